"""Judge placements on routing data: per layer and overall metrics of a plan beside the contiguous and random
baselines, and the tables `c2r-place` prints."""

from __future__ import annotations

import functools
from typing import Any

from tqdm.auto import tqdm

from placement.inputs import LayerRouting
from placement.layout import ExpertLayout
from placement.methods import random_placement
from placement.objective import layer_metrics, load_key, overall_metrics
from placement.pool import map_layers

BASELINES = ("contiguous", "random")


def evaluate_placement(
    routings: list[LayerRouting],
    layouts: list[ExpertLayout],
    num_nodes: int = 1,
    hidden: int | None = None,
    dtype_bytes: int = 2,
) -> dict[str, Any]:
    """{"layers": [per-layer metrics], "overall": mean over layers} of one placement (a layout per layer)."""
    layers = []
    for layer, routing in enumerate(routings):
        metrics = layer_metrics(routing, layouts[layer], num_nodes, hidden, dtype_bytes)
        layers.append({"layer": layer, **metrics})
    return {"layers": layers, "overall": overall_metrics(layers)}


def baseline_placements(
    num_layers: int, num_experts: int, num_ranks: int, seed: int = 0
) -> dict[str, list[ExpertLayout]]:
    """Contiguous and seeded random layouts, one per layer (a different random draw per layer)."""
    return {
        "contiguous": [ExpertLayout.contiguous(num_experts, num_ranks)] * num_layers,
        "random": [
            ExpertLayout(random_placement(num_experts, num_ranks, seed + layer), num_ranks)
            for layer in range(num_layers)
        ],
    }


def evaluate_with_baselines(
    routings: list[LayerRouting],
    layouts: list[ExpertLayout],
    num_nodes: int = 1,
    hidden: int | None = None,
    dtype_bytes: int = 2,
    seed: int = 0,
    progress: bool = False,
    jobs: int = 1,
) -> dict[str, dict[str, Any]]:
    """{"plan": ..., "contiguous": ..., "random": ...}, each as `evaluate_placement` returns; ``jobs``: layers
    judged in parallel worker processes (`placement.pool`; the same numbers)."""
    num_experts, num_ranks = layouts[0].num_experts, layouts[0].num_ranks
    placements = {"plan": layouts, **baseline_placements(len(routings), num_experts, num_ranks, seed)}
    if jobs > 1:
        task = functools.partial(_judge_layer, num_nodes=num_nodes, hidden=hidden, dtype_bytes=dtype_bytes)
        args = [(r, tuple(p[layer] for p in placements.values())) for layer, r in enumerate(routings)]
        per_layer = map_layers(task, args, jobs, progress, "evaluating")
        out = {}
        for i, name in enumerate(placements):
            layers = [{"layer": layer, **metrics[i]} for layer, metrics in enumerate(per_layer)]
            out[name] = {"layers": layers, "overall": overall_metrics(layers)}
        return out
    return {
        name: evaluate_placement(routings, placement, num_nodes, hidden, dtype_bytes)
        for name, placement in tqdm(placements.items(), desc="evaluating", unit="placement", disable=not progress)
    }


def _judge_layer(
    routing: LayerRouting, layouts: tuple[ExpertLayout, ...], *, num_nodes: int, hidden: int | None, dtype_bytes: int
) -> list[dict[str, Any]]:
    """One layer's metrics under each layout (a module-level function: a worker process runs it)."""
    return [layer_metrics(routing, layout, num_nodes, hidden, dtype_bytes) for layout in layouts]


def keep_contiguous_where_plan_loses(
    judged: dict[str, dict[str, Any]],
    layouts: list[ExpertLayout],
    max_load: float | None = None,
    reported: dict[str, dict[str, Any]] | None = None,
) -> tuple[list[ExpertLayout], list[int]]:
    """Per layer, the contiguous placement instead of the plan where contiguous is no worse on the ``judged``
    tokens (the planning tokens: a choice made on held-out ones would be selection on the test set, and the held-out
    numbers could never show a loss) on both counts: copies per token, and load max/mean above the cap (below the
    cap, load does not count; without a cap, load does not count at all). ``reported`` (as
    `evaluate_with_baselines` returns; default ``judged``) is updated to match. Returns (layouts, the layers
    switched)."""
    reported = judged if reported is None else reported
    cap = float("inf") if max_load is None else max_load
    plan, contig = judged["plan"]["layers"], judged["contiguous"]["layers"]
    shown, shown_contig = reported["plan"]["layers"], reported["contiguous"]["layers"]
    switched = []
    out = list(layouts)
    for layer, (p, c) in enumerate(zip(plan, contig)):
        if not p.get("tokens"):
            continue
        no_worse_copies = c["copies_per_token"] <= p["copies_per_token"]
        no_worse_load = max(c["load_imbalance"], cap) <= max(p["load_imbalance"], cap)
        if no_worse_copies and no_worse_load and layouts[layer].expert_to_rank != _contiguous_ids(layouts[layer]):
            out[layer] = ExpertLayout.contiguous(layouts[layer].num_experts, layouts[layer].num_ranks)
            shown[layer] = {**shown_contig[layer], "layer": layer}
            switched.append(layer)
    if switched:
        reported["plan"]["overall"] = overall_metrics(shown)
    return out, switched


def _contiguous_ids(layout: ExpertLayout) -> tuple[int, ...]:
    return ExpertLayout.contiguous(layout.num_experts, layout.num_ranks).expert_to_rank


def _change(new: float, old: float) -> str:
    return f"{100.0 * (new - old) / old:+.1f}%" if old else "n/a"


def _row_cells(
    results: dict[str, dict[str, Any]], m: dict[str, dict[str, Any]], detailed: bool, per_step: bool
) -> list[str]:
    plan, contig, rand = m["plan"], m["contiguous"], m["random"]
    cells = [
        f"{plan['copies_per_token']:.3f}",
        f"{contig['copies_per_token']:.3f}",
        f"{rand['copies_per_token']:.3f}",
        _change(plan["copies_per_token"], contig["copies_per_token"]),
    ]
    if detailed:
        cells += [f"{plan['km1_per_token']:.3f}", f"{contig['km1_per_token']:.3f}"]
        if "cross_rank_bytes_per_token" in plan:
            cells += [
                f"{plan['cross_rank_bytes_per_token'] / 1024:.2f}",
                f"{contig['cross_rank_bytes_per_token'] / 1024:.2f}",
            ]
    cells += [f"{plan['load_imbalance']:.2f}", f"{contig['load_imbalance']:.2f}"]
    if per_step:
        cells += [f"{plan['step_load_imbalance']:.2f}", f"{contig['step_load_imbalance']:.2f}"]
    if "node_fanout_per_token" in plan:
        cells += [f"{plan['node_fanout_per_token']:.3f}", f"{contig['node_fanout_per_token']:.3f}"]
    return cells


def format_comparison(results: dict[str, dict[str, Any]], detailed: bool = True) -> str:
    """A per-layer table (plan vs contiguous vs random) and an overall line."""
    first = next((m for m in results["plan"]["layers"] if m.get("tokens")), None)
    if first is None:
        return "no routed tokens to evaluate on"
    header = ["layer", "tokens", "copies/tok", "contig", "random", "vs contig"]
    if detailed:
        header += ["km1/tok", "contig"]
        if "cross_rank_bytes_per_token" in first:
            header += ["cross KiB/tok", "contig"]
    header += ["load max/mean", "contig"]
    # the per-step column where every layer of the plan and of contiguous placement has it (one rule for all rows)
    per_step = load_key(results["plan"]["layers"], results["contiguous"]["layers"]) == "step_load_imbalance"
    if per_step:
        header += ["per step", "contig"]
    if "node_fanout_per_token" in first:
        header += ["nodes/tok", "contig"]
    rows = []
    for layer, plan in enumerate(results["plan"]["layers"]):
        if not plan.get("tokens"):
            rows.append([str(layer), "0"] + ["-"] * (len(header) - 2))
            continue
        per = {name: results[name]["layers"][layer] for name in results}
        rows.append([str(layer), str(plan["tokens"]), *_row_cells(results, per, detailed, per_step)])
    overall = {name: results[name]["overall"] for name in results}
    rows.append(["all", str(overall["plan"]["tokens"]), *_row_cells(results, overall, detailed, per_step)])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    o = overall["plan"]
    lines.append(
        f"copies/tok = distinct destination ranks per token (what per-rank dispatch sends; per-expert dispatch sends "
        f"{o['slots_per_token']:.3f}); 'all' = mean over layers"
    )
    if per_step:
        lines.append(
            "per step = the busiest rank's load in each recorded step, summed, over the mean rank's: what the steps "
            "wait for (load max/mean pools the steps)"
        )
    if not o.get("exact", True):
        lines.append(
            "NOTE: from a co-activation matrix: copies/tok are an ESTIMATE (pairwise approximation, exact for top-2 "
            "routing, clipped to at least 1 copy per token otherwise); use --traces for exact numbers"
        )
    return "\n".join(lines)
