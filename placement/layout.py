"""Where each logical expert lives: ``expert_to_rank`` within one expert-parallel group, the one in-memory placement.

A logical expert id is what the router outputs and what a checkpoint means; its *physical* id is
``rank * experts_per_rank + local slot``, the order in which the all-to-all lays tokens out. Local slots follow
ascending logical id on each rank, so the contiguous layout maps every expert to itself.

Serialised one way everywhere (the plan file's ``layers[].expert_to_rank``, the run config's ``expert_layouts``,
profile.json's ``expert_to_rank``): a plain list of E rank ids per MoE layer (`ExpertLayout.to_json`), ``null`` for a
layer that is not expert parallel, read back by `ExpertLayout.from_json`. Plain numpy and lists, no torch: the
dispatcher makes its own tensors.

Shape legend: E experts, R ranks, X experts per rank (E / R).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from placement.errors import PlacementError


def require_divides(divisor: int, divisor_name: str, total: int, total_name: str, where: str = "") -> None:
    """The one home of "ep_size must divide num_experts" (and of its kin: nodes / ranks, ep_size / world size).
    The caller names both numbers in its own terms: ``ep_size (3) must divide num_experts (64)``."""
    if divisor <= 0 or total % divisor:
        prefix = f"{where}: " if where else ""
        raise PlacementError(f"{prefix}{divisor_name} ({divisor}) must divide {total_name} ({total})")


def _rank_ids(values: Any, where: str) -> tuple[int, ...]:
    """Lists, tuples and numpy arrays of integers -> a tuple of ints; anything else is refused by name."""
    if not isinstance(values, (list, tuple, np.ndarray)):
        raise PlacementError(f"{where} must be a list of ranks; got {type(values).__name__} {values!r}")
    bad = sorted({v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer))}, key=str)
    if bad:
        raise PlacementError(f"{where} holds non-integer ranks {bad}")
    return tuple(int(v) for v in values)


@dataclass(frozen=True)
class ExpertLayout:
    """``expert_to_rank[e]``: the rank holding logical expert ``e`` (exactly E/R experts per rank), and
    ``num_ranks`` R. Built from a list, tuple or numpy array; validated on construction."""

    expert_to_rank: tuple[int, ...]
    num_ranks: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "expert_to_rank", _rank_ids(self.expert_to_rank, "expert_to_rank"))
        num_experts = self.num_experts
        require_divides(self.num_ranks, "ep_size", num_experts, "num_experts")
        outside = sorted({r for r in self.expert_to_rank if not 0 <= r < self.num_ranks})
        if outside:
            raise PlacementError(f"expert_to_rank names ranks {outside} outside 0..{self.num_ranks - 1}")
        per_rank = Counter(self.expert_to_rank)
        wrong = {r: per_rank.get(r, 0) for r in range(self.num_ranks) if per_rank.get(r, 0) != self.experts_per_rank}
        if wrong:
            raise PlacementError(
                f"every rank must hold exactly {self.experts_per_rank} experts "
                f"(num_experts {num_experts} / ep_size {self.num_ranks}); these ranks hold: {wrong}"
            )

    @classmethod
    def contiguous(cls, num_experts: int, num_ranks: int) -> ExpertLayout:
        """Experts 0..E/R-1 on rank 0, and so on: what every framework does by default."""
        require_divides(num_ranks, "ep_size", num_experts, "num_experts")
        per_rank = num_experts // num_ranks
        return cls(tuple(e // per_rank for e in range(num_experts)), num_ranks)

    @classmethod
    def from_json(
        cls, value: Any, num_ranks: int, num_experts: int | None = None, where: str = "expert_to_rank"
    ) -> ExpertLayout:
        """Read one layer's saved ``expert_to_rank`` (a list of E ints), checking its length against
        ``num_experts`` when given; errors start with ``where`` (e.g. "plan.json layer 3")."""
        ranks = _rank_ids(value, where)
        if num_experts is not None and len(ranks) != num_experts:
            raise PlacementError(
                f"{where} must list a rank for each of {num_experts} experts; got {len(ranks)} entries"
            )
        try:
            return cls(ranks, num_ranks)
        except PlacementError as error:
            raise PlacementError(f"{where}: {error}") from None

    def to_json(self) -> list[int]:
        """The saved form (module docstring): E rank ids."""
        return list(self.expert_to_rank)

    @property
    def num_experts(self) -> int:
        return len(self.expert_to_rank)

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.num_ranks

    def as_array(self) -> np.ndarray:
        """[E] int64 copy of ``expert_to_rank``, for numpy metrics."""
        return np.asarray(self.expert_to_rank, dtype=np.int64)

    def local_experts(self, rank: int) -> list[int]:
        """Logical ids held by ``rank``, in local-slot order (ascending)."""
        return [e for e, r in enumerate(self.expert_to_rank) if r == rank]

    @property
    def rank_to_experts(self) -> list[list[int]]:
        """R lists of logical expert ids, each in local-slot order (fresh lists: callers may keep or change them)."""
        return [self.local_experts(rank) for rank in range(self.num_ranks)]

    @cached_property
    def physical_to_logical(self) -> np.ndarray:
        """[E] int64, read-only: the logical expert held in each physical slot (EPLB's ``phy2log``)."""
        return _frozen(np.concatenate([np.asarray(x, dtype=np.int64) for x in self.rank_to_experts]))

    @cached_property
    def logical_to_physical(self) -> np.ndarray:
        """[E] int64, read-only: physical id (rank * experts_per_rank + slot) of each logical expert (``log2phy``)."""
        return _frozen(np.argsort(self.physical_to_logical))


def _frozen(array: np.ndarray) -> np.ndarray:
    # cached on a frozen layout and shared by every reader: nobody may write into it
    array.setflags(write=False)
    return array


def layouts_from_rows(rows_LE: Sequence[Sequence[int]] | np.ndarray, num_ranks: int) -> list[ExpertLayout]:
    """One layout per MoE layer from [L, E] rank ids (e.g. a partitioner's labels)."""
    return [ExpertLayout(tuple(int(r) for r in row), num_ranks) for row in rows_LE]
