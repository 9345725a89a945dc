"""Expert compute backends behind one interface: ``backend(x_TD, routing, experts) -> out_TD``.

All backends read the same :class:`ExpertWeights`, so switching backends never changes a checkpoint.
"""

from __future__ import annotations

from typing import Protocol

import torch

from c2r.experts.config import ACTIVATIONS, BACKENDS, ExpertConfig
from c2r.experts.megablocks_backend import MegaBlocksBackend, megablocks_unavailable_reason
from c2r.experts.reference import ReferenceBackend
from c2r.experts.torch_backend import TorchBackend
from c2r.experts.weights import ExpertWeights
from c2r.routing.result import RoutingResult

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "ExpertBackend",
    "ExpertConfig",
    "ExpertWeights",
    "build_backend",
    "resolve_backend_name",
]


class ExpertBackend(Protocol):
    name: str

    def __call__(self, x_TD: torch.Tensor, routing: RoutingResult, experts: ExpertWeights) -> torch.Tensor: ...

    def grouped_mlp(
        self, x_PD: torch.Tensor, tokens_per_expert_E: torch.Tensor, experts: ExpertWeights
    ) -> torch.Tensor: ...


def resolve_backend_name(config: ExpertConfig, device: torch.device, dtype: torch.dtype) -> str:
    """``auto`` picks MegaBlocks where it can run (CUDA, bf16, installed), else torch."""
    if config.backend != "auto":
        return config.backend
    use_megablocks = (
        device.type == "cuda"
        and dtype == torch.bfloat16
        and config.megablocks_impl == "grouped"
        and megablocks_unavailable_reason() is None
    )
    return "megablocks" if use_megablocks else "torch"


def build_backend(name: str, config: ExpertConfig) -> ExpertBackend:
    if name == "reference":
        return ReferenceBackend()
    if name == "torch":
        return TorchBackend(config.torch_impl)
    if name == "megablocks":
        return MegaBlocksBackend(config.megablocks_impl)
    raise ValueError(f"expert backend {name!r} is not one of {list(BACKENDS)}")
