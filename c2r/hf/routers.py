"""Which router a converted block gets, and how it starts from the pretrained one.

``None`` asks for the model's own routing (its :class:`~c2r.hf.architectures.Architecture` ``native_router``);
any other :class:`RouterConfig` switches the block to that router, its gate rows copied from the pretrained router
and its own conversion hook run (AdaMoE's ``init_from_pretrained`` seeds the null experts from the gate).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from c2r.routing import RouterConfig


def routing_signature(config: RouterConfig) -> tuple:
    """What decides a router's function (not its losses or numerics): equal signatures route identically."""
    signature: tuple = (config.kind, config.renormalize, config.batch_balanced)
    if config.kind == "scored":
        g = config.group_limited
        groups = (g.num_groups, g.max_groups) if g.max_groups < g.num_groups else "no group limit"
        signature += (dataclasses.astuple(config.scored), groups)
    return signature


def same_routing(a: RouterConfig, b: RouterConfig) -> bool:
    return routing_signature(a) == routing_signature(b)


def describe(config: RouterConfig) -> str:
    if config.kind != "scored":
        balanced = ", batch-balanced selection" if config.batch_balanced else ""
        return f"{config.kind} (renormalize={config.renormalize}{balanced})"
    s, g = config.scored, config.group_limited
    return (
        f"scored ({s.score_function}, renormalize={config.renormalize}, routed_scaling_factor="
        f"{s.routed_scaling_factor}, {g.max_groups} of {g.num_groups or 1} groups)"
    )


def block_router_config(native: RouterConfig, router: RouterConfig | None, aux_loss_weight: float | None):
    """The router config of one block: the native one unless ``router`` is given; ``aux_loss_weight`` overrides."""
    config = dataclasses.replace(router or native)
    if aux_loss_weight is not None:
        config.aux_loss_weight = aux_loss_weight
    return config


@torch.no_grad()
def init_from_hf_router(router: nn.Module, hf_router: nn.Module, native: RouterConfig) -> None:
    """Start ``router`` (ours, any kind) from the pretrained Hugging Face router."""
    router.gate.weight.copy_(hf_router.weight)
    bias_E = getattr(hf_router, "e_score_correction_bias", None)
    if bias_E is not None and hasattr(router, "selection_bias_E"):
        router.selection_bias_E = bias_E.detach().float().clone()
    router.init_from_pretrained({"kind": native.kind})
