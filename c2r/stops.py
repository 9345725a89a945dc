"""Safe stops: when a training run saves, and how SIGINT / SIGTERM end it with a checkpoint on every rank.

A signal only sets a flag: its handler runs in the main thread between two bytecodes, perhaps mid-step or inside a
collective, where nothing can be saved. At each step boundary every rank's flags are summed over the ranks (in
c2r-train with the step's loss, read a step later: c2r/step_reads.py), so one rank's signal (Ctrl-C reaches every
process of the terminal's group, a scheduler's SIGTERM perhaps only some, the deepspeed launcher forwards SIGTERM
after the terminal's SIGINT) stops all ranks after the same step -- the step in flight and the next one -- and they
save together. The time-based save is agreed the same way: each rank's clock differs a little, any rank's counts.
A repeat of either stop signal while a stop is pending aborts at once: one line, then the signal's default action (the
process ends killed by it; no traceback, no save). One SIGINT plus one SIGTERM is one stop (the launcher's forward of a
single Ctrl-C); a second Ctrl-C repeats the SIGINT. Before training begins (``begin_training``: while the job joins, the
corpus loads, DeepSpeed builds the engine or its ops) there is nothing to save: a stop signal ends the rank at once in
the same way, with its own line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While entered (in the main thread): SIGINT and SIGTERM set ``received`` instead of ending the process, once
    training has begun (:meth:`begin_training`); before that, and on a repeat, they end it at once (module docstring).
    ``rank``: named in the line a rank other than 0 prints."""

    def __init__(self, signums: tuple[int, ...] = STOP_SIGNALS, rank: int = 0):
        self.signums, self.rank = signums, rank
        self.received: int | None = None
        self.training = False
        self._seen: set[int] = set()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.signums}
        return self

    def begin_training(self) -> None:
        """From here on a stop signal stops at a step boundary with a checkpoint."""
        self.training = True

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if not self.training:
            self._abort(signum, f"stopped by {name} before training began; nothing saved")
        if signum in self._seen:
            self._abort(
                signum, f"{name} again: aborted at once, without a checkpoint (the last saved one stays loadable)"
            )
        self._seen.add(signum)
        self.received = self.received or signum

    def _abort(self, signum: int, line: str) -> None:
        """End the process now, killed by ``signum`` (its default action), after ``line`` on stderr. Not an exception:
        raised here, between two bytecodes of whatever runs (a collective, DeepSpeed building an op), it would print
        a traceback and could be caught. The line goes straight to the file descriptor: the handler may have
        interrupted a write to ``sys.stderr``, which would refuse a reentrant one."""
        start = "\n" if self.training and not self.rank else ""  # off the line of rank 0's progress bar
        suffix = f" (rank {self.rank})" if self.rank else ""
        with contextlib.suppress(OSError):
            os.write(2, f"{start}{line}{suffix}\n".encode())
        for other in self.signums:  # a pending signal of the other kind must not run a Python handler on the way out
            signal.signal(other, signal.SIG_DFL)
        signal.raise_signal(signum)
        os._exit(128 + signum)  # where the default action did not end the process

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()


@dataclass(frozen=True)
class Boundary:
    """What every rank does after a step: ``save`` a checkpoint; ``stop_signal`` set: then stop (its name)."""

    save: bool
    stop_signal: str | None


class SavePolicy:
    """Decides at each step boundary, identically on every rank, whether to save and whether to stop.

    Saves every ``every_steps`` steps (0: never), when ``every_minutes`` have passed since the last save (0: never),
    at ``last_step``, and when any rank got a stop signal.

    Each rank's signals and clock reach the others as :meth:`flags`, summed over the ranks. c2r-train sends them
    with the step's loss (c2r/step_reads.py) and decides on the newest it has read, one step old: a signal during
    a step stops every rank after the next one, together, without a host sync of its own (:meth:`decide`).
    """

    def __init__(self, every_steps: int, every_minutes: float, last_step: int, signals: StopSignals):
        self.every_steps, self.every_minutes, self.last_step = every_steps, every_minutes, last_step
        self.signals = signals
        self.last_save = time.monotonic()
        self.last_save_step = -1  # a time flag sampled at or before the last save is stale

    def flags(self) -> list[float]:
        """This rank's flags now: one per stop signal (1: received), then whether a time-based save is due."""
        time_due = self.every_minutes > 0 and time.monotonic() - self.last_save >= 60 * self.every_minutes
        return [float(self.signals.received == signum) for signum in self.signals.signums] + [float(time_due)]

    def decide(self, done: int, flags: list[float] | None, flags_step: int | None) -> Boundary:
        """The boundary after step ``done``, from ``flags`` summed over the ranks, sampled after step ``flags_step``
        (None: none read yet). Every rank passes the same values, so every rank decides the same."""
        signum, time_due = None, False
        if flags is not None:
            *received, due = flags
            signum = next((s for s, n in zip(self.signals.signums, received) if n > 0), None)
            time_due = due > 0 and flags_step > self.last_save_step
        step_due = self.every_steps > 0 and done % self.every_steps == 0
        save = bool(signum or time_due or step_due or done == self.last_step)
        if save:
            self.last_save, self.last_save_step = time.monotonic(), done
        return Boundary(save=save, stop_signal=signal.Signals(signum).name if signum else None)


# DeepSpeed's node launcher (deepspeed.launcher.launch), on Ctrl-C or SIGTERM, sends its ranks SIGTERM and kills
# those still running 30 s later (terminate_process_tree): a stop must finish its steps and its save within that.
LAUNCHER_GRACE_S = 30.0


def under_deepspeed_launcher(environ=None) -> bool:
    """Whether this process is a rank started by DeepSpeed's node launcher (it sets CROSS_RANK; torchrun does not)."""
    import os

    return "CROSS_RANK" in (os.environ if environ is None else environ)


def stop_deadline_warning(save_s: float, step_s: float, pid: int, environ=None) -> str | None:
    """The warning for a run whose stop (two more steps, then a save) would outlast the launcher's grace period,
    None where it fits (with a fifth to spare) or no launcher will kill the ranks."""
    needed = save_s + 2 * step_s
    if not under_deepspeed_launcher(environ) or needed <= 0.8 * LAUNCHER_GRACE_S:
        return None
    return (
        f"a stop here takes ~{needed:.0f} s (a checkpoint {save_s:.0f} s, after two steps of {step_s:.1f} s), but the "
        f"deepspeed launcher kills its ranks {LAUNCHER_GRACE_S:.0f} s after a Ctrl-C: such a stop would be killed "
        f"mid-save (the previous checkpoint stays loadable). Stop by signalling one rank instead, e.g. kill -INT {pid} "
        "(every rank stops with it and the launcher lets them finish), and keep train.save_every_minutes small"
    )
