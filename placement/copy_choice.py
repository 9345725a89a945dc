"""The copy rule per token, exactly as the dispatchers run it (c2r/parallel/replicas.py does it in torch on the GPU;
this is the numpy twin the simulator uses, tested equal to it in tests/test_replica_rule_agreement.py).

For one source rank's tokens, each valid slot whose expert has m > 1 copies goes (1) to its first copy, home first,
on a rank the token already visits through its single-copy experts, else (2) as the n-th "free pair" of that expert
in flat order (token * K + slot) to copy n mod m. The planner's *expected* form of the same rule over a whole batch
is `placement.replica_rule`.

Shape legend: A tokens of one source rank, K slots, E experts, C most copies of one expert, R ranks.
"""

from __future__ import annotations

import numpy as np

from placement.layout import ExpertLayout
from placement.replica_rule import copy_ranks


def choose_copy_ranks(expert_ids_AK: np.ndarray, layout: ExpertLayout) -> np.ndarray:
    """[A, K] int64: the rank each valid slot goes to (-1: an empty slot, expert id < 0), for one source rank."""
    ids = np.asarray(expert_ids_AK, dtype=np.int64)
    valid = ids >= 0
    expert = np.maximum(ids, 0)
    ranks_EC = copy_ranks(layout)
    copies_E = (ranks_EC >= 0).sum(axis=1)
    A, K = ids.shape
    R, C = layout.num_ranks, ranks_EC.shape[1]
    cand_AKC = ranks_EC[expert]  # -1 past an expert's copies
    copies_AK = copies_E[expert]
    # 1. Visited ranks: those of the token's valid single-copy slots.
    single = valid & (copies_AK == 1)
    visited_AR = np.zeros((A, R + 1), dtype=bool)
    rows = np.broadcast_to(np.arange(A)[:, None], (A, K))
    visited_AR[rows[single], cand_AKC[..., 0][single]] = True
    on_visited = np.take_along_axis(visited_AR, np.where(cand_AKC >= 0, cand_AKC, R).reshape(A, K * C), 1)
    first = np.where(on_visited.reshape(A, K, C), np.arange(C), C).min(axis=2)  # C: no copy on a visited rank
    # 2. Free pairs: the n-th of expert e in flat order goes to copy n mod m.
    free = valid & (copies_AK > 1) & (first == C)
    flat_free = np.flatnonzero(free.ravel())
    order = flat_free[np.argsort(expert.ravel()[flat_free], kind="stable")]
    keys = expert.ravel()[order]
    starts = np.searchsorted(keys, keys, side="left")
    nth = np.zeros(A * K, dtype=np.int64)
    nth[order] = np.arange(len(order)) - starts
    copy = np.where(free, nth.reshape(A, K) % np.maximum(copies_AK, 1), np.where(first < C, first, 0))
    dest = np.take_along_axis(cand_AKC, copy[..., None], 2)[..., 0]
    return np.where(valid, dest, -1)
