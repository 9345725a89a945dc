"""Routers: each maps hidden states to a :class:`RoutingResult` (expert ids, weights, validity, aux loss, stats).

One router per module: ``topk`` (the baseline), ``c2r`` (collaboration-constrained), ``group_limited``
(device-limited, DeepSeek), ``adamoe`` (null experts), ``remoe`` (ReLU gates), ``adak`` (learned per-token k),
``scored`` (pretrained routers' rules: sigmoid scores, a selection bias, fixed expert groups, a routed scale).
Every router derives from :class:`Router`, which declares the optional hooks callers use, with no-op defaults.
Routers with state that changes once per optimizer step (ReMoE's lambda, the group-limited bias, AdaMoE's loss
schedule) are updated by :func:`after_optimizer_step`, which the trainer calls on every rank.
"""

from __future__ import annotations

import importlib

from c2r.routing.base import Router
from c2r.routing.config import ROUTER_KINDS, RouterConfig
from c2r.routing.result import RoutingResult, count_tokens_per_expert
from c2r.routing.topk import TopKRouter
from c2r.routing.updates import after_optimizer_step

__all__ = [
    "ROUTER_KINDS",
    "Router",
    "RouterConfig",
    "RoutingResult",
    "TopKRouter",
    "after_optimizer_step",
    "build_router",
    "count_tokens_per_expert",
]

# kind -> (module, class); imported on first use so a router's dependencies load only when it is picked.
ROUTER_CLASSES = {
    "topk": ("c2r.routing.topk", "TopKRouter"),
    "c2r": ("c2r.routing.c2r", "C2RRouter"),
    "group_limited": ("c2r.routing.group_limited", "GroupLimitedRouter"),
    "adamoe": ("c2r.routing.adamoe", "AdaMoERouter"),
    "remoe": ("c2r.routing.remoe", "ReMoERouter"),
    "adak": ("c2r.routing.adak", "AdaKRouter"),
    "scored": ("c2r.routing.scored", "ScoredRouter"),
}


def router_class(kind: str) -> type[Router]:
    if kind not in ROUTER_CLASSES:
        raise ValueError(f"router kind {kind!r} is not one of {list(ROUTER_KINDS)}")
    module, name = ROUTER_CLASSES[kind]
    return getattr(importlib.import_module(module), name)


def build_router(hidden_size: int, num_experts: int, top_k: int, config: RouterConfig, layer_index: int = 0) -> Router:
    """The router ``config.kind`` for one MoE layer; ``layer_index`` is the layer's position among MoE layers
    (C2R's collaborator lists are per layer)."""
    config.check_fits(num_experts, top_k)
    return router_class(config.kind)(hidden_size, num_experts, top_k, config, layer_index=layer_index)
