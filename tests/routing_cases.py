"""Hand-made routing results for backend tests: empty slots, idle experts, one expert taking every token."""

from __future__ import annotations

import torch

from c2r.routing import RoutingResult, count_tokens_per_expert


def make_routing(
    expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor, valid_TK: torch.Tensor, num_experts: int
) -> RoutingResult:
    weights_TK = torch.where(valid_TK, weights_TK, torch.zeros_like(weights_TK))
    return RoutingResult(
        expert_ids_TK=expert_ids_TK,
        weights_TK=weights_TK,
        valid_TK=valid_TK,
        aux_loss=torch.zeros(()),
        tokens_per_expert_E=count_tokens_per_expert(expert_ids_TK, valid_TK, num_experts),
        fixed_k=bool(valid_TK.all()),
    )


def random_routing(
    num_tokens: int,
    top_k: int,
    num_experts: int,
    *,
    empty_fraction: float = 0.0,
    idle_experts: int = 0,
    seed: int = 0,
    requires_grad: bool = False,
) -> RoutingResult:
    """Distinct experts per token drawn from the first ``num_experts - idle_experts`` experts (the rest get no
    token); each slot is empty with probability ``empty_fraction``."""
    g = torch.Generator().manual_seed(seed)
    usable = num_experts - idle_experts
    ids = torch.stack([torch.randperm(usable, generator=g)[:top_k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=g) + 0.1
    valid = torch.rand(num_tokens, top_k, generator=g) >= empty_fraction
    routing = make_routing(ids, weights, valid, num_experts)
    routing.weights_TK.requires_grad_(requires_grad)
    return routing


def all_to_one_expert(num_tokens: int, top_k: int, num_experts: int, expert: int = 0) -> RoutingResult:
    """Every token's first slot goes to ``expert``; its other slots are empty."""
    ids = torch.full((num_tokens, top_k), expert, dtype=torch.int64)
    valid = torch.zeros(num_tokens, top_k, dtype=torch.bool)
    valid[:, 0] = True
    return make_routing(ids, torch.rand(num_tokens, top_k) + 0.1, valid, num_experts)
