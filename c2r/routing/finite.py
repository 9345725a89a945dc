"""NaN/Inf router logits, found without making the host wait for the GPU.

Corrupt logits would silently route every token to expert 0 (top-k of NaN) and poison the loss. Reading a device
flag in every layer's forward to find them is a host sync per MoE layer: on the ~1B model of docs/gpu_runs.md, 8 a
step and 54 ms of host waiting per 32k-token step, each leaving the GPU idle while the host queues the next layer.

So on a GPU the count of bad tokens stays on the device, is copied to pinned host memory without waiting, and is
read once it has landed: at the layer's next forward when the copy is done by then (no wait), or at
:func:`c2r.routing.updates.router_logits_error` in c2r-adak before it saves (the GPU has finished by then, so the
one wait there costs nothing). On the CPU the check is immediate, as there is nothing to wait for, and names the
tokens. c2r-train reads every router's count itself, summed over the ranks with each step's loss and after each
evaluation (c2r/step_reads.py, ``read_by_trainer``): then no forward raises on its own, on a GPU or a CPU, since one
rank raising while the others wait for it in a collective would hang the job instead of stopping it.
"""

from __future__ import annotations

import torch

from c2r.host_syncs import host_copy


def nonfinite_logits_error(
    count: int, tokens: int | None, layer_index: int, first_rows: list[int] | None = None, all_ranks: bool = False
):
    """The one error for NaN/Inf router logits: ``count`` bad tokens (of ``tokens`` where known, with the first
    indices where known; summed over the ranks where ``all_ranks``) in MoE layer ``layer_index``."""
    of = f" of {tokens}" if tokens is not None else ""
    so_far = " (over its forwards so far, all ranks)" if all_ranks else " (over its forwards so far on this rank)"
    where = f" (first token indices: {first_rows})" if first_rows else so_far
    return FloatingPointError(
        f"router logits of MoE layer {layer_index} contain NaN/Inf for {count}{of} tokens{where}; check the input "
        "activations and the learning rate"
    )


class FiniteLogitsCheck:
    """One router's NaN/Inf check. On a GPU: a device count of bad tokens since the layer was built, whose newest
    value is copied to the host while the GPU runs on; :meth:`raise_if_seen` (at each forward) reads a copy that has
    landed; c2r-train reads the count with each step's loss (c2r/step_reads.py)."""

    def __init__(self, layer_index: int):
        self.layer_index = layer_index
        self.bad_count = None  # device int64 scalar: bad tokens seen so far (only grows; any > 0 is an error)
        self._landing = None  # (pinned host copy of bad_count, event recorded after the copy) not read yet
        # Set by a trainer that reads bad_count on every rank at once (c2r/step_reads.py): a forward then never
        # raises on its own, as one rank raising while the others wait in a collective would hang the job.
        self.read_by_trainer = False

    def __getstate__(self) -> dict:
        # A copied or pickled model starts with a clean check: CUDA events do not copy, and its counts are its own.
        return {"layer_index": self.layer_index}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["layer_index"])

    def observe(self, logits_TE: torch.Tensor) -> None:
        bad_T = ~torch.isfinite(logits_TE).all(dim=1)
        if not logits_TE.is_cuda and not self.read_by_trainer:
            if bool(bad_T.any()):
                rows = bad_T.nonzero().flatten()
                raise nonfinite_logits_error(rows.numel(), bad_T.numel(), self.layer_index, rows[:5].tolist())
            return
        count = bad_T.sum()
        self.bad_count = count if self.bad_count is None else self.bad_count + count
        if self.read_by_trainer:  # read with the step, on every rank at once (c2r/step_reads.py)
            return
        self.raise_if_seen()
        if self._landing is None:  # one copy in flight at a time: the next one carries the newer total
            self._landing = host_copy(self.bad_count)

    def raise_if_seen(self) -> None:
        """Raise when a copy that has already landed counts bad tokens (no wait)."""
        if self._landing is None or not self._landing[1].query():
            return
        host, _ = self._landing
        self._landing = None
        if int(host) > 0:
            raise nonfinite_logits_error(int(host), None, self.layer_index)
