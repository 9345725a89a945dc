"""Router auxiliary losses (docs/algorithms.md section 1)."""

from __future__ import annotations

import torch


def load_balancing_loss(
    probs_TE: torch.Tensor, tokens_per_expert_E: torch.Tensor, num_pairs: int | None = None, weight: float = 1.0
) -> torch.Tensor:
    """Switch/GShard balance loss times ``weight``: ``weight * E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of routed (token, slot) pairs that went to expert e (a count: no gradient) and ``P_e``
    the mean router probability of e over tokens. Equals 1 for a perfectly uniform router. ``num_pairs``: the
    routed pairs when the caller knows them (a fixed k: T * k), which saves the device-side total; the loss is a
    handful of tiny kernels, each launched from the host while the GPU waits, so fewer is faster.
    """
    num_experts = probs_TE.shape[-1]
    P_E = probs_TE.sum(dim=0) / max(probs_TE.shape[0], 1)  # not .mean: an empty batch (T = 0) gives 0, not NaN
    if num_pairs is None:
        f_E = tokens_per_expert_E.to(P_E.dtype) / tokens_per_expert_E.sum().clamp(min=1)
        scale = num_experts * weight
    else:
        f_E = tokens_per_expert_E.to(P_E.dtype)
        scale = num_experts * weight / max(num_pairs, 1)
    return torch.dot(f_E.detach(), P_E) * scale


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss without its coefficient: ``mean(logsumexp(logits)^2)`` (0 for an empty batch)."""
    return torch.logsumexp(logits_TE, dim=-1).square().sum() / max(logits_TE.shape[0], 1)
