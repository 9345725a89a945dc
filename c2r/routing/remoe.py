"""ReMoE: ReLU routing (docs/algorithms.md section 5; Wang et al., ICLR 2025, arXiv 2412.14711).

Gates are ``relu(x W^T)``: no softmax, no top-k. An expert is active for a token where its gate is positive, and
its output is weighted by the gate. An L1 regulariser, weighted by each expert's load, pushes the average number of
active experts towards the MoE ``top_k``; its coefficient lambda adapts once per optimizer step from the measured
sparsity (averaged over layers, micro-batches and every rank), so all layers share one lambda.

The routing result has one slot per expert (K = E) with empty slots where the gate is zero: a token may use anything
from no expert to all E, and the dropless layer computes exactly the active ones.

Shape legend: T tokens, D hidden size, E experts.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from c2r.routing.config import RouterConfig
from c2r.routing.losses import router_z_loss
from c2r.routing.result import RoutingResult
from c2r.routing.topk import TopKRouter
from c2r.routing.updates import all_reduce_sum


def load_balanced_l1(gates_TE: torch.Tensor, target_k: int) -> torch.Tensor:
    """``(1/T) sum_t sum_e f_e * g_te`` with ``f_e = E / (k T) * #{t : g_te > 0}`` (a count: no gradient)."""
    num_tokens, num_experts = gates_TE.shape
    active_E = (gates_TE > 0).sum(dim=0).to(gates_TE.dtype)
    f_E = active_E * (num_experts / (target_k * max(num_tokens, 1)))
    return (gates_TE * f_E.detach()).sum() / max(num_tokens, 1)


class ReMoERouter(TopKRouter):
    """``g = relu(x W^T)`` in float32; weights are the gates themselves (no renormalisation, as in the paper).

    ``aux_loss`` = lambda * the load-balanced L1 regulariser (+ the z-loss if set). lambda is kept in float32 as
    extra state of the module, so it is saved in (and restored from) checkpoints and never cast to bf16.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, config: RouterConfig, layer_index: int = 0):
        super().__init__(hidden_size, num_experts, top_k, config, layer_index)
        self.reg_lambda = np.float32(config.remoe.lambda_init)
        self.lambda_floor = np.float32(config.remoe.lambda_init)
        self.lambda_factor = np.float32(config.remoe.lambda_factor)
        self.target_sparsity = 1.0 - top_k / num_experts
        # zero gates and all gates over the forwards since the last optimizer step (counts, so that an empty batch
        # adds nothing: its zero fraction would be 0 / 0)
        self._zero_gates: torch.Tensor | None = None
        self._all_gates = 0
        self._forwards = 0

    def forward(self, x_TD: torch.Tensor) -> RoutingResult:
        logits_TE = self.logits(x_TD)
        gates_TE = F.relu(logits_TE)
        valid_TE = gates_TE > 0
        num_tokens = gates_TE.shape[0]
        expert_ids_TE = torch.arange(self.num_experts, device=gates_TE.device).expand(num_tokens, -1)
        tokens_per_expert_E = valid_TE.sum(dim=0)
        if self.training:
            zeros = (~valid_TE).sum().detach()
            self._zero_gates = zeros if self._zero_gates is None else self._zero_gates + zeros
            self._all_gates += valid_TE.numel()
            self._forwards += 1
        aux_loss = float(self.reg_lambda) * load_balanced_l1(gates_TE, self.top_k)
        if self.config.z_loss_weight > 0:
            aux_loss = aux_loss + self.config.z_loss_weight * router_z_loss(logits_TE)
        return RoutingResult(expert_ids_TE, gates_TE, valid_TE, aux_loss, tokens_per_expert_E, fixed_k=False)

    @classmethod
    def update_after_step(cls, routers: list[ReMoERouter], group=None) -> dict[str, float]:
        """``lambda *= alpha`` if the measured sparsity S is below ``1 - k/E`` (too many active experts), else
        ``lambda /= alpha`` (but not below ``lambda_init``); S is the zero-gate fraction of all gates over layers,
        micro-batches and ranks (none: lambda stays)."""
        seen = [r for r in routers if r._forwards]
        if not seen:
            return {}
        device = seen[0]._zero_gates.device
        totals = torch.stack(
            [
                sum(r._zero_gates for r in seen).double(),
                torch.tensor(float(sum(r._all_gates for r in seen)), device=device, dtype=torch.float64),
            ]
        )
        totals = all_reduce_sum(totals, group)
        for router in routers:
            router._zero_gates, router._all_gates, router._forwards = None, 0, 0
        if float(totals[1]) == 0:  # every batch was empty on every rank: nothing measured
            return {}
        sparsity = float(totals[0] / totals[1])
        target = seen[0].target_sparsity
        for router in routers:
            factor = router.lambda_factor if sparsity < router.target_sparsity else 1 / router.lambda_factor
            # Never below lambda_init (the paper's "off"): a layer stack sparser than the target without any
            # regularisation would otherwise drive lambda to float32 underflow (2.8e-45 after 800 steps in the
            # quality study), and hundreds of steps would pass before it could bite again.
            router.reg_lambda = max(np.float32(router.reg_lambda * factor), router.lambda_floor)
        return {
            "remoe_lambda": float(routers[0].reg_lambda),
            "remoe_sparsity": sparsity,
            "remoe_target_sparsity": target,
        }

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        return {"reg_lambda": torch.tensor(self.reg_lambda, dtype=torch.float32)}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.reg_lambda = np.float32(state["reg_lambda"].item())
