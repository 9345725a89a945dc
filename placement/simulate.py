"""What expert-parallel dispatch would cost on a cluster we do not have: per MoE layer, the PREDICTED all-to-all and
step time of per-expert, per-rank and per-node dispatch under the contiguous, planned and load-capped placements,
and the load-capped one with replicated experts (``c2r-place simulate --replicas P``).

Counting (exact, from the traced tokens). The cluster has R = N x W ranks (N nodes of W GPUs; rank r is local index
r % W of node r // W, as launchers number them). Traced tokens are split over the R source ranks in contiguous
blocks, as data parallelism splits a batch (``source_ranks``). Each valid (token, slot) goes to the rank holding its
expert, or for a replicated expert to the copy the dispatchers' rule picks on that source rank (``slot_ranks``).
Then, with the rules of c2r/parallel (docs/design.md "Dispatch"), rows from rank s to rank d:
- per-expert: one per valid (token, slot), s = the token's rank, d = the slot's rank;
- per-rank: one per (token, distinct destination rank);
- per-node, stage 1 (over the network): one per (token, distinct destination node m), to rank (m, s % W);
  stage 2 (within node m): one per (token, distinct destination rank d on m), from (m, s % W) to d.
A row to the sender itself is a local copy and crosses no link. So per token, per-node dispatch sends over the
network exactly its distinct *remote* nodes, and within nodes its forwarding copies.

Timing (`placement.cost.exchange_ms`, a first-order model). The counted rows are scaled from the traced tokens per
rank to ``CostModel.tokens_per_rank``. Each exchange costs peers x latency + the busiest rank's bytes over the
intra-/inter-node bandwidth. The exchanges are the ones the dispatchers time (forward and backward):
    per-expert  dispatch, combine                                      (rows: D x dtype bytes)       x 2 (+ backward)
    per-rank    dispatch, dispatch_meta, combine                       (meta rows: 2K float32)       x 2
    per-node    dispatch_inter(+meta), dispatch_intra(+meta), combine_intra, combine_inter          x 2
    all_to_all_ms = their sum;
    step_ms = all_to_all_ms + one count exchange per forward (latency only) + expert compute of the busiest rank:
              its (token, expert) pairs x 3 (forward + 2 x backward) x 2 x matrices x D x F flops / expert rate.
Attention and the rest of the model are not modelled; nothing overlaps. It is a PREDICTION, validated in
docs/scaling.md against what we could run.

Shape legend: the package legend (c2r/__init__.py: N nodes, R ranks, K slots, E experts); here also A traced tokens
(every rank's together), P distinct (token, key) pairs, W GPUs per node.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from placement.copy_choice import choose_balanced_copy_ranks, choose_copy_ranks
from placement.cost import CostModel, exchange_ms
from placement.errors import PlacementError
from placement.layout import ExpertLayout

MODES = ("per-expert", "per-rank", "per-node")
META_BYTES_PER_SLOT = 8  # per-rank / per-node metadata: a float32 expert id and a float32 weight per slot


@dataclass(frozen=True)
class Cluster:
    """N nodes of W GPUs each."""

    num_nodes: int
    gpus_per_node: int

    def __post_init__(self) -> None:
        for flag, value in (("--nodes", self.num_nodes), ("--gpus-per-node", self.gpus_per_node)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise PlacementError(f"{flag} must be a whole number >= 1; got {value!r}")

    @property
    def num_ranks(self) -> int:
        return self.num_nodes * self.gpus_per_node

    def check_experts(self, num_experts: int) -> None:
        """Expert parallelism over R ranks needs E/R whole experts on each (no replicas yet)."""
        R = self.num_ranks
        if num_experts < R or num_experts % R:
            raise PlacementError(
                f"--nodes {self.num_nodes} x --gpus-per-node {self.gpus_per_node} = {R} ranks, but the traces have "
                f"{num_experts} experts: each rank needs E/R whole experts (ranks must divide {num_experts})"
            )


def source_ranks(num_tokens: int, num_ranks: int) -> np.ndarray:
    """[A] int64: token i's rank, contiguous blocks as data parallelism splits a batch."""
    return np.arange(num_tokens, dtype=np.int64) * num_ranks // max(num_tokens, 1)


def slot_ranks(
    expert_ids_AK: np.ndarray, layout: ExpertLayout, src_A: np.ndarray | None = None, copy_choice: str = "rule"
) -> np.ndarray:
    """[A, K] destination rank of each slot (-1: empty slot). With replicated experts the copy choice runs per source
    rank (``src_A``, each rank's tokens in order), as the dispatchers run it (`placement.copy_choice`):
    ``copy_choice`` ``rule``, or ``balanced`` (every source with the batch's counts, as the all-reduce gives them)."""
    ids = np.asarray(expert_ids_AK, dtype=np.int64)
    if not layout.is_replicated:
        return np.where(ids >= 0, layout.as_array()[np.maximum(ids, 0)], -1)
    src_A = np.zeros(len(ids), dtype=np.int64) if src_A is None else src_A
    balanced = copy_choice == "balanced"
    count_E = np.bincount(ids[ids >= 0], minlength=layout.num_experts) if balanced else None  # the batch's
    dest = np.full(ids.shape, -1, dtype=np.int64)
    for rank in np.unique(src_A):
        mine = src_A == rank
        if balanced:
            dest[mine] = choose_balanced_copy_ranks(ids[mine], layout, count_E, int(rank))
        else:
            dest[mine] = choose_copy_ranks(ids[mine], layout)
    return dest


def _pairs(key_AK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (token, key) pairs among valid slots (key >= 0): (token [P], key [P])."""
    K = key_AK.shape[1] if key_AK.ndim == 2 else 0
    token_AK = np.broadcast_to(np.arange(len(key_AK))[:, None], key_AK.shape)
    valid = key_AK >= 0
    width = int(key_AK.max(initial=0)) + 1
    codes = np.unique(token_AK[valid] * width + key_AK[valid]) if K else np.zeros(0, np.int64)
    return codes // width, codes % width


def _matrix(src_P: np.ndarray, dst_P: np.ndarray, R: int) -> np.ndarray:
    return np.bincount(src_P * R + dst_P, minlength=R * R).reshape(R, R).astype(np.float64)


def dispatch_rows(dest_AK: np.ndarray, src_A: np.ndarray, cluster: Cluster) -> dict[str, Any]:
    """Rows [R, R] (s -> d) each dispatch stage sends for these tokens (module docstring):
    {"per-expert", "per-rank", "per-node-inter", "per-node-intra"}."""
    R, W = cluster.num_ranks, cluster.gpus_per_node
    dest = np.asarray(dest_AK, dtype=np.int64)
    valid = dest >= 0
    src_AK = np.broadcast_to(src_A[:, None], dest.shape)
    out = {"per-expert": _matrix(src_AK[valid], dest[valid], R)}
    token_P, rank_P = _pairs(dest)
    out["per-rank"] = _matrix(src_A[token_P], rank_P, R)
    node_token_P, node_P = _pairs(np.where(valid, dest // W, -1))
    out["per-node-inter"] = _matrix(src_A[node_token_P], node_P * W + src_A[node_token_P] % W, R)
    forwarder_P = (rank_P // W) * W + src_A[token_P] % W
    out["per-node-intra"] = _matrix(forwarder_P, rank_P, R)
    return out


def copies_per_token(rows: dict[str, Any], num_tokens: int, cluster: Cluster) -> dict[str, dict[str, float]]:
    """Per mode: all rows, rows crossing nodes (inter) and rows to other ranks of the same node (intra), per token."""
    node_R = np.arange(cluster.num_ranks) // cluster.gpus_per_node
    same = node_R[:, None] == node_R[None, :]
    local = np.eye(cluster.num_ranks, dtype=bool)

    def split(m: np.ndarray) -> dict[str, float]:
        n = max(num_tokens, 1)
        return {"all": m.sum() / n, "inter": m[~same].sum() / n, "intra": m[same & ~local].sum() / n}

    node = {k: split(rows[f"per-node-{k}"]) for k in ("inter", "intra")}
    per_node = {
        "all": node["inter"]["all"] + node["intra"]["all"],
        "inter": node["inter"]["inter"],  # stage 1 only crosses nodes (or stays on the sender)
        "intra": node["intra"]["intra"],  # stage 2 only stays in the node
    }
    return {"per-expert": split(rows["per-expert"]), "per-rank": split(rows["per-rank"]), "per-node": per_node}


def mode_exchanges(rows: dict[str, Any], mode: str, cluster: Cluster, model: CostModel, top_k: int) -> list[tuple]:
    """[(name, rows [R, R], row bytes, peers)] of one forward; the backward repeats each (gradients go back)."""
    data = model.hidden * model.bytes_per_element
    meta = top_k * META_BYTES_PER_SLOT
    R, N, W = cluster.num_ranks, cluster.num_nodes, cluster.gpus_per_node
    if mode == "per-expert":
        return [("dispatch", rows["per-expert"], data, R - 1), ("combine", rows["per-expert"], data, R - 1)]
    if mode == "per-rank":
        m = rows["per-rank"]
        return [("dispatch", m, data, R - 1), ("dispatch_meta", m, meta, R - 1), ("combine", m, data, R - 1)]
    inter, intra = rows["per-node-inter"], rows["per-node-intra"]
    return [
        ("dispatch_inter", inter, data, N - 1),
        ("dispatch_inter_meta", inter, meta, N - 1),
        ("dispatch_intra", intra, data, W - 1),
        ("dispatch_intra_meta", intra, meta, W - 1),
        ("combine_intra", intra, data, W - 1),
        ("combine_inter", inter, data, N - 1),
    ]


def predict_layer(
    expert_ids_AK: np.ndarray, layout: ExpertLayout, cluster: Cluster, model: CostModel, copy_choice: str = "rule"
) -> dict[str, dict[str, Any]]:
    """Per mode: PREDICTED ``all_to_all_ms`` (latency + transfer), ``step_ms``, ``compute_ms``, copies per token
    (all / inter-node / intra-node) for one layer's traced tokens under ``layout`` (module docstring);
    ``copy_choice``: the run's ``train.copy_choice`` (replicated layouts)."""
    ids = np.asarray(expert_ids_AK)
    T_traced = len(ids) / cluster.num_ranks
    if T_traced == 0:
        return {mode: {"tokens": 0} for mode in MODES}
    scale = model.tokens_per_rank / T_traced
    src_A = source_ranks(len(ids), cluster.num_ranks)
    dest = slot_ranks(ids, layout, src_A, copy_choice)
    rows = dispatch_rows(dest, src_A, cluster)
    copies = copies_per_token(rows, len(ids), cluster)
    pairs_R = np.bincount(dest[dest >= 0], minlength=cluster.num_ranks) * scale
    flops = 3 * 2 * model.matrices * model.hidden * model.ffn * pairs_R.max(initial=0.0)
    compute_ms = flops / (model.expert_tflop_s * 1e12) * 1e3
    counts_ms = (cluster.num_ranks - 1) * model.latency_us * 1e-3  # the forward's one count exchange
    out = {}
    for mode in MODES:
        latency = transfer = 0.0
        for _, m, row_bytes, peers in mode_exchanges(rows, mode, cluster, model, ids.shape[1]):
            lat, xfer = exchange_ms(m * scale, row_bytes, peers, model, cluster.gpus_per_node)
            latency, transfer = latency + 2 * lat, transfer + 2 * xfer  # forward and backward
        a2a = latency + transfer
        out[mode] = {
            "tokens": int(len(ids)),
            "all_to_all_ms": a2a,
            "latency_ms": latency,
            "transfer_ms": transfer,
            "compute_ms": compute_ms,
            "step_ms": a2a + counts_ms + compute_ms,
            "copies_per_token": copies[mode]["all"],
            "inter_node_copies_per_token": copies[mode]["inter"],
            "intra_node_copies_per_token": copies[mode]["intra"],
            "busiest_rank_pairs": float(pairs_R.max(initial=0.0)),
        }
    return out


def with_overrides(model: CostModel, **values: Any) -> CostModel:
    """``model`` with the given fields replaced where the value is not None (CLI flags left out keep it)."""
    return dataclasses.replace(model, **{k: v for k, v in values.items() if v is not None})


def totals(layers: list[dict[str, dict[str, dict[str, Any]]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Sum over layers of all_to_all_ms and step_ms, per plan and mode."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for layer in layers:
        for plan, modes in layer.items():
            for mode, m in modes.items():
                t = out.setdefault(plan, {}).setdefault(mode, {"all_to_all_ms": 0.0, "step_ms": 0.0})
                t["all_to_all_ms"] += m.get("all_to_all_ms", 0.0)
                t["step_ms"] += m.get("step_ms", 0.0)
    return out
