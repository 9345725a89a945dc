"""The dropless MoE layer: router -> sort tokens by expert -> expert MLPs -> combine. No capacity, no dropped
tokens; empty routing slots cost nothing.

Shape legend: B batch, S sequence length, T = B * S tokens, D hidden size, E experts, K slots per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from c2r.config_utils import require_positive
from c2r.experts import (
    ExpertBackend,
    ExpertConfig,
    ExpertShape,
    ExpertWeights,
    build_backend,
    resolve_expert_config,
)
from c2r.routing import RouterConfig, RoutingResult, build_router


@dataclass
class MoEConfig:
    """One MoE layer: how many experts, how big, how tokens are routed and how experts compute."""

    num_experts: int = 8
    top_k: int = 2
    ffn_hidden_size: int = 256
    router: RouterConfig = field(default_factory=RouterConfig)
    experts: ExpertConfig = field(default_factory=ExpertConfig)

    def __post_init__(self) -> None:
        require_positive(num_experts=self.num_experts, top_k=self.top_k, ffn_hidden_size=self.ffn_hidden_size)
        self.router.check_fits(self.num_experts, self.top_k)
        self.experts.check_fits(self.ffn_hidden_size)


class MoELayer(nn.Module):
    """Drop-in replacement for a transformer MLP: ``y, routing = layer(x)`` with ``x`` of shape [..., D]."""

    def __init__(
        self,
        hidden_size: int,
        config: MoEConfig,
        output_init_std: float = 0.02,
        layer_index: int = 0,
        num_local_experts: int | None = None,
    ):
        """``layer_index``: the layer's position among the model's MoE layers (C2R's lists are per layer).
        ``num_local_experts``: allocate only this many experts (an expert-parallel rank's share, filled by the
        caller) instead of all ``num_experts``."""
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size
        self.router = build_router(hidden_size, config.num_experts, config.top_k, config.router, layer_index)
        self.experts = ExpertWeights(
            config.num_experts if num_local_experts is None else num_local_experts,
            hidden_size,
            config.ffn_hidden_size,
            config.experts.activation,
            output_init_std=output_init_std,
        )
        self._backends: dict[tuple[str, str], ExpertBackend] = {}
        # Set by c2r.parallel.shard_experts: then ``experts`` holds this rank's experts only.
        self.dispatcher = None
        if config.experts.backend != "auto":
            self._backend(config.experts)  # fail at construction, not at the first step

    def _backend(self, config: ExpertConfig) -> ExpertBackend:
        key = (config.backend, config.megablocks_impl)
        if key not in self._backends:
            self._backends[key] = build_backend(config.backend, config)
        return self._backends[key]

    def backend_for(self, x: torch.Tensor) -> ExpertBackend:
        shape = ExpertShape(self.experts.num_experts, self.hidden_size, self.config.ffn_hidden_size)
        return self._backend(resolve_expert_config(self.config.experts, x.device, x.dtype, shape))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingResult]:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"input hidden size {x.shape[-1]} does not match the layer's hidden size "
                f"{self.hidden_size} (input shape {tuple(x.shape)})"
            )
        # Contiguous: MegaBlocks' gather kernels take rows as D elements apart (a slice of a wider tensor is not).
        x_TD = x.reshape(-1, self.hidden_size).contiguous()
        routing = self.router(x_TD)
        backend = self.backend_for(x_TD)
        if self.dispatcher is None:
            out_TD = backend(x_TD, routing, self.experts)
        else:
            out_TD = self.dispatcher(x_TD, routing, backend, self.experts)
        return out_TD.view(x.shape), routing

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A clearer message than torch's generic size mismatch: name the shapes the layer was built with.
        for name in ("w1", "v1", "w2"):
            key = f"{prefix}experts.{name}"
            ours = getattr(self.experts, name)
            if key in state_dict and ours is not None and state_dict[key].shape != ours.shape:
                E, F, D = self.experts.num_experts, self.config.ffn_hidden_size, self.hidden_size
                raise ValueError(
                    f"checkpoint tensor {key} has shape {tuple(state_dict[key].shape)} but this layer "
                    f"has num_experts={E}, ffn_hidden_size={F}, hidden_size={D}, i.e. "
                    f"{tuple(ours.shape)} = [E*F, D]"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
