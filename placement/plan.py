"""The plan file: which expert lives on which rank, per MoE layer, with what the planner predicted.

    {"format": "c2r-placement", "version": 1, "created": ISO-8601 UTC,
     "num_layers": L, "num_experts": E, "num_ranks": R, "num_nodes": N,
     "method": "kahypar", "objective": "km1", "seed": 0, "options": {...},
     "layers": [{"layer": 0, "expert_to_rank": [E ints], "rank_to_experts": [[E/R ints] * R],
                 "expert_load": [E], "predicted": {metrics}, "baseline_contiguous": {metrics},
                 "baseline_random": {metrics}}, ...],
     "predicted": {overall metrics}, "baseline_contiguous": {overall}, "baseline_random": {overall},
     "inputs": {"kind": "traces" | "coactivation", "path", "digest": "sha256:...", "tokens", "holdout", ...}}

``expert_to_rank`` is the truth; ``rank_to_experts`` (derived, for people reading the file) lists each rank's experts
in local-slot order: ascending logical id, the order `c2r.parallel.ExpertLayout.local_experts` uses. Metrics: see
`placement.objective` (predicted on the held-out tokens when the plan was made with a holdout).
"""

from __future__ import annotations

import datetime
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from placement.errors import PlacementError

FORMAT = "c2r-placement"
_NUMBER_LIST = re.compile(r"\[\s*((?:-?[\d.eE+-]+,?\s*)+)\]")
VERSION = 1


def rank_to_experts(expert_to_rank_E: np.ndarray | list[int], num_ranks: int) -> list[list[int]]:
    """[E] -> R lists of logical expert ids, each ascending (local-slot order)."""
    e2r = np.asarray(expert_to_rank_E)
    return [np.flatnonzero(e2r == r).tolist() for r in range(num_ranks)]


def validate_expert_to_rank(
    expert_to_rank_E: Any, num_experts: int, num_ranks: int, where: str = "expert_to_rank"
) -> np.ndarray:
    """Checks a placement and returns it as int64 [E]; errors name the offending values."""
    if num_ranks <= 0 or num_experts % num_ranks:
        raise PlacementError(f"{where}: ranks ({num_ranks}) must divide experts ({num_experts})")
    values = list(expert_to_rank_E) if isinstance(expert_to_rank_E, (list, tuple, np.ndarray)) else None
    if values is None or len(values) != num_experts:
        got = "not a list" if values is None else f"{len(values)} entries"
        raise PlacementError(f"{where} must list a rank for each of {num_experts} experts; got {got}")
    bad = sorted({v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer))}, key=str)
    if bad:
        raise PlacementError(f"{where} holds non-integer ranks {bad}")
    outside = sorted({int(v) for v in values if not 0 <= v < num_ranks})
    if outside:
        raise PlacementError(f"{where} names ranks {outside} outside 0..{num_ranks - 1}")
    counts = Counter(int(v) for v in values)
    per_rank = num_experts // num_ranks
    wrong = {r: counts.get(r, 0) for r in range(num_ranks) if counts.get(r, 0) != per_rank}
    if wrong:
        raise PlacementError(
            f"{where}: every rank must hold exactly {per_rank} experts ({num_experts} experts / {num_ranks} ranks); "
            f"these ranks hold: {wrong}"
        )
    return np.asarray(values, dtype=np.int64)


def _validate_rank_to_experts(lists: Any, e2r: np.ndarray, num_ranks: int, where: str) -> None:
    if not isinstance(lists, list) or len(lists) != num_ranks or not all(isinstance(x, list) for x in lists):
        raise PlacementError(f"{where}.rank_to_experts must be {num_ranks} lists (one per rank)")
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


@dataclass
class Plan:
    """A loaded, validated plan. ``expert_to_rank``: int64 [L, E]; ``data``: the whole JSON document."""

    num_layers: int
    num_experts: int
    num_ranks: int
    num_nodes: int
    expert_to_rank: np.ndarray
    method: str
    data: dict[str, Any]

    def rank_to_experts(self, layer: int) -> list[list[int]]:
        return rank_to_experts(self.expert_to_rank[layer], self.num_ranks)

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
    if data.get("version") != VERSION:
        raise PlacementError(f"{source} has plan version {data.get('version')!r}; this c2r reads version {VERSION}")
    layers_n, experts_n, ranks_n = (_positive_int(data, k, source) for k in ("num_layers", "num_experts", "num_ranks"))
    nodes_n = _positive_int(data, "num_nodes", source) if "num_nodes" in data else 1
    if experts_n % ranks_n:
        raise PlacementError(f"{source}: ranks ({ranks_n}) must divide experts ({experts_n})")
    if ranks_n % nodes_n:
        raise PlacementError(f"{source}: nodes ({nodes_n}) must divide ranks ({ranks_n})")
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
    rows = np.zeros((layers_n, experts_n), dtype=np.int64)
    for entry in layers:
        where = f"{source} layer {entry['layer']}"
        rows[entry["layer"]] = validate_expert_to_rank(entry.get("expert_to_rank"), experts_n, ranks_n, where)
        if "rank_to_experts" in entry:
            _validate_rank_to_experts(entry["rank_to_experts"], rows[entry["layer"]], ranks_n, where)
    return Plan(layers_n, experts_n, ranks_n, nodes_n, rows, str(data.get("method", "?")), data)


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
    expert_to_rank_LE: np.ndarray,
    *,
    num_ranks: int,
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
    num_layers, num_experts = expert_to_rank_LE.shape
    layers = []
    for layer in range(num_layers):
        e2r = validate_expert_to_rank(expert_to_rank_LE[layer], num_experts, num_ranks, f"layer {layer}")
        entry: dict[str, Any] = {
            "layer": layer,
            "expert_to_rank": e2r.tolist(),
            "rank_to_experts": rank_to_experts(e2r, num_ranks),
        }
        if expert_load_LE is not None:
            entry["expert_load"] = np.round(expert_load_LE[layer]).astype(np.int64).tolist()
        entry.update({key: per_layer[layer] for key, per_layer in layer_metrics.items()})
        layers.append(entry)
    return {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "num_layers": num_layers,
        "num_experts": num_experts,
        "num_ranks": num_ranks,
        "num_nodes": num_nodes,
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


def save_plan(plan: dict[str, Any], path: str | Path) -> None:
    """Validate, then write atomically (a crash never leaves half a plan under the plan's name)."""
    plan_from_dict(plan, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(plan) + "\n")
    os.replace(tmp, path)
