"""Profiling a c2r training run: routing traces and all-to-all counts/times, written under ``<out>/profile/``.

    profile/profile.json        what was profiled: model shape, EP size, each MoE layer's expert_to_rank
    profile/traces/             routing traces (profiling.trace)
    profile/comm/               per-rank all-to-all records (profiling.comm)

Turned on with ``--profile`` (or ``profile.enabled``) in ``c2r-train``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from c2r.moe import MoELayer
from c2r.parallel import model_layouts
from profiling.comm import CommProfiler
from profiling.trace import RoutingTraceRecorder, TraceConfig


@dataclass
class ProfileConfig:
    enabled: bool = False
    traces: bool = True
    comm: bool = True
    trace: TraceConfig = field(default_factory=TraceConfig)


def attach_routing_recorder(model: torch.nn.Module, recorder: RoutingTraceRecorder) -> list:
    """Record every training forward of every :class:`MoELayer` (logical expert ids; -1 for empty slots)."""
    handles = []
    for index, layer in enumerate(m for m in model.modules() if isinstance(m, MoELayer)):

        def on_forward(module, inputs, output, index=index):
            if module.training:
                routing = output[1]
                ids = torch.where(routing.valid_TK, routing.expert_ids_TK, -1)
                recorder.record(index, ids, routing.weights_TK)

        handles.append(layer.register_forward_hook(on_forward))
    return handles


class ProfileSession:
    def __init__(self, out_dir: str | Path, model: torch.nn.Module, config: ProfileConfig, run_info: dict[str, Any]):
        self.dir = Path(out_dir)
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        if not layers:
            raise ValueError("profiling needs at least one MoE layer in the model")
        moe = layers[0].config
        shape = {
            "num_layers": len(layers),
            "num_experts": moe.num_experts,
            "top_k": moe.top_k,
            "hidden_size": layers[0].hidden_size,
            "world_size": world,
        }
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            info = {
                "format": "c2r-profile",
                "version": 1,
                **shape,
                "expert_to_rank": model_layouts(model),
                "mode": "per-expert",
                **run_info,
            }
            (self.dir / "profile.json").write_text(json.dumps(info, indent=2))
        self.recorder = self.comm = None
        self._handles = []
        if config.traces:
            self.recorder = RoutingTraceRecorder(
                self.dir / "traces",
                num_layers=shape["num_layers"],
                num_experts=moe.num_experts,
                top_k=moe.top_k,
                source="c2r-train",
                router=moe.router.kind,
                rank=rank,
                world_size=world,
                config=config.trace,
                extra_header=run_info,
            )
            self._handles = attach_routing_recorder(model, self.recorder)
        if config.comm:
            self.comm = CommProfiler(self.dir / "comm", model)

    def begin_step(self, step: int) -> None:
        if self.recorder is not None:
            self.recorder.step = step
        if self.comm is not None:
            self.comm.begin_step()

    def end_step(self, step: int) -> None:
        if self.comm is not None:
            self.comm.end_step(step)

    def scalars(self) -> dict[str, float]:
        """Traffic since the last call (this rank's view), merged into the trainer's eval record and monitor."""
        return self.comm.take_scalars() if self.comm is not None else {}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        if self.recorder is not None:
            self.recorder.close()
        if self.comm is not None:
            self.comm.close()
