"""Placement metrics against hand-computed cases, brute-force simulation and the pairwise approximation."""

import numpy as np
import pytest

from placement.inputs import routing_from_coactivation, routing_from_expert_ids
from placement.layout import ExpertLayout
from placement.objective import distinct_per_row, km1, km1_batch, layer_metrics, load_key, overall_metrics
from placement.synthetic import synthetic_expert_ids


def test_worked_example_by_hand():
    # 4 experts on 2 ranks: expert_to_rank = [0, 0, 1, 1]; top-2 tokens:
    #   token A {0, 1} -> ranks {0}     lambda 1
    #   token B {0, 2} -> ranks {0, 1}  lambda 2
    #   token C {1, 3} -> ranks {0, 1}  lambda 2
    #   token D {2, 3} -> ranks {1}     lambda 1
    #   token E {3, -} (one empty slot) lambda 1
    # copies/token = (1+2+2+1+1)/5 = 1.4; slots/token = 9/5 = 1.8; km1/token = (0+1+1+0+0)/5 = 0.4;
    # cross-rank copies/token (per-rank dispatch, uniform source rank) = 1.4 * (1 - 1/2) = 0.7;
    # bytes with hidden 8 in bf16 = 0.7 * 8 * 2 = 11.2; per-expert cross copies = 1.8 / 2 = 0.9;
    # rank load: rank 0 = load(0)+load(1) = 2+2 = 4, rank 1 = load(2)+load(3) = 2+3 = 5 -> max/mean = 5/4.5.
    ids = np.array([[0, 1], [0, 2], [3, 1], [2, 3], [3, -1]])
    routing = routing_from_expert_ids(ids, 4)
    m = layer_metrics(routing, ExpertLayout([0, 0, 1, 1], 2), hidden=8, dtype_bytes=2)
    assert m["tokens"] == 5 and m["exact"]
    assert m["copies_per_token"] == pytest.approx(1.4)
    assert m["slots_per_token"] == pytest.approx(1.8)
    assert m["km1_per_token"] == pytest.approx(0.4)
    assert m["cross_rank_copies_per_token"] == pytest.approx(0.7)
    assert m["cross_rank_bytes_per_token"] == pytest.approx(11.2)
    assert m["per_expert_cross_rank_copies_per_token"] == pytest.approx(0.9)
    assert m["rank_load"] == [4, 5]
    assert m["load_imbalance"] == pytest.approx(5 / 4.5)
    assert km1(routing, np.array([0, 0, 1, 1])) == 2.0


def test_two_level_worked_example():
    # 8 experts, 4 ranks = 2 nodes x 2 GPUs, expert_to_rank = [0,0,1,1,2,2,3,3] (node = rank // 2).
    #   {0, 2, 4}: ranks {0, 1, 2} lambda 3, nodes {0, 1} nu 2
    #   {0, 1, 3}: ranks {0, 1}    lambda 2, nodes {0}    nu 1
    # node fan-out = 1.5; inter-node copies (node dedup) = 1.5 * 1/2 = 0.75; flat per-rank = 2.5 * 1/2 = 1.25.
    routing = routing_from_expert_ids(np.array([[0, 2, 4], [0, 1, 3]]), 8)
    m = layer_metrics(routing, ExpertLayout([0, 0, 1, 1, 2, 2, 3, 3], 4), num_nodes=2)
    assert m["copies_per_token"] == pytest.approx(2.5)
    assert m["node_fanout_per_token"] == pytest.approx(1.5)
    assert m["inter_node_copies_per_token"] == pytest.approx(0.75)
    assert m["inter_node_rank_copies_per_token"] == pytest.approx(1.25)


def test_cross_rank_formula_matches_simulation_over_source_ranks():
    # Put each token on every source rank s in turn and count copies to ranks other than s: the mean over s is
    # lambda (R - 1) / R (per-rank dispatch) and |S| (R - 1) / R (per-expert dispatch).
    rng = np.random.default_rng(3)
    ids = synthetic_expert_ids(300, 16, 4, seed=1)
    ids[rng.random(ids.shape) < 0.1] = -1
    e2r = rng.permutation(16) % 4
    per_rank, per_expert = [], []
    for row in ids:
        dest = [e2r[e] for e in row if e >= 0]
        for s in range(4):
            per_rank.append(len({d for d in dest if d != s}))
            per_expert.append(sum(d != s for d in dest))
    m = layer_metrics(routing_from_expert_ids(ids, 16), ExpertLayout(e2r, 4))
    assert m["cross_rank_copies_per_token"] == pytest.approx(np.mean(per_rank) * 1)
    assert m["per_expert_cross_rank_copies_per_token"] == pytest.approx(np.mean(per_expert))


def test_distinct_per_row_ignores_empty_slots():
    assert distinct_per_row(np.array([[1, 1, -1], [-1, -1, -1], [2, 0, 2], [3, -1, 3]])).tolist() == [1, 0, 2, 1]


def test_km1_batch_equals_km1():
    ids = synthetic_expert_ids(500, 8, 3, seed=2)
    routing = routing_from_expert_ids(ids, 8)
    labels = np.stack([np.random.default_rng(s).permutation(8) % 4 for s in range(7)])
    assert km1_batch(routing, labels, chunk_elems=50).tolist() == [km1(routing, row) for row in labels]


def _coactivation(ids, num_experts):
    onehot = np.zeros((len(ids), num_experts), dtype=np.int64)
    for t, row in enumerate(ids):
        onehot[t, row[row >= 0]] = 1
    return onehot.T @ onehot


def test_pairwise_metrics_are_exact_for_top2():
    ids = synthetic_expert_ids(400, 8, 2, seed=5)
    exact = routing_from_expert_ids(ids, 8)
    pairwise = routing_from_coactivation(_coactivation(ids, 8))
    assert pairwise.num_tokens == 400  # inferred: k = 1 + 2 pairs / trace = 2, T = trace / 2
    e2r = ExpertLayout([0, 1, 2, 3, 0, 1, 2, 3], 4)
    a = layer_metrics(exact, e2r, num_nodes=2)
    b = layer_metrics(pairwise, e2r, num_nodes=2)
    assert not b["exact"] and b["approximation"] == "pairwise"
    for key in ("copies_per_token", "km1_per_token", "load_imbalance", "node_fanout_per_token", "slots_per_token"):
        assert b[key] == pytest.approx(a[key]), key
    # The diagonal may be absent: then the matrix is read as top-2 and the loads are row sums.
    c = _coactivation(ids, 8)
    np.fill_diagonal(c, 0)
    assert layer_metrics(routing_from_coactivation(c), e2r)["copies_per_token"] == pytest.approx(a["copies_per_token"])


def test_pairwise_is_a_lower_bound_for_larger_k():
    ids = synthetic_expert_ids(400, 16, 6, seed=6)
    e2r = ExpertLayout.contiguous(16, 4)
    exact = layer_metrics(routing_from_expert_ids(ids, 16), e2r)["copies_per_token"]
    approx = layer_metrics(routing_from_coactivation(_coactivation(ids, 16), num_tokens=400), e2r)
    assert approx["copies_per_token"] <= exact + 1e-9


def test_overall_is_the_mean_over_layers():
    r = routing_from_expert_ids(np.array([[0, 2], [1, 3]]), 4)
    layers = [layer_metrics(r, ExpertLayout([0, 0, 1, 1], 2)), layer_metrics(r, ExpertLayout([0, 1, 0, 1], 2))]
    o = overall_metrics(layers)
    assert o["copies_per_token"] == pytest.approx((2.0 + 1.0) / 2)
    assert o["tokens"] == 4 and o["layers"] == 2


def test_step_load_is_the_busiest_rank_of_each_step_by_hand():
    # 4 experts on 2 ranks, expert_to_rank = [0, 0, 1, 1]; two recorded steps of top-1 tokens:
    #   step 0: experts 0, 0, 1, 2 -> rank loads [3, 1]: busiest 3, mean 2
    #   step 1: experts 2, 3, 3, 1 -> rank loads [1, 3]: busiest 3, mean 2
    # pooled: [4, 4] -> 1.0, yet each step waits for a rank at 1.5 x mean: step load (3 + 3) / (2 + 2) = 1.5.
    ids = np.array([[0], [0], [1], [2], [2], [3], [3], [1]])
    routing = routing_from_expert_ids(ids, 4, steps_N=np.array([0, 0, 0, 0, 1, 1, 1, 1]))
    m = layer_metrics(routing, ExpertLayout([0, 0, 1, 1], 2))
    assert m["load_imbalance"] == pytest.approx(1.0)
    assert m["step_load_imbalance"] == pytest.approx(1.5)
    assert m["worst_step_load_imbalance"] == pytest.approx(1.5)
    # a layout that keeps every step level: experts {0, 3} and {1, 2} (loads [2, 2] in both steps)
    level = layer_metrics(routing, ExpertLayout([0, 1, 1, 0], 2))
    assert level["step_load_imbalance"] == pytest.approx(1.0)
    o = overall_metrics([m, level])
    assert o["step_load_imbalance"] == pytest.approx(1.25) and o["worst_step_load_imbalance"] == pytest.approx(1.5)
    # one recorded step: no per-step metric, and then none overall (a mean over some layers would not compare with
    # another placement's over all of them), nor in what placements are compared on
    single = layer_metrics(routing_from_expert_ids(ids, 4), ExpertLayout([0, 0, 1, 1], 2))
    assert "step_load_imbalance" not in single
    assert "step_load_imbalance" not in overall_metrics([m, single])
    assert load_key([m, level]) == "step_load_imbalance" and load_key([m, single]) == "load_imbalance"
