"""The plan file: which expert lives on which rank, per MoE layer, with what the planner predicted.

    {"format": "c2r-placement", "version": 1, "created": ISO-8601 UTC,
     "num_layers": L, "num_experts": E, "num_ranks": R, "num_nodes": N,
     "method": "kahypar", "objective": "km1", "seed": 0, "options": {...},
     "layers": [{"layer": 0, "expert_to_rank": [E ints], "rank_to_experts": [[E/R ints] * R],
                 "expert_load": [E], "predicted": {metrics}, "baseline_contiguous": {metrics},
                 "baseline_random": {metrics}, "load_cap": {"max_load", "load_imbalance", "met",
                 "needs_replication", "lower_bound_without_replication", "kept_contiguous"}}, ...],
     "predicted": {overall metrics}, "baseline_contiguous": {overall}, "baseline_random": {overall},
     "inputs": {"kind": "traces" | "coactivation", "path", "digest": "sha256:...", "tokens", "holdout", ...}}

``expert_to_rank`` is the truth, one `ExpertLayout` per layer (`ExpertLayout.to_json` writes it, `from_json` reads
it); ``rank_to_experts`` (derived, for people reading the file) lists each rank's experts in local-slot order:
ascending logical id, the order `ExpertLayout.local_experts` uses. Metrics: see `placement.objective` (predicted on
the held-out tokens when the plan was made with a holdout); ``predicted_step_ms``: `placement.cost`, a prediction.

Replicas (`placement.replicate`, ``c2r-place plan --replicas P``): a replicated expert's ``expert_to_rank`` entry is
the list of its ranks, home first (``[0, [1, 3], 2, ...]``, `ExpertLayout.to_json`); ``rank_to_experts`` then lists
each rank's P/R slots (a replicated expert on each rank holding a copy); the document carries ``"num_slots"`` (P,
the same on every layer) and ``"version": 2``, so a reader that only knows version 1 refuses it rather than
ignoring the replicas. Plans without replicas are written as version 1, as before.
"""

from __future__ import annotations

import datetime
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from placement.errors import PlacementError
from placement.layout import ExpertLayout, require_divides
from profiling.files import atomic_write_text

FORMAT = "c2r-placement"
# one reading per list: numbers separated by commas (the old pattern, with an optional comma and sign, could split a
# run of digits many ways and backtracked exponentially on a list of numbers followed by a nested list)
_NUMBER_LIST = re.compile(r"\[\s*([\d.eE+-]+(?:\s*,\s*[\d.eE+-]+)*)\s*\]")
VERSION = 1
REPLICATED_VERSION = 2  # a plan with replicas: readers that cannot honour them must refuse it (version 1 only)


def _validate_rank_to_experts(lists: Any, layout: ExpertLayout, where: str) -> None:
    """The derived per-rank lists, when a file carries them, must agree with ``expert_to_rank`` (any order within a
    rank: the slot order is always ascending id; with replicas an expert is listed on each rank holding a copy)."""
    num_ranks, e2r = layout.num_ranks, layout.expert_to_rank
    if not isinstance(lists, list) or len(lists) != num_ranks or not all(isinstance(x, list) for x in lists):
        raise PlacementError(f"{where}.rank_to_experts must be {num_ranks} lists (one per rank)")
    if layout.is_replicated:
        wrong = [r for r, x in enumerate(lists) if not _int_list(x) or sorted(x) != layout.local_experts(r)]
        if wrong:
            raise PlacementError(f"{where}.rank_to_experts disagrees with expert_to_rank on ranks {wrong}")
        return
    flat = [e for experts in lists for e in experts]
    duplicates = sorted(e for e, n in Counter(flat).items() if n > 1)
    if duplicates:
        raise PlacementError(f"{where}.rank_to_experts places experts {duplicates} more than once")
    missing = sorted(set(range(len(e2r))) - set(flat))
    extra = sorted(set(flat) - set(range(len(e2r))), key=str)
    if missing or extra:
        raise PlacementError(f"{where}.rank_to_experts misses experts {missing} / names unknown experts {extra}")
    disagree = [e for r, experts in enumerate(lists) for e in experts if e2r[e] != r]
    if disagree:
        raise PlacementError(f"{where}.rank_to_experts disagrees with expert_to_rank for experts {sorted(disagree)}")


def _int_list(values: list) -> bool:
    return all(type(v) is int for v in values)


@dataclass
class Plan:
    """A loaded, validated plan. ``layouts``: one :class:`ExpertLayout` per MoE layer; ``data``: the whole JSON
    document."""

    num_layers: int
    num_experts: int
    num_ranks: int
    num_nodes: int
    layouts: list[ExpertLayout]
    method: str
    data: dict[str, Any]

    @property
    def expert_load(self) -> np.ndarray | None:
        """[L, E] expert load recorded at planning time (None when the plan does not carry it)."""
        loads = [entry.get("expert_load") for entry in self.data["layers"]]
        return None if any(x is None for x in loads) else np.asarray(loads, dtype=np.float64)


def _positive_int(data: dict[str, Any], key: str, source: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PlacementError(f"{source}: {key} must be a positive integer; got {value!r}")
    return value


def _check_expected(source: str, what: str, found: int, expected: int | None) -> None:
    if expected is not None and found != expected:
        raise PlacementError(f"{source} is a plan for {found} {what}, but {expected} {what} were expected")


def plan_from_dict(
    data: Any,
    source: str = "plan",
    num_layers: int | None = None,
    num_experts: int | None = None,
    num_ranks: int | None = None,
) -> Plan:
    """Validate a plan document (see `load_plan`)."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise PlacementError(f"{source} is not a c2r placement plan (format {found!r}, expected {FORMAT!r})")
    if data.get("version") not in (VERSION, REPLICATED_VERSION):
        raise PlacementError(
            f"{source} has plan version {data.get('version')!r}; this c2r reads versions {VERSION} and "
            f"{REPLICATED_VERSION} (with replicas)"
        )
    layers_n, experts_n, ranks_n = (_positive_int(data, k, source) for k in ("num_layers", "num_experts", "num_ranks"))
    nodes_n = _positive_int(data, "num_nodes", source) if "num_nodes" in data else 1
    require_divides(ranks_n, "ranks", experts_n, "experts", source)
    require_divides(nodes_n, "nodes", ranks_n, "ranks", source)
    _check_expected(source, "MoE layers", layers_n, num_layers)
    _check_expected(source, "experts", experts_n, num_experts)
    _check_expected(source, "ranks", ranks_n, num_ranks)
    layers = data.get("layers")
    if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
        raise PlacementError(f"{source}: 'layers' must be a list of objects")
    indices = [entry.get("layer") for entry in layers]
    if not all(type(i) is int for i in indices) or sorted(indices) != list(range(layers_n)):
        raise PlacementError(
            f"{source}: layers must be numbered 0..{layers_n - 1} once each (num_layers {layers_n}); found {indices}"
        )
    layouts: list[ExpertLayout] = [None] * layers_n  # type: ignore[list-item]  # every index is filled below
    for entry in layers:
        where = f"{source} layer {entry['layer']}"
        layout = ExpertLayout.from_json(entry.get("expert_to_rank"), ranks_n, experts_n, where)
        if "rank_to_experts" in entry:
            _validate_rank_to_experts(entry["rank_to_experts"], layout, where)
        layouts[entry["layer"]] = layout
    _check_slots(data, layouts, source)
    data = {**data, "layers": sorted(layers, key=lambda entry: entry["layer"])}  # per-layer data in layer order
    return Plan(layers_n, experts_n, ranks_n, nodes_n, layouts, str(data.get("method", "?")), data)


def _check_slots(data: dict[str, Any], layouts: list[ExpertLayout], source: str) -> None:
    """A plan's header agrees with its layers: one slot count for all (what `make_plan` writes), ``num_slots``
    where given, and the replicated version where a layer has replicas (an older reader would misread them)."""
    slots = sorted({layout.num_slots for layout in layouts})
    if len(slots) > 1:
        raise PlacementError(f"{source}: its layers hold different numbers of expert slots {slots}; one is needed")
    if "num_slots" in data and data["num_slots"] != slots[0]:
        raise PlacementError(f"{source}: num_slots is {data['num_slots']!r} but its layers hold {slots[0]} slots")
    if any(layout.is_replicated for layout in layouts) and data.get("version") != REPLICATED_VERSION:
        raise PlacementError(
            f"{source}: its layers have replicas, which need plan version {REPLICATED_VERSION} (found "
            f"{data.get('version')!r})"
        )


def load_plan(
    path: str | Path, num_layers: int | None = None, num_experts: int | None = None, num_ranks: int | None = None
) -> Plan:
    """Read and validate a plan file. The expected shape (any of layers, experts, ranks) is checked when given:
    a plan for another model is an error naming both numbers."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"plan file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PlacementError(f"{path} is not a JSON plan file ({error})") from error
    return plan_from_dict(data, str(path), num_layers, num_experts, num_ranks)


def make_plan(
    layouts: list[ExpertLayout],
    *,
    num_nodes: int,
    method: str,
    seed: int,
    inputs: dict[str, Any],
    layer_metrics: dict[str, list[dict[str, Any]]],
    overall: dict[str, dict[str, Any]],
    expert_load_LE: np.ndarray | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The plan document. ``layer_metrics`` / ``overall``: keyed "predicted", "baseline_contiguous",
    "baseline_random" (per layer lists / overall dicts)."""
    if not layouts or len({(x.num_experts, x.num_ranks) for x in layouts}) != 1:
        shapes = sorted({(x.num_experts, x.num_ranks) for x in layouts})
        raise PlacementError(f"a plan needs one or more layers of one shape; got (experts, ranks) {shapes}")
    num_layers, num_experts, num_ranks = len(layouts), layouts[0].num_experts, layouts[0].num_ranks
    layers = []
    for layer, layout in enumerate(layouts):
        entry: dict[str, Any] = {
            "layer": layer,
            "expert_to_rank": layout.to_json(),
            "rank_to_experts": layout.rank_to_experts,
        }
        if expert_load_LE is not None:
            entry["expert_load"] = np.round(expert_load_LE[layer]).astype(np.int64).tolist()
        entry.update({key: per_layer[layer] for key, per_layer in layer_metrics.items()})
        layers.append(entry)
    replicated = any(layout.is_replicated for layout in layouts)
    slots = {"num_slots": layouts[0].num_slots} if replicated else {}
    if replicated and len({layout.num_slots for layout in layouts}) != 1:
        raise PlacementError(
            f"every layer of a plan needs the same slots; got {sorted({x.num_slots for x in layouts})}"
        )
    return {
        "format": FORMAT,
        "version": REPLICATED_VERSION if replicated else VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "num_layers": num_layers,
        "num_experts": num_experts,
        "num_ranks": num_ranks,
        "num_nodes": num_nodes,
        **slots,
        "method": method,
        "objective": "km1",
        "seed": seed,
        "options": options or {},
        "layers": layers,
        **overall,
        "inputs": inputs,
    }


def dumps(document: Any) -> str:
    """Indented JSON with every list of numbers on one line (plans stay readable at 256 experts)."""
    text = json.dumps(document, indent=1)
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]", text)


def check_output_path(path: str | Path, what: str = "--out") -> Path:
    """Refuse, before any work, an output path that cannot be a file: a directory, or one under a file."""
    path = Path(path)
    if path.is_dir():
        raise PlacementError(f"{what} {path} is a directory; give a file name (e.g. {path / 'plan.json'})")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise PlacementError(f"{what} {path}: {parent} is a file, not a directory")
    return path


def write_text_atomic(path: str | Path, text: str, what: str = "--out") -> None:
    """Write through ``<name>.tmp`` and rename (a crash never leaves half a file under the name); on failure the
    temporary file is removed and the error is one line naming the path."""
    path = check_output_path(path, what)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise PlacementError(f"cannot write {what} {path}: {error.strerror or error}") from error


def save_plan(plan: dict[str, Any], path: str | Path) -> None:
    """Validate, then write atomically (a crash never leaves half a plan under the plan's name)."""
    plan_from_dict(plan, str(path))
    write_text_atomic(path, dumps(plan) + "\n")
