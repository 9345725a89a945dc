"""The placement objective and the traffic / load metrics of one placement, per MoE layer and overall.

Setting. One MoE layer, E experts placed on R ranks by an `ExpertLayout` (``expert_to_rank`` [E], exactly E/R each).
With nodes, the R ranks form N nodes of G = R/N consecutive ranks (rank r is on node r // G, as launchers number
them). A token
routed to the expert set S reaches

    lambda(S) = |{rank(e) : e in S}|   ranks,        nu(S) = |{node(rank(e)) : e in S}|   nodes.

Metrics (per token = averaged over the layer's tokens; "overall" = the mean over layers):
- ``slots_per_token``: mean |S|: the copies per-expert dispatch sends (one per routed expert; any placement).
- ``copies_per_token``: mean lambda: the copies per-rank dispatch sends (one per destination rank; Occult's CT).
- ``km1_per_token``: mean (lambda - 1) over tokens with a non-empty set: the KM1 (connectivity - 1) objective that
  the planner minimises, divided by tokens.
- ``cross_rank_copies_per_token``: copies that leave the token's own rank, in per-rank dispatch, assuming a token's
  source rank is uniform over the R ranks and independent of its experts (data parallelism spreads tokens evenly).
  A token on rank s sends lambda - [s in ranks(S)] copies to other ranks; P(s in ranks(S)) = lambda / R, so

      E_s[cross-rank copies] = lambda - lambda / R = lambda (R - 1) / R.

  The same argument for per-expert dispatch gives |S| (R - 1) / R (``per_expert_cross_rank_copies_per_token``):
  under uniform sources the placement does not change per-expert traffic at all; it pays off through per-rank
  dispatch (dedup per destination rank), which is what the planner optimises.
- ``cross_rank_bytes_per_token``: cross_rank_copies_per_token * hidden * dtype bytes (dispatch direction only; the
  combine reply moves the same amount back).
- ``load_imbalance``: max over ranks of token-expert pairs processed / mean (1.0 = perfectly balanced compute).
- ``step_load_imbalance`` (traces of 2+ recorded steps, unreplicated layouts): the busiest rank's load of each
  recorded step, summed over the steps, over the mean rank load summed likewise. In training every step waits for
  its busiest rank, so this is the expert compute time over a perfectly balanced one's: the load that sets the step
  time. It is at least ``load_imbalance`` (a rank busiest overall is not the busiest of every step).
  ``worst_step_load_imbalance``: the worst single step's max / mean.
- with N > 1 nodes: ``node_fanout_per_token`` = mean nu; ``inter_node_copies_per_token`` = nu (N - 1) / N (copies
  crossing nodes with node-level dedup, e.g. hierarchical/DeepEP-style dispatch, uniform source node as above);
  ``inter_node_rank_copies_per_token`` = lambda (N - 1) / N (flat per-rank dispatch, one copy per remote rank).
- replicated layouts (``layout.replicas``): lambda, nu and the rank loads under the replica rule, predicted over the
  layer's whole batch in expectation (`placement.replica_rule` says how and where that is exact); ``replicas``:
  the extra slots (P - E). Needs per-token sets: co-activation input is refused.

Co-activation input (pair counts C only, no per-token sets). Per-token lambda is not computable for k > 2; we use
the second-order inclusion-exclusion (Bonferroni) bound per rank: for a token with n_r of its experts on rank r,
1[n_r > 0] >= n_r - C(n_r, 2), so

    sum_tokens lambda  ~=  sum_r hits_r,   hits_r = load_r - within_r,   within_r = sum_{i<j on r} C[i, j],

exact whenever no rank holds 3 or more of one token's experts -- in particular exact for top-2 routing. For larger k
the bound can fall far below the truth (even below zero: "0.07 copies per token at 2 ranks" for a top-8 model), so
each term is clipped to what is possible: a token puts at most m = min(k, E/R) of its experts on one rank and is one
token, so load_r / m <= hits_r <= min(load_r, T); and every token reaches 1 to min(k, R) ranks, so the sum is
clipped to [T, T min(k, R)] (k: the mean experts per token, load / T, rounded up). The result is an estimate, never
an impossible value. These metrics carry ``"exact": false`` and ``"approximation": "pairwise"``.
``cut_pair_fraction`` (the share of co-activated pairs split over ranks, the graph objective) is reported beside
them.

Shape legend: M distinct expert sets, K slots, E experts, R ranks, Q candidate placements.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from placement.errors import PlacementError
from placement.inputs import LayerRouting
from placement.layout import ExpertLayout, require_divides
from placement.replica_rule import copy_ranks, expected_groups_hit, expected_rank_load, rule_one

DTYPE_BYTES = {"fp8": 1, "bf16": 2, "fp16": 2, "fp32": 4}


def distinct_per_row(groups_MK: np.ndarray) -> np.ndarray:
    """[..., K] int (-1 = empty) -> [...] int64: number of distinct non-negative values in each row."""
    g = np.sort(groups_MK, axis=-1)
    new = g >= 0
    new[..., 1:] &= g[..., 1:] != g[..., :-1]
    return new.sum(axis=-1)


def ranks_hit(sets_MK: np.ndarray, expert_to_rank_E: np.ndarray) -> np.ndarray:
    """[M, K] expert sets, [E] placement -> [M] lambda: distinct ranks each set reaches."""
    e2r = np.asarray(expert_to_rank_E, dtype=np.int64)
    ranks_MK = np.where(sets_MK >= 0, e2r[np.maximum(sets_MK, 0)], -1)
    return distinct_per_row(ranks_MK)


def km1(routing: LayerRouting, expert_to_rank_E: np.ndarray) -> float:
    """The objective: sum over tokens of (lambda - 1) for non-empty sets (pairwise input: the cut pair weight)."""
    lam_M = ranks_hit(routing.sets_MK, expert_to_rank_E)
    return float((routing.weight_M * np.maximum(lam_M - 1, 0)).sum())


def km1_batch(routing: LayerRouting, labels_QE: np.ndarray, chunk_elems: int = 1 << 22) -> np.ndarray:
    """`km1` of Q placements at once: [Q, E] -> [Q] float64 (chunked to bound memory)."""
    sets = routing.sets_MK[routing.set_size_M >= 2]
    weight = routing.weight_M[routing.set_size_M >= 2].astype(np.float64)
    out = np.zeros(len(labels_QE))
    if len(sets) == 0:
        return out
    step = max(1, chunk_elems // max(1, sets.size))
    safe = np.maximum(sets, 0)
    for start in range(0, len(labels_QE), step):
        labels = labels_QE[start : start + step]
        ranks_QMK = np.where(sets >= 0, labels[:, safe], -1)
        out[start : start + step] = (distinct_per_row(ranks_QMK) - 1) @ weight
    return out


def check_topology(num_experts: int, num_ranks: int, num_nodes: int = 1) -> None:
    """Ranks must divide experts and nodes must divide ranks (errors name both numbers, in the CLI's terms)."""
    require_divides(num_ranks, "ranks", num_experts, "experts")
    require_divides(num_nodes, "nodes", num_ranks, "ranks")


def _within_group_pairs(routing: LayerRouting, group_E: np.ndarray, num_groups: int) -> np.ndarray:
    """[G] pair weight with both experts in the same group (pairwise input)."""
    i, j = routing.sets_MK[:, 0], routing.sets_MK[:, 1]
    same = group_E[i] == group_E[j]
    return np.bincount(group_E[i][same], weights=routing.weight_M[same], minlength=num_groups)


def _pairwise_hits(routing: LayerRouting, group_E: np.ndarray, num_groups: int) -> float:
    """Estimate of sum over tokens of distinct groups hit: the Bonferroni bound, clipped per group and overall to
    what is possible (module docstring)."""
    tokens = float(routing.num_tokens)
    load_G = np.bincount(group_E, weights=routing.expert_load_E, minlength=num_groups)
    if not tokens or not load_G.sum():
        return 0.0
    k = max(1, math.ceil(float(load_G.sum()) / tokens - 1e-9))
    per_group = max(1, min(k, len(group_E) // num_groups))
    hits_G = load_G - _within_group_pairs(routing, group_E, num_groups)
    hits_G = np.clip(hits_G, load_G / per_group, np.minimum(load_G, tokens))
    return float(np.clip(hits_G.sum(), tokens, tokens * min(k, num_groups)))


def layer_metrics(
    routing: LayerRouting,
    layout: ExpertLayout,
    num_nodes: int = 1,
    hidden: int | None = None,
    dtype_bytes: int = 2,
) -> dict[str, Any]:
    """Metrics of one placement on one layer (keys and formulas: module docstring)."""
    e2r, num_ranks = layout.as_array(), layout.num_ranks
    if layout.num_experts != routing.num_experts:
        raise PlacementError(f"the layout places {layout.num_experts} experts, the routing has {routing.num_experts}")
    tokens = routing.num_tokens
    out: dict[str, Any] = {"tokens": int(tokens), "exact": not routing.pairwise}
    if tokens == 0:
        return out
    gpus_per_node = num_ranks // num_nodes
    e2n = e2r // gpus_per_node
    rank_load_R = np.bincount(e2r, weights=routing.expert_load_E, minlength=num_ranks)
    if layout.is_replicated:
        if routing.pairwise:
            raise PlacementError(
                "a replicated placement needs per-token routing (--traces): the replica rule routes each token by "
                "its whole expert set, which co-activation pair counts do not hold"
            )
        w = routing.weight_M.astype(np.float64)
        nonempty = float(w[routing.set_size_M > 0].sum())
        table = copy_ranks(layout)
        route = rule_one(routing.sets_MK, table, num_ranks)  # once, for the three predictions below
        rank_hits = float(expected_groups_hit(routing.sets_MK, table, num_ranks, route=route) @ w)
        node_of_rank = np.arange(num_ranks) // gpus_per_node
        node_hits = float(expected_groups_hit(routing.sets_MK, table, num_ranks, node_of_rank, route) @ w)
        rank_load_R = expected_rank_load(routing.sets_MK, w, table, num_ranks, route)
        out["replicas"] = layout.num_slots - layout.num_experts
    elif routing.pairwise:
        nonempty = tokens
        rank_hits = _pairwise_hits(routing, e2r, num_ranks)
        node_hits = _pairwise_hits(routing, e2n, num_nodes)
        total_pairs = float(routing.weight_M.sum())
        cut = total_pairs - float(_within_group_pairs(routing, e2r, num_ranks).sum())
        out["approximation"] = "pairwise"
        out["cut_pair_fraction"] = cut / total_pairs if total_pairs else 0.0
    else:
        w = routing.weight_M.astype(np.float64)
        nonempty = float(w[routing.set_size_M > 0].sum())
        rank_hits = float(ranks_hit(routing.sets_MK, e2r) @ w)
        node_hits = float(ranks_hit(routing.sets_MK, e2n) @ w)
    slots = float(routing.expert_load_E.sum()) / tokens
    copies = rank_hits / tokens
    out["slots_per_token"] = slots
    out["copies_per_token"] = copies
    out["km1_per_token"] = max(rank_hits - nonempty, 0.0) / tokens
    out["cross_rank_copies_per_token"] = copies * (num_ranks - 1) / num_ranks
    out["per_expert_cross_rank_copies_per_token"] = slots * (num_ranks - 1) / num_ranks
    if hidden is not None:
        bytes_per_copy = hidden * dtype_bytes
        out["cross_rank_bytes_per_token"] = out["cross_rank_copies_per_token"] * bytes_per_copy
        out["per_expert_cross_rank_bytes_per_token"] = out["per_expert_cross_rank_copies_per_token"] * bytes_per_copy
    out["load_imbalance"] = float(rank_load_R.max() / rank_load_R.mean()) if rank_load_R.sum() else 1.0
    if routing.step_load_SE is not None and not layout.is_replicated:
        step_load_SR = np.stack([np.bincount(e2r, weights=row, minlength=num_ranks) for row in routing.step_load_SE])
        step_load_SR = step_load_SR[step_load_SR.sum(axis=1) > 0]
        if len(step_load_SR):
            busiest_S, mean_S = step_load_SR.max(axis=1), step_load_SR.mean(axis=1)
            out["step_load_imbalance"] = float(busiest_S.sum() / mean_S.sum())
            out["worst_step_load_imbalance"] = float((busiest_S / mean_S).max())
    out["rank_load"] = rank_load_R.round().astype(np.int64).tolist()
    if num_nodes > 1:
        out["node_fanout_per_token"] = node_hits / tokens
        out["inter_node_copies_per_token"] = node_hits / tokens * (num_nodes - 1) / num_nodes
        out["inter_node_rank_copies_per_token"] = copies * (num_nodes - 1) / num_nodes
    return out


def load_key(*layer_metrics: list[dict[str, Any]]) -> str:
    """The load ratio to show and cost these placements' layers on: ``step_load_imbalance`` where every layer with
    tokens of every list has it (traces of 2+ steps, unreplicated layouts), else ``load_imbalance`` for all: a plan
    and its baselines are always compared on the same ratio, over the same layers."""
    with_tokens = [m for layers in layer_metrics for m in layers if m.get("tokens")]
    per_step = bool(with_tokens) and all("step_load_imbalance" in m for m in with_tokens)
    return "step_load_imbalance" if per_step else "load_imbalance"


def overall_metrics(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over layers (with tokens) of every per-token metric; the worst layer's load imbalance beside it."""
    with_tokens = [m for m in layers if m.get("tokens")]
    out: dict[str, Any] = {"tokens": int(sum(m.get("tokens", 0) for m in layers)), "layers": len(with_tokens)}
    if not with_tokens:
        return out
    out["exact"] = all(m["exact"] for m in with_tokens)
    # every layer's metrics (the per-step ratios only where every layer has them: a mean over some layers would not
    # compare with another placement's over all)
    keys = [k for k, v in with_tokens[0].items() if isinstance(v, float) and all(k in m for m in with_tokens)]
    for key in keys:
        out[key] = float(np.mean([m[key] for m in with_tokens]))
    out["max_load_imbalance"] = float(max(m["load_imbalance"] for m in with_tokens))
    if "worst_step_load_imbalance" in keys:
        out["worst_step_load_imbalance"] = float(max(m["worst_step_load_imbalance"] for m in with_tokens))
    return out
