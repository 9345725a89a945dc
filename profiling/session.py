"""Profiling a training run: routing traces and all-to-all counts/times, written under ``<out>/profile/``.

    profile/profile.json        what was profiled: model shape, EP size, dispatch mode, each MoE layer's expert_to_rank
    profile/traces/             routing traces (profiling.trace)
    profile/comm/               per-rank all-to-all records (profiling.comm)

Turned on with ``--profile`` (or ``profile.enabled``) in ``c2r-train``.

This package never imports the system it profiles; the caller hands it a :class:`ProfiledModel`. A MoE layer is any
``nn.Module`` whose forward returns ``(y, routing)``, where ``routing`` has ``expert_ids_TK`` [T, K] int,
``weights_TK`` [T, K] float and ``valid_TK`` [T, K] bool (False: the slot is empty). The caller builds the
:class:`~profiling.comm.CommProfiler` (:func:`open_comm_profiler`) before its layers become expert parallel, so that
each dispatcher gets its observer at construction, and hands it to the session.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from profiling.comm import CommProfiler
from profiling.trace import RoutingTraceRecorder, TraceConfig


@dataclass
class ProfileConfig:
    enabled: bool = False
    traces: bool = True
    comm: bool = True
    trace: TraceConfig = field(default_factory=TraceConfig)
    kernel_steps: int = 0  # > 0: torch.profiler over that many steps (profiling.kernels), independent of ``enabled``
    kernel_warmup: int = 10  # steps of this run before the kernel profile starts

    def __post_init__(self) -> None:
        if self.kernel_steps < 0 or self.kernel_warmup < 0:
            raise ValueError(
                f"profile.kernel_steps ({self.kernel_steps}) and profile.kernel_warmup ({self.kernel_warmup}) "
                "must be >= 0"
            )


@dataclass(frozen=True)
class ProfiledModel:
    """What the caller tells the profiler about its MoE model.

    ``layers``: the MoE layers in order (the protocol in the module docstring). ``expert_to_rank``: per layer, the
    rank of each expert, or None where the layer is not expert parallel. ``dispatch_mode``: how the expert-parallel
    layers send tokens (``per-expert``, ``per-rank``, ...), None when no layer is expert parallel. ``dtype``: the
    activations' dtype (``bf16``, ``fp16``, ``fp32``), recorded with ``hidden_size`` so that bytes per token can be
    computed from the traces alone (``c2r-place evaluate``); None when not known. ``ffn_hidden_size`` and
    ``expert_matrices`` (3 for SwiGLU, 2 for GELU): the experts' shape, for the planner's predicted compute time;
    None when not known.
    """

    layers: list[nn.Module]
    num_experts: int
    top_k: int
    hidden_size: int
    router: str
    dispatch_mode: str | None
    expert_to_rank: list[list[int] | None]
    dtype: str | None = None
    ffn_hidden_size: int | None = None
    expert_matrices: int | None = None

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("profiling needs at least one MoE layer in the model")
        if len(self.expert_to_rank) != len(self.layers):
            raise ValueError(
                f"expert_to_rank has {len(self.expert_to_rank)} layers but the model has {len(self.layers)} MoE layers"
            )


def open_comm_profiler(
    out_dir: str | Path, config: ProfileConfig, num_layers: int, use_cuda_events: bool
) -> CommProfiler | None:
    """The all-to-all profiler for ``ProfileSession(out_dir, ...)`` if ``config`` asks for one. Make it before the
    model is made expert parallel: ``.observers`` go to the dispatchers."""
    if not (config.enabled and config.comm):
        return None
    return CommProfiler(Path(out_dir) / "comm", num_layers, use_cuda_events)


def attach_routing_recorder(layers: list[nn.Module], recorder: RoutingTraceRecorder) -> list:
    """Record every training forward of every MoE layer (logical expert ids; -1 for empty slots)."""
    handles = []
    for index, layer in enumerate(layers):

        def on_forward(module, inputs, output, index=index):
            if module.training:
                routing = output[1]
                ids = torch.where(routing.valid_TK, routing.expert_ids_TK, -1)
                recorder.record(index, ids, routing.weights_TK)

        handles.append(layer.register_forward_hook(on_forward))
    return handles


class ProfileSession:
    """``comm``: the all-to-all profiler from :func:`open_comm_profiler`, already observing the dispatchers; the
    session writes and closes it with the traces."""

    def __init__(
        self,
        out_dir: str | Path,
        model: ProfiledModel,
        config: ProfileConfig,
        run_info: dict[str, Any],
        comm: CommProfiler | None = None,
    ):
        self.dir = Path(out_dir)
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        shape = {
            "num_layers": len(model.layers),
            "num_experts": model.num_experts,
            "top_k": model.top_k,
            "hidden_size": model.hidden_size,
            "ffn_hidden_size": model.ffn_hidden_size,
            "expert_matrices": model.expert_matrices,
            "dtype": model.dtype,
            "world_size": world,
        }
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            info = {
                "format": "c2r-profile",
                "version": 1,
                **shape,
                "expert_to_rank": model.expert_to_rank,
                "mode": model.dispatch_mode,
                **run_info,
            }
            (self.dir / "profile.json").write_text(json.dumps(info, indent=2))
        self.recorder = None
        self.comm = comm
        self._handles = []
        if config.traces:
            self.recorder = RoutingTraceRecorder(
                self.dir / "traces",
                num_layers=shape["num_layers"],
                num_experts=model.num_experts,
                top_k=model.top_k,
                source="c2r-train",
                router=model.router,
                rank=rank,
                world_size=world,
                config=config.trace,
                extra_header={
                    "hidden_size": model.hidden_size,
                    "ffn_hidden_size": model.ffn_hidden_size,
                    "expert_matrices": model.expert_matrices,
                    "dtype": model.dtype,
                    **run_info,
                },
            )
            self._handles = attach_routing_recorder(model.layers, self.recorder)

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
