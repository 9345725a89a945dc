"""The routing contract every router returns (docs/design.md, "Routing result").

Shape legend: T tokens, K maximum experts per token (slots), E routed experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RoutingResult:
    """Per token, up to K expert slots; a slot may be empty (``valid_TK`` False) and then costs nothing.

    Attributes:
        expert_ids_TK: int64 logical expert ids in [0, E). Empty slots hold 0 and must be ignored via ``valid_TK``.
        weights_TK: float32 combine weights; 0 in empty slots.
        valid_TK: bool, True where the slot routes the token to ``expert_ids_TK``.
        aux_loss: scalar the trainer adds to the loss (already multiplied by its coefficient); zero if none.
        tokens_per_expert_E: int64 number of valid (token, slot) pairs per expert (no gradient).
        fixed_k: True when every slot is valid (plain top-k). Backends then skip the empty-slot handling, and with it
            a host sync.
    """

    expert_ids_TK: torch.Tensor
    weights_TK: torch.Tensor
    valid_TK: torch.Tensor
    aux_loss: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    fixed_k: bool = False

    @property
    def num_tokens(self) -> int:
        return self.expert_ids_TK.shape[0]

    @property
    def max_k(self) -> int:
        return self.expert_ids_TK.shape[1]

    def active_experts_per_token(self) -> torch.Tensor:
        """Mean number of valid slots per token (a float tensor; no host sync)."""
        return self.valid_TK.sum(dim=1).float().mean()


def count_tokens_per_expert(
    expert_ids_TK: torch.Tensor, valid_TK: torch.Tensor | None, num_experts: int
) -> torch.Tensor:
    """Histogram of valid (token, slot) pairs over experts, shape [E], int64, without a host sync (any keys in
    ``[0, num_experts)``: experts, physical slots, ranks); ``valid_TK`` None: every slot is valid (a fixed k: one
    kernel launch fewer, which counts on a GPU where the router's small ops wait on the host). Not
    ``torch.bincount``: on CUDA it reads the input's maximum on the host to size its output, one host sync per call."""
    if valid_TK is None:
        ids = expert_ids_TK.flatten()
    else:
        ids = torch.where(valid_TK, expert_ids_TK, num_experts).flatten()  # empty slots: an overflow bin we drop
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    return counts.scatter_add_(0, ids, torch.ones_like(ids))[:num_experts]
