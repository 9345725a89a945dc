"""Top-k softmax router, the baseline every MoE system uses (docs/algorithms.md section 1).

Shape legend: T tokens, D hidden size, E experts, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from c2r.routing.balance import BatchBalancer
from c2r.routing.base import Router
from c2r.routing.config import RouterConfig
from c2r.routing.finite import FiniteLogitsCheck
from c2r.routing.losses import load_balancing_loss, router_z_loss
from c2r.routing.result import RoutingResult, count_tokens_per_expert
from c2r.routing.updates import all_reduce_sum


class TopKRouter(Router):
    """``p = softmax(x W^T)`` in float32; each token goes to its k most probable experts."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        config: RouterConfig | None = None,
        layer_index: int = 0,
    ):
        super().__init__()
        self.config = config or RouterConfig()
        self.config.check_fits(num_experts, top_k)
        self.num_experts = num_experts
        self.top_k = top_k
        self.layer_index = layer_index
        # Named "gate", never "expert": DeepSpeed's checkpointing treats any key containing "expert" as an expert.
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=0.02)
        self.finite_check = FiniteLogitsCheck(layer_index) if self.config.check_finite else None
        self.balancer = None
        if self.config.batch_balanced:
            self.balancer = BatchBalancer(num_experts, self.config.balance_rounds, self.config.balance_momentum)

    def gate_weight(self) -> torch.Tensor:
        """[logits, D]: the rows that score this router's choices (AdaMoE appends its null experts' rows)."""
        return self.gate.weight

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        weight = self.gate_weight()
        if self.config.logits_dtype == "float32":
            logits_TE = F.linear(x_TD.float(), weight.float())
        else:
            logits_TE = F.linear(x_TD, weight.to(x_TD.dtype)).float()
        if self.finite_check is not None:
            self.finite_check.observe(logits_TE)
        return logits_TE

    def logits_check(self) -> FiniteLogitsCheck | None:
        return self.finite_check

    def forward(self, x_TD: torch.Tensor) -> RoutingResult:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        scores_TE = probs_TE if self.balancer is None else self.balancer.selection_scores(logits_TE, self.top_k)
        return self.selection_result(logits_TE, probs_TE, scores_TE.topk(self.top_k, dim=-1).indices)

    @classmethod
    def update_after_step(cls, routers: list[TopKRouter], group=None) -> dict[str, float]:
        """Batch balancing: fold the step's solved biases, averaged over its batches and every rank, into the
        running bias (c2r/routing/balance.py). One small all-reduce per step for all balanced layers together."""
        balancers = [r.balancer for r in routers if r.balancer is not None]
        if not balancers:
            return {}
        # Every rank joins the all-reduce, also one that solved nothing this step (a batch of no tokens): count 0.
        rows = []
        for balancer in balancers:
            solved = balancer.take_solved()
            zeros_E = torch.zeros_like(balancer.bias_E)
            sum_E, count = solved if solved is not None else (zeros_E, 0)
            rows.append(torch.cat([sum_E.to(zeros_E.device), zeros_E.new_full((1,), float(count))]))
        totals = all_reduce_sum(torch.stack(rows), group)
        for balancer, row in zip(balancers, totals):
            # where no rank solved (count 0) the running bias stays; no host sync to find out
            mean_E = row[:-1] / row[-1].clamp_min(1)
            keep = torch.where(row[-1] > 0, balancer.momentum, 1.0)
            balancer.bias_E = keep * balancer.bias_E + (1 - keep) * mean_E
        return {}

    def selection_result(
        self,
        logits_TE: torch.Tensor,
        probs_TE: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        weights_TK: torch.Tensor | None = None,
        valid_TK: torch.Tensor | None = None,
    ) -> RoutingResult:
        """The routing result of a selection of softmax experts (every router built on this one ends here): by
        default every slot valid and weighted by its probability, renormalised over the slots when configured."""
        if weights_TK is None:
            weights_TK = probs_TE.gather(1, expert_ids_TK)
            if self.config.renormalize:
                weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        fixed_k = valid_TK is None
        tokens_per_expert_E = count_tokens_per_expert(expert_ids_TK, valid_TK, self.num_experts)
        num_pairs = expert_ids_TK.numel() if fixed_k else None  # known on the host: no device-side total
        if valid_TK is None:
            valid_TK = torch.ones_like(expert_ids_TK, dtype=torch.bool)
        return RoutingResult(
            expert_ids_TK=expert_ids_TK,
            weights_TK=weights_TK,
            valid_TK=valid_TK,
            aux_loss=self.aux_loss(logits_TE, probs_TE, tokens_per_expert_E, num_pairs),
            tokens_per_expert_E=tokens_per_expert_E,
            fixed_k=fixed_k,
        )

    def aux_loss(
        self,
        logits_TE: torch.Tensor,
        probs_TE: torch.Tensor,
        tokens_per_expert_E: torch.Tensor,
        num_pairs: int | None = None,
    ) -> torch.Tensor:
        """The weighted balance loss plus the weighted z-loss, each only where its weight is set (no zero tensor
        to add to: each term is a kernel launch the GPU waits on)."""
        terms = []
        if self.config.aux_loss_weight > 0:
            terms.append(load_balancing_loss(probs_TE, tokens_per_expert_E, num_pairs, self.config.aux_loss_weight))
        if self.config.z_loss_weight > 0:
            terms.append(self.config.z_loss_weight * router_z_loss(logits_TE))
        if not terms:
            return logits_TE.new_zeros(())
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]
