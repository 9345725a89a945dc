"""Router auxiliary losses (docs/algorithms.md section 1)."""

from __future__ import annotations

import torch


def load_balancing_loss(probs_TE: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Switch/GShard balance loss without its coefficient: ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of routed (token, slot) pairs that went to expert e (a count: no gradient) and ``P_e``
    the mean router probability of e over tokens. Equals 1 for a perfectly uniform router.
    """
    num_experts = probs_TE.shape[-1]
    total = tokens_per_expert_E.sum().clamp(min=1)
    f_E = tokens_per_expert_E.to(probs_TE.dtype) / total
    P_E = probs_TE.mean(dim=0)
    return num_experts * torch.sum(f_E.detach() * P_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss without its coefficient: ``mean(logsumexp(logits)^2)``."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()
