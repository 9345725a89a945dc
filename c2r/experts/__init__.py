"""Expert compute backends behind one interface: ``backend(x_TD, routing, experts) -> out_TD``.

All backends read the same :class:`ExpertWeights`, so switching backends never changes a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch

from c2r.experts.backend_choice import device_family, nearest_measurement
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
    "ExpertShape",
    "ExpertWeights",
    "build_backend",
    "resolve_expert_config",
]


class ExpertBackend(Protocol):
    name: str

    def __call__(self, x_TD: torch.Tensor, routing: RoutingResult, experts: ExpertWeights) -> torch.Tensor: ...

    def grouped_mlp(
        self,
        x_PD: torch.Tensor,
        tokens_per_expert_E: torch.Tensor,
        experts: ExpertWeights,
        host_counts: list[int] | None = None,
    ) -> torch.Tensor:
        """The expert MLPs on rows already sorted by expert. ``host_counts``: the same counts as Python ints where
        the caller already has them on the host (the expert-parallel dispatcher does: they came with its one count
        exchange), so that a backend that needs them there (MegaBlocks' grouped_gemm, the segment loop) does not
        sync with the GPU a second time."""
        ...


@dataclass(frozen=True)
class ExpertShape:
    """What the backend choice looks at: experts on this rank, hidden size, expert FFN width."""

    num_experts: int
    hidden_size: int
    ffn_hidden_size: int


def resolve_expert_config(
    config: ExpertConfig, device: torch.device, dtype: torch.dtype, shape: ExpertShape | None = None
) -> ExpertConfig:
    """The configuration a layer actually computes with: ``auto`` resolved. On a CUDA GPU in bf16 with MegaBlocks
    installed, the contender that measured fastest for the nearest recorded shape (c2r/experts/backend_choice.py:
    ``megablocks`` grouped_gemm, ``torch``, or MegaBlocks' permutation around torch._grouped_mm); MegaBlocks'
    grouped path where no shape is given or nothing was recorded for this GPU; torch everywhere else."""
    if config.backend != "auto":
        return config
    use_megablocks = (
        device.type == "cuda"
        and dtype == torch.bfloat16
        and config.megablocks_impl == "grouped"
        and megablocks_unavailable_reason() is None
    )
    if not use_megablocks:
        return replace(config, backend="torch")
    grouped = replace(config, backend="megablocks")
    if shape is None:
        return grouped
    family = device_family(torch.cuda.get_device_capability(device))
    row = nearest_measurement(family, config.activation, shape.num_experts, shape.hidden_size, shape.ffn_hidden_size)
    if row is None or row.fastest == "megablocks":
        return grouped
    # torch._grouped_mm needs 16-byte aligned rows; MegaBlocks does not.
    per_16_bytes = 16 // (torch.finfo(dtype).bits // 8)
    aligned = shape.hidden_size % per_16_bytes == 0 and shape.ffn_hidden_size % per_16_bytes == 0
    if not (hasattr(torch, "_grouped_mm") and aligned):
        return grouped
    if row.fastest == "torch":
        return replace(config, backend="torch")
    return replace(config, backend="megablocks", megablocks_impl="grouped_mm")


def build_backend(name: str, config: ExpertConfig) -> ExpertBackend:
    if name == "reference":
        return ReferenceBackend()
    if name == "torch":
        return TorchBackend(config.torch_impl)
    if name == "megablocks":
        return MegaBlocksBackend(config.megablocks_impl)
    raise ValueError(f"expert backend {name!r} is not one of {list(BACKENDS)}")
