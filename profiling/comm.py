"""All-to-all profiler: per step, per MoE layer, per destination rank, the token copies and bytes the expert-parallel
exchange moved, and how long each exchange took (forward and backward).

Each rank appends one JSON line per (step, MoE layer) to ``comm-rank<r>.jsonl``:

    {"step", "layer", "rank" (global), "ep_rank", "ep_size", "mode", "tokens", "valid_slots",
     "send_copies": [R] (rows sent to each EP rank, itself included), "recv_copies": [R], "bytes_per_copy",
     "distinct_ranks": sum over tokens of the number of distinct EP ranks its experts live on (lambda),
     "remote_ranks": the same, not counting the token's own rank, "local_expert_load": [E/R],
     "ranks_per_node": W (EP rank r on node r // W), "distinct_nodes" / "remote_nodes": the same over nodes,
     "inter_node_copies" / "intra_node_copies": rows sent to ranks of other nodes / to other ranks of this node
     (both stages of per-node dispatch together), "inter_node_bytes" / "intra_node_bytes": those times bytes_per_copy,
     "time_ms": {"dispatch", "combine", "dispatch_backward", "combine_backward"; per-rank dispatch also
                 "dispatch_meta", "dispatch_meta_backward" (the copies' expert slots and weights); per-node dispatch
                 names each exchange by its stage: "dispatch_inter", "dispatch_intra", "combine_inter", ...;
                 a dispatcher that overlaps its exchanges with compute in chunks times only the waits, so each name
                 sums its chunks' exposed time}}

How it is wired (this package never imports the system it profiles): the caller makes the profiler before its MoE
layers become expert parallel and gives ``profiler.observers[i]`` to layer i's dispatcher when building it. The
dispatcher calls the observer's ``start(name) -> handle`` and ``stop(handle)`` around each exchange (forward and
backward), and ``on_dispatch(meta)`` once per forward, with ``meta`` carrying what it sent:

    mode: str, ep_rank: int, send_splits / recv_splits: [R] ints, num_tokens: int, bytes_per_row: int,
    valid_slots / distinct_ranks / remote_ranks / distinct_nodes / remote_nodes: () int tensors,
    tokens_per_local_expert_X: [E/R] int tensor, ranks_per_node: int, inter_node_copies / intra_node_copies: ints

(c2r's ``DispatchMeta`` is one). The profiler counts nothing itself: it writes down what the dispatcher reports.

Off by default. Cost when on: a few small tensor ops per MoE layer forward, and on GPUs CUDA events plus one
synchronisation per step to read them (# NOTE: host sync).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


class _LayerObserver:
    """Watches the dispatcher of one layer: times its exchanges (a monotonic clock on the CPU, CUDA events on GPUs)
    and keeps the counts of its last forward."""

    def __init__(self, profiler: CommProfiler, layer: int):
        self.profiler, self.layer = profiler, layer

    def start(self, name: str) -> Any:
        if self.profiler.closed:
            return None
        if self.profiler.use_cuda_events:
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
            return name, begin
        return name, time.perf_counter()

    def stop(self, handle: Any) -> None:
        if handle is None:
            return
        name, begin = handle
        if self.profiler.use_cuda_events:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.profiler._timings[self.layer].append((name, begin, end))
        else:
            self.profiler._timings[self.layer].append((name, (time.perf_counter() - begin) * 1e3, None))

    def on_dispatch(self, meta: Any) -> None:
        if self.profiler.closed:
            return
        record = self.profiler._layer_record(self.layer, meta)
        earlier = self.profiler._records.get(self.layer)
        # every forward of the step counts (gradient accumulation runs several), as its exchanges' times do
        self.profiler._records[self.layer] = record if earlier is None else _summed(earlier, record)


# The counts of a record that add up over a step's forwards (the rest describe the layer and are the same in each).
SUMMED = (
    "tokens", "valid_slots", "send_copies", "recv_copies", "distinct_ranks", "remote_ranks", "local_expert_load",
    "distinct_nodes", "remote_nodes", "inter_node_copies", "intra_node_copies", "inter_node_bytes", "intra_node_bytes",
)  # fmt: skip


def _summed(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two forwards' records of one layer as one: counts added (device tensors stay on the device, lists by
    position)."""
    out = dict(a)
    for key in SUMMED:
        x, y = a[key], b[key]
        out[key] = [i + j for i, j in zip(x, y, strict=True)] if isinstance(x, list) else x + y
    return out


class CommProfiler:
    """``num_layers``: the MoE layers to watch (``observers[i]`` for layer i); ``use_cuda_events``: time with CUDA
    events (the exchanges run on a GPU) rather than the host clock."""

    def __init__(self, out_dir: str | Path, num_layers: int, use_cuda_events: bool = False):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.use_cuda_events = use_cuda_events
        self.observers = [_LayerObserver(self, index) for index in range(num_layers)]
        self.closed = False
        self._records: dict[int, dict[str, Any]] = {}
        self._timings: dict[int, list] = defaultdict(list)
        self._totals: dict[str, float] = defaultdict(float)
        self._file = open(self.dir / f"comm-rank{self.rank:03d}.jsonl", "a")  # noqa: SIM115 (closed in close())

    def _layer_record(self, index: int, meta: Any) -> dict[str, Any]:
        # Device tensors until end_step reads them: no host sync inside the step.
        counts = torch.stack(
            [meta.distinct_ranks, meta.remote_ranks, meta.valid_slots, meta.distinct_nodes, meta.remote_nodes]
        )
        return {
            "layer": index,
            "rank": self.rank,
            "ep_rank": meta.ep_rank,
            "ep_size": len(meta.send_splits),
            "mode": meta.mode,
            "tokens": meta.num_tokens,
            "valid_slots": counts[2],
            "send_copies": meta.send_splits,
            "recv_copies": meta.recv_splits,
            "bytes_per_copy": meta.bytes_per_row,
            "distinct_ranks": counts[0],
            "remote_ranks": counts[1],
            "local_expert_load": meta.tokens_per_local_expert_X,
            "ranks_per_node": meta.ranks_per_node,
            "distinct_nodes": counts[3],
            "remote_nodes": counts[4],
            "inter_node_copies": meta.inter_node_copies,
            "intra_node_copies": meta.intra_node_copies,
            "inter_node_bytes": meta.inter_node_copies * meta.bytes_per_row,
            "intra_node_bytes": meta.intra_node_copies * meta.bytes_per_row,
        }

    def begin_step(self) -> None:
        """Forget what was dispatched outside training steps (evaluation passes run the dispatcher too)."""
        self._records.clear()
        self._timings.clear()

    def end_step(self, step: int) -> None:
        """Write this step's records (call after the optimizer step, when the backward exchanges are done)."""
        if self.use_cuda_events and self._timings:
            torch.cuda.synchronize()  # NOTE: host sync, only while profiling, to read the CUDA events
        for index, record in sorted(self._records.items()):
            record = {key: value.tolist() if torch.is_tensor(value) else value for key, value in record.items()}
            times: dict[str, float] = defaultdict(float)
            for name, begin, end in self._timings.get(index, []):
                times[name] += begin.elapsed_time(end) if end is not None else begin
            self._file.write(json.dumps({"step": step, **record, "time_ms": dict(times)}) + "\n")
            self._accumulate(record, times)
        if self._records:
            self._totals["steps"] += 1
        self._file.flush()
        self._records.clear()
        self._timings.clear()

    def _accumulate(self, record: dict[str, Any], times: dict[str, float]) -> None:
        own = record["send_copies"][record["ep_rank"]]
        self._totals["tokens"] += record["tokens"]
        self._totals["copies"] += sum(record["send_copies"])
        self._totals["cross_rank_copies"] += sum(record["send_copies"]) - own
        self._totals["all_to_all_ms"] += sum(times.values())

    def take_scalars(self) -> dict[str, float]:
        """This rank's traffic since the last call, per token (and all-to-all ms per step), for the monitor."""
        t, self._totals = self._totals, defaultdict(float)
        if not t["tokens"]:
            return {}
        return {
            "comm_copies_per_token": t["copies"] / t["tokens"],
            "comm_cross_rank_copies_per_token": t["cross_rank_copies"] / t["tokens"],
            "comm_all_to_all_ms_per_step": t["all_to_all_ms"] / max(t["steps"], 1),
        }

    def close(self) -> None:
        """Stop recording (the dispatchers keep their observers, which from now on do nothing) and close the file."""
        self.closed = True
        self._records.clear()
        self._timings.clear()
        self._file.close()
