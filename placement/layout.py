"""Where each logical expert lives: ``expert_to_rank`` within one expert-parallel group, the one in-memory placement.

A logical expert id is what the router outputs and what a checkpoint means; its *physical* id is
``rank * experts_per_rank + local slot``, the order in which the all-to-all lays tokens out. Local slots follow
ascending logical id on each rank, so the contiguous layout maps every expert to itself.

Replicated experts (EPLB's redundant experts): a logical expert may also have *replicas*, identical copies on other
ranks (``replicas[e]``: the extra ranks of expert ``e``, never its home rank ``expert_to_rank[e]`` and never one rank
twice). Then a rank holds X = P / R slots, P = E + the number of replicas physical slots in all, still in ascending
logical id on each rank. The home copy is the expert's *primary*: the one a checkpoint saves.

Serialised one way everywhere (the plan file's ``layers[].expert_to_rank``, the run config's ``expert_layouts``,
profile.json's ``expert_to_rank``): a plain list of E entries per MoE layer (`ExpertLayout.to_json`), each a rank id,
or for a replicated expert the list of its ranks, home first (``[0, [0, 3], 1, ...]``); ``null`` for a layer that is
not expert parallel; read back by `ExpertLayout.from_json`. Plain numpy and lists, no torch: the dispatcher makes its
own tensors.

Shape legend: E experts, R ranks, X slots per rank (E / R without replicas, P / R with them), P physical slots,
M the most copies of one expert.
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
    """``expert_to_rank[e]``: the (home) rank of logical expert ``e``; ``num_ranks`` R; ``replicas[e]``: the other
    ranks holding a copy of ``e`` (empty tuple, the default: no replicas). Every rank holds the same number of slots.
    Built from lists, tuples or numpy arrays; validated on construction."""

    expert_to_rank: tuple[int, ...]
    num_ranks: int
    replicas: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "expert_to_rank", _rank_ids(self.expert_to_rank, "expert_to_rank"))
        num_experts = self.num_experts
        if self.replicas is None or (isinstance(self.replicas, (list, tuple)) and not any(self.replicas)):
            object.__setattr__(self, "replicas", ())
        else:
            if not isinstance(self.replicas, (list, tuple)) or len(self.replicas) != num_experts:
                raise PlacementError(f"replicas must list the extra ranks of each of {num_experts} experts")
            extra = tuple(_rank_ids(r, f"replicas of expert {e}") for e, r in enumerate(self.replicas))
            object.__setattr__(self, "replicas", extra)
        outside = sorted({r for ranks in self.ranks_of_experts for r in ranks if not 0 <= r < self.num_ranks})
        if outside:
            raise PlacementError(f"expert_to_rank names ranks {outside} outside 0..{self.num_ranks - 1}")
        twice = [e for e, ranks in enumerate(self.ranks_of_experts) if len(set(ranks)) != len(ranks)]
        if twice:
            # a second copy on the same rank spreads no load: always a planning mistake
            raise PlacementError(f"experts {twice} have two copies on one rank (a replica must be on another rank)")
        require_divides(self.num_ranks, "ep_size", self.num_slots, "num_experts" if not self.replicas else "slots")
        per_rank = Counter(r for ranks in self.ranks_of_experts for r in ranks)
        wrong = {r: per_rank.get(r, 0) for r in range(self.num_ranks) if per_rank.get(r, 0) != self.experts_per_rank}
        if wrong:
            what = f"num_experts {num_experts}" if not self.replicas else f"{self.num_slots} slots"
            raise PlacementError(
                f"every rank must hold exactly {self.experts_per_rank} experts "
                f"({what} / ep_size {self.num_ranks}); these ranks hold: {wrong}"
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
        """Read one layer's saved ``expert_to_rank`` (E entries: a rank, or a replicated expert's ranks, home
        first), checking its length against ``num_experts`` when given; errors start with ``where`` (e.g.
        "plan.json layer 3")."""
        if not isinstance(value, (list, tuple, np.ndarray)):
            _rank_ids(value, where)  # refuses it by name
        entries = list(value)
        if num_experts is not None and len(entries) != num_experts:
            raise PlacementError(
                f"{where} must list a rank for each of {num_experts} experts; got {len(entries)} entries"
            )
        nested = [e for e in entries if isinstance(e, (list, tuple))]
        if nested and any(not e for e in nested):
            raise PlacementError(f"{where}: an expert's list of ranks is empty")
        homes = [e[0] if isinstance(e, (list, tuple)) else e for e in entries]
        replicas = [tuple(e[1:]) if isinstance(e, (list, tuple)) else () for e in entries] if nested else ()
        try:
            return cls(_rank_ids(homes, where), num_ranks, replicas)
        except PlacementError as error:
            raise PlacementError(f"{where}: {error}") from None

    def to_json(self) -> list:
        """The saved form (module docstring): E rank ids, a list of ranks (home first) for a replicated expert."""
        if not self.replicas:
            return list(self.expert_to_rank)
        return [[home, *extra] if extra else home for home, extra in zip(self.expert_to_rank, self.replicas)]

    @classmethod
    def with_replicas(cls, base: ExpertLayout, replicas: Sequence[Sequence[int]]) -> ExpertLayout:
        """``base``'s homes with ``replicas[e]`` extra ranks for expert ``e``."""
        return cls(base.expert_to_rank, base.num_ranks, tuple(tuple(int(r) for r in x) for x in replicas))

    @property
    def num_experts(self) -> int:
        """E logical experts (what the router chooses among)."""
        return len(self.expert_to_rank)

    @property
    def num_slots(self) -> int:
        """P physical expert slots: E plus the replicas."""
        return self.num_experts + sum(len(r) for r in self.replicas)

    @property
    def experts_per_rank(self) -> int:
        """X, the expert slots each rank holds (E / R, or P / R with replicas)."""
        return self.num_slots // self.num_ranks

    @property
    def is_replicated(self) -> bool:
        return bool(self.replicas)

    @cached_property
    def ranks_of_experts(self) -> tuple[tuple[int, ...], ...]:
        """Per logical expert, every rank holding a copy, home first."""
        if not self.replicas:
            return tuple((r,) for r in self.expert_to_rank)
        return tuple((home, *extra) for home, extra in zip(self.expert_to_rank, self.replicas))

    def require_unreplicated(self, what: str) -> None:
        """For code that does not handle replicas yet: one clear refusal rather than a silently wrong answer."""
        if self.replicas:
            replicated = [e for e, extra in enumerate(self.replicas) if extra]
            raise PlacementError(f"{what} does not handle replicated experts yet (experts {replicated} have replicas)")

    def as_array(self) -> np.ndarray:
        """[E] int64 copy of ``expert_to_rank``, for numpy metrics."""
        return np.asarray(self.expert_to_rank, dtype=np.int64)

    def local_experts(self, rank: int) -> list[int]:
        """Logical ids held by ``rank`` (replicas included), in local-slot order (ascending)."""
        return [e for e, ranks in enumerate(self.ranks_of_experts) if rank in ranks]

    @property
    def rank_to_experts(self) -> list[list[int]]:
        """R lists of logical expert ids, each in local-slot order (fresh lists: callers may keep or change them)."""
        return [self.local_experts(rank) for rank in range(self.num_ranks)]

    @cached_property
    def physical_to_logical(self) -> np.ndarray:
        """[P] int64, read-only: the logical expert held in each physical slot (EPLB's ``phy2log``)."""
        return _frozen(np.concatenate([np.asarray(x, dtype=np.int64) for x in self.rank_to_experts]))

    @cached_property
    def logical_to_physical(self) -> np.ndarray:
        """[E] int64, read-only: physical id (rank * experts_per_rank + slot) of each logical expert's home copy."""
        X = self.experts_per_rank
        return _frozen(
            np.array([r * X + self.local_experts(r).index(e) for e, r in enumerate(self.expert_to_rank)], np.int64)
        )

    @cached_property
    def replica_slots(self) -> np.ndarray:
        """[E, M] int64, read-only: every physical slot of each logical expert, home first, -1 past its copies
        (EPLB's ``log2phy``); M = 1 without replicas."""
        X = self.experts_per_rank
        M = max(len(ranks) for ranks in self.ranks_of_experts)
        table = np.full((self.num_experts, M), -1, dtype=np.int64)
        for e, ranks in enumerate(self.ranks_of_experts):
            for m, r in enumerate(ranks):
                table[e, m] = r * X + self.local_experts(r).index(e)
        return _frozen(table)


def _frozen(array: np.ndarray) -> np.ndarray:
    # cached on a frozen layout and shared by every reader: nobody may write into it
    array.setflags(write=False)
    return array


def layouts_from_rows(rows_LE: Sequence[Sequence[int]] | np.ndarray, num_ranks: int) -> list[ExpertLayout]:
    """One layout per MoE layer from [L, E] rank ids (e.g. a partitioner's labels)."""
    return [ExpertLayout(tuple(int(r) for r in row), num_ranks) for row in rows_LE]
