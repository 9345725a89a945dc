"""All-to-all profiler: per step, per MoE layer, per destination rank, the token copies and bytes the expert-parallel
exchange moved, and how long each exchange took (forward and backward).

Each rank appends one JSON line per (step, MoE layer) to ``comm-rank<r>.jsonl``:

    {"step", "layer", "rank" (global), "ep_rank", "ep_size", "mode", "tokens", "valid_slots",
     "send_copies": [R] (rows sent to each EP rank, itself included), "recv_copies": [R], "bytes_per_copy",
     "distinct_ranks": sum over tokens of the number of distinct EP ranks its experts live on (lambda),
     "remote_ranks": the same, not counting the token's own rank, "local_expert_load": [E/R],
     "time_ms": {"dispatch", "combine", "dispatch_backward", "combine_backward"}}

Off by default. Cost when on: a forward hook per MoE layer, a few small tensor ops, and on GPUs CUDA events plus one
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

from c2r.moe import MoELayer
from c2r.parallel.dispatch import ranks_hit
from c2r.routing import RoutingResult


class _LayerTimer:
    """Times the exchanges of one layer: a monotonic clock on the CPU, CUDA events on GPUs."""

    def __init__(self, profiler: CommProfiler, layer: int):
        self.profiler, self.layer = profiler, layer

    def start(self, name: str) -> Any:
        if self.profiler.use_cuda_events:
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
            return name, begin
        return name, time.perf_counter()

    def stop(self, handle: Any) -> None:
        name, begin = handle
        if self.profiler.use_cuda_events:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.profiler._timings[self.layer].append((name, begin, end))
        else:
            self.profiler._timings[self.layer].append((name, (time.perf_counter() - begin) * 1e3, None))


class CommProfiler:
    def __init__(self, out_dir: str | Path, model: torch.nn.Module):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        self.use_cuda_events = any(p.is_cuda for p in model.parameters())
        self._records: dict[int, dict[str, Any]] = {}
        self._timings: dict[int, list] = defaultdict(list)
        self._handles = []
        self._totals: dict[str, float] = defaultdict(float)
        self._file = open(self.dir / f"comm-rank{self.rank:03d}.jsonl", "a")  # noqa: SIM115 (closed in close())
        for index, layer in enumerate(self.layers):
            if layer.dispatcher is None:
                continue  # no expert parallelism in this layer: nothing crosses ranks
            layer.dispatcher.timer = _LayerTimer(self, index)
            self._handles.append(layer.register_forward_hook(self._hook(index)))

    def _hook(self, index: int):
        def on_forward(module: MoELayer, inputs, output) -> None:
            if module.training:  # evaluation passes are not part of a training step's traffic
                self._records[index] = self._layer_record(index, module, inputs[0], output[1])

        return on_forward

    def _layer_record(self, index: int, layer: MoELayer, x: torch.Tensor, routing: RoutingResult) -> dict[str, Any]:
        dispatcher, meta = layer.dispatcher, layer.last_dispatch
        layout = dispatcher.layout
        rank_TK = dispatcher.expert_to_rank_E.to(routing.expert_ids_TK.device)[routing.expert_ids_TK]
        hits_TR = ranks_hit(rank_TK, routing.valid_TK, layout.num_ranks)
        lam_T, own_T = hits_TR.sum(1), hits_TR[:, dispatcher.rank]
        # Device tensors until end_step, which reads every layer's counts with one copy.
        counts = torch.stack([lam_T.sum(), (lam_T - own_T.long()).sum(), routing.valid_TK.sum()])
        return {
            "layer": index,
            "rank": self.rank,
            "ep_rank": dispatcher.rank,
            "ep_size": layout.num_ranks,
            "mode": dispatcher.mode,
            "tokens": routing.num_tokens,
            "valid_slots": counts[2],
            "send_copies": meta.send_splits,
            "recv_copies": meta.recv_splits,
            "bytes_per_copy": x.shape[-1] * x.element_size(),
            "distinct_ranks": counts[0],
            "remote_ranks": counts[1],
            "local_expert_load": meta.tokens_per_local_expert_L,
        }

    def begin_step(self) -> None:
        """Forget exchanges timed outside training steps (evaluation passes run the dispatcher too)."""
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
        self._file.flush()
        self._records.clear()
        self._timings.clear()

    def _accumulate(self, record: dict[str, Any], times: dict[str, float]) -> None:
        own = record["send_copies"][record["ep_rank"]]
        self._totals["tokens"] += record["tokens"]
        self._totals["copies"] += sum(record["send_copies"])
        self._totals["cross_rank_copies"] += sum(record["send_copies"]) - own
        self._totals["all_to_all_ms"] += sum(times.values())
        self._totals["layer_steps"] += 1

    def take_scalars(self) -> dict[str, float]:
        """This rank's traffic since the last call, per token (and all-to-all ms per step), for the monitor."""
        t, self._totals = self._totals, defaultdict(float)
        if not t["tokens"]:
            return {}
        steps = t["layer_steps"] / max(1, len(self._handles))
        return {
            "comm_copies_per_token": t["copies"] / t["tokens"],
            "comm_cross_rank_copies_per_token": t["cross_rank_copies"] / t["tokens"],
            "comm_all_to_all_ms_per_step": t["all_to_all_ms"] / max(steps, 1),
        }

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        for layer in self.layers:
            if layer.dispatcher is not None:
                layer.dispatcher.timer = None
        self._file.close()
