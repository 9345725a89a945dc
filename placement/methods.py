"""Balanced expert placement: every method returns ``expert_to_rank`` [E] with exactly E/R experts per rank
(labels, inside this module); `plan_placement` hands out one `ExpertLayout` per layer.

Methods (``METHODS``; all deterministic given ``seed``):
- ``kahypar`` (default): Mt-KaHyPar on the hypergraph whose hyperedges are the distinct expert sets (weight = how
  many tokens chose the set), objective KM1 = sum over tokens of (lambda - 1), unit expert weights, epsilon 0 (exact
  equal part sizes). Co-activation input: the pair graph (exact for top-2).
- ``greedy``: collaboration clustering: seed a group with the heaviest co-activated pair of unplaced experts, grow
  it with the expert of highest affinity to the group until E/R, repeat.
- ``spectral``: scikit-learn SpectralClustering on the co-activation affinity, then the balancing pass.
- ``kl``: recursive Kernighan-Lin bisection (networkx) of the clique-expansion graph.
- ``metis``: METIS recursive bisection (pymetis) on the clique-expansion graph with integer edge weights, then the
  balancing pass (METIS allows a little imbalance).
- ``contiguous``: experts 0..E/R-1 on rank 0, ... (what frameworks do); ``random``: a seeded balanced shuffle.
- ``exact``: enumerates every balanced placement modulo rank relabelling (small E only): ground truth.

Two levels (N nodes of G GPUs), ``topology="two-level"`` (any method): partition into N nodes first (exact balance,
KM1 over nodes), then each node's experts into its G GPUs on the hyperedges restricted to that node;
rank = node * G + local GPU.

Mapping, ``topology="map"`` (Mt-KaHyPar only): one partition into R ranks mapped onto a target graph of the R ranks
(complete; an edge costs 1 inside a node and ``inter_node_cost`` = c between nodes), minimising the Steiner-tree
objective: the cheapest tree on the target graph that spans a token's ranks. On this graph a token reaching lambda
ranks on nu nodes costs (lambda - nu) * 1 + (nu - 1) * c = (lambda - 1) + (c - 1)(nu - 1), i.e. rank KM1 plus
(c - 1) x node KM1 (`steiner_cost_batch`). Epsilon 0 with unit weights holds exact E/R sizes.

Graph methods use the clique expansion of the hypergraph: a set of size s adds weight w / (s - 1) to each of its
pairs (the usual weighting: a cut set costs about the same whatever its size); for top-2 this is the co-activation
matrix itself.

Shape legend: M distinct expert sets, K slots, E experts, P parts (ranks or nodes), Q candidate placements.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable
from itertools import combinations

import numpy as np

from placement.errors import PlacementError
from placement.inputs import LayerRouting, restrict, subsample
from placement.kahypar_context import DEFAULT_PRESET, check_preset, context_for
from placement.layout import ExpertLayout
from placement.loadcap import CapResult, cap_load, needs_replication
from placement.objective import check_topology, km1_batch
from placement.pool import map_layers, worker_threads

PartitionFn = Callable[[LayerRouting, int, int], np.ndarray]
CostFn = Callable[[np.ndarray], np.ndarray]

EXACT_MAX_PLACEMENTS = 200_000
TOPOLOGIES = ("two-level", "map")
DEFAULT_INTER_NODE_COST = 10
_KAHYPAR_MAX_TOTAL_WEIGHT = 1 << 26  # keeps Mt-KaHyPar's 32-bit edge weights and gains far from overflow
_METIS_MAX_TOTAL_WEIGHT = 1 << 30  # METIS sums edge weights into idx_t (32 or 64 bit by build): stay far below


# ---- helpers ---------------------------------------------------------------------------------------------------


def random_placement(num_experts: int, num_ranks: int, seed: int = 0) -> np.ndarray:
    """[E]: a uniformly random balanced placement (seeded)."""
    perm = np.random.default_rng(seed).permutation(num_experts)
    e2r = np.empty(num_experts, dtype=np.int64)
    e2r[perm] = ExpertLayout.contiguous(num_experts, num_ranks).as_array()
    return e2r


def affinity_matrix(routing: LayerRouting) -> np.ndarray:
    """[E, E] float64 clique-expansion affinity (zero diagonal): each set of size s >= 2 adds w / (s - 1) to every
    pair it contains; co-activation input: the off-diagonal counts."""
    num_experts = routing.num_experts
    if routing.pairwise:
        return routing.coactivation_EE - np.diag(np.diag(routing.coactivation_EE))
    size_M = routing.set_size_M
    keep = size_M >= 2
    sets, w = routing.sets_MK[keep], routing.weight_M[keep] / (size_M[keep] - 1.0)
    flat = np.zeros(num_experts * num_experts)
    for a, b in combinations(range(sets.shape[1]), 2):
        valid = sets[:, b] >= 0  # sets are sorted with padding last, so column a is valid too
        idx = sets[valid, a].astype(np.int64) * num_experts + sets[valid, b]
        flat += np.bincount(idx, weights=w[valid], minlength=num_experts * num_experts)
    upper = flat.reshape(num_experts, num_experts)
    return upper + upper.T


def is_balanced(labels_E: np.ndarray, num_parts: int) -> bool:
    sizes = np.bincount(labels_E, minlength=num_parts)
    return len(sizes) == num_parts and bool((sizes == len(labels_E) // num_parts).all())


def balance(labels_E: np.ndarray, affinity_EE: np.ndarray, num_parts: int) -> np.ndarray:
    """Move experts out of over-full parts, one at a time, choosing the move that loses the least affinity
    (affinity to the target part minus affinity to the current part, largest first), until every part holds E/P."""
    labels = np.asarray(labels_E, dtype=np.int64).copy()
    capacity = len(labels) // num_parts
    sizes = np.bincount(labels, minlength=num_parts)
    conn_EP = affinity_EE @ np.eye(num_parts)[labels]  # [E, P]: affinity of each expert to each part
    while (sizes > capacity).any():
        movable = np.flatnonzero(sizes[labels] > capacity)
        targets = np.flatnonzero(sizes < capacity)
        gain = conn_EP[np.ix_(movable, targets)] - conn_EP[movable, labels[movable]][:, None]
        i, j = np.unravel_index(np.argmax(gain), gain.shape)
        expert, src, dst = movable[i], labels[movable[i]], targets[j]
        labels[expert] = dst
        sizes[src] -= 1
        sizes[dst] += 1
        conn_EP[:, src] -= affinity_EE[:, expert]
        conn_EP[:, dst] += affinity_EE[:, expert]
    return labels


def steiner_cost_batch(
    routing: LayerRouting, labels_QE: np.ndarray, gpus_per_node: int, inter_node_cost: int
) -> np.ndarray:
    """[Q, E] rank placements -> [Q] Steiner-tree cost on the two-tier target graph (module docstring):
    rank KM1 + (inter_node_cost - 1) x node KM1 (rank r is on node r // gpus_per_node)."""
    labels = np.asarray(labels_QE, dtype=np.int64)
    return km1_batch(routing, labels) + (inter_node_cost - 1) * km1_batch(routing, labels // gpus_per_node)


def refine_by_swaps(
    routing: LayerRouting,
    labels_E: np.ndarray,
    max_work: int = 2_000_000,
    max_rounds: int = 20,
    cost: CostFn | None = None,
) -> np.ndarray:
    """Best-improvement local search on the exact KM1 objective (or ``cost``: [Q, E] -> [Q]): swap the pair of
    experts (on different parts) that lowers it most, until no swap helps (sizes never change). Skipped when one
    round would evaluate more than ``max_work`` pin x candidate pairs (large E: Mt-KaHyPar's own refinement has to
    do)."""
    cost = cost or functools.partial(km1_batch, routing)
    labels = np.asarray(labels_E, dtype=np.int64).copy()
    i, j = np.triu_indices(len(labels), k=1)
    pins = int(routing.set_size_M[routing.set_size_M >= 2].sum())
    if pins == 0 or len(i) * pins > max_work:
        return labels
    best = cost(labels[None])[0]
    for _ in range(max_rounds):
        pairs = np.flatnonzero(labels[i] != labels[j])
        a, b = i[pairs], j[pairs]
        candidates = np.repeat(labels[None], len(pairs), axis=0)
        candidates[np.arange(len(pairs)), a] = labels[b]
        candidates[np.arange(len(pairs)), b] = labels[a]
        values = cost(candidates)
        q = int(np.argmin(values))
        if values[q] >= best:
            break
        best, labels = values[q], candidates[q]
    return labels


# ---- methods: (routing, num_parts, seed) -> labels [E] in 0..P-1 -------------------------------------------------


def partition_contiguous(routing: LayerRouting, num_parts: int, seed: int = 0) -> np.ndarray:
    return ExpertLayout.contiguous(routing.num_experts, num_parts).as_array()


def partition_random(routing: LayerRouting, num_parts: int, seed: int = 0) -> np.ndarray:
    return random_placement(routing.num_experts, num_parts, seed)


def partition_greedy(routing: LayerRouting, num_parts: int, seed: int = 0) -> np.ndarray:
    """Collaboration clustering (see the module docstring). Ties go to the lowest expert id."""
    affinity = affinity_matrix(routing)
    num_experts = routing.num_experts
    capacity = num_experts // num_parts
    labels = np.full(num_experts, -1, dtype=np.int64)
    for part in range(num_parts):
        free = np.flatnonzero(labels < 0)
        if capacity == 1 or len(free) == capacity:
            group = list(free[:capacity])
        else:
            sub = np.triu(affinity[np.ix_(free, free)], k=1)
            i, j = np.unravel_index(np.argmax(sub), sub.shape)
            group = [free[i], free[j]] if sub[i, j] > 0 else [free[0], free[1]]
        labels[group] = part
        while len(group) < capacity:
            score = affinity[group].sum(axis=0)
            score[labels >= 0] = -np.inf
            best = int(np.argmax(score))
            group.append(best)
            labels[best] = part
    return labels


def partition_spectral(routing: LayerRouting, num_parts: int, seed: int = 0) -> np.ndarray:
    """SpectralClustering on the affinity (+ a tiny uniform floor so that idle experts keep the graph connected);
    its clusters are unequal in size, so the caller's balancing pass follows."""
    try:
        from sklearn.cluster import SpectralClustering
    except ImportError as error:
        raise PlacementError("method 'spectral' needs scikit-learn: pip install scikit-learn") from error
    affinity = affinity_matrix(routing)
    floor = 1e-6 * max(float(affinity.max()), 1.0)
    affinity = affinity + floor - np.diag(np.full(len(affinity), floor))
    model = SpectralClustering(
        n_clusters=num_parts, affinity="precomputed", random_state=seed, assign_labels="cluster_qr"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = model.fit_predict(affinity).astype(np.int64)
    return labels if is_balanced(labels, num_parts) else balance(labels, affinity, num_parts)


def partition_kl(routing: LayerRouting, num_parts: int, seed: int = 0) -> np.ndarray:
    """Recursive Kernighan-Lin bisection: split P parts into floor(P/2) + ceil(P/2), the experts in proportion
    (from a seeded random balanced start; KL swaps pairs, so sizes hold), and recurse on each side."""
    try:
        import networkx as nx
    except ImportError as error:
        raise PlacementError("method 'kl' needs networkx: pip install networkx") from error
    affinity = affinity_matrix(routing)
    capacity = routing.num_experts // num_parts
    rng = np.random.default_rng(seed)
    labels = np.zeros(routing.num_experts, dtype=np.int64)
    todo = [(np.arange(routing.num_experts), num_parts, 0)]  # (experts, parts, first label)
    while todo:
        experts, parts, first = todo.pop()
        if parts == 1:
            labels[experts] = first
            continue
        left_parts = parts // 2
        n_left = capacity * left_parts
        graph = nx.Graph()
        graph.add_nodes_from(int(e) for e in experts)
        sub = affinity[np.ix_(experts, experts)]
        for i, j in zip(*np.nonzero(np.triu(sub, k=1))):
            graph.add_edge(int(experts[i]), int(experts[j]), weight=float(sub[i, j]))
        start = rng.permutation(experts)
        a, b = nx.community.kernighan_lin_bisection(
            graph, ({int(e) for e in start[:n_left]}, {int(e) for e in start[n_left:]}), max_iter=20, seed=seed
        )
        left, right = (a, b) if len(a) == n_left else (b, a)
        todo.append((np.array(sorted(left)), left_parts, first))
        todo.append((np.array(sorted(right)), parts - left_parts, first + left_parts))
    return labels


def integer_affinity(routing: LayerRouting) -> np.ndarray:
    """[E, E] int64 clique-expansion weights for METIS (which wants positive integers): `affinity_matrix` times
    lcm(1, ..., K - 1), which makes every w / (s - 1) an integer for integer token counts; scaled down (keeping
    every nonzero pair >= 1) if the total could overflow."""
    affinity = affinity_matrix(routing)
    max_size = 2 if routing.pairwise else int(routing.set_size_M.max(initial=2))
    scale = float(math.lcm(*range(1, max(max_size, 2))))
    total = affinity.sum() / 2 * scale
    if total > _METIS_MAX_TOTAL_WEIGHT:
        scale *= _METIS_MAX_TOTAL_WEIGHT / total
    return np.where(affinity > 0, np.maximum(1.0, np.round(affinity * scale)), 0.0).astype(np.int64)


def partition_metis(routing: LayerRouting, num_parts: int, seed: int = 0) -> np.ndarray:
    """METIS on the clique-expansion graph (integer weights: `integer_affinity`), seeded, with the smallest
    imbalance METIS accepts (ufactor 1: 0.1%); its parts can still be off by an expert or two (or empty), so the
    balancing pass follows. No KM1 refinement: this is the plain graph baseline. Recursive bisection at every P:
    k-way METIS (pymetis' choice above 8 parts) did much worse on these small dense graphs (64 experts, top-8,
    16 ranks: 4.99 vs 4.39 KM1 per token after balancing)."""
    try:
        import pymetis
    except ImportError as error:
        raise PlacementError("method 'metis' needs pymetis: pip install pymetis") from error
    weights = integer_affinity(routing)
    if not weights.any():
        return ExpertLayout.contiguous(routing.num_experts, num_parts).as_array()
    rows, cols = np.nonzero(weights)  # row-major: each vertex's neighbours are contiguous, both directions stored
    starts = np.searchsorted(rows, np.arange(routing.num_experts + 1))
    result = pymetis.part_graph(
        num_parts,
        adjacency=pymetis.CSRAdjacency(starts.tolist(), cols.tolist()),
        eweights=weights[rows, cols].tolist(),
        options=pymetis.Options(seed=seed, ufactor=1),
        recursive=True,
    )
    labels = np.asarray(result.vertex_part, dtype=np.int64)
    return labels if is_balanced(labels, num_parts) else balance(labels, weights.astype(np.float64), num_parts)


def count_balanced_placements(num_experts: int, num_parts: int) -> int:
    """Balanced placements modulo part relabelling: E! / ((E/P)!^P P!)."""
    m = num_experts // num_parts
    return math.factorial(num_experts) // (math.factorial(m) ** num_parts * math.factorial(num_parts))


def balanced_labelings(num_experts: int, num_parts: int) -> np.ndarray:
    """[Q, E]: every balanced placement once (modulo relabelling: part p's lowest expert is lower than part
    p+1's), in a fixed order."""
    capacity = num_experts // num_parts
    labels = np.full(num_experts, -1, dtype=np.int64)
    out: list[np.ndarray] = []

    def fill(part: int) -> None:
        free = np.flatnonzero(labels < 0)
        if len(free) == 0:
            out.append(labels.copy())
            return
        for companions in combinations(free[1:], capacity - 1):
            block = [free[0], *companions]
            labels[block] = part
            fill(part + 1)
            labels[block] = -1

    fill(0)
    return np.array(out, dtype=np.int64).reshape(-1, num_experts)


def partition_exact(routing: LayerRouting, num_parts: int, seed: int = 0) -> np.ndarray:
    """The KM1 optimum by enumeration (first optimum in enumeration order). Refuses more than
    ``EXACT_MAX_PLACEMENTS`` candidates."""
    count = count_balanced_placements(routing.num_experts, num_parts)
    if count > EXACT_MAX_PLACEMENTS:
        raise PlacementError(
            f"method 'exact' would enumerate {count} balanced placements of {routing.num_experts} experts on "
            f"{num_parts} parts (limit {EXACT_MAX_PLACEMENTS}; about 12 experts at most); use --method kahypar"
        )
    candidates = balanced_labelings(routing.num_experts, num_parts)
    return candidates[int(np.argmin(km1_batch(routing, candidates)))]


@functools.cache
def _mtkahypar(threads: int):
    """Mt-KaHyPar's module and its initializer (its thread pool is created once per process)."""
    try:
        import mtkahypar
    except ImportError as error:
        raise PlacementError(
            "method 'kahypar' needs Mt-KaHyPar: pip install mtkahypar (or choose --method greedy, spectral, kl, "
            "exact, contiguous or random)"
        ) from error
    return mtkahypar, mtkahypar.initialize(threads, False)


def _kahypar_context(seed: int, preset: str, threads: int | None, num_experts: int, num_parts: int):
    """Mt-KaHyPar's module, initializer and a silent, seeded context of ``preset`` for ``num_experts`` vertices into
    ``num_parts`` (`placement.kahypar_context.context_for`)."""
    mt, initializer = _mtkahypar(threads or os.cpu_count() or 1)
    mt.set_seed(seed)
    context = context_for(mt, initializer, preset, num_experts, num_parts, seed)
    context.logging = False
    return mt, initializer, context


def _hyperedges(routing: LayerRouting) -> tuple[list[list[int]], list[int]]:
    """Sets of size >= 2 as pin lists, with integer weights scaled down if their total could overflow."""
    size_M = routing.set_size_M
    weight = routing.weight_M.astype(np.float64)
    total = weight[size_M >= 2].sum()
    if total > _KAHYPAR_MAX_TOTAL_WEIGHT:
        weight = np.maximum(1.0, np.round(weight * _KAHYPAR_MAX_TOTAL_WEIGHT / total))
    edges: list[list[int]] = []
    weights: list[int] = []
    for size in np.unique(size_M[size_M >= 2]):
        rows = size_M == size
        edges += routing.sets_MK[rows, :size].tolist()
        weights += weight[rows].astype(np.int64).tolist()
    return edges, weights


def partition_kahypar(
    routing: LayerRouting, num_parts: int, seed: int = 0, preset: str = DEFAULT_PRESET, threads: int | None = None
) -> np.ndarray:
    """Mt-KaHyPar, KM1, epsilon 0, unit expert weights; hyperedges = distinct sets weighted by token count; then
    `refine_by_swaps` where it is cheap (small E). ``preset``: `placement.kahypar_context` (default
    ``deterministic_multilevel``; it and ``deterministic`` give the same result for a seed at any thread count:
    checked on 1, 2 and 4 threads), default, quality, highest_quality."""
    check_preset(preset)
    edges, weights = _hyperedges(routing)
    if not edges:
        return ExpertLayout.contiguous(routing.num_experts, num_parts).as_array()
    mt, initializer, context = _kahypar_context(seed, preset, threads, routing.num_experts, num_parts)
    context.set_partitioning_parameters(num_parts, 0.0, mt.Objective.KM1)
    hypergraph = initializer.create_hypergraph(
        context, routing.num_experts, len(edges), edges, [1] * routing.num_experts, weights
    )
    labels = np.asarray(hypergraph.partition(context).get_partition(), dtype=np.int64)
    return refine_by_swaps(routing, labels) if is_balanced(labels, num_parts) else labels


def partition_kahypar_capped(
    routing: LayerRouting,
    num_parts: int,
    load_E: np.ndarray,
    max_load: float,
    seed: int = 0,
    preset: str = DEFAULT_PRESET,
    threads: int | None = None,
) -> np.ndarray | None:
    """Mt-KaHyPar with both constraints in one weight: expert e weighs B + l_e (l: its load scaled to integers summing
    to 100000, B = sum(l) + 1) and every part may weigh at most B x E/P + max_load x mean part load. A part with
    more than E/P experts is over that bound whatever its load, and the E experts fill the parts, so a feasible
    result has exactly E/P experts per part *and* part load <= max_load x mean. Returns None where Mt-KaHyPar found
    no feasible partition (e.g. a hot expert makes the cap impossible); the caller falls back to the unit-weight
    partition and `placement.loadcap` repair. Measured (benchmarks/placement_load.py traces, 64 experts, 8 ranks):
    0.2-2% lower KM1 than repair alone at the same cap."""
    check_preset(preset)
    edges, weights = _hyperedges(routing)
    total = float(np.sum(load_E))
    if not edges or not total:
        return None
    scaled = np.round(np.asarray(load_E, dtype=np.float64) / total * 100_000).astype(np.int64)
    big = int(scaled.sum()) + 1
    per_part = routing.num_experts // num_parts
    mt, initializer, context = _kahypar_context(seed, preset, threads, routing.num_experts, num_parts)
    context.set_partitioning_parameters(num_parts, 0.0, mt.Objective.KM1)
    # rounded up: at --max-load 1.0 a floor left the parts' bounds summing below the total, which Mt-KaHyPar refuses
    # as invalid input; the exact cap is checked on the result below
    bound = big * per_part + math.ceil(max_load * scaled.sum() / num_parts)
    context.set_individual_target_block_weights([bound] * num_parts)
    hypergraph = initializer.create_hypergraph(
        context, routing.num_experts, len(edges), edges, (big + scaled).tolist(), weights
    )
    labels = np.asarray(hypergraph.partition(context).get_partition(), dtype=np.int64)
    part_load = np.bincount(labels, weights=scaled, minlength=num_parts)
    if not is_balanced(labels, num_parts) or part_load.max() > max_load * scaled.sum() / num_parts:
        return None
    return labels


def map_kahypar(
    routing: LayerRouting,
    num_ranks: int,
    gpus_per_node: int,
    inter_node_cost: int = DEFAULT_INTER_NODE_COST,
    seed: int = 0,
    preset: str = DEFAULT_PRESET,
    threads: int | None = None,
) -> np.ndarray:
    """Mt-KaHyPar's ``map_onto_graph``: the hypergraph of `partition_kahypar` mapped onto the complete graph of
    ``num_ranks`` ranks whose edges cost 1 within a node (``gpus_per_node`` consecutive ranks) and
    ``inter_node_cost`` between nodes; Steiner-tree objective (`steiner_cost_batch`), epsilon 0, unit weights.
    Then `refine_by_swaps` on that same objective where it is cheap; the balancing pass (topology-blind) only if
    Mt-KaHyPar ever missed exact sizes (not seen). Returns ranks [E]. Slow: about 10x the two-level plan at 64
    experts on 16 ranks, unfinished after 18 minutes at 256 experts on 64 ranks; within 1.5% of two-level,
    either way, on the synthetic cases measured (docs/placement.md)."""
    check_preset(preset)
    if isinstance(inter_node_cost, bool) or not isinstance(inter_node_cost, (int, np.integer)) or inter_node_cost < 1:
        raise PlacementError(f"inter-node cost must be an integer >= 1 (intra-node cost is 1); got {inter_node_cost!r}")
    edges, weights = _hyperedges(routing)
    if not edges:
        return ExpertLayout.contiguous(routing.num_experts, num_ranks).as_array()
    _, initializer, context = _kahypar_context(seed, preset, threads, routing.num_experts, num_ranks)
    context.set_mapping_parameters(num_ranks, 0.0)
    hypergraph = initializer.create_hypergraph(
        context, routing.num_experts, len(edges), edges, [1] * routing.num_experts, weights
    )
    pairs = list(combinations(range(num_ranks), 2))
    costs = [1 if a // gpus_per_node == b // gpus_per_node else int(inter_node_cost) for a, b in pairs]
    target = initializer.create_target_graph(context, num_ranks, len(pairs), pairs, costs)
    labels = np.asarray(hypergraph.map_onto_graph(target, context).get_partition(), dtype=np.int64)
    if not is_balanced(labels, num_ranks):
        labels = balance(labels, affinity_matrix(routing), num_ranks)
    cost = functools.partial(
        steiner_cost_batch, routing, gpus_per_node=gpus_per_node, inter_node_cost=int(inter_node_cost)
    )
    return refine_by_swaps(routing, labels, cost=cost)


METHODS: dict[str, PartitionFn] = {
    "kahypar": partition_kahypar,
    "metis": partition_metis,
    "greedy": partition_greedy,
    "spectral": partition_spectral,
    "kl": partition_kl,
    "contiguous": partition_contiguous,
    "random": partition_random,
    "exact": partition_exact,
}


# ---- planning --------------------------------------------------------------------------------------------------


def _partition(routing: LayerRouting, num_parts: int, partition: PartitionFn, seed: int) -> np.ndarray:
    """One balanced partition into ``num_parts`` (the balancing pass runs if a method could not hold sizes)."""
    if num_parts == 1:
        return np.zeros(routing.num_experts, dtype=np.int64)
    labels = np.asarray(partition(routing, num_parts, seed), dtype=np.int64)
    if len(labels) != routing.num_experts or labels.min() < 0 or labels.max() >= num_parts:
        raise RuntimeError(f"partitioner returned labels outside 0..{num_parts - 1} or of the wrong length")
    if not is_balanced(labels, num_parts):
        labels = balance(labels, affinity_matrix(routing), num_parts)
    return labels


def get_method(method: str, preset: str = DEFAULT_PRESET, threads: int | None = None) -> PartitionFn:
    if method not in METHODS:
        raise PlacementError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "kahypar":
        return functools.partial(partition_kahypar, preset=preset, threads=threads)
    return METHODS[method]


def plan_layer(
    routing: LayerRouting,
    num_ranks: int,
    num_nodes: int = 1,
    method: str = "kahypar",
    seed: int = 0,
    preset: str = DEFAULT_PRESET,
    threads: int | None = None,
    max_tokens: int | None = None,
    topology: str = "two-level",
    inter_node_cost: int = DEFAULT_INTER_NODE_COST,
) -> np.ndarray:
    """One layer's placement: [E] int64 rank of each expert, exactly E/R per rank. When 1 < num_nodes < num_ranks,
    ``topology`` "two-level": nodes first, then GPUs within each node; "map" (method kahypar only): one Mt-KaHyPar
    mapping onto the ranks with inter-node edges costing ``inter_node_cost`` (module docstring). With one node, or
    one GPU per node, both are the flat partition. ``max_tokens``: plan on a seeded sample of at most that many
    tokens (None: all)."""
    num_experts = routing.num_experts
    check_topology(num_experts, num_ranks, num_nodes)
    if topology not in TOPOLOGIES:
        raise PlacementError(f"unknown topology {topology!r}; choose from {', '.join(TOPOLOGIES)}")
    if topology == "map" and method != "kahypar":
        raise PlacementError(f"topology 'map' is Mt-KaHyPar's mapping: it needs --method kahypar, not {method!r}")
    routing = subsample(routing, max_tokens, seed)
    partition = get_method(method, preset, threads)
    if num_nodes in (1, num_ranks):
        expert_to_rank = _partition(routing, num_ranks, partition, seed)
    elif topology == "map":
        gpus_per_node = num_ranks // num_nodes
        expert_to_rank = map_kahypar(routing, num_ranks, gpus_per_node, inter_node_cost, seed, preset, threads)
    else:
        gpus_per_node = num_ranks // num_nodes
        expert_to_node = _partition(routing, num_nodes, partition, seed)
        expert_to_rank = np.empty(num_experts, dtype=np.int64)
        for node in range(num_nodes):
            experts = np.flatnonzero(expert_to_node == node)
            local = _partition(restrict(routing, experts), gpus_per_node, partition, seed)
            expert_to_rank[experts] = node * gpus_per_node + local
    if not is_balanced(expert_to_rank, num_ranks):
        raise RuntimeError(f"internal error: unbalanced placement {expert_to_rank.tolist()}")
    return expert_to_rank


def plan_placement(
    routings: list[LayerRouting],
    num_ranks: int,
    num_nodes: int = 1,
    method: str = "kahypar",
    seed: int = 0,
    preset: str = DEFAULT_PRESET,
    threads: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
    topology: str = "two-level",
    inter_node_cost: int = DEFAULT_INTER_NODE_COST,
    max_load: float | None = None,
    jobs: int = 1,
    per_step: bool = True,
) -> list[ExpertLayout]:
    """Every layer's placement, one layout per layer (arguments: `plan_layer`). With ``max_load`` (a cap on rank
    load max/mean): `cap_layer` (repair where needed, and the capped descent) from `plan_layer`'s placement and,
    with one rank level (1 node, or 1 GPU per node) and Mt-KaHyPar, also from `partition_kahypar_capped`'s where it
    finds a feasible partition: the better of the two (`_plan_and_cap`). ``jobs``: layers planned in parallel
    (`placement.pool`; the same plans as one process)."""
    if max_load is not None:
        _check_cap(max_load)
    task = functools.partial(
        _plan_and_cap,
        num_ranks=num_ranks,
        num_nodes=num_nodes,
        method=method,
        seed=seed,
        preset=preset,
        threads=worker_threads(jobs, threads),
        max_tokens=max_tokens,
        topology=topology,
        inter_node_cost=inter_node_cost,
        max_load=max_load,
        per_step=per_step,
    )
    labels = map_layers(task, [(r,) for r in routings], jobs, progress, f"planning ({method})")
    return [ExpertLayout(x, num_ranks) for x in labels]


def _plan_and_cap(
    routing: LayerRouting,
    *,
    num_ranks: int,
    num_nodes: int,
    method: str,
    seed: int,
    preset: str,
    threads: int | None,
    max_tokens: int | None,
    topology: str,
    inter_node_cost: int,
    max_load: float | None,
    per_step: bool = True,
) -> np.ndarray:
    """One layer of `plan_placement` (a module-level function: a worker process runs it). Under a cap with one rank
    level, two starts are capped and the better kept: Mt-KaHyPar's partition under the cap, and its uncapped
    partition repaired; each is the better one on some layers (against the exact capped optimum of 60 small
    layers: 0.23% above it on average, 0.67% with the capped start alone; benchmarks/cap_price_exact.py)."""
    labels = plan_layer(
        routing, num_ranks, num_nodes, method, seed, preset, threads, max_tokens, topology, inter_node_cost
    )
    if max_load is None or num_ranks == 1:  # one rank holds every expert: nothing to cap (nor to ask Mt-KaHyPar)
        return labels
    capped = functools.partial(
        cap_layer, routing, num_ranks=num_ranks, max_load=max_load, num_nodes=num_nodes, seed=seed,
        max_tokens=max_tokens, inter_node_cost=inter_node_cost, per_step=per_step,
    )  # fmt: skip
    result = capped(labels)
    one_level = method == "kahypar" and num_nodes in (1, num_ranks)
    if one_level and not needs_replication(routing.expert_load_E, num_ranks, max_load):
        sample = subsample(routing, max_tokens, seed)
        start = partition_kahypar_capped(sample, num_ranks, routing.expert_load_E, max_load, seed, preset, threads)
        if start is not None:
            result = min(capped(start), result, key=lambda r: (not r.met, 0.0 if r.met else r.max_load, r.cost))
    return result.labels


def _check_cap(max_load: float) -> None:
    if isinstance(max_load, bool) or not isinstance(max_load, (int, float)) or not max_load >= 1.0:
        raise PlacementError(f"the load cap must be a number >= 1.0 (max/mean rank load); got {max_load!r}")


def cap_layer(
    routing: LayerRouting,
    labels_E: np.ndarray,
    num_ranks: int,
    max_load: float,
    num_nodes: int = 1,
    seed: int = 0,
    max_tokens: int | None = None,
    inter_node_cost: int = DEFAULT_INTER_NODE_COST,
    per_step: bool = True,
) -> CapResult:
    """One layer swapped until every rank's load is <= ``max_load`` x mean (`placement.loadcap.cap_load`; the
    placement is the result's ``labels``): the cost is measured on the planning sample (``max_tokens``, ``seed``: as
    `plan_layer` drew it), the cap on the load of every planning token and, with ``per_step`` and a trace of several
    steps, on each step's load too (the margin for drift: a plan that holds on every step seen is what holds on the
    next); with 1 < nodes < ranks the cost counts node fan-out ``inter_node_cost`` - 1 times over (the Steiner
    objective of ``--topology map``)."""
    if routing.expert_load_E.sum() == 0 or num_ranks == 1:
        return CapResult(np.asarray(labels_E, dtype=np.int64), 1.0, True, False, 0, 0.0)
    c = int(inter_node_cost) if 1 < num_nodes < num_ranks else 1
    return cap_load(
        subsample(routing, max_tokens, seed),
        labels_E,
        num_ranks,
        max_load,
        load_E=routing.expert_load_E,
        gpus_per_node=num_ranks // num_nodes,
        inter_node_cost=c,
        step_load_SE=routing.step_load_SE if per_step else None,
    )


def cap_layouts(
    routings: list[LayerRouting],
    layouts: list[ExpertLayout],
    max_load: float,
    num_nodes: int = 1,
    seed: int = 0,
    max_tokens: int | None = None,
    inter_node_cost: int = DEFAULT_INTER_NODE_COST,
    progress: bool = False,
    jobs: int = 1,
    per_step: bool = True,
) -> list[ExpertLayout]:
    """`cap_layer` on every layout (``jobs``: layers in parallel, as `plan_placement`)."""
    _check_cap(max_load)
    task = functools.partial(
        cap_layer,
        max_load=max_load,
        num_nodes=num_nodes,
        seed=seed,
        max_tokens=max_tokens,
        inter_node_cost=inter_node_cost,
        per_step=per_step,
    )
    args = [(r, lay.as_array(), lay.num_ranks) for r, lay in zip(routings, layouts)]
    results = map_layers(task, args, jobs, progress, f"load cap {max_load:g}")
    return [ExpertLayout(x.labels, lay.num_ranks) for x, lay in zip(results, layouts)]
