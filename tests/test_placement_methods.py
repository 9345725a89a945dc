"""Placement methods: balance, determinism, the exact optimum against brute force, Mt-KaHyPar reaching it,
METIS, two-level topology and Mt-KaHyPar's mapping onto the ranks' graph, replication."""

import itertools
import os
import sys

import numpy as np
import pytest

from placement import methods
from placement.cli import main as place_main
from placement.errors import PlacementError
from placement.export import replicate_hot_experts
from placement.inputs import restrict, routing_from_coactivation, routing_from_expert_ids, subsample
from placement.layout import ExpertLayout
from placement.methods import (
    METHODS,
    balance,
    balanced_labelings,
    count_balanced_placements,
    integer_affinity,
    plan_layer,
    steiner_cost_batch,
)
from placement.objective import km1, km1_batch, layer_metrics
from placement.plan import load_plan
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


@pytest.mark.parametrize("method", ["kahypar", "metis", "greedy", "spectral", "kl", "exact"])
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
    with pytest.raises(PlacementError, match="unknown method 'louvain'"):
        plan_layer(routing, 2, method="louvain")
    with pytest.raises(PlacementError, match="unknown topology 'ring'"):
        plan_layer(routing, 4, num_nodes=2, topology="ring")
    with pytest.raises(PlacementError, match="topology 'map'.*needs --method kahypar, not 'greedy'"):
        plan_layer(routing, 4, num_nodes=2, method="greedy", topology="map")
    with pytest.raises(PlacementError, match="inter-node cost must be an integer >= 1.*got 0"):
        plan_layer(routing, 4, num_nodes=2, topology="map", inter_node_cost=0)


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
    flat = layer_metrics(routing, ExpertLayout(plan_layer(routing, 8, num_nodes=1), 8), num_nodes=2)
    two = layer_metrics(routing, ExpertLayout(plan_layer(routing, 8, num_nodes=2), 8), num_nodes=2)
    assert two["node_fanout_per_token"] <= flat["node_fanout_per_token"]
    assert two["node_fanout_per_token"] == pytest.approx(1.0)
    for method in ("greedy", "kl", "spectral", "metis", "random", "contiguous"):
        assert_balanced(plan_layer(routing, 8, num_nodes=2, method=method), 16, 8)
    mapped = plan_layer(routing, 8, num_nodes=2, topology="map")
    assert_balanced(mapped, 16, 8)
    assert layer_metrics(routing, ExpertLayout(mapped, 8), num_nodes=2)["node_fanout_per_token"] == pytest.approx(1.0)


# ---- METIS -----------------------------------------------------------------------------------------------------


def disjoint_pairs_routing(num_experts, tokens=400, seed=0):
    """Top-2 routing where the experts form num_experts/2 fixed pairs and every token picks one pair: the optimum
    (one pair per rank, or per half-rank) has KM1 0."""
    rng = np.random.default_rng(seed)
    pairs = rng.permutation(num_experts).reshape(-1, 2)
    ids = pairs[rng.integers(len(pairs), size=tokens)]
    return routing_from_expert_ids(ids, num_experts), pairs


def pairwise_counts(routing):
    """[E, E] co-activation counts (zero diagonal: read as top-2) of a top-2 routing."""
    counts = np.zeros((routing.num_experts, routing.num_experts))
    for (a, b), w in zip(routing.sets_MK[:, :2], routing.weight_M):
        counts[a, b] += w
        counts[b, a] += w
    return counts


def test_metis_finds_the_disjoint_pairs():
    routing, pairs = disjoint_pairs_routing(8)
    pairwise = routing_from_coactivation(pairwise_counts(routing))
    for source in (routing, pairwise):
        e2r = plan_layer(source, 4, method="metis")
        assert_balanced(e2r, 8, 4)
        assert km1(routing, e2r) == 0 == km1(routing, plan_layer(routing, 4, method="exact"))
        assert all(e2r[a] == e2r[b] for a, b in pairs)
    # 16 experts in 8 pairs on 2 nodes x 2 GPUs: every pair stays on one rank
    routing16, _ = disjoint_pairs_routing(16, seed=1)
    e2r = plan_layer(routing16, 4, num_nodes=2, method="metis")
    assert_balanced(e2r, 16, 4)
    assert km1(routing16, e2r) == 0


def test_metis_integer_weights_are_exact_clique_weights():
    routing = clustered_routing(8, 4, tokens=200, seed=3)  # sets of size <= 4: w / 1, w / 2, w / 3 -> x lcm 6
    weights = integer_affinity(routing)
    assert weights.dtype == np.int64 and (weights == weights.T).all()
    assert np.array_equal(weights, np.round(methods.affinity_matrix(routing) * 6).astype(np.int64))


# ---- Mt-KaHyPar mapping onto the ranks' graph (--topology map) ---------------------------------------------------


def all_rank_labelings(num_experts, num_ranks):
    """[Q, E]: every balanced placement with ranks labelled (rank identity matters once ranks sit on nodes)."""
    sizes = [num_experts // num_ranks] * num_ranks
    rows = itertools.product(range(num_ranks), repeat=num_experts)
    return np.array([p for p in rows if np.bincount(p, minlength=num_ranks).tolist() == sizes])


def test_steiner_cost_is_mtkahypars_steiner_tree():
    # On the complete graph with intra-node edges 1 and inter-node edges c, a token on lambda ranks of nu nodes
    # costs (lambda - 1) + (c - 1)(nu - 1); Mt-KaHyPar's own steiner_tree metric agrees.
    routing = clustered_routing(16, 4, tokens=300, seed=2)
    e2r = plan_layer(routing, 8, method="random", seed=5)
    mt, initializer = methods._mtkahypar(os.cpu_count() or 1)
    context = initializer.context_from_preset(mt.PresetType.DETERMINISTIC)
    context.set_mapping_parameters(8, 0.0)
    edges, weights = methods._hyperedges(routing)
    hypergraph = initializer.create_hypergraph(context, 16, len(edges), edges, [1] * 16, weights)
    pairs = list(itertools.combinations(range(8), 2))
    target = initializer.create_target_graph(
        context, 8, len(pairs), pairs, [1 if a // 4 == b // 4 else 7 for a, b in pairs]
    )
    partitioned = hypergraph.create_partitioned_hypergraph(context, 8, e2r.tolist())
    assert partitioned.steiner_tree(target) == steiner_cost_batch(routing, e2r[None], 4, 7)[0]
    assert steiner_cost_batch(routing, e2r[None], 4, 7)[0] == km1(routing, e2r) + 6 * km1(routing, e2r // 4)


@pytest.mark.parametrize("top_k", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_map_reaches_the_topology_optimum(top_k, seed):
    # 8 experts on 2 nodes x 2 GPUs: the mapping reaches the exact minimum of the Steiner cost over every balanced
    # labelled placement, and its inter-node fan-out is no worse than the two-level plan's.
    routing = clustered_routing(8, top_k, clusters=4, seed=seed)
    mapped = plan_layer(routing, 4, num_nodes=2, topology="map", seed=seed)
    assert_balanced(mapped, 8, 4)
    assert np.array_equal(mapped, plan_layer(routing, 4, num_nodes=2, topology="map", seed=seed))  # deterministic
    optimum = steiner_cost_batch(routing, all_rank_labelings(8, 4), 2, 10).min()
    assert steiner_cost_batch(routing, mapped[None], 2, 10)[0] == optimum
    two_level = plan_layer(routing, 4, num_nodes=2, seed=seed)
    assert km1_batch(routing, (mapped // 2)[None])[0] <= km1_batch(routing, (two_level // 2)[None])[0]
    fanout = [
        layer_metrics(routing, ExpertLayout(p, 4), num_nodes=2)["node_fanout_per_token"] for p in (mapped, two_level)
    ]
    assert fanout[0] <= fanout[1] + 1e-12


def test_map_on_coactivation_input_and_one_node():
    routing, pairs = disjoint_pairs_routing(16, seed=2)
    pairwise = routing_from_coactivation(pairwise_counts(routing))
    for source in (routing, pairwise):
        e2r = plan_layer(source, 4, num_nodes=2, topology="map")
        assert_balanced(e2r, 16, 4)
        assert km1(routing, e2r) == 0
    # one node (or one GPU per node): the mapping is the flat partition
    assert np.array_equal(plan_layer(routing, 4, topology="map"), plan_layer(routing, 4))


def test_cli_plans_with_topology_map(tmp_path, capsys):
    routing, _ = disjoint_pairs_routing(16, seed=3)
    np.save(tmp_path / "c.npy", pairwise_counts(routing))
    argv = ["plan", "--coactivation", str(tmp_path / "c.npy"), "--ranks", "4", "--nodes", "2", "-q"]
    assert place_main([*argv, "--topology", "map", "--inter-node-cost", "4", "--out", str(tmp_path / "p.json")]) == 0
    plan = load_plan(tmp_path / "p.json")
    assert plan.data["options"]["topology"] == "map" and plan.data["options"]["inter_node_cost"] == 4
    assert plan.data["predicted"]["cut_pair_fraction"] == 0.0
    assert place_main([*argv, "--topology", "map", "--method", "greedy", "--out", str(tmp_path / "q.json")]) == 2
    assert "needs --method kahypar, not 'greedy'" in capsys.readouterr().err


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
