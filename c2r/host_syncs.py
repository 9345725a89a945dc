"""Host syncs we make on purpose, and the copies that let us avoid them.

:func:`wait_for` waits on a CUDA event and flags it the way torch's sync debug mode flags its own syncs, so that
``profiling.host_syncs.count_host_syncs`` (where counting lives) still counts every sync; :func:`host_copy` queues a
small device-to-host copy into pinned memory and returns the event that says it landed.
"""

from __future__ import annotations

import warnings

import torch

from profiling.host_syncs import SYNC_WARNING


def wait_for(event: torch.cuda.Event, what: str) -> None:
    """``event.synchronize()``, a host sync that torch's sync debug mode does not flag (it watches copies, not event
    waits): here it is flagged as torch flags its own, so that ``profiling.host_syncs.count_host_syncs`` still counts
    every sync."""
    mode = torch.cuda.get_sync_debug_mode()
    if mode == 1:
        warnings.warn(f"{what} {SYNC_WARNING} (an event wait)", stacklevel=2)
    elif mode == 2:
        raise RuntimeError(f"{what} {SYNC_WARNING} (an event wait)")
    event.synchronize()


def host_copy(values: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
    """A copy of a small CUDA tensor into fresh pinned host memory, queued now, and the event that says it landed:
    the caller goes on queueing GPU work and reads the copy when the event says it is there (``event.query()``, no
    wait) or waits for it (:func:`wait_for`). Fresh per call: the caching host allocator makes that cheap, and a
    caller may keep the copy (grouped_gemm's backward keeps its group sizes)."""
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(values.device))  # the stream the copy went on, not the current device's
    return host, event
