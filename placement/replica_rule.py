"""Where a token's slots go when experts have replicas (the rule the runtime dispatch applies), predicted per layer:
expected rank loads and expected distinct ranks (or nodes) per token.

The rule (shared with the runtime; `placement.layout.ExpertLayout` holds the copies, home first). For each token
and each of its valid slots whose expert e has m > 1 copies:
1. the token's *visited ranks* are the ranks of its slots whose experts have exactly one copy; if a copy of e is
   on a visited rank, the slot goes to the first such copy (home-first order): it costs no extra token copy;
2. otherwise the slot is one of e's *free pairs*: in flat order (t * K + k) the n-th free pair of e goes to copy
   n mod m, an even split over e's copies.
Slots of unreplicated experts go to their only copy.

How the planner predicts it. The runtime applies the rule per source rank; the planner applies it to the whole
batch of a layer, and in expectation: a layer's routing is its distinct expert sets with their token counts
(`placement.inputs.LayerRouting`, token order is gone), so each free pair of e counts 1/m on each copy. Rule 1 is
per token, so it is exact. Loads: the round robin gives each copy of e floor or ceil of (free pairs / m), so a
copy's predicted load is within one pair of the whole-batch count (within one per source rank of the runtime's).
Distinct ranks per token: a free slot never lands on a visited rank (else rule 1 would have taken it), so a token
reaches its visited ranks plus the distinct ranks of its free slots; with one free slot that is exactly one more
rank. With several free slots whose experts share a rank, which copies they meet depends on the order of the
batch; we take the slots as independent: P(rank r not reached) = prod over free slots of (1 - copies of the
slot's expert on r / its m). The same formula over nodes gives nodes per token (a free slot may land on a visited
node; those count once).

Shape legend: M distinct expert sets, K slots, E experts, C most copies of one expert, R ranks, G groups (ranks or
nodes), S replicated slots.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from placement.layout import ExpertLayout


def copy_ranks(layout: ExpertLayout) -> np.ndarray:
    """[E, C] int64: the ranks of each expert's copies, home first, -1 past its copies."""
    copies = layout.ranks_of_experts
    table = np.full((layout.num_experts, max(len(c) for c in copies)), -1, dtype=np.int64)
    for e, ranks in enumerate(copies):
        table[e, : len(ranks)] = ranks
    return table


class RuleOne(NamedTuple):
    """Rule 1 applied to every slot of M sets: ``visited_MR`` the ranks of single-copy experts, ``single_MK`` slots
    of single-copy experts; for the S slots of replicated experts: their set ``rows_S``, ``experts_S`` and
    destination ``dest_S`` (-1: a free pair, split by rule 2)."""

    visited_MR: np.ndarray
    single_MK: np.ndarray
    rows_S: np.ndarray
    experts_S: np.ndarray
    dest_S: np.ndarray


def rule_one(sets_MK: np.ndarray, ranks_EC: np.ndarray, num_ranks: int) -> RuleOne:
    """Rule 1 for every slot (module docstring); ``ranks_EC``: `copy_ranks` of the layout."""
    num_copies_E = (ranks_EC >= 0).sum(axis=1)
    rows_MK = np.broadcast_to(np.arange(len(sets_MK))[:, None], sets_MK.shape)
    valid = sets_MK >= 0
    expert = np.maximum(sets_MK, 0)
    single = valid & (num_copies_E[expert] == 1)
    visited_MR = np.zeros((len(sets_MK), num_ranks), dtype=bool)
    visited_MR[rows_MK[single], ranks_EC[expert[single], 0]] = True
    replicated = valid & (num_copies_E[expert] > 1)
    rows, experts = rows_MK[replicated], expert[replicated]
    cand_SC = ranks_EC[experts]
    hit_SC = (cand_SC >= 0) & visited_MR[rows[:, None], np.maximum(cand_SC, 0)]
    first = np.argmax(hit_SC, axis=1)
    dest = np.where(hit_SC.any(axis=1), cand_SC[np.arange(len(rows)), first], -1)
    return RuleOne(visited_MR, single, rows, experts, dest)


def expected_rank_load(
    sets_MK: np.ndarray, weight_M: np.ndarray, ranks_EC: np.ndarray, num_ranks: int, route: RuleOne | None = None
) -> np.ndarray:
    """[R] float64: token-expert pairs each rank processes under the rule (free pairs split evenly); ``ranks_EC``:
    `copy_ranks` of the layout (a table, so that a planner may try copies before the slot counts are even);
    ``route``: `rule_one` of the same, when the caller has it."""
    w_M = np.asarray(weight_M, dtype=np.float64)
    _, single, rows, experts, dest = rule_one(sets_MK, ranks_EC, num_ranks) if route is None else route
    expert = np.maximum(sets_MK, 0)
    w_MK = np.broadcast_to(w_M[:, None], sets_MK.shape)
    # float64 also when every slot is replicated (numpy's bincount of nothing is int64, weights or not)
    load = np.bincount(ranks_EC[expert[single], 0], weights=w_MK[single], minlength=num_ranks).astype(np.float64)
    fixed = dest >= 0
    load += np.bincount(dest[fixed], weights=w_M[rows[fixed]], minlength=num_ranks)
    free_rows, free_experts = rows[~fixed], experts[~fixed]
    cand = ranks_EC[free_experts]
    share = w_M[free_rows] / (cand >= 0).sum(axis=1)
    on = cand >= 0
    load += np.bincount(cand[on], weights=np.broadcast_to(share[:, None], cand.shape)[on], minlength=num_ranks)
    return load


def expected_expert_rank_load(
    sets_MK: np.ndarray, weight_M: np.ndarray, ranks_EC: np.ndarray, num_ranks: int, route: RuleOne | None = None
) -> np.ndarray:
    """[E, R] float64: `expected_rank_load` split by expert: the pairs of expert e that rank r processes (each
    copy's load; a row sums to e's load). The planner's slot swaps read it to find the copies that weigh most."""
    w_M = np.asarray(weight_M, dtype=np.float64)
    _, single, rows, experts, dest = rule_one(sets_MK, ranks_EC, num_ranks) if route is None else route
    num_experts = len(ranks_EC)
    size = num_experts * num_ranks
    expert = np.maximum(sets_MK, 0)
    w_MK = np.broadcast_to(w_M[:, None], sets_MK.shape)
    cell = expert[single] * num_ranks + ranks_EC[expert[single], 0]
    load = np.bincount(cell, weights=w_MK[single], minlength=size).astype(np.float64)  # as in expected_rank_load
    fixed = dest >= 0
    load += np.bincount(experts[fixed] * num_ranks + dest[fixed], weights=w_M[rows[fixed]], minlength=size)
    free_rows, free_experts = rows[~fixed], experts[~fixed]
    cand = ranks_EC[free_experts]
    on = cand >= 0
    share = np.broadcast_to((w_M[free_rows] / on.sum(axis=1))[:, None], cand.shape)
    cell = free_experts[:, None] * num_ranks + cand
    load += np.bincount(cell[on], weights=share[on], minlength=size)
    return load.reshape(num_experts, num_ranks)


def expected_groups_hit(
    sets_MK: np.ndarray,
    ranks_EC: np.ndarray,
    num_ranks: int,
    group_of_rank_R: np.ndarray | None = None,
    route: RuleOne | None = None,
) -> np.ndarray:
    """[M] float64: expected distinct groups (ranks by default; nodes with ``group_of_rank_R``) each set reaches
    under the rule (module docstring); ``ranks_EC`` as in `expected_rank_load`."""
    visited_MR, _, rows, experts, dest = rule_one(sets_MK, ranks_EC, num_ranks) if route is None else route
    if group_of_rank_R is None:
        return _expected_ranks_hit(visited_MR, rows, experts, dest, ranks_EC, num_ranks)
    group_R = np.asarray(group_of_rank_R, dtype=np.int64)
    num_groups = int(group_R.max()) + 1
    visited_MG = np.zeros((len(sets_MK), num_groups), dtype=bool)
    vm, vr = np.nonzero(visited_MR)
    visited_MG[vm, group_R[vr]] = True
    free = dest < 0
    free_rows, cand_SC = rows[free], ranks_EC[experts[free]]
    on_SC = cand_SC >= 0
    num_copies_S = on_SC.sum(axis=1)
    # one factor per (free slot, distinct group of its copies): P(slot misses g) = 1 - copies on g / m
    group_SC = np.where(on_SC, group_R[np.maximum(cand_SC, 0)], -1)
    count_SC = np.zeros(group_SC.shape, dtype=np.int64)
    first_SC = on_SC.copy()
    for c in range(group_SC.shape[1]):  # C is a handful: columns, not an [S, C, C] cube
        same_S = group_SC == group_SC[:, c : c + 1]
        count_SC[:, c] = same_S.sum(axis=1)
        first_SC[:, c] &= ~same_S[:, :c].any(axis=1)
    factor = 1.0 - count_SC[first_SC] / np.broadcast_to(num_copies_S[:, None], on_SC.shape)[first_SC]
    cell = (np.broadcast_to(free_rows[:, None], group_SC.shape)[first_SC] * num_groups + group_SC[first_SC]).ravel()
    size = len(sets_MK) * num_groups
    log_miss = np.bincount(cell, weights=np.log(np.maximum(factor, 1e-300)), minlength=size)
    certain = np.bincount(cell, weights=factor <= 0, minlength=size) > 0  # every copy on g: surely reached
    reached = np.where(certain, 1.0, 1.0 - np.exp(log_miss)).reshape(len(sets_MK), num_groups)
    return np.where(visited_MG, 1.0, reached).sum(axis=1)


def _expected_ranks_hit(
    visited_MR: np.ndarray,
    rows_S: np.ndarray,
    experts_S: np.ndarray,
    dest_S: np.ndarray,
    ranks_EC: np.ndarray,
    num_ranks: int,
) -> np.ndarray:
    """`expected_groups_hit` over ranks, on the (set, rank) cells that free slots reach only: a free slot never has
    a copy on a visited rank (rule 1 would have taken it), and the copies of one expert sit on distinct ranks, so a
    token reaches its visited ranks plus, per reached cell, 1 - prod over the free slots with a copy there of
    (1 - 1/m). The planner's replica fill calls this thousands of times a layer on one expert's sets: the dense
    [M, R] pass of the general path was most of its time."""
    free = dest_S < 0
    cand_SC = ranks_EC[experts_S[free]]
    on_SC = cand_SC >= 0
    log_miss_S = np.log1p(-1.0 / on_SC.sum(axis=1))
    cell = (rows_S[free][:, None] * num_ranks + cand_SC)[on_SC]
    cells, which = np.unique(cell, return_inverse=True)
    reached = -np.expm1(np.bincount(which, weights=np.broadcast_to(log_miss_S[:, None], on_SC.shape)[on_SC]))
    hits = np.bincount(cells // num_ranks, weights=reached, minlength=len(visited_MR)).astype(np.float64, copy=False)
    return visited_MR.sum(axis=1) + hits  # float64 when no slot is free too (an empty bincount is int64)
