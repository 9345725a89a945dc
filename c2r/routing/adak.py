"""Ada-K routing: a learned number of experts per token (docs/algorithms.md section 6; Yue et al., ICLR 2025).

A frozen top-k softmax router (``gate``) ranks the experts; a per-layer *allocator* (a bias-free linear map
D -> J followed by a softmax) gives a distribution over k = 1..J. The token uses the router's top-k* experts, with
their probabilities renormalised over those k*. Slots k*+1..J are empty (``valid_TK`` False), so they cost no FLOPs
and no bytes downstream. The allocators are trained by ``c2r-adak`` (c2r/adak_train.py): P-Warm, then PPO.

Shape legend: T tokens, D hidden size, E experts, K slots per token, J largest k of the allocator (K = J, or the
MoE top-k in ``default`` mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from c2r.config_utils import require_choice
from c2r.routing.balance import BatchBalancer
from c2r.routing.config import RouterConfig
from c2r.routing.result import RoutingResult
from c2r.routing.topk import TopKRouter

ADAK_MODES = ("default", "sample", "argmax")


@dataclass
class Allocation:
    """What the allocator did in the router's last forward; ``c2r-adak`` reads it back from the module.

    Attributes:
        k_T: int64, experts used per token (1..J; the MoE top-k for every token in ``default`` mode).
        log_probs_TJ: float32 ``log P(k = n + 1)`` of the allocator; carries the allocator's gradient.
        router_probs_TE: float32 softmax of the (frozen) router, detached: P-Warm's labels are made from it.
    """

    k_T: torch.Tensor
    log_probs_TJ: torch.Tensor
    router_probs_TE: torch.Tensor

    @property
    def log_prob_T(self) -> torch.Tensor:
        """``log P(k_T)``: the log-probability of the ks actually used (the PPO policy's action log-prob)."""
        return self.log_probs_TJ.gather(1, (self.k_T - 1).unsqueeze(1)).squeeze(1)

    @property
    def probs_TJ(self) -> torch.Tensor:
        return self.log_probs_TJ.exp()


def select_top_k_star(
    probs_TE: torch.Tensor,
    k_T: torch.Tensor,
    max_k: int,
    renormalize: bool = True,
    scores_TE: torch.Tensor | None = None,
):
    """The router's top-``k_T[t]`` experts of each token in ``max_k`` slots; slots past k are empty.

    Experts are ranked by ``scores_TE`` (default: the probabilities; a batch-balanced router's logits plus its bias)
    and weighted by their probabilities. Returns ``(expert_ids_TK, weights_TK, valid_TK)``; empty slots hold expert 0
    and weight 0. With ``renormalize`` the weights of the used slots sum to 1 (a token with k = 1 gets weight 1 on its
    top expert).
    """
    scores_TE = probs_TE if scores_TE is None else scores_TE
    expert_ids_TK = scores_TE.topk(max_k, dim=-1).indices  # sorted, best first
    top_probs_TK = probs_TE.gather(1, expert_ids_TK)
    slot_K = torch.arange(max_k, device=probs_TE.device)
    valid_TK = slot_K.unsqueeze(0) < k_T.unsqueeze(1)
    weights_TK = torch.where(valid_TK, top_probs_TK, torch.zeros_like(top_probs_TK))
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    expert_ids_TK = torch.where(valid_TK, expert_ids_TK, torch.zeros_like(expert_ids_TK))
    return expert_ids_TK, weights_TK, valid_TK


class AdaKRouter(TopKRouter):
    """Top-k router whose k is chosen per token by a learned allocator.

    Modes (``config.adak.mode``, changed at run time with :meth:`set_mode`):
        ``default``: the plain top-k router with the MoE ``top_k`` (K = top_k, every slot valid): the baseline pass.
        ``sample``: k* drawn from the allocator (PPO rollouts).
        ``argmax``: the allocator's most likely k (inference). The paper does not say how k is picked at inference;
            argmax is our choice (deterministic, and what a served model should do).
    :meth:`force_k` overrides the mode with given per-token ks (PPO epochs re-evaluating a rollout's actions).
    Every forward records an :class:`Allocation` in ``last_allocation`` (ks, their log-probs, the distribution).

    The allocator (named ``allocator``: no parameter may contain the word "expert") starts at zero weights, i.e. a
    uniform distribution over k = 1..J: the natural start of a policy that P-Warm then moves towards the default k.

    Batch balance (``balance`` ``auto``, c2r-train's default; ``c2r-adak`` turns a source's ``batch`` into it): the
    experts are ranked by the logits plus the source top-k router's *running* bias (``balancer.bias_E``, loaded with
    the checkpoint), as that router ranks them in evaluation; the bias is never re-solved or updated here, so every
    mode routes each token the same way in training and evaluation. ``balance`` ``none``: ranked by probability.

    Aux loss: the plain router's balance (and z-) loss over the slots actually used, exactly as
    :class:`TopKRouter` computes it. It only matters if the gate trains (``c2r-train`` with this router); ``c2r-adak``
    freezes the gate and optimises its own P-Warm / PPO losses, ignoring it.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, config: RouterConfig, layer_index: int = 0):
        super().__init__(hidden_size, num_experts, top_k, config, layer_index)
        self.max_k = config.adak.resolved_max_k(num_experts)
        self.allocator = nn.Linear(hidden_size, self.max_k, bias=False)
        nn.init.zeros_(self.allocator.weight)
        if config.balance != "none":  # the batch-balanced source's running bias (TopKRouter makes none for "adak")
            self.balancer = BatchBalancer(num_experts, config.balance_rounds, config.balance_momentum)
        self.mode = config.adak.mode
        self.forced_k_T: torch.Tensor | None = None
        self.last_allocation: Allocation | None = None

    @classmethod
    def update_after_step(cls, routers: list[AdaKRouter], group=None) -> dict[str, float]:
        """Nothing: the running bias stays the source's (TopKRouter's update would fold in solves never made)."""
        return {}

    def set_mode(self, mode: str) -> None:
        require_choice("adak mode", mode, ADAK_MODES)
        self.mode = mode

    def force_k(self, k_T: torch.Tensor | None) -> None:
        """Use exactly these ks (int, 1..J, one per token of the next calls) until ``force_k(None)``."""
        if k_T is not None:
            # NOTE: host sync, once per layer and PPO epoch: a bad k would otherwise index out of the slots silently.
            if k_T.dim() != 1 or bool((k_T < 1).any()) or bool((k_T > self.max_k).any()):
                raise ValueError(f"forced ks must be a 1-D tensor of values in 1..{self.max_k}")
            k_T = k_T.long()
        self.forced_k_T = k_T

    def allocator_log_probs(self, x_TD: torch.Tensor) -> torch.Tensor:
        """``log P_l(k)`` over k = 1..J, float32, shape [T, J]."""
        logits_TJ = F.linear(x_TD.float(), self.allocator.weight.float())
        return logits_TJ.log_softmax(dim=-1)

    def choose_k(self, log_probs_TJ: torch.Tensor) -> torch.Tensor:
        if self.forced_k_T is not None:
            if self.forced_k_T.shape[0] != log_probs_TJ.shape[0]:
                raise ValueError(
                    f"forced ks are for {self.forced_k_T.shape[0]} tokens, this call has {log_probs_TJ.shape[0]}"
                )
            return self.forced_k_T.to(log_probs_TJ.device)
        if self.mode == "sample":
            return torch.multinomial(log_probs_TJ.detach().exp(), 1).squeeze(1) + 1
        if self.mode == "argmax":
            return log_probs_TJ.detach().argmax(dim=-1) + 1
        return torch.full_like(log_probs_TJ[:, 0], self.top_k, dtype=torch.long)

    def forward(self, x_TD: torch.Tensor) -> RoutingResult:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        log_probs_TJ = self.allocator_log_probs(x_TD)
        k_T = self.choose_k(log_probs_TJ)
        self.last_allocation = Allocation(k_T, log_probs_TJ, probs_TE.detach())
        fixed_k = self.forced_k_T is None and self.mode == "default"
        # Default mode keeps K = top_k full slots: the output is then exactly TopKRouter's (in evaluation).
        slots = self.top_k if fixed_k else self.max_k
        scores_TE = None
        if self.balancer is not None:  # TopKRouter's evaluation scores: the running bias, never a batch's solve
            self.balancer.bias_E = self.balancer.bias_E.to(logits_TE.device)
            scores_TE = logits_TE.detach() + self.balancer.bias_E
        expert_ids_TK, weights_TK, valid_TK = select_top_k_star(
            probs_TE, k_T, slots, self.config.renormalize, scores_TE
        )
        return self.selection_result(logits_TE, probs_TE, expert_ids_TK, weights_TK, None if fixed_k else valid_TK)

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, max_k={self.max_k}, mode={self.mode}"


def adak_routers(model: nn.Module) -> list[AdaKRouter]:
    """The model's Ada-K routers in depth order (one per MoE layer)."""
    return [m for m in model.modules() if isinstance(m, AdaKRouter)]
