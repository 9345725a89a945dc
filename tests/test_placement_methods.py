"""Placement methods: balance, determinism, the exact optimum against brute force, Mt-KaHyPar reaching it,
two-level topology, replication."""

import itertools
import sys

import numpy as np
import pytest

from placement import methods
from placement.errors import PlacementError
from placement.export import replicate_hot_experts
from placement.inputs import restrict, routing_from_coactivation, routing_from_expert_ids, subsample
from placement.methods import METHODS, balance, balanced_labelings, count_balanced_placements, plan_layer
from placement.objective import km1, layer_metrics
from placement.synthetic import synthetic_expert_ids


def clustered_routing(num_experts, top_k, tokens=400, clusters=4, seed=0):
    ids = synthetic_expert_ids(tokens, num_experts, top_k, num_clusters=clusters, cluster_bonus=3.0, seed=seed)
    return routing_from_expert_ids(ids, num_experts)


def brute_force_optimum(routing, num_ranks):
    """Every labelling in R^E, kept if balanced: the true minimum of KM1."""
    capacity = routing.num_experts // num_ranks
    best = np.inf
    for labels in itertools.product(range(num_ranks), repeat=routing.num_experts):
        if np.bincount(labels, minlength=num_ranks).tolist() == [capacity] * num_ranks:
            best = min(best, km1(routing, np.array(labels)))
    return best


def assert_balanced(e2r, num_experts, num_ranks):
    assert len(e2r) == num_experts
    assert np.bincount(e2r, minlength=num_ranks).tolist() == [num_experts // num_ranks] * num_ranks


@pytest.mark.parametrize("num_ranks", [2, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_equals_brute_force(num_ranks, seed):
    routing = routing_from_expert_ids(synthetic_expert_ids(60, 8, 3, num_clusters=3, seed=seed), 8)
    e2r = plan_layer(routing, num_ranks, method="exact")
    assert_balanced(e2r, 8, num_ranks)
    assert km1(routing, e2r) == brute_force_optimum(routing, num_ranks)


def test_enumeration_counts_each_placement_once():
    for e, r in [(8, 2), (8, 4), (6, 3), (9, 3)]:
        labels = balanced_labelings(e, r)
        assert len(labels) == count_balanced_placements(e, r)
        canonical = {tuple(np.unique(row, return_index=True)[1].argsort()[row]) for row in labels}
        assert len(canonical) == len(labels)


@pytest.mark.parametrize("num_ranks", [2, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("top_k", [2, 3])
def test_kahypar_reaches_the_exact_optimum(num_ranks, seed, top_k):
    routing = clustered_routing(8, top_k, clusters=num_ranks, seed=seed)
    e2r = plan_layer(routing, num_ranks, method="kahypar", seed=seed)
    assert_balanced(e2r, 8, num_ranks)
    assert km1(routing, e2r) == km1(routing, plan_layer(routing, num_ranks, method="exact"))


def test_kahypar_reaches_the_exact_optimum_on_12_experts():
    routing = clustered_routing(12, 3, clusters=3, seed=4)
    exact = km1(routing, plan_layer(routing, 3, method="exact"))
    assert km1(routing, plan_layer(routing, 3, method="kahypar")) == exact


SHAPES = [(8, 2), (8, 4), (8, 8), (16, 4), (16, 8), (64, 2), (64, 8)]


# `exact` enumerates assignments, so it only gets the 8-expert shapes (it refuses bigger ones: tested elsewhere).
@pytest.mark.parametrize(
    "method,num_experts,num_ranks", [(m, e, r) for m in sorted(METHODS) for e, r in SHAPES if m != "exact" or e <= 8]
)
def test_every_method_returns_a_balanced_placement(method, num_experts, num_ranks):
    routing = clustered_routing(num_experts, 4, tokens=300, seed=num_experts + num_ranks)
    e2r = plan_layer(routing, num_ranks, method=method, seed=3)
    assert e2r.dtype == np.int64
    assert_balanced(e2r, num_experts, num_ranks)
    assert np.array_equal(e2r, plan_layer(routing, num_ranks, method=method, seed=3))  # deterministic


@pytest.mark.parametrize("method", ["kahypar", "greedy", "spectral", "kl", "exact"])
def test_methods_beat_contiguous_on_clustered_routing(method):
    routing = clustered_routing(8, 2, tokens=500, clusters=2, seed=7)
    planned = km1(routing, plan_layer(routing, 2, method=method))
    assert planned <= km1(routing, plan_layer(routing, 2, method="contiguous"))
    assert planned <= km1(routing, plan_layer(routing, 2, method="random"))


def test_methods_work_on_coactivation_input():
    ids = synthetic_expert_ids(500, 16, 2, num_clusters=4, seed=8)
    onehot = np.zeros((500, 16), dtype=np.int64)
    onehot[np.arange(500)[:, None], ids] = 1
    pairwise = routing_from_coactivation(onehot.T @ onehot)
    exact = routing_from_expert_ids(ids, 16)
    for method in METHODS:
        e2r = plan_layer(pairwise, 4, method=method) if method != "exact" else None
        if e2r is not None:
            assert_balanced(e2r, 16, 4)
    # top-2: the pair graph's KM1 is the token KM1, so Mt-KaHyPar on either input gives the same quality
    assert km1(exact, plan_layer(pairwise, 4)) == km1(exact, plan_layer(exact, 4))


def test_balancing_pass_repairs_sizes_and_keeps_groups():
    affinity = np.zeros((6, 6))
    for i, j in [(0, 1), (2, 3), (4, 5)]:
        affinity[i, j] = affinity[j, i] = 10.0
    affinity[1, 2] = affinity[2, 1] = 1.0
    labels = balance(np.array([0, 0, 0, 0, 1, 1]), affinity, 3)  # part 0 over-full, part 2 empty
    assert sorted(np.bincount(labels).tolist()) == [2, 2, 2]
    assert labels[0] == labels[1] and labels[2] == labels[3] and labels[4] == labels[5]


def test_exact_refuses_large_cases():
    routing = clustered_routing(16, 2, tokens=50)
    with pytest.raises(PlacementError, match=r"2027025 balanced placements of 16 experts on 8 parts"):
        plan_layer(routing, 8, method="exact")


def test_topology_errors_name_both_numbers():
    routing = clustered_routing(8, 2, tokens=50)
    with pytest.raises(PlacementError, match=r"ranks \(3\) must divide experts \(8\)"):
        plan_layer(routing, 3)
    with pytest.raises(PlacementError, match=r"nodes \(3\) must divide ranks \(4\)"):
        plan_layer(routing, 4, num_nodes=3)
    with pytest.raises(PlacementError, match="unknown method 'metis'"):
        plan_layer(routing, 2, method="metis")


def test_missing_mtkahypar_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mtkahypar", None)
    methods._mtkahypar.cache_clear()
    try:
        with pytest.raises(PlacementError, match="pip install mtkahypar.*--method greedy"):
            plan_layer(clustered_routing(8, 2, tokens=50), 2, method="kahypar")
    finally:
        methods._mtkahypar.cache_clear()
    assert_balanced(plan_layer(clustered_routing(8, 2, tokens=50), 2, method="greedy"), 8, 2)


def test_two_level_placement_cuts_inter_node_fanout():
    # 16 experts in 2 groups of 8 that fire together (k=4), 8 ranks = 2 nodes x 4 GPUs. A flat partition is blind
    # to which ranks share a node; the two-level plan puts each group on one node.
    rng = np.random.default_rng(0)
    groups = [rng.permutation(16)[:8], None]
    groups[1] = np.setdiff1d(np.arange(16), groups[0])
    ids = np.stack([rng.choice(groups[rng.integers(2)], 4, replace=False) for _ in range(600)])
    routing = routing_from_expert_ids(ids, 16)
    flat = layer_metrics(routing, plan_layer(routing, 8, num_nodes=1), 8, num_nodes=2)
    two = layer_metrics(routing, plan_layer(routing, 8, num_nodes=2), 8, num_nodes=2)
    assert two["node_fanout_per_token"] <= flat["node_fanout_per_token"]
    assert two["node_fanout_per_token"] == pytest.approx(1.0)
    for method in ("greedy", "kl", "spectral", "random", "contiguous"):
        assert_balanced(plan_layer(routing, 8, num_nodes=2, method=method), 16, 8)


def test_restrict_and_subsample_keep_token_counts():
    routing = clustered_routing(8, 3, tokens=300)
    sub = restrict(routing, np.array([5, 1, 2, 7]))
    assert sub.num_experts == 4 and sub.weight_M.sum() == 300
    assert sub.expert_load_E.tolist() == routing.expert_load_E[[5, 1, 2, 7]].tolist()
    small = subsample(routing, 100, seed=1)
    assert small.weight_M.sum() == 100 and small.num_tokens == 100 and small.expert_load_E.sum() == 300
    assert subsample(routing, 1000) is routing


def test_replicate_hot_experts():
    load = np.array([[100.0, 10, 10, 10, 10, 10, 10, 40]])
    phy2log, log2phy, logcnt = replicate_hot_experts(load, num_replicas=12, num_gpus=4)
    assert phy2log.shape == (1, 12) and logcnt.sum() == 12
    assert logcnt[0, 0] == 4 and logcnt[0, 7] == 2  # 100/4 = 25 vs 40/2 = 20: the hottest get the replicas
    for e in range(8):
        slots = [p for p in log2phy[0, e] if p >= 0]
        assert len(slots) == logcnt[0, e] and all(phy2log[0, p] == e for p in slots)
    per_replica = (load[0] / logcnt[0])[phy2log[0]].reshape(4, 3).sum(axis=1)
    assert per_replica.max() / per_replica.mean() < 1.3
    with pytest.raises(PlacementError, match=r"replicas \(10\).*GPUs \(4\)"):
        replicate_hot_experts(load, 10, 4)
