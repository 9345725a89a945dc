"""Counting host syncs: how often a piece of code makes the CPU wait for the GPU, and where.

On CUDA, torch's sync debug mode warns at every synchronizing call (a device-to-host copy such as ``.tolist()``,
``.item()``, ``int(tensor)`` or ``.cpu()``; ``nonzero``; ``bincount``; a blocking copy, host-to-device included, as
in ``torch.tensor(x, device="cuda")``); :func:`count_host_syncs` turns it on, catches those warnings, counts them and
notes the Python frames that made each one. Not flagged by torch: ``torch.cuda.synchronize()`` and waits on a CUDA
event (c2r's own event waits flag themselves: ``c2r.host_syncs.wait_for``). On the CPU nothing syncs: the count is 0.
Python's warning state is the process's, so Python code on autograd's threads (DeepSpeed's gradient hooks) is seen
too; syncs made inside autograd's C++ backward are not (torch prints those instead). A count nested in another is
counted by the inner one only.

    with count_host_syncs(x.device) as syncs:
        y = layer(x)
    print(syncs.count, syncs.by_site.most_common(3))
"""

from __future__ import annotations

import collections
import contextlib
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

SYNC_WARNING = "called a synchronizing CUDA operation"  # the text of torch's sync debug mode warning
SITE_FRAMES = 3  # frames of a site: the innermost ones outside torch, warnings and this module


@dataclass
class HostSyncs:
    count: int = 0
    # (innermost frame, its caller, ...) as "path:line function" -> syncs made there
    by_site: collections.Counter = field(default_factory=collections.Counter)


def sync_site(stack: list[traceback.FrameSummary]) -> tuple[str, ...]:
    """The innermost :data:`SITE_FRAMES` frames of ``stack`` that are neither torch's nor the warning machinery's,
    innermost first, each as ``parent/file.py:line function``."""
    # c2r/host_syncs.py: its wait_for flags a sync for its caller, which is the site
    skipped = ("/torch/", "/warnings.py", "profiling/host_syncs.py", "c2r/host_syncs.py", "<frozen")
    frames = [f for f in reversed(stack) if not any(s in f.filename for s in skipped)]
    return tuple(f"{'/'.join(f.filename.split('/')[-2:])}:{f.lineno} {f.name}" for f in frames[:SITE_FRAMES])


@contextlib.contextmanager
def catch_sync_warnings(syncs: HostSyncs) -> Iterator[HostSyncs]:
    """Count into ``syncs`` every sync warning raised inside the block (torch's, or one flagged by
    ``c2r.host_syncs.wait_for``), with its site; other warnings are shown as usual."""

    def note(message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING in str(message):
            syncs.count += 1
            syncs.by_site[sync_site(traceback.extract_stack()[:-1])] += 1
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():  # restores the filters and showwarning on exit
        shown = warnings.showwarning
        warnings.filterwarnings("always", message=f".*{SYNC_WARNING}")  # every sync, not each site's first
        warnings.showwarning = note
        yield syncs


@contextlib.contextmanager
def count_host_syncs(device: torch.device | str) -> Iterator[HostSyncs]:
    """Count the host syncs inside the ``with`` block, by site (set as they happen)."""
    syncs = HostSyncs()
    if torch.device(device).type != "cuda":
        yield syncs
        return
    previous = torch.cuda.get_sync_debug_mode()
    with catch_sync_warnings(syncs):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield syncs
        finally:
            torch.cuda.set_sync_debug_mode(previous)


def sync_table(syncs: HostSyncs, steps: int, shown: int = 12) -> list[str]:
    """Lines for a summary: host syncs per step, and per step by site (innermost frame first, then its callers)."""
    lines = ["", f"host syncs per step (torch's sync debug mode; Python frames): {syncs.count / steps:.1f}"]
    for site, count in syncs.by_site.most_common(shown):
        lines.append(f"  {count / steps:6.1f}  " + "  <  ".join(site))
    return lines
