"""Ada-K's training objective as pure tensor functions (docs/adak.md): P-Warm labels and the calibration
of p, the PPO clipped objective with per-layer advantages, and the expected-k penalty. ``c2r-adak``
(c2r/adak_train.py) runs them on a frozen model.

Shape legend: B batch, S sequence length, T = B * S tokens, V vocabulary, E experts, N largest k, L MoE layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from c2r.routing.adak import Allocation
from c2r.routing.updates import all_reduce_sum


def token_log_likelihood(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """``log p(target)`` of every token, float32, shape [T] in the routers' token order (row-major B, S)."""
    return -F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten(), reduction="none")


def pwarm_labels_from_cumsum(cum_TE: torch.Tensor, p: float, max_k: int) -> torch.Tensor:
    """The smallest k whose sorted probabilities sum to >= p, from their running sums; clipped to ``max_k``."""
    return ((cum_TE < p).sum(dim=-1) + 1).clamp(max=max_k)


def sorted_cumsum(router_probs_TE: torch.Tensor) -> torch.Tensor:
    """Running sums of each token's router probabilities, largest first, shape [T, E]."""
    return router_probs_TE.sort(dim=-1, descending=True).values.cumsum(dim=-1)


def pwarm_labels(router_probs_TE: torch.Tensor, p: float, max_k: int) -> torch.Tensor:
    """P-Warm's label of every token: the smallest k with ``sum of its top-k router probabilities >= p``.

    Example: probabilities (0.5, 0.3, 0.2) and p = 0.6 give k = 2 (0.5 < 0.6 <= 0.8).
    """
    return pwarm_labels_from_cumsum(sorted_cumsum(router_probs_TE), p, max_k)


def mean_pwarm_label(cums_TE: list[torch.Tensor], p: float, max_k: int, group=None) -> float:
    """Mean P-Warm label over all tokens and layers given, summed over ``group`` (every rank's tokens)."""
    total_count = torch.zeros(2, dtype=torch.float64, device=cums_TE[0].device)
    for cum_TE in cums_TE:
        total_count[0] += pwarm_labels_from_cumsum(cum_TE, p, max_k).sum()
        total_count[1] += cum_TE.shape[0]
    all_reduce_sum(total_count, group)
    return float(total_count[0] / total_count[1])  # NOTE: host sync, once per bisection step


def calibrate_pwarm_p(
    router_probs: list[torch.Tensor], target_k: float, max_k: int, iters: int = 40, group=None
) -> tuple[float, float]:
    """Bisection over p in [0, 1] for the p whose mean P-Warm label is closest to ``target_k``; returns (p, mean).

    The mean label is a non-decreasing step function of p (1 at p = 0), so the bisection keeps
    ``mean(lo) < target <= mean(hi)`` and returns whichever end lies nearer the target.
    """
    cums = [sorted_cumsum(probs) for probs in router_probs]
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if mean_pwarm_label(cums, mid, max_k, group) < target_k:
            lo = mid
        else:
            hi = mid
    mean_lo, mean_hi = (mean_pwarm_label(cums, p, max_k, group) for p in (lo, hi))
    return (lo, mean_lo) if abs(mean_lo - target_k) < abs(mean_hi - target_k) else (hi, mean_hi)


def pwarm_loss(allocations: list[Allocation], labels: list[torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the allocators against the P-Warm labels, averaged over tokens and layers."""
    losses = [F.nll_loss(a.log_probs_TJ, k_T - 1) for a, k_T in zip(allocations, labels)]
    return torch.stack(losses).mean()


def layer_advantages(reward_T: torch.Tensor, baseline_T: torch.Tensor, num_layers: int, gamma: float) -> torch.Tensor:
    """``A_l = gamma^(L - l) * (reward - baseline)`` for MoE layers l = 1..L, shape [L, T] (the last layer gets 1)."""
    exponent_L = torch.arange(num_layers - 1, -1, -1, device=reward_T.device, dtype=torch.float32)
    return (gamma**exponent_L).unsqueeze(1) * (reward_T - baseline_T).unsqueeze(0)


def ppo_clip_loss(
    log_prob_new_T: torch.Tensor, log_prob_old_T: torch.Tensor, advantage_T: torch.Tensor, clip_eps: float
) -> torch.Tensor:
    """``-mean(min(r A, clip(r, 1 - eps, 1 + eps) A))`` with ``r = P_new(k) / P_old(k)`` (to be minimised)."""
    ratio_T = (log_prob_new_T - log_prob_old_T).exp()
    surrogate_T = torch.minimum(ratio_T * advantage_T, ratio_T.clamp(1 - clip_eps, 1 + clip_eps) * advantage_T)
    return -surrogate_T.mean()


def expected_k(log_probs_TN: torch.Tensor) -> torch.Tensor:
    """``sum_n n P(n)`` averaged over tokens: the allocator's expected number of experts."""
    k_N = torch.arange(1, log_probs_TN.shape[1] + 1, device=log_probs_TN.device, dtype=log_probs_TN.dtype)
    return (log_probs_TN.exp() * k_N).sum(dim=-1).mean()


def ppo_objective(
    allocations: list[Allocation],
    log_prob_old_LT: list[torch.Tensor],
    advantage_LT: torch.Tensor,
    clip_eps: float,
    k_penalty: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss to minimise: ``(1/L) sum_l PPO-clip_l + lambda * (1/L) sum_l sum_n n P_l(n)``."""
    num_layers = len(allocations)
    clip_terms, k_terms, clipped = [], [], []
    for a, old_T, adv_T in zip(allocations, log_prob_old_LT, advantage_LT):
        new_T = a.log_prob_T
        clip_terms.append(ppo_clip_loss(new_T, old_T, adv_T, clip_eps))
        k_terms.append(expected_k(a.log_probs_TJ))
        clipped.append(((new_T - old_T).exp().detach() - 1).abs().gt(clip_eps).float().mean())
    expected = torch.stack(k_terms).sum() / num_layers
    loss = torch.stack(clip_terms).sum() / num_layers + k_penalty * expected
    return loss, {"expected_k": expected.detach(), "clip_fraction": torch.stack(clipped).mean()}
