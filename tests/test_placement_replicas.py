"""Replicated experts in the planner: the replica rule's predicted metrics against a per-token recount, the
replicated plan's invariants, plan files and `c2r-place evaluate` with replicas, and the --replicas errors."""

from __future__ import annotations

import numpy as np
import pytest

from placement.inputs import routing_from_expert_ids
from placement.layout import ExpertLayout
from placement.objective import layer_metrics


def recount(ids_TK: np.ndarray, layout: ExpertLayout) -> tuple[float, np.ndarray]:
    """The rule applied token by token over the whole batch in flat order, written plainly (the reference):
    returns (mean distinct ranks per token, [R] pairs per rank)."""
    copies = layout.ranks_of_experts
    served = {e: 0 for e in range(layout.num_experts)}  # free pairs of e seen so far
    load = np.zeros(layout.num_ranks)
    distinct = []
    for token in ids_TK.tolist():
        slots = [e for e in token if e >= 0]
        visited = {copies[e][0] for e in slots if len(copies[e]) == 1}
        ranks = set()
        for e in slots:
            if len(copies[e]) == 1:
                rank = copies[e][0]
            else:
                on_visited = [r for r in copies[e] if r in visited]
                if on_visited:
                    rank = on_visited[0]
                else:
                    rank = copies[e][served[e] % len(copies[e])]
                    served[e] += 1
            ranks.add(rank)
            load[rank] += 1
        distinct.append(len(ranks))
    return float(np.mean(distinct)), load


# 4 experts on 2 ranks, 3 slots each: expert 0 (home 0) also on rank 1, expert 2 (home 1) also on rank 0.
LAYOUT = ExpertLayout((0, 0, 1, 1), 2, ((1,), (), (0,), ()))
# Worked example: [0, 1] visits rank 0 (expert 1), so expert 0 stays home: 1 rank. [0, 3] visits rank 1, so expert 0
# goes to its replica there: 1 rank. [2, 1]: expert 2's replica on rank 0. [0, -1] and [2, -1] are free pairs, split
# one each over the two copies (an even count, so the expectation is exact). [1, 3]: 2 ranks.
HAND_MADE = np.array([[0, 1], [0, 3], [2, 1], [2, 3], [0, -1], [0, -1], [2, -1], [2, -1], [1, 3], [3, -1]])


def test_replicated_metrics_equal_a_per_token_recount():
    copies, load = recount(HAND_MADE, LAYOUT)
    m = layer_metrics(routing_from_expert_ids(HAND_MADE, 4), LAYOUT)
    assert m["copies_per_token"] == pytest.approx(copies) == 1.1
    assert m["rank_load"] == load.tolist() == [7, 8]
    assert m["load_imbalance"] == pytest.approx(8 / 7.5)
    assert m["replicas"] == 2


def test_replicated_metrics_track_the_recount_on_random_routing():
    """Several free slots per token: the prediction takes them as independent (placement.replica_rule), the
    round robin does not, so the two agree closely but not exactly."""
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(8, 3, replace=False, p=np.arange(8, 0, -1) / 36) for _ in range(4000)])
    layout = ExpertLayout((0, 0, 1, 1, 2, 2, 3, 3), 4, ((1, 2), (3,), (), (0,), (), (), (), ()))
    copies, load = recount(ids, layout)
    m = layer_metrics(routing_from_expert_ids(ids, 8), layout)
    assert m["copies_per_token"] == pytest.approx(copies, rel=0.01)
    assert np.abs(np.array(m["rank_load"]) - load).max() <= 4  # within a pair per replicated copy on a rank
    unreplicated = ExpertLayout((0, 0, 1, 1, 2, 2, 3, 3), 4)
    plain = layer_metrics(routing_from_expert_ids(ids, 8), unreplicated)
    copies_plain, load_plain = recount(ids, unreplicated)
    assert plain["copies_per_token"] == pytest.approx(copies_plain) and plain["rank_load"] == load_plain.tolist()
