"""Counting host syncs: how often a piece of code makes the CPU wait for the GPU.

On CUDA, torch's sync debug mode warns at every synchronizing call (a device-to-host copy such as ``.tolist()``,
``.item()``, ``int(tensor)`` or ``.cpu()``; ``nonzero``; ``bincount``; a blocking copy; ``torch.cuda.synchronize``);
:func:`count_host_syncs` turns it on, records those warnings and counts them. Waits on a CUDA event are not among
what torch flags: our own go through :func:`wait_for`, which flags them the same way. On the CPU nothing syncs: the
count is 0.
Only work on the calling thread is seen (autograd runs the backward on threads of its own): count forwards.

    with count_host_syncs(x.device) as syncs:
        y = layer(x)
    print(syncs.count)
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

SYNC_WARNING = "called a synchronizing CUDA operation"  # the text of torch's sync debug mode warning


@dataclass
class HostSyncs:
    count: int = 0


@contextlib.contextmanager
def count_host_syncs(device: torch.device | str) -> Iterator[HostSyncs]:
    """Count the host syncs inside the ``with`` block (set on exit)."""
    syncs = HostSyncs()
    if torch.device(device).type != "cuda":
        yield syncs
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every sync, not the first of each call site
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield syncs
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    syncs.count = sum(SYNC_WARNING in str(w.message) for w in caught)


def wait_for(event: torch.cuda.Event, what: str) -> None:
    """``event.synchronize()``, a host sync that torch's sync debug mode does not flag (it watches copies, not event
    waits): here it is flagged as torch flags its own, so that :func:`count_host_syncs` still counts every sync."""
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
    event.record()
    return host, event
