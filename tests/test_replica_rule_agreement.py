"""The planner's model of the replica rule (placement/replica_rule.py, numpy, whole batch, in expectation) against the
rule the dispatchers run (c2r/parallel/replicas.py, torch, per source rank): the two layers implement one rule. And
the planner's fast count of distinct ranks against its general per-group count."""

import numpy as np
import pytest
import torch

from c2r.parallel.replicas import CopyChooser
from placement.layout import ExpertLayout
from placement.replica_rule import copy_ranks, expected_groups_hit, expected_rank_load

T, E, K, R = 600, 8, 2, 4
# every expert on two ranks: rank r's experts also on rank r + 1 (what P = 2E plans, placement/replicate.py)
RING = ExpertLayout.from_json([[e // 2, (e // 2 + 1) % R] for e in range(E)], R, num_experts=E)
# the layouts on which the numpy twins must pick what the dispatchers pick: a hot expert everywhere, several
# replicated experts whose homes moved, none replicated, every expert twice
TWIN_LAYOUTS = [
    ExpertLayout.from_json([[0, 1, 2, 3], 0, 1, 1, 2, [2, 3], 3, 0], R, num_experts=E),
    ExpertLayout.from_json([[1, 0], [2, 3], 0, 0, [1, 2], 2, 3, [3, 1]], R, num_experts=E),
    ExpertLayout.contiguous(E, R),
    RING,
]


def test_planner_prediction_matches_the_runtime_choice():
    rng = np.random.default_rng(0)
    # expert 0 hot, replicated on every rank; expert 5 on two ranks; 12 slots, 3 per rank
    layout = ExpertLayout.from_json([[0, 1, 2, 3], 0, 1, 1, 2, [2, 3], 3, 0], R, num_experts=E)
    p = np.array([6, 1, 1, 1, 1, 2, 1, 1], dtype=float)
    sets = np.stack([rng.choice(E, K, replace=False, p=p / p.sum()) for _ in range(T)])
    physical = CopyChooser(layout).physical(torch.from_numpy(sets), torch.ones(T, K, dtype=torch.bool)).numpy()
    X = layout.experts_per_rank
    ranks_TK = physical // X
    assert (layout.physical_to_logical[physical] == sets).all()  # every slot goes to a copy of its own expert
    # Loads: the runtime's split over copies is a round robin, the planner's an even expectation; they differ by
    # less than one pair per copy held on a rank.
    runtime_load = np.bincount(ranks_TK.ravel(), minlength=R)
    ranks_EC = copy_ranks(layout)
    predicted_load = expected_rank_load(sets, np.ones(T), ranks_EC, R)
    copies_on_rank = np.bincount(ranks_EC[ranks_EC >= 0], minlength=R)
    assert np.all(np.abs(predicted_load - runtime_load) <= copies_on_rank), (predicted_load, runtime_load)
    # Distinct ranks per token: exact for tokens with at most one free slot (every token here: K = 2 and at most
    # one of a token's two experts can be free when the other is single-copy; two replicated experts: both free).
    single = np.array([len(c) == 1 for c in layout.ranks_of_experts])
    one_free = single[sets].any(axis=1)
    predicted = expected_groups_hit(sets[one_free], ranks_EC, R)
    runtime = np.array([len(set(row)) for row in ranks_TK[one_free]])
    np.testing.assert_allclose(predicted, runtime)
    # Tokens whose both experts are replicated: the expectation over the round robin, close on average.
    both = ~one_free
    assert both.sum() > 20
    predicted = expected_groups_hit(sets[both], ranks_EC, R).mean()
    runtime = np.mean([len(set(row)) for row in ranks_TK[both]])
    assert abs(predicted - runtime) < 0.15, (predicted, runtime)


def test_the_simulators_copy_choice_is_the_dispatchers():
    # placement/copy_choice.py (numpy, used by c2r-place simulate) and c2r/parallel/replicas.py (torch, what the
    # dispatchers run) pick the same copy for every slot: random routing with empty slots, several layouts.
    from placement.copy_choice import choose_copy_ranks

    rng = np.random.default_rng(3)
    for layout in TWIN_LAYOUTS:
        for k in (1, 2, 4):
            ids = np.stack([rng.choice(E, k, replace=False) for _ in range(300)])
            ids[rng.random(ids.shape) < 0.2] = -1  # empty slots (variable k)
            valid = torch.from_numpy(ids >= 0)
            physical = CopyChooser(layout).physical(torch.from_numpy(np.maximum(ids, 0)), valid).numpy()
            want = np.where(ids >= 0, physical // layout.experts_per_rank, -1)
            np.testing.assert_array_equal(choose_copy_ranks(ids, layout), want)


def test_a_layout_with_every_expert_replicated_is_predicted_exactly_in_expectation():
    # no single-copy expert (what --replicas 2E plans): rule 1 never applies, every pair is free; the planner's
    # loads are float halves (numpy's bincount of no single-copy slot had made them int64 and failed to add them)
    rng = np.random.default_rng(5)
    sets = np.stack([rng.choice(E, K, replace=False) for _ in range(T)])
    ranks_EC = copy_ranks(RING)
    predicted = expected_rank_load(sets, np.ones(T), ranks_EC, R)
    assert predicted.dtype == np.float64
    own_R = np.bincount(sets.ravel(), minlength=E).reshape(R, 2).sum(axis=1)  # rank r's two homes
    np.testing.assert_allclose(predicted, (own_R + np.roll(own_R, 1)) / 2)  # half its own, half its predecessor's
    physical = CopyChooser(RING).physical(torch.from_numpy(sets), torch.ones(T, K, dtype=torch.bool)).numpy()
    runtime = np.bincount((physical // RING.experts_per_rank).ravel(), minlength=R)
    assert np.abs(predicted - runtime).max() <= 2  # within a pair per copy held on a rank (4 a rank, each +-1/2)


def random_replicated_case(rng, num_experts, num_ranks, top_k, num_sets):
    """Sets with -1 padding, and a copy table of 1 to several copies per expert on distinct ranks (-1 past them)."""
    sets = np.stack([rng.permutation(num_experts)[:top_k] for _ in range(num_sets)])
    sets[rng.random(sets.shape) < 0.15] = -1
    copies = rng.integers(1, min(num_ranks, 4) + 1, num_experts)
    table = np.full((num_experts, int(copies.max())), -1)
    for e, m in enumerate(copies):
        table[e, :m] = rng.permutation(num_ranks)[:m]
    return sets, table


@pytest.mark.parametrize("seed", range(4))
def test_distinct_ranks_fast_path_equals_the_groups_path(seed):
    # the rank count on reached cells (the replica fill's fast path) against the general path with each rank its
    # own group
    rng = np.random.default_rng(seed)
    for num_experts, num_ranks, top_k in [(16, 4, 4), (32, 8, 6), (64, 16, 8)]:
        sets, table = random_replicated_case(rng, num_experts, num_ranks, top_k, 300)
        fast = expected_groups_hit(sets, table, num_ranks)
        general = expected_groups_hit(sets, table, num_ranks, np.arange(num_ranks))
        assert fast.dtype == np.float64 and np.allclose(fast, general, rtol=0, atol=1e-12)
    single = expected_groups_hit(np.array([[0, 1], [1, -1]]), np.array([[0], [1]]), 2)  # no free slot at all
    assert single.dtype == np.float64 and single.tolist() == [2.0, 1.0]


def test_the_balanced_choice_equals_its_numpy_twin_and_levels_the_ranks():
    # copy_choice="balanced" (c2r/parallel/replicas.py, torch) and placement/copy_choice.py's twin pick the same copy
    # for every slot; every slot goes to a copy of its own expert; on skewed routing over a layout whose copies
    # connect the ranks it levels the loads that the fixed split leaves uneven
    from c2r.parallel import replicas
    from placement import copy_choice
    from placement.copy_choice import choose_balanced_copy_ranks, choose_copy_ranks

    assert copy_choice.BALANCE_ITERS == replicas.BALANCE_ITERS  # one number: the dispatchers import the twin's

    rng = np.random.default_rng(7)
    p = np.array([8, 1, 1, 4, 1, 2, 1, 1], dtype=float)
    for layout in TWIN_LAYOUTS:
        for k in (1, 2, 4):
            ids = np.stack([rng.choice(E, k, replace=False, p=p / p.sum()) for _ in range(500)])
            ids[rng.random(ids.shape) < 0.1] = -1
            valid = torch.from_numpy(ids >= 0)
            chooser = CopyChooser(layout, copy_choice="balanced")
            physical = chooser.physical(torch.from_numpy(np.maximum(ids, 0)), valid).numpy()
            want = np.where(ids >= 0, physical // layout.experts_per_rank, -1)
            np.testing.assert_array_equal(choose_balanced_copy_ranks(ids, layout), want)
            held = layout.physical_to_logical[physical]
            assert (held[ids >= 0] == ids[ids >= 0]).all()  # each slot on a copy of its own expert, none lost
    ids = np.stack([rng.choice(E, K, replace=False, p=p / p.sum()) for _ in range(T)])
    rule = np.bincount(choose_copy_ranks(ids, RING).ravel(), minlength=R)
    balanced = np.bincount(choose_balanced_copy_ranks(ids, RING).ravel(), minlength=R)
    assert rule.max() / rule.mean() > 1.2 and balanced.max() / balanced.mean() < 1.01, (rule, balanced)


def test_the_planners_balanced_load_is_what_the_choice_sends_up_to_rounding():
    # placement/copy_choice.py balanced_rank_loads (the plan summary's prediction for --copy-choice balanced, from
    # expert loads alone) against the copies the choice picks token by token, the batch split over 4 source ranks
    # (each rounds its quotas to whole pairs, dithered by source: 0.7 pairs off at most here)
    from placement.copy_choice import balanced_rank_loads
    from placement.simulate import slot_ranks, source_ranks

    rng = np.random.default_rng(3)
    p = np.array([8, 1, 1, 4, 1, 2, 1, 1], dtype=float)
    for layout in TWIN_LAYOUTS:
        ids = np.stack([rng.choice(E, K, replace=False, p=p / p.sum()) for _ in range(T)])
        sent = np.bincount(slot_ranks(ids, layout, source_ranks(T, R), "balanced").ravel(), minlength=R)
        predicted = balanced_rank_loads(np.bincount(ids.ravel(), minlength=E)[None], layout)[0]
        assert predicted.sum() == pytest.approx(T * K)
        np.testing.assert_allclose(predicted, sent, atol=R)  # a rank's load to within a pair per source
    ids = np.stack([rng.choice(E, K, replace=False, p=p / p.sum()) for _ in range(T)])
    level = balanced_rank_loads(np.bincount(ids.ravel(), minlength=E)[None], RING)[0]
    assert level.max() / level.mean() < 1.01
