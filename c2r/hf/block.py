"""The module that takes a Hugging Face MoE block's place: our MoELayer (router, ExpertWeights, backends), plus the
block's shared experts kept as they were, returning what the decoder layer expects (the hidden states only, as
every 5.x block does).

A trainer reads the routing of the last forward from ``block.last_routing`` (and :func:`aux_loss` sums the
layers' aux losses). Hugging Face's own ``output_router_logits`` keeps working for the model's own router: the
block passes its router logits through ``router_logits`` (an identity module) where transformers' output
recorder can hook them.

Shape legend: B batch, S sequence length, T tokens (B * S), D hidden size, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from c2r.hf.architectures import Architecture
from c2r.hf.routers import same_routing
from c2r.moe import MoELayer
from c2r.routing import RouterConfig, RoutingResult
from placement.layout import ExpertLayout


class RouterLogitsTap(nn.Module):
    """Identity: transformers records ``router_logits`` with a forward hook on a module's output."""

    def forward(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return logits_TE


class HFMoEBlock(nn.Module):
    """A converted Hugging Face MoE block. Holds this rank's experts only (``local_experts``, logical ids in slot
    order of ``layout``); with more than one rank it needs a dispatcher (:func:`c2r.hf.attach_expert_parallel`)."""

    def __init__(
        self,
        arch: Architecture,
        moe: MoELayer,
        layout: ExpertLayout,
        ep_rank: int,
        shared: dict[str, nn.Module],
        native_router: RouterConfig,
        native_top_k: int,
        jitter_noise: float = 0.0,
    ):
        super().__init__()
        self.jitter_noise = jitter_noise  # Mixtral's router_jitter_noise: the block's input scaled in training
        self.arch = arch
        self.moe = moe
        for name, module in shared.items():
            self.add_module(name, module)
        self.layout = layout
        self.ep_rank = ep_rank
        self.local_experts = layout.local_experts(ep_rank)
        self.native_router = native_router  # the model's own routing, and its k: what export can express
        self.native_top_k = native_top_k
        # The logits Hugging Face's aux loss expects are over the E routed experts and the model's own scoring:
        # recorded for the native router only (a switched router's aux loss is in ``last_routing``).
        native = same_routing(moe.config.router, native_router) and moe.config.top_k == native_top_k
        self.router_logits = RouterLogitsTap() if native else None
        self.last_routing: RoutingResult | None = None

    @property
    def layer(self) -> MoELayer:
        """Our MoE layer; under DeepSpeed ``moe`` is DeepSpeed's MoE module holding it
        (c2r.deepspeed.wrap_moe_layers), whose forward is the layer's."""
        return self.moe if isinstance(self.moe, MoELayer) else self.moe.deepspeed_moe

    @property
    def router(self) -> nn.Module:
        return self.layer.router

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.layout.num_ranks > 1 and self.layer.dispatcher is None:
            raise RuntimeError(
                f"this MoE block holds {len(self.local_experts)} of {self.layout.num_experts} experts (ep rank "
                f"{self.ep_rank} of {self.layout.num_ranks}): call c2r.hf.attach_expert_parallel(model) first"
            )
        if self.training and self.jitter_noise > 0:  # as Hugging Face's block: the same draws under the same seed
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        out_TD, routing = self.moe(x_TD)
        self.last_routing = routing
        if self.router_logits is not None:
            self.router_logits(F.linear(x_TD, self.router.gate.weight.to(x_TD.dtype)))
        shared = [getattr(self, name) for name in self.arch.shared_attrs if name != self.arch.shared_gate_attr]
        if shared:
            shared_TD = shared[0](x_TD)
            if self.arch.shared_gate_attr is not None:
                shared_TD = torch.sigmoid(getattr(self, self.arch.shared_gate_attr)(x_TD)) * shared_TD
            out_TD = out_TD + shared_TD
        return out_TD.view(hidden_states.shape)

    def hf_router_state(self) -> dict[str, torch.Tensor]:
        """The router's tensors under the Hugging Face block's names (relative to the block)."""
        state = {f"{self.arch.router_attr}.weight": self.router.gate.weight.detach()}
        if self.arch.router_bias:
            state[f"{self.arch.router_attr}.e_score_correction_bias"] = self.router.selection_bias_E.detach().float()
        return state

    @torch.no_grad()
    def load_hf_router_tensor(self, name: str, tensor: torch.Tensor) -> bool:
        """Copy a Hugging Face router tensor (``name`` relative to the block); False if ``name`` is not one."""
        if name == f"{self.arch.router_attr}.weight":
            self.router.gate.weight.copy_(tensor)
            return True
        if self.arch.router_bias and name == f"{self.arch.router_attr}.e_score_correction_bias":
            if hasattr(self.router, "selection_bias_E"):  # routers without a selection bias have no use for it
                self.router.selection_bias_E = tensor.detach().float().clone()
            return True
        return False


def converted_blocks(model: nn.Module) -> list[tuple[str, HFMoEBlock]]:
    """(name, block) of every converted block, in depth order (the MoE layer index)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, HFMoEBlock)]


def routing_results(model: nn.Module) -> list[RoutingResult | None]:
    """Each converted block's routing of the last forward."""
    return [block.last_routing for _, block in converted_blocks(model)]


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the converted blocks' router aux losses of the last forward (already weighted): add it to the loss."""
    losses = [r.aux_loss for r in routing_results(model) if r is not None]
    if not losses:
        raise RuntimeError(f"{type(model).__name__}: no converted MoE block has run a forward yet")
    return torch.stack(losses).sum()


def attach_expert_parallel(
    model: nn.Module, group=None, mode: str = "per-expert", observers=None, ranks_per_node: int | None = None
) -> None:
    """Give every converted block of a model loaded with ``ep_size`` > 1 its all-to-all dispatcher over ``group``
    (default: the world), with the layout it was loaded with; call once torch.distributed is initialised.
    ``observers``: one ``DispatchObserver`` per MoE block (the communication profiler's), default none.
    ``ranks_per_node``: ranks per node (default: the launcher's local world size); per-node dispatch groups by it."""
    from c2r.parallel import build_dispatcher
    from c2r.parallel.dispatch import NO_OBSERVER
    from c2r.parallel.nodes import make_node_groups, resolve_ranks_per_node

    blocks = converted_blocks(model)
    if blocks:
        ranks_per_node = resolve_ranks_per_node(ranks_per_node, blocks[0][1].layout.num_ranks)
    node_groups = make_node_groups(ranks_per_node, group) if blocks and mode == "per-node" else None  # once
    if observers is not None and len(observers) != len(blocks):
        raise ValueError(f"{len(observers)} dispatch observers given but the model has {len(blocks)} MoE blocks")
    for index, (name, block) in enumerate(blocks):
        observer = observers[index] if observers else NO_OBSERVER
        dispatcher = build_dispatcher(mode, block.layout, group, observer, ranks_per_node, node_groups)
        if dispatcher.rank != block.ep_rank:
            raise ValueError(
                f"{name} was loaded for ep rank {block.ep_rank}, but this process is rank {dispatcher.rank}"
            )
        block.layer.dispatcher = dispatcher
        block.router.set_expert_placement(block.layout.expert_to_rank, block.layout.num_ranks)
