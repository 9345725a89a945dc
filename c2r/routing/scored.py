"""Scored top-k: the routing rules of pretrained models that plain top-k softmax does not cover (DeepSeek-V3
section 2.1.2, DeepSeek-V2 section 2.2.2), so a converted Hugging Face model computes its own function.

1. Scores ``s = softmax(x W^T)`` or ``sigmoid(x W^T)`` in float32.
2. Selection on ``s + b`` (``b``: a per-expert bias used for choosing only; DeepSeek-V3's
   ``e_score_correction_bias``, updated aux-loss-free when ``group_limited.bias_update_rate`` > 0): keep the
   token's best M of G groups (a group scores the sum of its best ``group_score_top`` entries), then top-k within.
3. Weights: the unbiased ``s`` of the selected experts, renormalised (``renormalize``, with ``norm_epsilon`` in the
   denominator) and multiplied by ``routed_scaling_factor``.

The groups are contiguous blocks of expert ids, as the pretrained model defines them; a placement never changes
them (DeepSeek places one group per node, but the function must not depend on where experts live).

Shape legend: T tokens, D hidden size, E experts, K top-k, G groups, S experts per group (E / G), M kept groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from c2r.routing.config import RouterConfig
from c2r.routing.group_limited import GroupLimitedRouter
from c2r.routing.result import RoutingResult


class ScoredRouter(GroupLimitedRouter):
    """Group-limited top-k with a score function, an always-applied selection bias and a routed scale.

    Shares the group-limited router's groups, selection bias (saved as extra state, float32) and its aux-loss-free
    bias update; the balance loss (``aux_loss_weight``) uses the scores normalised over experts.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, config: RouterConfig, layer_index: int = 0):
        super().__init__(hidden_size, num_experts, top_k, config, layer_index)
        scored = config.scored
        self.score_function = scored.score_function
        self.routed_scaling_factor = scored.routed_scaling_factor
        self.group_score_top = scored.group_score_top or math.ceil(top_k / self.max_groups)
        self.norm_epsilon = scored.norm_epsilon

    def set_expert_placement(self, expert_to_rank: Sequence[int], num_ranks: int) -> None:
        """No-op: the groups are the model's own (see the module docstring), not the placement's ranks."""

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return logits_TE.sigmoid() if self.score_function == "sigmoid" else logits_TE.softmax(dim=-1)

    def forward(self, x_TD: torch.Tensor) -> RoutingResult:
        logits_TE = self.logits(x_TD)
        scores_TE = self.scores(logits_TE)
        self.selection_bias_E = self.selection_bias_E.to(scores_TE.device)
        expert_ids_TK = self.select(scores_TE.detach() + self.selection_bias_E)
        weights_TK = scores_TE.gather(1, expert_ids_TK)
        if self.config.renormalize:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + self.norm_epsilon)
        weights_TK = weights_TK * self.routed_scaling_factor
        probs_TE = scores_TE if self.score_function == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)
        result = self.selection_result(logits_TE, probs_TE, expert_ids_TK, weights_TK)
        if self.bias_update_rate > 0 and self.training:
            load = result.tokens_per_expert_E.detach()
            self._load_since_step_E = load if self._load_since_step_E is None else self._load_since_step_E + load
        return result

    def select(self, choice_TE: torch.Tensor) -> torch.Tensor:
        """[T, E] selection scores -> [T, K] expert ids within the token's best M groups (others masked, -inf)."""
        if self.max_groups >= self.num_groups:
            return choice_TE.topk(self.top_k, dim=-1).indices
        group_TG = choice_TE[:, self.members_GY].topk(self.group_score_top, dim=-1).values.sum(dim=-1)
        kept_TG = torch.zeros_like(group_TG, dtype=torch.bool)
        kept_TG.scatter_(1, group_TG.topk(self.max_groups, dim=-1).indices, True)
        masked_TE = choice_TE.masked_fill(~kept_TG[:, self.group_of_E], float("-inf"))
        return masked_TE.topk(self.top_k, dim=-1).indices

    @torch.no_grad()
    def set_selection_bias(self, bias_E: torch.Tensor) -> None:
        """Load a pretrained selection bias (DeepSeek-V3's ``e_score_correction_bias``), kept in float32."""
        if bias_E.shape != (self.num_experts,):
            raise ValueError(f"selection bias has shape {tuple(bias_E.shape)}, expected ({self.num_experts},)")
        self.selection_bias_E = bias_E.detach().float().clone()
