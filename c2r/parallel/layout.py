"""Where each logical expert lives: ``expert_to_rank`` within one expert-parallel group.

A logical expert id is what the router outputs and what a checkpoint means; its *physical* id is
``rank * experts_per_rank + local slot``, the order in which the all-to-all lays tokens out. Local slots follow
ascending logical id on each rank, so the contiguous layout maps every expert to itself.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class ExpertLayout:
    expert_to_rank: tuple[int, ...]
    num_ranks: int

    def __post_init__(self) -> None:
        num_experts = len(self.expert_to_rank)
        if self.num_ranks <= 0 or num_experts % self.num_ranks:
            raise ValueError(f"ep_size ({self.num_ranks}) must divide num_experts ({num_experts})")
        bad = [r for r in self.expert_to_rank if not 0 <= r < self.num_ranks]
        if bad:
            raise ValueError(f"expert_to_rank names ranks {sorted(set(bad))} outside 0..{self.num_ranks - 1}")
        per_rank = Counter(self.expert_to_rank)
        wrong = {r: per_rank.get(r, 0) for r in range(self.num_ranks) if per_rank.get(r, 0) != self.experts_per_rank}
        if wrong:
            raise ValueError(
                f"every rank must hold exactly {self.experts_per_rank} experts "
                f"(num_experts {num_experts} / ep_size {self.num_ranks}); these ranks hold: {wrong}"
            )

    @classmethod
    def contiguous(cls, num_experts: int, num_ranks: int) -> ExpertLayout:
        """Experts 0..E/R-1 on rank 0, and so on: what every framework does by default."""
        if num_ranks <= 0 or num_experts % num_ranks:
            raise ValueError(f"ep_size ({num_ranks}) must divide num_experts ({num_experts})")
        per_rank = num_experts // num_ranks
        return cls(tuple(e // per_rank for e in range(num_experts)), num_ranks)

    @property
    def num_experts(self) -> int:
        return len(self.expert_to_rank)

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.num_ranks

    def local_experts(self, rank: int) -> list[int]:
        """Logical ids held by ``rank``, in local-slot order."""
        return [e for e, r in enumerate(self.expert_to_rank) if r == rank]

    @cached_property
    def logical_to_physical(self) -> torch.Tensor:
        """[E] int64: physical id (rank * experts_per_rank + slot) of each logical expert."""
        physical = torch.empty(self.num_experts, dtype=torch.int64)
        for rank in range(self.num_ranks):
            for slot, expert in enumerate(self.local_experts(rank)):
                physical[expert] = rank * self.experts_per_rank + slot
        return physical

    @cached_property
    def physical_to_logical(self) -> list[int]:
        """[E]: the logical expert held in each physical slot."""
        logical = [0] * self.num_experts
        for expert, physical in enumerate(self.logical_to_physical.tolist()):
            logical[physical] = expert
        return logical
