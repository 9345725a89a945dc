"""Where a training step's time goes, kernel by kernel: ``torch.profiler`` over a few steps of a run.

    profile/kernels.txt              rank 0's summary: wall and GPU-busy ms per step, each phase's time, top ops
    profile/kernels_rank{r}.json.gz  each rank's Chrome trace (chrome://tracing, https://ui.perfetto.dev)

Turned on with ``--profile-kernels N`` (``profile.kernel_steps``) in ``c2r-train``: the N steps after
``profile.kernel_warmup`` steps of this run (warm-up lets the allocator, cuBLAS and triton settle first). The caller
marks its phases with :func:`phase` (``forward``, ``backward``, ``optimizer``, ...): each phase's rows in the summary
give its CPU time (how long the host spent launching it) and the device time of the kernels it launched.

Independent of the routing and all-to-all profiler (``--profile``): either can run without the other.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.profiler_util import EventList

from profiling.host_syncs import HostSyncs, count_host_syncs, sync_table

PHASE_PREFIX = "c2r."


def phase(name: str):
    """A labelled range in the kernel profile (``c2r.<name>``); costs next to nothing when no profile is running."""
    return torch.profiler.record_function(PHASE_PREFIX + name)


def busy_ms(intervals: list[tuple[int, int]]) -> float:
    """Length of the union of ``(start_ns, end_ns)`` intervals in ms: the time at least one kernel ran (kernels on
    two streams that overlap count once)."""
    total, reach = 0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total / 1e6


def device_work(events) -> list:
    """The kernels, memcpys and memsets among kineto events: device-side events that are not the device-side copy
    of a ``record_function`` range (a "gpu_user_annotation", which spans all the kernels of its range)."""
    cuda = torch.autograd.DeviceType.CUDA
    return [e for e in events if e.device_type() == cuda and not e.is_user_annotation()]


def kernel_intervals(events) -> list[tuple[int, int]]:
    """``(start_ns, end_ns)`` of every device kernel, memcpy and memset among a profile's kineto events."""
    return [(e.start_ns(), e.end_ns()) for e in device_work(events)]


def launch_phases(events) -> dict[int, str]:
    """``kernel correlation id -> phase`` from a profile's kineto events: a kernel belongs to the :func:`phase`
    whose host range contains its launch. The backward's kernels are launched by autograd's own thread, which a
    ``record_function`` range on the main thread does not parent, so the range's own device total would miss them."""
    cuda = torch.autograd.DeviceType.CUDA
    host = [e for e in events if e.device_type() != cuda]
    ranges = [(e.start_ns(), e.end_ns(), e.name()[len(PHASE_PREFIX) :]) for e in host if _is_phase(e)]
    phases = {}
    for e in host:
        if e.correlation_id() and not e.is_user_annotation():
            for start, end, name in ranges:
                if start <= e.start_ns() <= end:
                    phases[e.correlation_id()] = name
                    break
    return phases


def kernels_by_phase(events, phase_of: dict[int, str]) -> dict[str, list[tuple[str, int]]]:
    """``phase -> [(kernel name, device ns)]`` for the kernels each :func:`phase` launched (``phase_of``:
    `launch_phases` of the same events)."""
    kernels: dict[str, list[tuple[str, int]]] = {name: [] for name in set(phase_of.values())}
    for kernel in device_work(events):
        if (name := phase_of.get(kernel.correlation_id())) is not None:
            kernels[name].append((kernel.name(), kernel.duration_ns()))
    return kernels


def idle_gaps(events) -> list[tuple[int, Any, Any]]:
    """``(gap ns, kernel before, kernel after)`` for every stretch in which no kernel, memcpy or memset runs,
    between the first and the last: where the GPU waits (for the host's launches, a host sync, another rank)."""
    gaps, reach, before = [], None, None
    for e in sorted(device_work(events), key=lambda e: e.start_ns()):
        if reach is not None and e.start_ns() > reach:
            gaps.append((e.start_ns() - reach, before, e))
        if reach is None or e.end_ns() > reach:
            reach, before = e.end_ns(), e
    return gaps


def idle_table(events, phase_of: dict[int, str], steps: int, shown: int = 8) -> list[str]:
    """GPU idle time per step by the phase that launched the kernel ending each gap (the work the GPU waited for;
    ``phase_of``: `launch_phases` of the same events), then the longest gaps with the kernels on either side."""
    gaps = idle_gaps(events)
    by_phase: dict[str, int] = {}
    for gap, _, after in gaps:
        name = phase_of.get(after.correlation_id(), "(outside the phases)")
        by_phase[name] = by_phase.get(name, 0) + gap
    lines = ["", "GPU idle, by the phase that launched the kernel after the gap (ms/step):"]
    lines += [f"  {ns / 1e6 / steps:8.2f}  {name}" for name, ns in sorted(by_phase.items(), key=lambda kv: -kv[1])]
    lines += ["", "longest GPU idle gaps (us; the phase after the gap; the kernels before -> after):"]
    for gap, before, after in sorted(gaps, key=lambda g: -g[0])[:shown]:
        name = phase_of.get(after.correlation_id(), "-")
        lines.append(f"  {gap / 1e3:9.1f}  {name:<14} {before.name()[:60]} -> {after.name()[:60]}")
    return lines


def profile_steps(step: Callable[[], None], iters: int, on_cuda: bool, title: str, rows: int = 18) -> list[str]:
    """Where ``iters`` calls of ``step`` (one benchmark iteration each) spend their time, under torch.profiler: the
    kernels per step, the GPU's busy time against the wall (the union of kernel intervals) with the longest idle
    gaps and the kernels on either side, and the top ops by self time (device time on a GPU, so nested ops count
    once). For the layer benchmarks (benchmarks/layer_bench.py,
    benchmarks/ep_bench.py ``--profile N``); a training run has :class:`KernelProfile`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    if on_cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(iters):
            step()
        if on_cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - started) * 1e3 / iters
    averages = prof.key_averages()
    kernels = sum(e.count for e in averages if on_cuda and e.device_type.name == "CUDA")
    per_step = f", {kernels / iters:.0f} kernels per step" if on_cuda else ""
    lines = [f"--- profile: {title}, {iters} steps{per_step} ---"]
    if on_cuda:
        events = list(prof.profiler.kineto_results.events())
        busy = busy_ms(kernel_intervals(events)) / iters
        lines.append(f"GPU busy {busy:.3f} ms of {wall_ms:.3f} ms wall per step (idle {wall_ms - busy:.3f} ms); gaps:")
        for gap, before, after in sorted(idle_gaps(events), key=lambda g: -g[0])[:6]:
            lines.append(f"  {gap / 1e3:8.1f} us  after {before.name()[:50]}  before {after.name()[:50]}")
    sort_by = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    lines.append(averages.table(sort_by=sort_by, row_limit=rows, max_name_column_width=70))
    return lines


BETWEEN_OPS = "(host time between ops: Python, DeepSpeed's code, or waiting for another thread)"


def host_calls_by_phase(events) -> dict[str, list[tuple[str, int]]]:
    """``phase -> [(host op name, ns)]`` from a profile's kineto events: the outermost ops each :func:`phase` ran on
    the host. On the phase's own
    thread those are the range's direct children, plus one ``BETWEEN_OPS`` entry for the range's time outside them;
    on other threads (autograd's, which runs the backward) the outermost ops that start inside the phase's window."""
    events = [e for e in events if e.device_type() != torch.autograd.DeviceType.CUDA]
    events = [e for e in events if not e.is_user_annotation() or e.name().startswith(PHASE_PREFIX)]
    windows = [(e.start_ns(), e.end_ns(), e.name()[len(PHASE_PREFIX) :]) for e in events if _is_phase(e)]
    calls: dict[str, list[tuple[str, int]]] = {name: [] for _, _, name in windows}
    inside: dict[int, int] = {}  # id(phase event) -> ns of its direct children
    by_thread: dict[int, list] = {}
    for e in events:
        by_thread.setdefault(e.start_thread_id(), []).append(e)
    for thread_events in by_thread.values():
        open_events: list = []  # (event, its end clipped to its parent's: a child that outlasts it ends with it)
        # parents before children; at an equal start and length a phase range is the parent
        for e in sorted(thread_events, key=lambda e: (e.start_ns(), -e.duration_ns(), not _is_phase(e))):
            while open_events and open_events[-1][1] <= e.start_ns():
                open_events.pop()
            parent = open_events[-1][0] if open_events else None
            if parent is not None and _is_phase(parent):
                calls[parent.name()[len(PHASE_PREFIX) :]].append((e.name(), e.duration_ns()))
                inside[id(parent)] = inside.get(id(parent), 0) + min(e.end_ns(), parent.end_ns()) - e.start_ns()
            elif parent is None and not _is_phase(e):
                for start, end, name in windows:
                    if start <= e.start_ns() < end:
                        calls[name].append((e.name(), e.duration_ns()))
                        break
            open_events.append((e, min(e.end_ns(), open_events[-1][1]) if open_events else e.end_ns()))
    for e in events:
        if _is_phase(e):
            calls[e.name()[len(PHASE_PREFIX) :]].append((BETWEEN_OPS, e.duration_ns() - inside.get(id(e), 0)))
    return calls


def _is_phase(event) -> bool:
    return event.name().startswith(PHASE_PREFIX)


def top_by_phase_table(
    by_phase: dict[str, list[tuple[str, int]]], steps: int, what: str, rows: int = 8, width: int = 150
) -> list[str]:
    """Per phase, its ``rows`` costliest names (kernels, or host calls) by time: ms and occurrences per step. Names
    are cut to ``width`` characters but keep their template arguments' start, which is what tells e.g. a vectorised
    copy kernel from an unrolled (unvectorised) one."""
    lines = []
    for name, entries in sorted(by_phase.items(), key=lambda kv: -sum(ns for _, ns in kv[1])):
        by_name: dict[str, list[int]] = {}
        for entry, ns in entries:
            by_name.setdefault(entry, []).append(ns)
        if not by_name:
            continue
        lines += ["", f"top {what} of phase {name} (ms/step, {what}/step):"]
        for entry, durations in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:rows]:
            lines.append(f"  {sum(durations) / 1e6 / steps:8.2f} {len(durations) / steps:7.1f}  {entry[:width]}")
    return lines


class KernelProfile:
    """Profiles steps ``first`` .. ``first + steps - 1``; ``begin_step``/``end_step`` around every step of the run."""

    def __init__(self, out_dir: str | Path, first: int, steps: int, use_cuda: bool, rows: int = 30):
        if steps < 1:
            raise ValueError(f"profile.kernel_steps ({steps}) must be at least 1 to profile")
        self.dir = Path(out_dir)
        self.first, self.last = first, first + steps - 1
        self.use_cuda, self.rows = use_cuda, rows
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self._prof = None
        self._counting = contextlib.ExitStack()  # the host-sync count over the window (GPU only)
        self._syncs: HostSyncs | None = None
        self._started = 0.0
        self.summary: str | None = None  # the text of kernels.txt once written

    def begin_step(self, step: int) -> None:
        if step != self.first:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.use_cuda else [])
        self._sync()
        self._prof = profile(activities=activities)
        self._prof.__enter__()
        if self.use_cuda:
            self._syncs = self._counting.enter_context(count_host_syncs("cuda"))
        self._started = time.perf_counter()

    def end_step(self, step: int) -> None:
        if self._prof is None or step != self.last:
            return
        self._counting.close()
        self._sync()
        wall_s = time.perf_counter() - self._started
        self._prof.__exit__(None, None, None)
        self._write(wall_s)
        self._prof = None

    def close(self) -> None:
        """End a profile the run stopped inside (a stop signal, fewer steps left than asked): nothing is written."""
        self._counting.close()
        if self._prof is not None:
            with contextlib.suppress(Exception):
                self._prof.__exit__(None, None, None)
            self._prof = None

    def _sync(self) -> None:
        if self.use_cuda:
            torch.cuda.synchronize()

    def _write(self, wall_s: float) -> None:
        prof, steps = self._prof, self.last - self.first + 1
        self.dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.dir / f"kernels_rank{self.rank}.json.gz"))
        if self.rank != 0:
            return
        events, kineto = prof.key_averages(), list(prof.profiler.kineto_results.events())
        phase_of = launch_phases(kineto) if self.use_cuda else {}
        per_step = lambda us: us / 1e3 / steps  # noqa: E731 - microseconds over the window -> ms per step
        wall = wall_s * 1e3 / steps
        lines = [f"kernel profile: steps {self.first}-{self.last} ({steps} steps), rank 0", ""]
        lines.append(f"wall time      {wall:9.2f} ms per step")
        if self.use_cuda:
            busy = busy_ms(kernel_intervals(kineto)) / steps
            kernels = sum(e.count for e in events if e.device_type.name == "CUDA") / steps
            lines.append(f"GPU busy       {busy:9.2f} ms per step ({busy / wall:.0%} of wall; {kernels:.0f} kernels)")
        by_phase = kernels_by_phase(kineto, phase_of) if self.use_cuda else {}
        device = {name: sum(ns for _, ns in launched) / 1e6 for name, launched in by_phase.items()}
        lines += ["", f"{'phase':<28} {'CPU ms/step':>12}" + (f" {'device ms/step':>15}" if self.use_cuda else "")]
        phases = [e for e in events if e.key.startswith(PHASE_PREFIX) and e.device_type.name == "CPU"]
        for e in sorted(phases, key=lambda e: -e.cpu_time_total):
            name = e.key[len(PHASE_PREFIX) :]
            row = f"{name:<28} {per_step(e.cpu_time_total):12.2f}"
            lines.append(row + (f" {device.get(name, 0.0) / steps:15.2f}" if self.use_cuda else ""))
        sort_by = "self_device_time_total" if self.use_cuda else "self_cpu_time_total"
        lines += ["", f"top ops by self {'device' if self.use_cuda else 'CPU'} time, whole window:"]
        ops = [e for e in events if not e.key.startswith(PHASE_PREFIX)]  # the phases are above, with their totals
        ops = EventList(ops, use_device="cuda" if self.use_cuda else None)
        lines.append(ops.table(sort_by=sort_by, row_limit=self.rows, max_name_column_width=60))
        lines += top_by_phase_table(by_phase, steps, "kernels")
        lines += top_by_phase_table(host_calls_by_phase(kineto), steps, "host calls")
        if self.use_cuda:
            lines += idle_table(kineto, phase_of, steps)
            lines += sync_table(self._syncs, steps)
        self.summary = "\n".join(lines)
        (self.dir / "kernels.txt").write_text(self.summary + "\n")
