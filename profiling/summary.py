"""One run's profile reduced to the numbers people ask for: per MoE layer, the rank x rank traffic, copies per token,
cross-rank bytes, all-to-all time, expert and rank load. ``c2r-profile summarize`` prints it; the dashboard draws it.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from profiling.reader import read_comm_records, read_online_counts

log = logging.getLogger("profiling.summary")


def find_profile_dir(path: str | Path) -> Path:
    """Accept a run directory (holding profile/) or the profile directory itself."""
    path = Path(path)
    for candidate in (path, path / "profile"):
        if (candidate / "profile.json").exists():
            return candidate
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    raise FileNotFoundError(
        f"no profile in {path} (expected {path / 'profile' / 'profile.json'}; run c2r-train with --profile)"
    )


def _node_traffic(records: list[dict[str, Any]], copies_RR: np.ndarray, tokens: int) -> dict[str, Any]:
    """Inter- and intra-node copies and bytes per token, and the node x node copies (records from before nodes were
    recorded count as one node)."""
    W = records[0].get("ranks_per_node") or len(copies_RR)
    N = len(copies_RR) // W
    sums = defaultdict(int)
    for r in records:
        for key in ("distinct_nodes", "inter_node_copies", "intra_node_copies", "inter_node_bytes", "intra_node_bytes"):
            sums[key] += r.get(key, 0)
        sums["remote_nodes"] += r.get("remote_nodes", 0)
    return {
        "ranks_per_node": W,
        "copies_node_to_node": copies_RR.reshape(N, W, N, W).sum((1, 3)).tolist(),
        "distinct_nodes_per_token": sums["distinct_nodes"] / tokens,
        "remote_nodes_per_token": sums["remote_nodes"] / tokens,
        "inter_node_copies_per_token": sums["inter_node_copies"] / tokens,
        "intra_node_copies_per_token": sums["intra_node_copies"] / tokens,
        "inter_node_bytes_per_token": sums["inter_node_bytes"] / tokens,
        "intra_node_bytes_per_token": sums["intra_node_bytes"] / tokens,
    }


def _layer_traffic(records: list[dict[str, Any]], num_ranks: int) -> dict[str, Any]:
    copies_RR = np.zeros((num_ranks, num_ranks), dtype=np.int64)
    load_R = np.zeros(num_ranks, dtype=np.int64)
    slot_load_R = [None] * num_ranks  # per rank, per local slot (replicas are slots of their own)
    group_load: dict[int, np.ndarray] = defaultdict(lambda: np.zeros(num_ranks, dtype=np.int64))
    sums = defaultdict(int)
    for r in records:
        copies_RR[r["ep_rank"]] += np.asarray(r["send_copies"], dtype=np.int64)
        load_R[r["ep_rank"]] += sum(r["local_expert_load"])
        # EP groups are contiguous ranks; with data parallelism over them, each group's GPUs wait for its busiest
        group_load[r["rank"] // num_ranks][r["ep_rank"]] += sum(r["local_expert_load"])
        local = np.asarray(r["local_expert_load"], dtype=np.int64)
        slot_load_R[r["ep_rank"]] = local if slot_load_R[r["ep_rank"]] is None else slot_load_R[r["ep_rank"]] + local
        for key in ("tokens", "valid_slots", "distinct_ranks", "remote_ranks"):
            sums[key] += r[key]
    bytes_per_copy = records[0]["bytes_per_copy"]
    tokens = max(sums["tokens"], 1)
    cross = int(copies_RR.sum() - np.trace(copies_RR))
    return {
        "tokens": sums["tokens"],
        "copies_rank_to_rank": copies_RR.tolist(),
        "bytes_rank_to_rank": (copies_RR * bytes_per_copy).tolist(),
        "bytes_per_copy": bytes_per_copy,
        "mode": records[0].get("mode", "per-expert"),
        "copies_per_token": int(copies_RR.sum()) / tokens,
        "routed_slots_per_token": sums["valid_slots"] / tokens,
        "distinct_ranks_per_token": sums["distinct_ranks"] / tokens,
        "cross_rank_copies_per_token": cross / tokens,
        "cross_rank_bytes_per_token": cross * bytes_per_copy / tokens,
        "remote_ranks_per_token": sums["remote_ranks"] / tokens,
        "rank_load": load_R.tolist(),
        # per physical slot (rank * X + local slot), when every rank recorded: a replica's load apart from its home's
        **({"slot_load": np.concatenate(slot_load_R).tolist()} if all(s is not None for s in slot_load_R) else {}),
        # the worst EP group's: pooled over groups, one GPU's load would hide behind another's
        "rank_load_imbalance": max(float(g.max() / max(g.mean(), 1e-9)) for g in group_load.values()),
        **_node_traffic(records, copies_RR, tokens),
    }


def _step_times(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per step: all-to-all milliseconds summed over layers and phases; the slowest rank counts."""
    per_rank_step: dict[tuple[int, int], float] = defaultdict(float)
    for r in records:
        per_rank_step[(r["step"], r["rank"])] += sum(r.get("time_ms", {}).values())
    steps: dict[int, float] = defaultdict(float)
    for (step, _), ms in per_rank_step.items():
        steps[step] = max(steps[step], ms)
    return [{"step": s, "all_to_all_ms": steps[s]} for s in sorted(steps)]


def profiled_steps(path: str | Path) -> list[int]:
    """The training steps a run's all-to-all records cover (empty without records), sorted."""
    comm_dir = find_profile_dir(path) / "comm"
    return sorted({r["step"] for r in read_comm_records(comm_dir)}) if comm_dir.exists() else []


def summarize(path: str | Path, steps: Collection[int] | None = None) -> dict[str, Any]:
    """``steps``: summarise the all-to-all records of these training steps only (a window; None: every step). The
    online co-activation counters have no steps: they always cover the whole run (``traced_tokens`` per layer)."""
    profile_dir = find_profile_dir(path)
    try:
        info = json.loads((profile_dir / "profile.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{profile_dir / 'profile.json'} is not readable JSON ({error})") from None
    summary: dict[str, Any] = {
        "format": "c2r-profile-summary",
        "version": 1,
        "profile": info,
        "layers": [],
        "steps": [],
    }
    coactivation = traced_tokens = None
    if any((profile_dir / "traces").glob("counts-rank*.npz")):
        coactivation, traced_tokens = read_online_counts(profile_dir / "traces")
    elif (profile_dir / "traces").exists():  # a run killed before its counters were first written
        log.warning(
            "%s has no online counters yet: expert loads and co-activation are left out", profile_dir / "traces"
        )
    records = read_comm_records(profile_dir / "comm") if (profile_dir / "comm").exists() else []
    summary["profiled_steps"] = sorted({r["step"] for r in records})
    if steps is not None:
        keep = set(steps)
        records = [r for r in records if r["step"] in keep]
    by_layer: dict[int, list] = defaultdict(list)
    for r in records:
        by_layer[r["layer"]].append(r)
    for layer in range(info["num_layers"]):
        entry: dict[str, Any] = {"layer": layer, "expert_to_rank": info["expert_to_rank"][layer]}
        if by_layer.get(layer):
            entry.update(_layer_traffic(by_layer[layer], by_layer[layer][0]["ep_size"]))
        if coactivation is not None:
            load_E = np.diag(coactivation[layer]).astype(np.int64)
            entry["expert_load"] = load_E.tolist()
            entry["traced_tokens"] = int(traced_tokens[layer])
            entry["expert_load_imbalance"] = float(load_E.max() / max(load_E.mean(), 1e-9))
        summary["layers"].append(entry)
    summary["steps"] = _step_times(records)
    summary["overall"] = _overall(summary["layers"], summary["steps"])
    return summary


def _overall(layers: list[dict[str, Any]], steps: list[dict[str, Any]]) -> dict[str, Any]:
    with_traffic = [entry for entry in layers if "tokens" in entry]
    overall: dict[str, Any] = {}
    if with_traffic:
        for key in (
            "copies_per_token",
            "distinct_ranks_per_token",
            "cross_rank_copies_per_token",
            "cross_rank_bytes_per_token",
            "remote_ranks_per_token",
            "rank_load_imbalance",
            "distinct_nodes_per_token",
            "inter_node_copies_per_token",
            "intra_node_copies_per_token",
            "inter_node_bytes_per_token",
            "intra_node_bytes_per_token",
        ):
            overall[key] = float(np.mean([entry[key] for entry in with_traffic]))
    if steps:
        overall["all_to_all_ms_per_step"] = float(np.median([s["all_to_all_ms"] for s in steps]))
    return overall


def coactivation_matrix(path: str | Path) -> np.ndarray:
    """[L, E, E] online co-activation counts of a profiled run, summed over ranks (diagonal: expert load)."""
    return read_online_counts(find_profile_dir(path) / "traces")[0]


def format_summary(summary: dict[str, Any]) -> str:
    info = summary["profile"]
    lines = [
        f"profile of {info.get('run', '?')}: {info['num_layers']} MoE layers, {info['num_experts']} experts, "
        f"top-{info['top_k']}, ep_size {info.get('ep_size', '?')}, "
        + (f"{len(summary['steps'])} steps of all-to-all records" if summary["steps"] else "no all-to-all records")
    ]
    header = (
        f"{'layer':>5} {'copies/tok':>10} {'ranks/tok':>9} {'cross/tok':>9} {'cross KiB/tok':>13} "
        f"{'rank load max/mean':>18} {'expert load max/mean':>20}"
    )
    lines.append(header)
    for e in summary["layers"]:
        if "tokens" not in e:
            lines.append(f"{e['layer']:>5} {'(no expert parallelism: no all-to-all)':>60}")
            continue
        lines.append(
            f"{e['layer']:>5} {e['copies_per_token']:>10.3f} {e['distinct_ranks_per_token']:>9.3f} "
            f"{e['cross_rank_copies_per_token']:>9.3f} {e['cross_rank_bytes_per_token'] / 1024:>13.3f} "
            f"{e['rank_load_imbalance']:>18.3f} {e.get('expert_load_imbalance', float('nan')):>20.3f}"
        )
    o = summary["overall"]
    if "cross_rank_copies_per_token" in o:
        mode = next(e["mode"] for e in summary["layers"] if "mode" in e)
        lines.append(
            f"mean over layers: {o['copies_per_token']:.3f} copies/token sent ({mode} dispatch), "
            f"{o['distinct_ranks_per_token']:.3f} distinct ranks/token (what per-rank dispatch sends), "
            f"{o['cross_rank_copies_per_token']:.3f} cross-rank copies/token"
        )
        W = next(e["ranks_per_node"] for e in summary["layers"] if "ranks_per_node" in e)
        if info.get("ep_size", W) > W:  # more than one node: the network hop apart from NVLink
            lines.append(
                f"nodes of {W} ranks: {o['inter_node_copies_per_token']:.3f} inter-node copies/token "
                f"({o['inter_node_bytes_per_token'] / 1024:.3f} KiB), {o['intra_node_copies_per_token']:.3f} "
                f"intra-node copies/token ({o['intra_node_bytes_per_token'] / 1024:.3f} KiB), "
                f"{o['distinct_nodes_per_token']:.3f} distinct nodes/token (what per-node dispatch sends over the "
                "network, own node included)"
            )
    if "all_to_all_ms_per_step" in o:
        lines.append(
            f"all-to-all time: {o['all_to_all_ms_per_step']:.2f} ms per step (median; slowest rank, "
            "forward + backward, all layers)"
        )
    return "\n".join(lines)
