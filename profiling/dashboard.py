"""``c2r-profile dashboard``: one self-contained HTML file (plotly and its JavaScript inline, opens offline) showing
one profiled run, or two side by side (before, after) with the change in %.

Two runs are compared like with like or not at all (``profiling.compare``): over equal windows of training steps (the
last N steps both runs profiled), per token and per step rather than in totals, one colour scale per pair of panels;
when the runs are different models, or the windows are different points of training (a run from scratch against a
continuation), a warning at the top says so and the all-to-all time is shown side by side, not as a change.

Per MoE layer (a layer selector on each figure): the rank x rank all-to-all traffic, the expert co-activation with the
experts grouped by the rank that holds them (so experts that fire together on one rank show as blocks), expert and
rank load; over layers: copies and cross-rank bytes per token; over steps: all-to-all time. Every figure has a plain
HTML table with the same numbers below it. What a run did not record (no expert parallelism: no all-to-all; no
routing traces: no co-activation) is said, not drawn.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from profiling.compare import Comparison, choose_windows, compare_summaries, describe_steps
from profiling.summary import coactivation_matrix, find_profile_dir, profiled_steps, summarize

RUN_COLORS = ("#4C78A8", "#F58518")
PLOT_CONFIG = {"displaylogo": False, "responsive": True}

KIB = 1024.0
# (summary["overall"] key, label, lower is better (None: neither), format, divisor: bytes shown in KiB)
HEADLINE = (
    ("copies_per_token", "token copies sent per token (own rank included)", True, "{:.3f}", 1.0),
    ("distinct_ranks_per_token", "distinct ranks per token", True, "{:.3f}", 1.0),
    ("cross_rank_copies_per_token", "cross-rank copies per token", True, "{:.3f}", 1.0),
    ("cross_rank_bytes_per_token", "cross-rank KiB per token", True, "{:,.2f}", KIB),
    ("all_to_all_ms_per_step", "all-to-all ms per step (median, slowest rank)", True, "{:.2f}", 1.0),
    ("rank_load_imbalance", "rank load imbalance (max / mean)", True, "{:.3f}", 1.0),
    ("expert_load_imbalance", "expert load imbalance (max / mean)", True, "{:.3f}", 1.0),
)
# what depends on the length of the run and the point of training, not only on routing and placement per token
TIME_KEYS = ("all_to_all_ms_per_step",)

# per-layer table: (summary["layers"][i] key, label, format)
LAYER_COLUMNS = (
    ("copies_per_token", "copies / token", "{:.3f}"),
    ("distinct_ranks_per_token", "distinct ranks / token", "{:.3f}"),
    ("cross_rank_copies_per_token", "cross-rank copies / token", "{:.3f}"),
    ("cross_rank_kib_per_token", "cross-rank KiB / token", "{:,.2f}"),
    ("rank_load_imbalance", "rank load max/mean", "{:.3f}"),
    ("expert_load_imbalance", "expert load max/mean", "{:.3f}"),
)


@dataclass
class RunData:
    """One profiled run: its label, its :func:`profiling.summary.summarize` dict (cut to the compared window of
    steps), and its [L, E, E] co-activation counts over the whole run (None when the run recorded no routing traces).
    What the figures draw is normalised: per token (traffic, co-activation, load) or per step (time, traffic tables),
    never a total that grows with the length of the run."""

    name: str
    summary: dict[str, Any]
    coactivation: np.ndarray | None = None

    @property
    def info(self) -> dict[str, Any]:
        return self.summary["profile"]

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.summary["layers"]

    @property
    def has_traffic(self) -> bool:
        return any("tokens" in entry for entry in self.layers)

    def layer(self, index: int) -> dict[str, Any]:
        return self.layers[index] if index < len(self.layers) else {"layer": index}

    def expert_to_rank(self, index: int) -> list[int] | None:
        """Each expert's (home) rank. The saved form lists a replicated expert's ranks, home first (``[0, [0, 3],
        1, ...]``, placement/layout.py); ``replicas`` has the others."""
        saved = self.layer(index).get("expert_to_rank")
        return None if saved is None else [e[0] if isinstance(e, list) else e for e in saved]

    def replicas(self, index: int) -> list[list[int]]:
        """Per expert, the ranks of its replicas besides its home (empty lists: no replicas)."""
        saved = self.layer(index).get("expert_to_rank") or []
        return [list(e[1:]) if isinstance(e, list) else [] for e in saved]

    def slots(self, index: int) -> list[tuple[int, bool]] | None:
        """Per physical slot (rank by rank, ascending expert id on each, as the dispatcher lays them out): the
        expert it holds and whether it is a replica (not the home copy); None without replicas."""
        homes, extra = self.expert_to_rank(index), self.replicas(index)
        if homes is None or not any(extra):
            return None
        ranks = max(max(homes), *(max(r, default=0) for r in extra)) + 1
        return [
            (e, rank != homes[e])
            for rank in range(ranks)
            for e in range(len(homes))
            if rank == homes[e] or rank in extra[e]
        ]

    @property
    def window(self) -> list[int]:
        """The training steps summarised (all-to-all records of these steps only)."""
        return [s["step"] for s in self.summary["steps"]]

    def expert_load(self, index: int) -> list[float] | None:
        """Routed slots each expert got, per token (over the whole run: the online counters have no steps)."""
        entry = self.layer(index)
        if "expert_load" not in entry:
            return None
        return (np.asarray(entry["expert_load"]) / max(entry.get("traced_tokens", 0), 1)).tolist()

    def rank_load(self, index: int) -> list[float] | None:
        """Routed slots each EP rank's experts processed, per token: from the all-to-all records of the window,
        else from the traces (whole run)."""
        entry = self.layer(index)
        if "rank_load" in entry:
            return (np.asarray(entry["rank_load"]) / max(entry["tokens"], 1)).tolist()
        placement, load = self.expert_to_rank(index), self.expert_load(index)
        if placement is None or load is None:
            return None
        ranks = [[home, *extra] for home, extra in zip(placement, self.replicas(index))]
        # A replicated expert's load split evenly over its copies: an estimate (the dispatcher's rule first keeps
        # a slot on a rank the token visits anyway); the all-to-all records, when present, have the measured loads.
        rank_of = [r for copies in ranks for r in copies]
        share = [w / len(copies) for copies, w in zip(ranks, load) for _ in copies]
        return np.bincount(rank_of, weights=share, minlength=max(rank_of) + 1).tolist()

    def slot_load(self, index: int) -> list[float] | None:
        """Routed slots each physical expert slot processed, per token (window), for replicated layouts."""
        entry = self.layer(index)
        if self.slots(index) is None or "slot_load" not in entry:
            return None
        return (np.asarray(entry["slot_load"]) / max(entry["tokens"], 1)).tolist()


def load_run(path: str | Path, name: str | None = None, steps: list[int] | None = None) -> RunData:
    """``steps``: the window of training steps to summarise (None: every profiled step)."""
    summary = summarize(path, steps)
    profile_dir = find_profile_dir(path)
    coactivation = coactivation_matrix(path) if (profile_dir / "traces").exists() else None
    summary["overall"].update(_expert_imbalance(summary["layers"]))
    for entry in summary["layers"]:
        if "cross_rank_bytes_per_token" in entry:
            entry["cross_rank_kib_per_token"] = entry["cross_rank_bytes_per_token"] / KIB
    return RunData(name or Path(path).resolve().name, summary, coactivation)


def _expert_imbalance(layers: list[dict[str, Any]]) -> dict[str, float]:
    values = [entry["expert_load_imbalance"] for entry in layers if "expert_load_imbalance" in entry]
    return {"expert_load_imbalance": float(np.mean(values))} if values else {}


# ---------------------------------------------------------------------------------------------------- HTML helpers


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, spec: str = "{:,}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return spec.format(value)


def change(before: float | None, after: float | None, lower_is_better: bool | None = True) -> str:
    """The change from before to after in %, as an HTML span coloured good (green) or bad (red)."""
    if before is None or after is None:
        return '<span class="na">–</span>'
    if before == 0:
        return '<span class="na">n/a</span>' if after else '<span class="same">0%</span>'
    pct = (after - before) / abs(before) * 100
    kind = "same" if abs(pct) < 0.05 or lower_is_better is None else ("good" if (pct < 0) == lower_is_better else "bad")
    return f'<span class="{kind}">{pct:+.1f}%</span>'


def table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """An HTML table; header cells are escaped, row cells are HTML already (escape them with :func:`esc`)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def details(summary: str, body: str) -> str:
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"


def num_layers(runs: list[RunData]) -> int:
    return max(run.info["num_layers"] for run in runs)


def layer_menu(count: int, trace_args, layout_args=None) -> list[dict[str, Any]]:
    """A plotly dropdown "layer i" whose button i applies trace_args(i) (and layout_args(i)) to the figure."""
    buttons = [
        {
            "label": f"layer {i}",
            "method": "update",
            "args": [trace_args(i), layout_args(i) if layout_args else {}],
        }
        for i in range(count)
    ]
    return [
        {
            "buttons": buttons,
            "direction": "down",
            "x": 0,
            "xanchor": "left",
            "y": 1.0,
            "yanchor": "bottom",
            "pad": {"b": 34},
            "showactive": True,
            "name": "layer",
        }
    ]


def style(fig: go.Figure, height: int, title: str) -> go.Figure:
    fig.update_layout(
        height=height,
        template="plotly_white",
        title={"text": title, "x": 0.5, "xanchor": "center", "y": 0.98, "yanchor": "top", "font": {"size": 15}},
        margin={"t": 110, "l": 70, "r": 30, "b": 60},
        legend={"orientation": "h", "x": 1, "xanchor": "right", "y": 1.0, "yanchor": "bottom"},
        font={"size": 12},
    )
    return fig


def run_titles(runs: list[RunData], what: str = "") -> list[str]:
    return [f"{esc(run.name)}{what}" for run in runs]


# ------------------------------------------------------------------------------------------------------- figures


def traffic_matrices(run: RunData, index: int, per: str = "token") -> tuple[np.ndarray | None, np.ndarray | None]:
    """Rank x rank token copies and KiB of one layer over the window, per token (the copies then sum to
    copies_per_token) or per step."""
    entry = run.layer(index)
    if "copies_rank_to_rank" not in entry:
        return None, None
    divisor = max(entry["tokens"], 1) if per == "token" else max(len(run.window), 1)
    copies = np.asarray(entry["copies_rank_to_rank"], dtype=float) / divisor
    return copies, np.asarray(entry["bytes_rank_to_rank"], dtype=float) / divisor / KIB


def blank_note(axis: str, text: str) -> dict[str, Any]:
    """An annotation in the middle of an empty subplot (``axis``: "" for the first, "2" for the second)."""
    return {"text": text, "showarrow": False, "xref": f"x{axis} domain", "yref": f"y{axis} domain", "x": 0.5,
            "y": 0.5, "font": {"size": 14, "color": "#9a6700"}}  # fmt: skip


def pair_heatmaps(
    runs: list[RunData],
    matrices: Callable[[RunData, int], tuple[np.ndarray | None, np.ndarray | None]],
    shown: Callable[[RunData], bool],
    unit: str,
    blank: str,
    colorscale: str,
) -> go.Figure:
    """One heatmap panel per run of ``matrices(run, layer)`` (copies per token, KiB per token in the hover) between
    ``unit``s (rank or node), with a layer selector; a run that ``shown`` rejects gets the note ``blank``."""
    fig = make_subplots(1, len(runs), subplot_titles=run_titles(runs), horizontal_spacing=0.12)
    # one colour scale from 0 for every layer and run, so the selector and the panels compare like with like
    top = max(
        (float(m.max()) for run in runs for i in range(len(run.layers)) if (m := matrices(run, i)[0]) is not None),
        default=0.0,
    )

    def traces(index: int) -> dict[str, list]:
        mats = [matrices(run, index) for run in runs]
        return {
            "z": [m[0].tolist() if m[0] is not None else [[None]] for m in mats],
            "customdata": [m[1].tolist() if m[1] is not None else [[None]] for m in mats],
        }

    first = traces(0)
    for col, run in enumerate(runs, start=1):
        fig.add_trace(
            go.Heatmap(
                z=first["z"][col - 1],
                customdata=first["customdata"][col - 1],
                coloraxis="coloraxis",
                texttemplate="%{z:.3f}",
                hovertemplate=f"from {unit} %{{y}} to {unit} %{{x}}<br>%{{z:.4f}} copies per token<br>"
                "%{customdata:.3f} KiB per token<extra></extra>",
                name=esc(run.name),
            ),
            1,
            col,
        )
        if not shown(run):
            fig.update_xaxes(visible=False, row=1, col=col)
            fig.update_yaxes(visible=False, row=1, col=col)
            fig.add_annotation(blank_note("" if col == 1 else str(col), blank))
            continue
        fig.update_xaxes(title_text=f"to {unit}", dtick=1, constrain="domain", row=1, col=col)
        fig.update_yaxes(title_text=f"from {unit}", dtick=1, autorange="reversed", constrain="domain",
                         scaleanchor=f"x{'' if col == 1 else col}", row=1, col=col)  # fmt: skip
    fig.update_layout(
        coloraxis={"colorscale": colorscale, "cmin": 0, "cmax": top, "colorbar": {"title": {"text": "copies/token"}}},
        updatemenus=layer_menu(num_layers(runs), traces),
    )
    return fig


def fig_traffic(runs: list[RunData]) -> go.Figure | None:
    """Rank x rank token copies per token of one MoE layer's dispatch (KiB in the hover), one panel per run."""
    if not any(run.has_traffic for run in runs):
        return None
    fig = pair_heatmaps(
        runs,
        lambda run, i: traffic_matrices(run, i) if "tokens" in run.layer(i) else (None, None),
        lambda run: run.has_traffic,
        "rank",
        "no all-to-all recorded in this run",
        "Blues",
    )
    return style(fig, 460, "All-to-all dispatch: token copies per token, rank to rank (diagonal: stays on its rank)")


def node_matrices(run: RunData, index: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Node x node token copies and KiB of one layer per token, from the rank x rank counts grouped by node (both
    stages of per-node dispatch; the diagonal stays within a node); None for a layer on one node or not recorded."""
    entry = run.layer(index)
    if "copies_node_to_node" not in entry or len(entry["copies_node_to_node"]) < 2:
        return None, None
    copies = np.asarray(entry["copies_node_to_node"], dtype=float) / max(entry["tokens"], 1)
    return copies, copies * entry["bytes_per_copy"] / KIB


def is_multi_node(run: RunData) -> bool:
    return any(node_matrices(run, i)[0] is not None for i in range(len(run.layers)))


def fig_nodes(runs: list[RunData]) -> go.Figure | None:
    """Node x node token copies per token of one MoE layer (KiB in the hover), one panel per run; only for runs whose
    expert-parallel ranks span more than one node."""
    if not any(is_multi_node(run) for run in runs):
        return None
    fig = pair_heatmaps(runs, node_matrices, is_multi_node, "node", "one node: no inter-node traffic", "Oranges")
    return style(fig, 420, "Node to node: token copies per token (off the diagonal: over the network)")


NODE_COLUMNS = (
    ("inter_node_copies_per_token", "inter-node copies / token", "{:.3f}", 1.0),
    ("intra_node_copies_per_token", "intra-node copies / token", "{:.3f}", 1.0),
    ("inter_node_bytes_per_token", "inter-node KiB / token", "{:,.3f}", KIB),
    ("intra_node_bytes_per_token", "intra-node KiB / token", "{:,.3f}", KIB),
    ("distinct_nodes_per_token", "distinct nodes / token", "{:.3f}", 1.0),
    ("remote_nodes_per_token", "remote nodes / token", "{:.3f}", 1.0),
)


def table_nodes(runs: list[RunData]) -> str:
    """Per layer and run: the inter- vs intra-node split the dispatcher counted (intra: to other ranks of the node)."""
    rows = []
    for run in runs:
        for entry in run.layers:
            if "tokens" not in entry or not is_multi_node(run):
                continue
            nodes = len(entry["copies_node_to_node"])
            cells = [fmt(entry.get(key, 0.0) / div, spec) for key, _, spec, div in NODE_COLUMNS]
            rows.append([f"{esc(run.name)}, layer {entry['layer']}", esc(entry.get("mode", "")),
                         f"{nodes} x {entry['ranks_per_node']}", *cells])  # fmt: skip
    header = ["run, layer", "dispatch", "nodes x ranks", *[label for _, label, _, _ in NODE_COLUMNS]]
    return table(header, rows, "nodes")


def placement_order(placement: list[int] | None, num_experts: int) -> tuple[list[int], list[int]]:
    """Experts sorted by (rank, id), and the positions in that order where a new rank's experts begin."""
    if placement is None:
        return list(range(num_experts)), []
    order = sorted(range(num_experts), key=lambda e: (placement[e], e))
    starts = [i for i in range(1, num_experts) if placement[order[i]] != placement[order[i - 1]]]
    return order, starts


def coactivation_panel(run: RunData, index: int) -> dict[str, Any]:
    """One run's co-activation heatmap data for one layer: experts in placement order, diagonal masked."""
    if run.coactivation is None or index >= len(run.coactivation):
        return {"z": [[None]], "customdata": [[None]], "order": [], "starts": [], "placement": None}
    tokens = run.layer(index).get("traced_tokens") or int(run.coactivation[index].diagonal().sum()) or 1
    counts = run.coactivation[index].astype(float) * (1000.0 / tokens)  # per 1000 tokens: runs of any length
    placement = run.expert_to_rank(index)
    order, starts = placement_order(placement, len(counts))
    z = counts[np.ix_(order, order)]
    np.fill_diagonal(z, np.nan)
    ids = np.asarray(order)
    custom = np.stack(np.broadcast_arrays(ids[:, None], ids[None, :]), axis=-1)
    return {
        "z": np.where(np.isnan(z), None, z).tolist(),
        "customdata": custom.tolist(),
        "order": order,
        "starts": starts,
        "placement": placement,
        "replicas": run.replicas(index),
    }


def coactivation_layout(panels: list[dict[str, Any]]) -> dict[str, Any]:
    """Tick labels (expert ids in placement order), rank boundary lines and rank labels for every panel."""
    layout: dict[str, Any] = {"shapes": [], "annotations": []}
    for col, panel in enumerate(panels, start=1):
        axis = "" if col == 1 else str(col)
        n, step = len(panel["order"]), max(1, math.ceil(len(panel["order"]) / 24))
        # a replicated expert is marked "+": it also has copies on other ranks (grouped here under its home rank)
        replicated = {e for e, extra in enumerate(panel.get("replicas") or []) if extra}
        ticks = [f"{e}+" if e in replicated else str(e) for e in panel["order"][::step]]
        for name in (f"xaxis{axis}", f"yaxis{axis}"):  # dotted paths: a whole axis object would replace the axis
            layout[f"{name}.tickvals"] = list(range(0, n, step))
            layout[f"{name}.ticktext"] = ticks
            layout[f"{name}.visible"] = n > 0
        if not n:
            layout["annotations"].append(blank_note(axis, "no routing traces in this run"))
        line = {"color": "#d62728", "width": 2}
        for b in panel["starts"]:
            layout["shapes"].append(
                {"type": "line", "xref": f"x{axis}", "yref": f"y{axis}", "x0": b - 0.5, "x1": b - 0.5,
                 "y0": -0.5, "y1": n - 0.5, "line": line}
            )  # fmt: skip
            layout["shapes"].append(
                {"type": "line", "xref": f"x{axis}", "yref": f"y{axis}", "y0": b - 0.5, "y1": b - 0.5,
                 "x0": -0.5, "x1": n - 0.5, "line": line}
            )  # fmt: skip
        bounds = [0, *panel["starts"], n]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if panel["placement"] is not None and n:
                layout["annotations"].append(
                    {"text": f"rank {panel['placement'][panel['order'][lo]]}", "showarrow": False,
                     "xref": f"x{axis}", "yref": f"y{axis} domain", "x": (lo + hi - 1) / 2, "y": 1.0,
                     "yanchor": "bottom", "font": {"size": 11, "color": "#d62728"}}
                )  # fmt: skip
    return layout


def fig_coactivation(runs: list[RunData]) -> go.Figure | None:
    """Expert co-activation (tokens routed to both experts) of one layer, experts grouped by the rank holding them."""
    if all(run.coactivation is None for run in runs):
        return None
    titles = run_titles(runs, ": experts grouped by rank")
    fig = make_subplots(1, len(runs), subplot_titles=titles, horizontal_spacing=0.14)

    def panels(index: int) -> list[dict[str, Any]]:
        return [coactivation_panel(run, index) for run in runs]

    def traces(index: int) -> dict[str, list]:
        data = panels(index)
        return {"z": [p["z"] for p in data], "customdata": [p["customdata"] for p in data]}

    def layout(index: int) -> dict[str, Any]:
        found = coactivation_layout(panels(index))
        # subplot titles are annotations too: keep them, lifted above the rank labels
        titles = [{**a.to_plotly_json(), "yshift": 22} for a in fig.layout.annotations[: len(runs)]]
        found["annotations"] = titles + found["annotations"]
        return found

    first = traces(0)
    for col, run in enumerate(runs, start=1):
        axis = "" if col == 1 else str(col)
        fig.add_trace(
            go.Heatmap(
                z=first["z"][col - 1],
                customdata=first["customdata"][col - 1],
                coloraxis="coloraxis",  # one scale for both runs: the same colour is the same rate in each panel
                hovertemplate="expert %{customdata[0]} and expert %{customdata[1]}: %{z:.2f} per 1000 tokens"
                "<extra></extra>",
                name=esc(run.name),
            ),
            1,
            col,
        )
        square = {"constrain": "domain", "showgrid": False, "zeroline": False, "title_text": "expert"}
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{axis}", constraintoward="top", row=1, col=col, **square)
        fig.update_xaxes(row=1, col=col, **square)
    top = max((coactivation_max(run) for run in runs), default=0.0)
    colorbar = {"title": {"text": "per 1000 tokens"}, "len": 0.9}
    fig.update_layout(coloraxis={"colorscale": "Viridis", "cmin": 0, "cmax": top or 1.0, "colorbar": colorbar})
    start = layout(0)
    fig.layout.annotations, fig.layout.shapes = start.pop("annotations"), start.pop("shapes")
    fig.update_layout(updatemenus=layer_menu(num_layers(runs), traces, layout), **start)
    experts = max(run.info["num_experts"] for run in runs)
    height = min(900, max(560, 300 + 9 * experts))  # many experts: taller, so each cell stays visible
    return style(
        fig, height, "Expert co-activation: tokens per 1000 routed to both experts (whole run; diagonal masked)"
    )


def coactivation_max(run: RunData) -> float:
    """The largest off-diagonal co-activation per 1000 tokens over every layer of a run (0 without traces)."""
    if run.coactivation is None:
        return 0.0
    values = [v for i in range(len(run.coactivation)) for row in coactivation_panel(run, i)["z"] for v in row]
    return max((v for v in values if v is not None), default=0.0)


def fig_load(runs: list[RunData]) -> go.Figure | None:
    """Expert load and (with expert parallelism) rank load of one layer per token, one bar colour per run."""
    panels = [("expert", lambda run, index: run.expert_load(index))]
    if any(run.rank_load(index) for run in runs for index in range(run.info["num_layers"])):
        panels.append(("rank", lambda run, index: run.rank_load(index)))
    if any(run.slot_load(index) for run in runs for index in range(run.info["num_layers"])):
        panels.append(("physical slot (replicated experts)", lambda run, index: run.slot_load(index)))
    if not any(get(run, 0) for run in runs for _, get in panels):
        return None
    titles = [f"routed slots per token, per {what}" for what, _ in panels]
    widths = {1: [1.0], 2: [0.7, 0.3], 3: [0.45, 0.15, 0.4]}[len(panels)]
    fig = make_subplots(1, len(panels), subplot_titles=titles, column_widths=widths)

    def traces(index: int) -> dict[str, list]:
        values = [get(run, index) or [] for run in runs for _, get in panels]
        return {"x": [list(range(len(v))) for v in values], "y": values}

    first = traces(0)
    for i, run in enumerate(runs):
        for col, (what, _) in enumerate(panels, start=1):
            fig.add_trace(
                go.Bar(
                    x=first["x"][len(panels) * i + col - 1],
                    y=first["y"][len(panels) * i + col - 1],
                    name=esc(run.name),
                    legendgroup=str(i),
                    showlegend=col == 1 and len(runs) > 1,
                    marker_color=RUN_COLORS[i],
                    hovertemplate=f"{what} %{{x}}: %{{y:.4f}} per token<extra>{esc(run.name)}</extra>",
                ),
                1,
                col,
            )
            fig.update_xaxes(title_text=what, dtick=1 if max(map(len, first["x"])) <= 32 else None, row=1, col=col)
    fig.update_yaxes(title_text="per token", row=1, col=1)
    fig.update_layout(barmode="group", updatemenus=layer_menu(num_layers(runs), traces))
    fig = style(fig, 420, "Load per token: experts (whole run), ranks (window)")
    fig.update_layout(legend={"y": 1.14})
    return fig


def fig_per_layer(runs: list[RunData]) -> go.Figure | None:
    """Copies per token, cross-rank copies per token and cross-rank bytes per token, per layer, one bar per run."""
    if not any(run.has_traffic for run in runs):
        return None
    panels = (
        ("copies_per_token", "copies sent per token"),
        ("cross_rank_copies_per_token", "cross-rank copies per token"),
        ("cross_rank_kib_per_token", "cross-rank KiB per token"),
    )
    fig = make_subplots(1, 3, subplot_titles=[title for _, title in panels], horizontal_spacing=0.07)
    for i, run in enumerate(runs):
        entries = [e for e in run.layers if "tokens" in e]
        for col, (key, _) in enumerate(panels, start=1):
            fig.add_trace(
                go.Bar(
                    x=[f"layer {e['layer']}" for e in entries],
                    y=[e[key] for e in entries],
                    name=esc(run.name),
                    legendgroup=str(i),
                    showlegend=col == 1,
                    marker_color=RUN_COLORS[i],
                    hovertemplate="%{x}: %{y:,.3f}<extra>" + esc(run.name) + "</extra>",
                ),
                1,
                col,
            )
    fig.update_layout(barmode="group")
    fig = style(fig, 400, "Per MoE layer: what the all-to-all sends per token")
    fig.update_layout(margin={"t": 100}, showlegend=len(runs) > 1, legend={"y": 1.14})
    return fig


def fig_step_times(runs: list[RunData]) -> go.Figure | None:
    """All-to-all milliseconds per training step (slowest rank, forward + backward, all layers), one line per run."""
    if not any(run.summary["steps"] for run in runs):
        return None
    fig = go.Figure()
    for i, run in enumerate(runs):
        steps = run.summary["steps"]
        fig.add_trace(
            go.Scatter(
                x=[s["step"] for s in steps],
                y=[s["all_to_all_ms"] for s in steps],
                mode="lines+markers",
                name=esc(run.name),
                line={"color": RUN_COLORS[i]},
                hovertemplate="step %{x}: %{y:.2f} ms<extra>" + esc(run.name) + "</extra>",
            )
        )
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="ms per step", rangemode="tozero")
    fig = style(fig, 380, "All-to-all time per step (slowest rank; forward + backward; all MoE layers)")
    fig.update_layout(margin={"t": 70}, showlegend=len(runs) > 1)
    return fig


# -------------------------------------------------------------------------------------------------------- tables


def headline_change(key: str, values: list, lower: bool | None, comparison: Comparison | None) -> str:
    """The change column of one headline row: held back where the runs are not like with like (every row for
    different models; the time rows for windows at different points of training)."""
    if comparison is not None and not comparison.same_model:
        return '<span class="na">not compared: different models</span>'
    if comparison is not None and not comparison.comparable and key in TIME_KEYS:
        return '<span class="na">not compared: windows differ (see the warning)</span>'
    return change(values[0], values[1], lower)


def table_headline(runs: list[RunData], comparison: Comparison | None = None) -> str:
    rows = []
    for key, label, lower, spec, divisor in HEADLINE:
        values = [run.summary["overall"].get(key) for run in runs]
        values = [None if v is None else v / divisor for v in values]
        row = [esc(label), *[fmt(v, spec) for v in values]]
        if len(runs) == 2:
            row.append(headline_change(key, values, lower, comparison))
        rows.append(row)
    header = ["mean over MoE layers", *[run.name for run in runs]] + (["change"] if len(runs) == 2 else [])
    return table(header, rows, "headline")


def placement_kind(run: RunData) -> str:
    """How the run placed its experts: contiguous blocks per rank, a plan, or no expert parallelism."""
    layouts = [run.expert_to_rank(i) for i in range(run.info["num_layers"])]
    if all(layout is None for layout in layouts):
        return "none (no expert parallelism)"
    contiguous = all(layout is None or layout == sorted(layout) for layout in layouts)
    copies = sum(len(r) for i in range(run.info["num_layers"]) for r in run.replicas(i))
    replicated = f", {copies} replicas" if copies else ""
    return ("contiguous" if contiguous else "planned") + replicated


def table_runs(runs: list[RunData]) -> str:
    keys = ("num_layers", "num_experts", "top_k", "ep_size", "world_size", "hidden_size", "dtype")
    rows = []
    for run in runs:
        mode = next((e["mode"] for e in run.layers if "mode" in e), "–")
        profiled = run.summary.get("profiled_steps", [])
        steps = [esc(describe_steps(profiled)), esc(describe_steps(run.window))]
        row = [esc(run.name), *[esc(run.info.get(k, "–")) for k in keys], *steps, esc(mode), esc(placement_kind(run))]
        rows.append([*row, esc(run.info.get("run", "–"))])
    header = ["run", "MoE layers", "experts", "top-k", "EP size", "ranks", "hidden", "dtype", "profiled", "window"]
    return table([*header, "dispatch", "placement", "path"], rows, "runs")


def table_per_layer(runs: list[RunData], comparison: Comparison | None = None) -> str:
    rows = []
    for index in range(num_layers(runs)):
        row = [str(index)]
        for key, _, spec in LAYER_COLUMNS:
            values = [run.layer(index).get(key) for run in runs]
            cell = " → ".join(fmt(v, spec) for v in values)
            if len(runs) == 2 and (comparison is None or comparison.same_model):
                cell += " " + change(*values)
            row.append(cell)
        rows.append(row)
    what = "" if len(runs) == 1 else f" ({runs[0].name} → {runs[1].name})"
    return table([f"layer{what}", *[label for _, label, _ in LAYER_COLUMNS]], rows, "layers")


def table_traffic(runs: list[RunData]) -> str:
    if not any(run.has_traffic for run in runs):
        return ""
    parts = []
    for index in range(num_layers(runs)):
        cells = []
        for run in runs:
            copies, kib = traffic_matrices(run, index, per="step")
            if copies is None:
                cells.append(f"<div><b>{esc(run.name)}</b>: no all-to-all in this layer</div>")
                continue
            rows = [[f"<b>{r}</b>", *[f"{c:,.1f}<br><small>{b / KIB:,.3f} MiB</small>" for c, b in zip(cr, br)]]
                    for r, (cr, br) in enumerate(zip(copies.tolist(), kib.tolist()))]  # fmt: skip
            header = ["from \\ to rank", *[str(r) for r in range(len(copies))]]
            cells.append(f"<div><b>{esc(run.name)}</b>{table(header, rows, 'matrix')}</div>")
        parts.append(f"<h4>layer {index}</h4><div class='side'>{''.join(cells)}</div>")
    return details("token copies (and MiB) per step from rank to rank, every layer (the window)", "".join(parts))


def table_load(runs: list[RunData]) -> str:
    parts = []
    for run in runs:
        experts = max((len(e.get("expert_load", [])) for e in run.layers), default=0)
        replicated = any(run.slots(index) for index in range(run.info["num_layers"]))
        rows = []
        for index in range(run.info["num_layers"]):
            load, ranks = run.expert_load(index), run.rank_load(index)
            cells = [fmt(v, "{:.4f}") for v in (load or [None] * experts)]
            rows.append([str(index), *cells, " / ".join(fmt(v, "{:.4f}") for v in ranks or [None])])
            slots, slot_load = run.slots(index), run.slot_load(index)
            if replicated:
                # physical slots in dispatch order, each named by its expert; a replica (not the home copy) "eN+"
                rows[-1].append(
                    " / ".join(
                        f"e{e}{'+' if copy else ''} {fmt(v, '{:.4f}')}" for (e, copy), v in zip(slots, slot_load)
                    )
                    if slots and slot_load
                    else "-"
                )
        header = ["layer", *[f"e{e}" for e in range(experts)], "per rank"]
        if replicated:
            header.append("per physical slot (eN+: a replica)")
        parts.append(f"<h4>{esc(run.name)}</h4>{table(header, rows, 'matrix')}")
    return details("routed slots per token, per expert (whole run) and per rank (window), every layer", "".join(parts))


def table_steps(runs: list[RunData]) -> str:
    """Row i: the i-th step of each run's window (the windows may be different steps of training)."""
    count = max(len(run.summary["steps"]) for run in runs)
    if not count:
        return ""
    rows = []
    for i in range(count):
        row = [str(i)]
        for run in runs:
            s = run.summary["steps"][i] if i < len(run.summary["steps"]) else None
            row += [fmt(s and s["step"]), fmt(s and s["all_to_all_ms"], "{:.2f}")]
        rows.append(row)
    header = ["# in window", *[cell for run in runs for cell in (f"{run.name} step", f"{run.name} ms per step")]]
    return details("all-to-all ms per step, the window", table(header, rows, "matrix"))


# ---------------------------------------------------------------------------------------------------------- page


def missing_notes(runs: list[RunData]) -> list[str]:
    notes = []
    for run in runs:
        if not run.has_traffic:
            notes.append(
                f"{run.name}: no all-to-all records (no expert parallelism, ep_size 1, or profile.comm off): "
                "no traffic, copies, bytes or all-to-all time"
            )
        if run.coactivation is None:
            notes.append(f"{run.name}: no routing traces (profile.traces off): no co-activation or expert load")
    if len(runs) == 2 and runs[0].info["num_layers"] != runs[1].info["num_layers"]:
        notes.append(
            f"the runs have different numbers of MoE layers ({runs[0].info['num_layers']} and "
            f"{runs[1].info['num_layers']}): layers are compared by index"
        )
    return notes


def figure_html(fig: go.Figure | None, div_id: str, missing: str) -> str:
    if fig is None:
        return f'<p class="missing">Not shown: {esc(missing)}.</p>'
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=PLOT_CONFIG)


def section(title: str, body: str, note: str = "") -> str:
    note_html = f'<p class="note">{note}</p>' if note else ""
    return f"<section><h2>{esc(title)}</h2>{note_html}{body}</section>"


def comparison_banner(runs: list[RunData], comparison: Comparison | None) -> str:
    """Loud when the two runs are not like with like; a quiet line naming the window when they are."""
    if comparison is None:
        return ""
    if comparison.comparable:
        window = describe_steps(comparison.windows[0])
        return (
            f'<p class="comparable">Compared like with like: the same model and ranks, {esc(window)} of both runs '
            f"({len(comparison.windows[0])} steps each).</p>"
        )
    reasons = "".join(f"<li>{esc(r)}</li>" for r in comparison.reasons)
    held_back = "no change is shown" if not comparison.same_model else "the all-to-all time is not shown as a change"
    return (
        '<div class="not-comparable" id="not-comparable"><b>NOT LIKE WITH LIKE: these numbers are not a measured '
        f"effect of the change between the runs.</b><ul>{reasons}</ul>Per-token numbers below are normalised, but "
        f"{held_back}: both values stand side by side. For a before/after, compare against a control: the same "
        "continuation from the same checkpoint, for the same steps, with only the placement (or the setting under "
        "test) changed.</div>"
    )


def build_dashboard(runs: list[RunData], comparison: Comparison | None = None) -> str:
    """``comparison``: how two runs compare (default: judged from their summaries as they are)."""
    if not 1 <= len(runs) <= 2:
        raise ValueError(f"dashboard takes one run, or two to compare; got {len(runs)}")
    if len(runs) == 2 and comparison is None:
        comparison = compare_summaries((runs[0].name, runs[1].name), (runs[0].summary, runs[1].summary))
    title = "c2r profile: " + (runs[0].name if len(runs) == 1 else f"{runs[0].name} vs {runs[1].name}")
    notes = "".join(f"<li>{esc(n)}</li>" for n in missing_notes(runs))
    no_traffic, no_traces = "no run recorded all-to-all traffic", "no run recorded routing traces"
    per_layer = figure_html(fig_per_layer(runs), "fig-per-layer", no_traffic) + table_per_layer(runs, comparison)
    body = [
        f"<h1>{esc(title)}</h1>",
        comparison_banner(runs, comparison),
        f'<p class="note">written {datetime.now():%Y-%m-%d %H:%M}; traffic and time over each run&rsquo;s window '
        "of steps (the runs table), per token or per step; co-activation and expert load from the online counters, "
        "over the whole run, per token; &ldquo;mean over MoE layers&rdquo; averages the layers that have the "
        "number.</p>",
        f'<ul class="missing">{notes}</ul>' if notes else "",
        section("Headline", table_headline(runs, comparison) + table_runs(runs)),
        section("Per layer", per_layer),
        section(
            "Rank-to-rank traffic", figure_html(fig_traffic(runs), "fig-traffic", no_traffic) + table_traffic(runs)
        ),  # fmt: skip
        section(
            "Node-to-node traffic",
            figure_html(fig_nodes(runs), "fig-nodes", "") + table_nodes(runs),
            "Ranks grouped into nodes (the run's gpus_per_node). Per-node dispatch sends each token once per remote "
            "node over the network, then forwards it within the node: compare the inter-node column across modes.",
        )
        if any(is_multi_node(run) for run in runs)
        else "",
        section(
            "Expert co-activation by placement",
            figure_html(fig_coactivation(runs), "fig-coactivation", no_traces),
            "Experts are ordered by the rank that holds them (red lines: rank boundaries). Bright blocks on the "
            "diagonal: experts that fire together live together; bright cells off the blocks cost cross-rank copies.",
        ),
        section("Load", figure_html(fig_load(runs), "fig-load", no_traces) + table_load(runs)),
        section("All-to-all time", figure_html(fig_step_times(runs), "fig-steps", no_traffic) + table_steps(runs)),
    ]
    return PAGE.format(title=esc(title), plotlyjs=get_plotlyjs(), css=CSS, body="\n".join(body))


def load_runs(
    paths: list[str], names: list[str] | None = None, window: int | None = None
) -> tuple[list[RunData], Comparison | None]:
    """One run (every profiled step), or two cut to equal windows (the last ``window`` steps of each; default the
    shorter run's profiled step count) with their :class:`~profiling.compare.Comparison`."""
    if names is not None and len(names) != len(paths):
        raise ValueError(f"{len(names)} names for {len(paths)} runs")
    if not 1 <= len(paths) <= 2:
        raise ValueError(f"dashboard takes one run, or two to compare; got {len(paths)}")
    labels = names or [Path(path).resolve().name for path in paths]
    if len(paths) == 2 and labels[0] == labels[1]:
        labels = [f"{labels[0]} (before)", f"{labels[1]} (after)"]
    if len(paths) == 1:
        return [load_run(paths[0], labels[0])], None
    windows = choose_windows(profiled_steps(paths[0]), profiled_steps(paths[1]), window)
    data = [load_run(path, label, steps or None) for path, label, steps in zip(paths, labels, windows)]
    return data, compare_summaries((labels[0], labels[1]), (data[0].summary, data[1].summary))


def write_dashboard(runs: list[str], out: str, names: list[str] | None = None, window: int | None = None) -> None:
    """Write the dashboard of one run directory, or of two (before, after) over equal windows, to ``out``."""
    data, comparison = load_runs(runs, names, window)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(build_dashboard(data, comparison), encoding="utf-8")


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1500px;
       padding: 16px 28px; color: #222; background: #fff; }
h1 { font-size: 22px; margin: 8px 0; } h2 { font-size: 18px; border-bottom: 2px solid #ddd; padding-bottom: 4px; }
h4 { margin: 10px 0 4px; }
section { margin: 22px 0 34px; }
table { border-collapse: collapse; margin: 10px 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 4px 9px; text-align: right; }
th { background: #f3f5f8; } td:first-child, th:first-child { text-align: left; }
table.headline { font-size: 15px; } table.headline td { padding: 6px 14px; }
table.matrix small { color: #777; } table.layers td, table.layers th { white-space: nowrap; }
.side { display: flex; gap: 32px; flex-wrap: wrap; }
.good { color: #1a7f37; font-weight: 600; } .bad { color: #cf222e; font-weight: 600; } .same, .na { color: #777; }
.note { color: #555; font-size: 13px; }
.not-comparable { color: #82071e; background: #ffebe9; border: 2px solid #cf222e; padding: 10px 16px;
                  border-radius: 6px; font-size: 15px; margin: 10px 0; }
.comparable { color: #1a7f37; font-size: 14px; }
.missing { color: #9a6700; background: #fff8c5; padding: 8px 12px 8px 28px; border-radius: 6px; }
p.missing { padding: 8px 12px; }
details { margin: 8px 0; overflow-x: auto; } summary { cursor: pointer; color: #0969da; }
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<script type="text/javascript">{plotlyjs}</script>
<style>{css}</style>
</head>
<body>
{body}
</body>
</html>
"""
