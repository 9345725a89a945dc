"""A small cost model of one expert-parallel MoE layer's training step: does a plan pay, in time, before it is applied?

Per layer and placement (metrics from `placement.objective`), per rank, one training step (forward + backward):

    comm_ms    = 4 exchanges (dispatch, combine; forward and backward) x T x bytes_per_copy x
                 (intra-node cross-rank copies per token / intra bandwidth
                  + inter-node copies per token / inter bandwidth)
    compute_ms = load max/mean x T x k (the busiest rank's token-expert pairs) x 3 (forward + 2 x backward)
                 x 2 x matrices x D x F flops / expert rate
                 (load max/mean: within each recorded step, ``step_load_imbalance``, where the trace has steps for
                 every placement compared -- each step waits for its own busiest rank; else the pooled ratio)
    step_ms    = comm_ms + compute_ms   (no overlap: every rank waits for the busiest one, and for its copies)

T: tokens per rank per step, k: slots per token (``slots_per_token``), D / F: hidden / expert FFN width. Copies per
token (per-rank dispatch, uniform source rank) split as in `placement.objective`: inter-node lambda (N - 1) / N,
intra-node the rest of lambda (R - 1) / R. It is a *prediction*: a first-order model, not a measurement.

Inputs: stated defaults (`CostModel`), or a profiled run (`calibrate`): the all-to-all records of
``RUN/profile/comm`` (`profiling.reader.read_comm_records`) give the measured bandwidth (cross-rank bytes over
forward dispatch + combine time), the tokens per rank and the bytes per copy. The profiler does not time expert
compute, so the expert rate stays the default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from placement.errors import PlacementError
from placement.objective import load_key


@dataclass(frozen=True)
class CostModel:
    """Defaults: an H200-class GPU (NVLink all-to-all measured at 235-280 GB/s, docs/design.md facts; 50 GB/s per GPU
    between nodes, a 400 Gb/s NIC each, where DeepEP reaches 43-58 GB/s; an expert GEMM rate of 300 TFLOP/s bf16),
    Mixtral-like experts. ``bytes_per_copy``: what one sent copy takes, measured (``calibrate``: the row and the
    routing slots that travel with it); 0: ``hidden`` x ``bytes_per_element``."""

    tokens_per_rank: int = 8192
    hidden: int = 4096
    ffn: int = 14336
    matrices: int = 3  # SwiGLU: w1, w3, w2
    bytes_per_element: int = 2
    intra_node_gb_s: float = 200.0
    inter_node_gb_s: float = 50.0
    expert_tflop_s: float = 300.0
    source: str = "defaults"
    # A fixed cost per peer of each exchange (one message each way), what small messages and CPU/gloo ranks are
    # dominated by; `exchange_ms` (c2r-place simulate) uses it, `layer_cost` (bandwidth only) does not.
    latency_us: float = 5.0
    bytes_per_copy: int = 0

    @property
    def copy_bytes(self) -> int:
        return self.bytes_per_copy or self.hidden * self.bytes_per_element

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "str":
                continue
            bound = ">= 0" if field.name in ("latency_us", "bytes_per_copy") else "> 0"
            if not (value >= 0 if bound == ">= 0" else value > 0):
                raise PlacementError(f"cost model: {field.name} must be {bound}; got {value!r}")


def layer_cost(
    metrics: dict[str, Any], model: CostModel, num_ranks: int, num_nodes: int = 1, load: str = "load_imbalance"
) -> dict[str, float]:
    """{"comm_ms", "compute_ms", "step_ms"} of one layer's placement (formulas: module docstring); ``load``: the
    metric of the busiest rank's load (`load_key`)."""
    if not metrics.get("tokens"):
        return {"comm_ms": 0.0, "compute_ms": 0.0, "step_ms": 0.0}
    copies = metrics["copies_per_token"]
    inter = copies * (num_nodes - 1) / num_nodes
    intra = copies * (num_ranks - 1) / num_ranks - inter
    bytes_per_copy = model.copy_bytes
    seconds = intra / (model.intra_node_gb_s * 1e9) + inter / (model.inter_node_gb_s * 1e9)
    comm_ms = 4 * model.tokens_per_rank * bytes_per_copy * seconds * 1e3
    pairs = metrics[load] * model.tokens_per_rank * metrics["slots_per_token"]
    flops = 3 * 2 * model.matrices * model.hidden * model.ffn * pairs
    compute_ms = flops / (model.expert_tflop_s * 1e12) * 1e3
    return {"comm_ms": comm_ms, "compute_ms": compute_ms, "step_ms": comm_ms + compute_ms}


def exchange_ms(
    rows_RR: np.ndarray, row_bytes: int, peers: int, model: CostModel, gpus_per_node: int
) -> tuple[float, float]:
    """(latency ms, transfer ms) of one all-to-all moving ``rows_RR[s, d]`` rows of ``row_bytes`` from rank s to d:

        latency  = max(peers, 1) x latency_us              (peers: the other ranks of the exchange's group; a group
                                                            of one still makes the call and copies locally)
        transfer = max over ranks of max(sent, received) seconds, where a rank's seconds are
                   bytes to/from other ranks of its node / intra_node_gb_s + bytes to/from other nodes / inter_node_gb_s

    Rows a rank keeps (the diagonal) cost nothing. The two links are not assumed to overlap (a conservative choice:
    a flat all-to-all on NVLink + a NIC could overlap them; per-node dispatch runs them one after the other)."""
    R = len(rows_RR)
    node_R = np.arange(R) // gpus_per_node
    same_RR = node_R[:, None] == node_R[None, :]
    off = rows_RR * ~np.eye(R, dtype=bool)
    per_byte = np.where(same_RR, 1.0 / (model.intra_node_gb_s * 1e9), 1.0 / (model.inter_node_gb_s * 1e9))
    seconds_RR = off * per_byte * row_bytes
    busiest = max(seconds_RR.sum(1).max(initial=0.0), seconds_RR.sum(0).max(initial=0.0))
    return max(peers, 1) * model.latency_us * 1e-3, busiest * 1e3


def calibrate(run_dir: str | Path, base: CostModel | None = None) -> CostModel:
    """``base`` (default `CostModel()`) with bandwidth, tokens per rank and bytes per copy measured in a profiled run
    (a run directory, its ``profile`` directory or the ``comm`` directory itself)."""
    from profiling.reader import read_comm_records

    base = base or CostModel()
    run_dir = Path(run_dir)
    comm_dir = next((d for d in (run_dir / "profile" / "comm", run_dir / "comm", run_dir) if d.is_dir()), None)
    if comm_dir is None:
        if run_dir.exists():
            raise PlacementError(
                f"--calibrate {run_dir} is not a directory; give a profiled run's directory (RUN, RUN/profile or "
                "RUN/profile/comm)"
            )
        raise FileNotFoundError(f"--calibrate {run_dir} does not exist")
    records = read_comm_records(comm_dir)
    sent_bytes, ms, tokens = 0.0, 0.0, []
    for rec in records:
        remote = sum(n for r, n in enumerate(rec.get("send_copies", [])) if r != rec.get("ep_rank"))
        sent_bytes += 2 * remote * rec.get("bytes_per_copy", 0)  # dispatch and the combine reply
        # the forward token exchanges: "dispatch" / "combine", per-node's "dispatch_inter", "combine_intra", ...
        # (not the metadata rows, not the backward)
        ms += sum(t for name, t in rec.get("time_ms", {}).items() if "meta" not in name and "backward" not in name)
        tokens.append(rec.get("tokens", 0))
    if not sent_bytes or not ms:
        raise PlacementError(f"--calibrate {comm_dir}: the all-to-all records hold no cross-rank bytes or no times")
    return dataclasses.replace(
        base,
        tokens_per_rank=max(1, int(np.median(tokens))),
        bytes_per_copy=int(records[0].get("bytes_per_copy", 0)),  # with the routing slots a per-rank copy carries
        intra_node_gb_s=sent_bytes / (ms * 1e-3) / 1e9,
        source=f"calibrated on {comm_dir} ({len(records)} all-to-all records; expert rate: default)",
    )


def fit_latency_bandwidth(records: list[dict[str, Any]]) -> tuple[float, float]:
    """(latency us per exchange, GB/s) fitted by non-negative least squares to a profiled run's all-to-all records:
    per record (one rank, one layer, one step), its forward token exchanges' time = exchanges x latency + the bytes
    it sent to other ranks (dispatch and combine reply) / bandwidth. One bandwidth: the records do not split a flat
    exchange's time between links."""
    from scipy.optimize import nnls

    rows, ms = [], []
    for rec in records:
        times = {n: t for n, t in rec.get("time_ms", {}).items() if "meta" not in n and "backward" not in n}
        remote = sum(n for r, n in enumerate(rec.get("send_copies", [])) if r != rec.get("ep_rank"))
        if times:
            rows.append([len(times), 2 * remote * rec.get("bytes_per_copy", 0) / 1e9])
            ms.append(sum(times.values()) * 1e-3)
    if len(rows) < 2 or not any(r[1] for r in rows):
        raise PlacementError("the all-to-all records hold no cross-rank bytes or no times: nothing to fit")
    (latency_s, seconds_per_gb), _ = nnls(np.array(rows), np.array(ms))
    return latency_s * 1e6, (1.0 / seconds_per_gb if seconds_per_gb else float("inf"))


def format_costs(
    layer_pairs: list[tuple[dict[str, Any], dict[str, Any]]], model: CostModel, num_ranks: int, num_nodes: int
) -> str:
    """Per layer: predicted step ms (comm + compute) under the plan vs contiguous, and an overall line."""
    load = load_key([p for p, _ in layer_pairs], [c for _, c in layer_pairs])
    busiest = "the busiest rank of each recorded step" if load == "step_load_imbalance" else "the busiest rank, pooled"
    lines = [
        f"PREDICTED step time per MoE layer (a cost model, not a measurement; {model.source}: {model.tokens_per_rank} "
        f"tokens/rank, hidden {model.hidden}, ffn {model.ffn}, {model.copy_bytes} bytes a copy"
        f"{' (measured)' if model.bytes_per_copy else ''}, {model.intra_node_gb_s:.3g} GB/s intra-node, "
        f"{model.inter_node_gb_s:.3g} GB/s inter-node, {model.expert_tflop_s:.3g} TFLOP/s experts; compute on "
        f"{busiest})",
        "layer  plan ms (comm + compute)  contig ms (comm + compute)  change",
    ]
    totals = np.zeros(2)
    for layer, (plan, contig) in enumerate(layer_pairs):
        p = layer_cost(plan, model, num_ranks, num_nodes, load)
        c = layer_cost(contig, model, num_ranks, num_nodes, load)
        totals += [p["step_ms"], c["step_ms"]]
        change = f"{100 * (p['step_ms'] / c['step_ms'] - 1):+.1f}%" if c["step_ms"] else "n/a"
        lines.append(
            f"{layer:5d}  {p['step_ms']:7.3f} ({p['comm_ms']:.3f} + {p['compute_ms']:.3f})  "
            f"{c['step_ms']:9.3f} ({c['comm_ms']:.3f} + {c['compute_ms']:.3f})  {change}"
        )
    if totals[1]:
        lines.append(
            f"  all  {totals[0]:.3f} ms vs {totals[1]:.3f} ms contiguous ({100 * (totals[0] / totals[1] - 1):+.1f}%)"
        )
    return "\n".join(lines)
