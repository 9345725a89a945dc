"""AdaMoE: null experts make k per token adaptive (docs/algorithms.md section 4; Zeng et al., Findings of EMNLP 2024,
arXiv 2406.13233).

The router scores E true experts plus m null experts and takes the top-k of all E + m. Null slots are empty slots of
the routing result: they never enter dispatch, so they cost no FLOPs and no bytes. A token whose top-k holds r nulls
uses k - r true experts; a token that picks only nulls skips the layer (zero MoE output).

Shape legend: T tokens, D hidden size, E true experts, U = E + m true and null experts, K top-k.
"""

from __future__ import annotations

import torch
from torch import nn

from c2r.routing.config import RouterConfig
from c2r.routing.losses import router_z_loss
from c2r.routing.result import RoutingResult, count_tokens_per_expert
from c2r.routing.topk import TopKRouter


def null_aware_balance_loss(probs_TU: torch.Tensor, selected_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """AdaMoE's balance loss without its coefficient: ``(E + m) * sum_i f~_i * P_i`` over all E + m experts.

    ``f_i`` is the fraction of the T*K selections that went to i (no gradient); every null expert gets the mean of
    the nulls' f (nulls are not pushed to balance among themselves); ``P_i`` is the mean probability of i.
    """
    total = probs_TU.shape[-1]
    every_TK = torch.ones_like(selected_TK, dtype=torch.bool)
    f_U = count_tokens_per_expert(selected_TK, every_TK, total).to(probs_TU.dtype) / max(selected_TK.numel(), 1)
    f_U = torch.cat([f_U[:num_experts], f_U[num_experts:].mean().expand(total - num_experts)])
    return total * torch.sum(f_U.detach() * probs_TU.sum(dim=0)) / max(probs_TU.shape[0], 1)  # 0 when T = 0


class AdaMoERouter(TopKRouter):
    """Top-k over E true + m null experts; weights renormalised over the selected true experts only (the paper's
    ablation found this better than over all selected).

    The null logits come from their own linear layer ``null_gate`` [m, D]. ``aux_loss_weight`` is alpha for the
    first ``adamoe.aux_loss_switch_step`` optimizer steps, then ``adamoe.aux_loss_weight_after`` (the paper: 0.02 for
    the first epoch, then 1e-4). ``init_from_pretrained`` converts a trained top-k router (see there).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, config: RouterConfig, layer_index: int = 0):
        super().__init__(hidden_size, num_experts, top_k, config, layer_index)
        self.num_null = config.adamoe.num_null_experts
        self.null_gate = nn.Linear(hidden_size, self.num_null, bias=False)
        nn.init.normal_(self.null_gate.weight, std=0.02)
        self.register_buffer("optimizer_steps", torch.zeros((), dtype=torch.int64))

    def gate_weight(self) -> torch.Tensor:
        """[E + m, D]: the true experts' rows, then the nulls'."""
        return torch.cat([self.gate.weight, self.null_gate.weight])

    def current_aux_loss_weight(self) -> float:
        switch = self.config.adamoe.aux_loss_switch_step
        if switch and int(self.optimizer_steps) >= switch:
            return self.config.adamoe.aux_loss_weight_after
        return self.config.aux_loss_weight

    def forward(self, x_TD: torch.Tensor) -> RoutingResult:
        logits_TU = self.logits(x_TD)
        probs_TU = logits_TU.softmax(dim=-1)
        probs_TK, selected_TK = probs_TU.topk(self.top_k, dim=-1)
        valid_TK = selected_TK < self.num_experts  # null slots are empty slots
        weights_TK = probs_TK * valid_TK
        # Over the true experts only; a token of nulls only keeps all-zero weights (0 / 1, not 0 / 0).
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(weights_TK.dtype).tiny)
        expert_ids_TK = torch.where(valid_TK, selected_TK, 0)
        tokens_per_expert_E = count_tokens_per_expert(expert_ids_TK, valid_TK, self.num_experts)
        aux_loss = logits_TU.new_zeros(())
        alpha = self.current_aux_loss_weight()
        if alpha > 0:
            aux_loss = aux_loss + alpha * null_aware_balance_loss(probs_TU, selected_TK, self.num_experts)
        if self.config.z_loss_weight > 0:
            aux_loss = aux_loss + self.config.z_loss_weight * router_z_loss(logits_TU)
        return RoutingResult(expert_ids_TK, weights_TK, valid_TK, aux_loss, tokens_per_expert_E, fixed_k=False)

    @classmethod
    def update_after_step(cls, routers: list[AdaMoERouter], group=None) -> dict[str, float]:
        for router in routers:
            router.optimizer_steps += 1
        return {"adamoe_aux_loss_weight": routers[0].current_aux_loss_weight()}

    @torch.no_grad()
    def init_from_pretrained(self, saved_router: dict) -> None:
        """Converting a trained router of another kind: null j's logit row starts as a copy of true expert
        (j mod E)'s row (the paper initialises the nulls' linear layer by copying rows of the router weight; which
        rows it does not say). A null then ties with its source expert, so with m >= E and k = 2k' the converted
        router starts out choosing the old top-k' experts plus their null twins: the old model's function, with
        training left to move the nulls."""
        if saved_router.get("kind") == "adamoe":
            return
        rows = torch.arange(self.num_null, device=self.gate.weight.device) % self.num_experts
        self.null_gate.weight.copy_(self.gate.weight[rows])
