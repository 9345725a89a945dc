"""Group- (device-) limited routing (docs/algorithms.md section 3; DeepSeek-V2 section 2.2.2, DeepSeek-V3
section 2.1.2).

Experts are partitioned into G equal groups (by default the expert-parallel ranks of the layer's placement). A token
first keeps its M best groups, scored by the sum of the group's top-(k/M) scores, then takes its top-k experts
among the kept groups only, so it never reaches more than M ranks: fan-out is bounded by construction.

Shape legend: T tokens, D hidden size, E experts, K top-k, G groups, Y experts per group (E / G), M kept groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from c2r.routing.config import RouterConfig, check_groups_fit
from c2r.routing.result import RoutingResult
from c2r.routing.topk import TopKRouter
from c2r.routing.updates import all_reduce_sum


class GroupLimitedRouter(TopKRouter):
    """Top-k softmax routing restricted to the token's top-M expert groups.

    The selection uses ``p + b`` (``b``: DeepSeek-V3's auxiliary-loss-free balancing bias, kept in float32 and
    saved with the model; zero unless ``bias_update_rate`` > 0); the weights use the unbiased ``p`` of the selected
    experts, renormalised over them when ``renormalize`` (V3 always does). Non-kept groups are masked with -inf.
    Where k/M is not an integer the group score sums the top ceil(k/M) scores (our choice; the papers use k/M = 2).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, config: RouterConfig, layer_index: int = 0):
        super().__init__(hidden_size, num_experts, top_k, config, layer_index)
        self.max_groups = config.group_limited.max_groups
        self.bias_update_rate = config.group_limited.bias_update_rate
        self.selection_bias_E = torch.zeros(num_experts, dtype=torch.float32)  # extra state: not cast to bf16
        self._load_since_step_E: torch.Tensor | None = None
        # Without num_groups the groups are the expert-parallel ranks, known once the layer is sharded; until then
        # (and in a one-rank run) all experts share one group, which bounds fan-out to one rank trivially.
        groups = config.group_limited.num_groups or 1
        self.set_groups(
            [e // (num_experts // groups) for e in range(num_experts)], check=bool(config.group_limited.num_groups)
        )

    def set_groups(self, group_of_expert: Sequence[int], check: bool = True) -> None:
        """Group membership of each expert (equal-size groups); checks that M, k and the group sizes fit."""
        group_of_E = torch.as_tensor(list(group_of_expert), dtype=torch.int64)
        num_groups = int(group_of_E.max()) + 1
        sizes = torch.bincount(group_of_E, minlength=num_groups)
        if len(group_of_E) != self.num_experts or bool((sizes != sizes[0]).any()):
            raise ValueError(
                f"expert groups must be equal in size and cover {self.num_experts} experts; got sizes {sizes.tolist()}"
            )
        if check:
            check_groups_fit(self.num_experts, self.top_k, num_groups, self.max_groups)
        self.num_groups = num_groups
        self.register_buffer(
            "members_GY", torch.argsort(group_of_E, stable=True).view(num_groups, -1), persistent=False
        )
        self.register_buffer("group_of_E", group_of_E, persistent=False)

    def set_expert_placement(self, expert_to_rank: Sequence[int], num_ranks: int) -> None:
        """Group by rank of an expert-parallel placement, or by node (consecutive ranks) when ``num_groups`` is set."""
        groups = self.config.group_limited.num_groups or num_ranks
        if num_ranks % groups:
            raise ValueError(f"group_limited num_groups ({groups}) must divide the expert-parallel ranks ({num_ranks})")
        ranks_per_group = num_ranks // groups
        self.set_groups([rank // ranks_per_group for rank in expert_to_rank])

    def forward(self, x_TD: torch.Tensor) -> RoutingResult:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        scores_TE = probs_TE.detach()
        if self.bias_update_rate > 0:
            self.selection_bias_E = self.selection_bias_E.to(probs_TE.device)
            scores_TE = scores_TE + self.selection_bias_E
        expert_ids_TK = self.select(scores_TE)
        result = self.selection_result(logits_TE, probs_TE, expert_ids_TK)  # weights: the unbiased p
        if self.bias_update_rate > 0 and self.training:
            load = result.tokens_per_expert_E.detach()
            self._load_since_step_E = load if self._load_since_step_E is None else self._load_since_step_E + load
        return result

    def select(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """[T, E] selection scores -> [T, K] expert ids, all within the token's top-M groups."""
        if self.max_groups >= self.num_groups:
            return scores_TE.topk(self.top_k, dim=-1).indices
        per_group = math.ceil(self.top_k / self.max_groups)
        group_score_TG = scores_TE[:, self.members_GY].topk(per_group, dim=-1).values.sum(dim=-1)  # [T, G, Y] -> [T, G]
        kept_TM = group_score_TG.topk(self.max_groups, dim=-1).indices
        kept_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, kept_TM, True)
        masked_TE = scores_TE.masked_fill(~kept_TG[:, self.group_of_E], float("-inf"))
        return masked_TE.topk(self.top_k, dim=-1).indices

    @classmethod
    def update_after_step(cls, routers: list[GroupLimitedRouter], group=None) -> dict[str, float]:
        """``b_e += gamma * sign(mean_load - load_e)`` with the load summed over every rank since the last step."""
        active = [r for r in routers if r.bias_update_rate > 0 and r._load_since_step_E is not None]
        if not active:
            return {}
        loads_LE = all_reduce_sum(torch.stack([r._load_since_step_E.float() for r in active]), group)
        for router, load_E in zip(active, loads_LE, strict=True):
            step = router.bias_update_rate * torch.sign(load_E.mean() - load_E)
            router.selection_bias_E = router.selection_bias_E.to(load_E.device) + step
            router._load_since_step_E = None
        return {"group_limited_max_bias": max(float(r.selection_bias_E.abs().max()) for r in active)}

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        return {"selection_bias_E": self.selection_bias_E.detach().float().cpu()}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.selection_bias_E = state["selection_bias_E"].float()
