"""Routers: each maps hidden states to a :class:`RoutingResult` (expert ids, weights, validity, aux loss, stats)."""

from __future__ import annotations

from torch import nn

from c2r.routing.config import ROUTER_KINDS, RouterConfig
from c2r.routing.result import RoutingResult, count_tokens_per_expert
from c2r.routing.topk import TopKRouter

__all__ = ["ROUTER_KINDS", "RouterConfig", "RoutingResult", "TopKRouter", "build_router", "count_tokens_per_expert"]


def build_router(hidden_size: int, num_experts: int, top_k: int, config: RouterConfig) -> nn.Module:
    if config.kind == "topk":
        return TopKRouter(hidden_size, num_experts, top_k, config)
    raise ValueError(f"router kind {config.kind!r} is not one of {list(ROUTER_KINDS)}")
