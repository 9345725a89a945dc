"""Whether two profiled runs can be compared like with like, and over which training steps.

A before/after delta is only a measurement of the change when both runs are the same model on the same ranks, seen
over equal windows at the same point of training. A 300-step run from scratch against a 100-step continuation fails
that twice: the totals differ 3x from the run lengths alone, and the first run's early steps (warm-up, routing still
moving) are not in the second. So the dashboard compares the last N steps both runs profiled (N: the shorter run's
count, or ``--window``), per token and per step, and says loudly when even that is not like with like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# profile.json keys that define the model and the ranks it ran on: runs that differ here are different experiments
MODEL_KEYS = ("num_layers", "num_experts", "top_k", "hidden_size", "dtype", "ep_size", "world_size")


@dataclass(frozen=True)
class Comparison:
    """``windows``: the compared training steps of each run. ``comparable``: equal windows at the same steps, same
    model and ranks; else ``reasons`` says why not, one sentence each. ``same_model``: False when the runs differ in
    model or ranks (then no change is shown at all; otherwise only time, which depends on the point of training and
    the run length, is held back)."""

    windows: tuple[list[int], list[int]]
    comparable: bool
    same_model: bool
    reasons: list[str]


def choose_windows(steps_a: list[int], steps_b: list[int], window: int | None = None) -> tuple[list[int], list[int]]:
    """The last N profiled steps of each run: N = ``window``, or the shorter run's profiled step count."""
    if window is not None and window < 1:
        raise ValueError(f"--window must be a positive number of steps; got {window}")
    n = min(len(steps_a), len(steps_b)) if window is None else window
    return sorted(steps_a)[-n:] if n else [], sorted(steps_b)[-n:] if n else []


def describe_steps(steps: list[int]) -> str:
    if not steps:
        return "no steps"
    span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}–{steps[-1]}"
    return span if len(steps) == steps[-1] - steps[0] + 1 else f"{span} ({len(steps)} of them)"


def _model_reasons(names: tuple[str, str], infos: tuple[dict, dict], bytes_per_copy: tuple) -> list[str]:
    reasons = []
    for key in MODEL_KEYS:
        a, b = (info.get(key) for info in infos)
        if a is not None and b is not None and a != b:
            reasons.append(f"different models or ranks: {key} {a} in {names[0]}, {b} in {names[1]}")
    if None not in bytes_per_copy and bytes_per_copy[0] != bytes_per_copy[1]:
        reasons.append(
            f"different bytes per token copy ({bytes_per_copy[0]} in {names[0]}, {bytes_per_copy[1]} in {names[1]}): "
            "another hidden size or dtype"
        )
    return reasons


def _window_reasons(names: tuple[str, str], profiled: tuple[list, list], windows: tuple[list, list]) -> list[str]:
    if not (profiled[0] and profiled[1]):
        return []  # no all-to-all records on one side: there is no time or traffic to compare
    reasons = []
    if len(windows[0]) != len(windows[1]):
        reasons.append(
            f"unequal windows: {names[0]} profiled {len(profiled[0])} steps, {names[1]} {len(profiled[1])}; the "
            f"window asks for more steps than one run has"
        )
    starts = [steps[0] for steps in profiled]
    if (starts[0] == 0) != (starts[1] == 0):
        scratch, cont = (0, 1) if starts[0] == 0 else (1, 0)
        reasons.append(
            f"{names[scratch]} is a run from scratch (profiled from step 0), {names[cont]} a continuation (profiled "
            f"from step {starts[cont]}): early steps and late steps do not cost the same"
        )
    if windows[0] != windows[1]:
        reasons.append(
            f"the windows are different points of training: {describe_steps(windows[0])} of {names[0]}, "
            f"{describe_steps(windows[1])} of {names[1]}"
        )
    return reasons


def compare_summaries(names: tuple[str, str], summaries: tuple[dict[str, Any], dict[str, Any]]) -> Comparison:
    """Judge two :func:`profiling.summary.summarize` results, each already cut to its window."""
    infos = tuple(s["profile"] for s in summaries)
    bytes_per_copy = tuple(
        next((e["bytes_per_copy"] for e in s["layers"] if "bytes_per_copy" in e), None) for s in summaries
    )
    windows = tuple([step["step"] for step in s["steps"]] for s in summaries)
    profiled = tuple(s.get("profiled_steps", w) for s, w in zip(summaries, windows))
    model = _model_reasons(names, infos, bytes_per_copy)
    reasons = model + _window_reasons(names, profiled, windows)
    return Comparison(windows, not reasons, not model, reasons)
