"""The copy rule per token, exactly as the dispatchers run it (c2r/parallel/replicas.py does it in torch on the GPU;
this is the numpy twin the simulator uses, tested equal to it in tests/test_replica_rule_agreement.py).

For one source rank's tokens, each valid slot whose expert has m > 1 copies goes (1) to its first copy, home first,
on a rank the token already visits through its single-copy experts, else (2) as the n-th "free pair" of that expert
in flat order (token * K + slot) to copy n mod m. The planner's *expected* form of the same rule over a whole batch
is `placement.replica_rule`. `choose_balanced_copy_ranks` is the twin of the dispatchers' ``copy_choice="balanced"``.

Shape legend: A tokens of one source rank, K slots, E experts, C most copies of one expert, R ranks.
"""

from __future__ import annotations

import numpy as np

from placement.layout import ExpertLayout
from placement.replica_rule import copy_ranks

COPY_CHOICES = ("rule", "balanced")  # c2r-train --copy-choice, c2r-place simulate --copy-choice
# rounds of `balanced_shares` (here and in c2r/parallel/replicas.py): within 1% of the best per-batch split at 16 ranks
# from 32, at 64 ranks from ~128 (skewed routing, tests/test_gpu.py); 64: within ~2% there, 0.06 ms a layer in the
# kernel
BALANCE_ITERS = 64


def balanced_shares(count_E: np.ndarray, rank_EC: np.ndarray, num_ranks: int) -> np.ndarray:
    """[E, C] float64: c2r.parallel.replicas.balanced_shares (its docstring), in numpy."""
    on = rank_EC >= 0
    copies_E = on.sum(axis=1)
    cells = on & (copies_E > 1)[:, None]
    rank = np.maximum(rank_EC, 0)
    count = np.asarray(count_E, dtype=np.float64)
    fixed_R = np.bincount(rank[:, 0], weights=np.where(copies_E > 1, 0.0, count), minlength=num_ranks)
    step = 1.0 / max(float(np.bincount(rank.ravel(), weights=cells.ravel(), minlength=num_ranks).max()), 1.0)
    share = np.where(cells, (count / copies_E)[:, None], 0.0)
    for _ in range(BALANCE_ITERS):
        load = fixed_R + np.bincount(rank.ravel(), weights=share.ravel(), minlength=num_ranks)
        load_EC = load[rank]
        mean_E = np.where(cells, load_EC, 0.0).sum(axis=1) / copies_E
        share = np.where(cells, np.maximum(share + step * (mean_E[:, None] - load_EC), 0.0), 0.0)
        total = share.sum(axis=1)  # 0 where nothing is replicated or every share clipped: then the shares stay 0
        share = share * np.where(total > 0, count / np.maximum(total, 1e-300), 0.0)[:, None]
    return share


def balanced_rank_loads(load_SE: np.ndarray, layout: ExpertLayout) -> np.ndarray:
    """[S, R] each rank's load when each row of ``load_SE`` (one batch's pairs per expert) is split as
    `balanced_shares` splits it: the single-copy experts' on their ranks, each replicated expert's shares on its
    copies' (the quotas round these to whole pairs per source rank, so a run's loads differ from these by a pair or
    so per copy)."""
    ranks_EC = copy_ranks(layout)
    on = ranks_EC >= 0
    single = on.sum(axis=1) == 1
    out = np.zeros((len(load_SE), layout.num_ranks))
    for row, load in zip(out, np.asarray(load_SE, dtype=np.float64)):
        share = balanced_shares(load, ranks_EC, layout.num_ranks)
        row += np.bincount(ranks_EC[single, 0], weights=load[single], minlength=layout.num_ranks)
        row += np.bincount(ranks_EC[on], weights=share[on], minlength=layout.num_ranks)
    return out


def choose_balanced_copy_ranks(
    expert_ids_AK: np.ndarray, layout: ExpertLayout, count_E: np.ndarray | None = None, source_rank: int = 0
) -> np.ndarray:
    """`choose_copy_ranks` under ``copy_choice="balanced"`` (c2r/parallel/replicas.py): ``count_E`` the batch's
    pairs per expert over every source rank (default: this source's own, a batch of one rank)."""
    ids = np.asarray(expert_ids_AK, dtype=np.int64)
    valid = ids >= 0
    expert = np.maximum(ids, 0)
    ranks_EC = copy_ranks(layout)
    E, C = ranks_EC.shape
    copies_AK = (ranks_EC >= 0).sum(axis=1)[expert]
    local_E = np.bincount(ids[valid], minlength=E)
    count = local_E if count_E is None else np.asarray(count_E, dtype=np.int64)
    share = balanced_shares(count, ranks_EC, layout.num_ranks)
    dither = (source_rank + 0.5) / layout.num_ranks  # c2r.parallel.replicas.local_quotas: rounding per source rank
    bound = np.minimum(
        np.floor(np.cumsum(share / np.maximum(count, 1)[:, None], axis=1) * local_E[:, None] + dither),
        local_E[:, None],
    )
    bound = bound.astype(np.int64)
    bound[:, -1] = local_E
    quota = np.diff(bound, axis=1, prepend=0)
    first = _first_visited_copy(ids, layout, ranks_EC)
    replicated = valid & (copies_AK > 1)
    prefer = replicated & (first < C)
    key = expert * C + np.minimum(first, C - 1)
    keep = prefer & (_nth_within_key(key, prefer) < quota.ravel()[key])
    kept = np.bincount(key[keep], minlength=E * C).reshape(E, C)
    spill = replicated & ~keep
    ends = np.cumsum(quota - kept, axis=1)
    spill_copy = np.minimum((_nth_within_key(expert, spill)[..., None] >= ends[expert]).sum(axis=2), copies_AK - 1)
    copy = np.where(keep, first, np.where(spill, spill_copy, np.where(first < C, first, 0)))
    dest = np.take_along_axis(ranks_EC[expert], copy[..., None], 2)[..., 0]
    return np.where(valid, dest, -1)


def _first_visited_copy(ids: np.ndarray, layout: ExpertLayout, ranks_EC: np.ndarray) -> np.ndarray:
    """[A, K] the index of each slot's first copy on a rank its token visits (rule 1), C where none is."""
    valid = ids >= 0
    expert = np.maximum(ids, 0)
    copies_AK = (ranks_EC >= 0).sum(axis=1)[expert]
    A, K = ids.shape
    R, C = layout.num_ranks, ranks_EC.shape[1]
    cand_AKC = ranks_EC[expert]
    single = valid & (copies_AK == 1)
    visited_AR = np.zeros((A, R + 1), dtype=bool)
    rows = np.broadcast_to(np.arange(A)[:, None], (A, K))
    visited_AR[rows[single], cand_AKC[..., 0][single]] = True
    on_visited = np.take_along_axis(visited_AR, np.where(cand_AKC >= 0, cand_AKC, R).reshape(A, K * C), 1)
    return np.where(on_visited.reshape(A, K, C), np.arange(C), C).min(axis=2)


def _nth_within_key(key_AK: np.ndarray, mask_AK: np.ndarray) -> np.ndarray:
    """[A, K]: how many masked-in slots with the same key come before each in flat order (arbitrary where off)."""
    flat = np.flatnonzero(mask_AK.ravel())
    order = flat[np.argsort(key_AK.ravel()[flat], kind="stable")]
    keys = key_AK.ravel()[order]
    nth = np.zeros(key_AK.size, dtype=np.int64)
    nth[order] = np.arange(len(order)) - np.searchsorted(keys, keys, side="left")
    return nth.reshape(key_AK.shape)


def choose_copy_ranks(expert_ids_AK: np.ndarray, layout: ExpertLayout) -> np.ndarray:
    """[A, K] int64: the rank each valid slot goes to (-1: an empty slot, expert id < 0), for one source rank."""
    ids = np.asarray(expert_ids_AK, dtype=np.int64)
    valid = ids >= 0
    expert = np.maximum(ids, 0)
    ranks_EC = copy_ranks(layout)
    C = ranks_EC.shape[1]
    copies_AK = (ranks_EC >= 0).sum(axis=1)[expert]
    first = _first_visited_copy(ids, layout, ranks_EC)  # 1. a copy on a visited rank
    # 2. Free pairs: the n-th of expert e in flat order goes to copy n mod m.
    free = valid & (copies_AK > 1) & (first == C)
    nth = _nth_within_key(expert, free)
    copy = np.where(free, nth % np.maximum(copies_AK, 1), np.where(first < C, first, 0))
    dest = np.take_along_axis(ranks_EC[expert], copy[..., None], 2)[..., 0]
    return np.where(valid, dest, -1)
