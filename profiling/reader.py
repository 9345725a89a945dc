"""Reading what the profiler wrote, tolerating damage: a truncated or corrupt shard is skipped and named, never
silently used; shards that disagree with the header are skipped too; an empty directory is an error."""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger("profiling.reader")


@dataclass
class TraceSet:
    """Routing traces of one run: per MoE layer, each recorded token's expert ids ([N, K], -1 = empty slot)."""

    header: dict[str, Any]
    expert_ids: dict[int, np.ndarray]
    weights: dict[int, np.ndarray]
    steps: dict[int, np.ndarray]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return int(self.header["num_layers"])

    @property
    def num_experts(self) -> int:
        return int(self.header["num_experts"])


def read_header(trace_dir: Path) -> dict[str, Any]:
    path = trace_dir / "header.json"
    if not path.exists():
        raise FileNotFoundError(f"no trace header {path} (is {trace_dir} a routing-trace directory?)")
    header = json.loads(path.read_text())
    if header.get("format") != "c2r-routing-trace":
        raise ValueError(f"{path} is not a c2r routing-trace header (format {header.get('format')!r})")
    return header


def _load_shard(path: Path, header: dict[str, Any]) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        shard = {k: data[k] for k in ("layer", "step", "expert_ids", "weights")}
    n, k = len(shard["layer"]), int(header["top_k"])
    if shard["expert_ids"].shape != (n, k) or shard["weights"].shape != (n, k) or len(shard["step"]) != n:
        raise ValueError(f"shapes {shard['expert_ids'].shape} do not match the header's top_k={k} over {n} rows")
    if n and (shard["layer"].max() >= header["num_layers"] or shard["expert_ids"].max() >= header["num_experts"]):
        raise ValueError(
            f"layer or expert id beyond the header's {header['num_layers']} layers / {header['num_experts']} experts"
        )
    return shard


def read_traces(trace_dir: str | Path, progress: bool = True) -> TraceSet:
    trace_dir = Path(trace_dir)
    header = read_header(trace_dir)
    paths = sorted(trace_dir.glob("rank*-*.npz"))
    if not paths:
        raise FileNotFoundError(f"no trace shards (rank*-*.npz) in {trace_dir}")
    parts: dict[str, dict[int, list[np.ndarray]]] = {"expert_ids": {}, "weights": {}, "step": {}}
    skipped = []
    for path in tqdm(paths, desc="reading traces", unit="shard", disable=not progress):
        try:
            shard = _load_shard(path, header)
        except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as error:
            skipped.append((path.name, f"{type(error).__name__}: {error}"))
            continue
        for layer in np.unique(shard["layer"]):
            rows = shard["layer"] == layer
            for key in parts:
                parts[key].setdefault(int(layer), []).append(shard[key][rows])
    for name, reason in skipped:
        log.warning("skipped trace shard %s (%s)", name, reason)
    if len(skipped) == len(paths):
        raise ValueError(f"every trace shard in {trace_dir} is unreadable: {skipped}")
    merged = {
        key: {layer: np.concatenate(arrays) for layer, arrays in by_layer.items()} for key, by_layer in parts.items()
    }
    return TraceSet(header, merged["expert_ids"], merged["weights"], merged["step"], skipped)


def coactivation_from_ids(expert_ids_NK: np.ndarray, num_experts: int) -> np.ndarray:
    """[E, E] int64 co-activation of one layer's traced tokens (diagonal: load)."""
    onehot = np.zeros((len(expert_ids_NK), num_experts), dtype=np.int64)
    rows = np.repeat(np.arange(len(expert_ids_NK)), expert_ids_NK.shape[1])
    cols = expert_ids_NK.reshape(-1)
    keep = cols >= 0
    onehot[rows[keep], cols[keep]] = 1
    return onehot.T @ onehot


def coactivation_from_traces(traces: TraceSet) -> np.ndarray:
    """[L, E, E] from the written shards (only the sampled tokens)."""
    out = np.zeros((traces.num_layers, traces.num_experts, traces.num_experts), dtype=np.int64)
    for layer, ids in traces.expert_ids.items():
        out[layer] = coactivation_from_ids(ids, traces.num_experts)
    return out


def read_online_counts(trace_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Online counters summed over ranks: co-activation [L, E, E] and tokens seen [L] (every token, unsampled)."""
    paths = sorted(Path(trace_dir).glob("counts-rank*.npz"))
    if not paths:
        raise FileNotFoundError(f"no online counters (counts-rank*.npz) in {trace_dir}")
    coactivation = tokens = None
    for path in paths:
        try:
            with np.load(path) as data:
                c, t = data["coactivation"], data["tokens"]
        except (zipfile.BadZipFile, OSError, KeyError, EOFError, ValueError) as error:
            raise ValueError(
                f"{path} is not a readable counters file ({error}); move it away to go on without it"
            ) from None
        if coactivation is not None and c.shape != coactivation.shape:
            raise ValueError(f"{path.name} holds counters of shape {c.shape}, others {coactivation.shape}")
        coactivation = c if coactivation is None else coactivation + c
        tokens = t if tokens is None else tokens + t
    return coactivation, tokens


def read_comm_records(comm_dir: str | Path) -> list[dict[str, Any]]:
    """Every rank's all-to-all records; a torn last line (a crash mid-write) is skipped and logged."""
    paths = sorted(Path(comm_dir).glob("comm-rank*.jsonl"))
    if not paths:
        raise FileNotFoundError(f"no all-to-all records (comm-rank*.jsonl) in {comm_dir}")
    records = []
    for path in paths:
        for line_no, line in enumerate(path.read_text().splitlines(), start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("skipped unreadable line %s:%d", path.name, line_no)
    return records
