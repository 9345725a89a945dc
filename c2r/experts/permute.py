"""Ordering (token, slot) pairs by expert, the first step of every grouped backend.

Shape legend: the package legend (``c2r/__init__.py``), and P valid (token, slot) rows in expert order (permuted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from c2r.routing.result import RoutingResult, count_tokens_per_expert


@dataclass(frozen=True)
class ExpertOrder:
    """Valid (token, slot) pairs sorted by expert, and the metadata a grouped GEMM needs.

    Attributes:
        token_idx_P: which token each sorted row comes from.
        weight_P: its combine weight (float32).
        tokens_per_expert_E: rows per expert, int64; sums to S.
    """

    token_idx_P: torch.Tensor
    weight_P: torch.Tensor
    tokens_per_expert_E: torch.Tensor


def sort_by_expert(routing: RoutingResult, num_experts: int) -> ExpertOrder:
    ids_TK, valid_TK = routing.expert_ids_TK, routing.valid_TK
    top_k = ids_TK.shape[1]
    # Empty slots get key E, so they sort behind every real expert and can be cut off in one slice.
    keys = ids_TK.flatten() if routing.fixed_k else torch.where(valid_TK, ids_TK, num_experts).flatten()
    order = torch.argsort(keys, stable=True)
    if not routing.fixed_k:
        num_valid = int(valid_TK.sum())  # NOTE: host sync; only for routers with empty slots
        order = order[:num_valid]
    return ExpertOrder(
        token_idx_P=order // top_k,
        weight_P=routing.weights_TK.flatten()[order],
        tokens_per_expert_E=count_tokens_per_expert(ids_TK, valid_TK, num_experts),
    )


def combine(rows_PD: torch.Tensor, order: ExpertOrder, num_tokens: int) -> torch.Tensor:
    """Weighted sum of each token's expert outputs back in token order: out[t] = sum_s w_s * rows[s]."""
    weighted = rows_PD * order.weight_P.to(rows_PD.dtype).unsqueeze(1)
    out = rows_PD.new_zeros(num_tokens, rows_PD.shape[1])
    return out.index_add(0, order.token_idx_P, weighted)
