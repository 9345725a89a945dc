"""What c2r-train reads after every step -- the loss, the gradient norm, the routers' NaN/Inf counts and the stop
flags -- in one all-reduce and one device-to-host copy, read one step late.

Reading a step's numbers at its own boundary makes the host wait there for the GPU to finish the step; the host then
queues the next step on an idle GPU, and where the host is the bound (the ~1B model at 8k tokens a step on one H200:
docs/gpu_runs.md) the GPU idles while the host launches the next forward. So each step's numbers are summed over the
ranks on the device and copied to pinned host memory without waiting (:meth:`StepReader.queue`), and read at the
next step's boundary (:meth:`StepReader.read`), by when the GPU has finished them while it runs the next step.

Where a boundary decides something with them -- an evaluation, a checkpoint, a stop -- the caller reads its own
step's numbers too (``wait_newest``), so a diverged step is still found before anything saves it, and an evaluation
record's mean loss and tokens per second cover every step of its window. On the CPU the same code runs, one step late
as well (the copy is the tensor itself): the behaviour the CPU tests check is the one GPU runs have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from c2r.host_syncs import host_copy, wait_for
from c2r.routing.updates import bad_logit_counts, first_router_error, router_checks


@dataclass(frozen=True)
class StepNumbers:
    """One step's numbers as every rank reads them (summed over the ranks, then averaged where a mean is meant)."""

    step: int  # steps done when they were queued
    loss: float  # the LM loss, mean over the ranks and the step's micro-batches
    grad_norm: float | None  # DeepSpeed's global gradient norm (-1: it found NaN/Inf); None: not computed
    router_error: FloatingPointError | None  # the first router whose logits were NaN/Inf so far, on any rank
    flags: list[float]  # the caller's flags (c2r/stops.py SavePolicy.flags), summed over the ranks


class StepReader:
    """Queues each step's numbers on the device and reads them a step later (module docstring)."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.device = device
        self.checks = router_checks(model)
        for check in self.checks:  # read here, on every rank at once: no rank raises alone mid-forward
            check.read_by_trainer = True
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self._pending: list[tuple[int, bool, torch.Tensor, torch.cuda.Event | None]] = []

    def queue(self, step: int, micro_losses: list[torch.Tensor], grad_norm, flags: list[float]) -> None:
        """Step ``step``'s numbers: its micro-batches' losses (device scalars), DeepSpeed's gradient norm (a tensor,
        a float or None) and this rank's ``flags``; one all-reduce and one copy are queued, nothing is waited for."""
        has_norm = grad_norm is not None
        # DeepSpeed reports an invalid norm as -1 (or NaN/Inf): +Inf, so that summing over the ranks keeps it invalid.
        host_norm = 0.0 if torch.is_tensor(grad_norm) or not has_norm else float(grad_norm)
        on_host = [host_norm if math.isfinite(host_norm) and host_norm >= 0 else math.inf, *flags]
        # A host list becomes a device tensor through pinned memory, without a wait (a pageable copy would sync).
        host_part = torch.tensor(on_host, dtype=torch.float64)
        if self.device.type == "cuda":
            host_part = host_part.pin_memory().to(self.device, non_blocking=True)
        norm = None
        if torch.is_tensor(grad_norm):
            norm = grad_norm.detach().double().reshape(1).to(self.device)
            norm = torch.where(norm.isfinite() & (norm >= 0), norm, math.inf)
        loss = torch.stack([m.detach().double() for m in micro_losses]).mean().reshape(1).to(self.device)
        counts = bad_logit_counts(self.checks, self.device).double() if self.checks else loss.new_zeros(0)
        values = torch.cat([loss, host_part[:1] if norm is None else norm, counts, host_part[1:]])
        if self.world > 1:
            dist.all_reduce(values)
        copy, landed = host_copy(values) if values.is_cuda else (values, None)
        self._pending.append((step, has_norm, copy, landed))

    def read(self, wait_newest: bool) -> list[StepNumbers]:
        """The queued steps' numbers, oldest first: all of them with ``wait_newest``, else all but the newest (whose
        copy may still be in flight). Every rank reads the same numbers at the same boundary."""
        ready = self._pending if wait_newest else self._pending[:-1]
        self._pending = [] if wait_newest else self._pending[-1:]
        return [self._numbers(*entry) for entry in ready]

    def router_error_now(self) -> FloatingPointError | None:
        """The routers' NaN/Inf counts summed over the ranks, read now (after an evaluation's forwards): every rank
        gets the same answer, so every rank raises or none does."""
        if not self.checks:
            return None
        counts = bad_logit_counts(self.checks, self.device)
        if self.world > 1:
            dist.all_reduce(counts)
        return first_router_error(self.checks, counts.tolist(), all_ranks=self.world > 1)  # NOTE: host sync

    def _numbers(self, step, has_norm, copy, landed) -> StepNumbers:
        if landed is not None and not landed.query():  # landed long ago unless this is the step just queued
            wait_for(landed, "the step's loss")  # NOTE: host sync, where the step's numbers decide something now
        values = copy.tolist()
        # The mean over the ranks: DeepSpeed's ZeRO 1/2 norm (and c2r's ZeRO 0 one) is the same on every rank.
        loss, norm = values[0] / self.world, values[1] / self.world
        counts, flags = values[2 : 2 + len(self.checks)], values[2 + len(self.checks) :]
        return StepNumbers(
            step,
            loss,
            norm if has_norm else None,
            first_router_error(self.checks, [round(c) for c in counts], all_ranks=self.world > 1),
            flags,
        )
