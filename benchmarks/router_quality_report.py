"""Report of the router quality study (see benchmarks/router_quality.py): copies per token from the evaluated routing,
the markdown table and the plot (plotly HTML, and a PNG screenshot of it from headless Chromium when available).

Shape legend: L MoE layers, T evaluated tokens, E experts, R ranks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from placement.inputs import routing_from_expert_ids
from placement.layout import ExpertLayout
from placement.methods import plan_layer
from placement.objective import layer_metrics

LABELS = {
    "topk": "top-k (k=4)",
    "c2r_T4": "C2R, T=4",
    "c2r_T8": "C2R, T=8",
    "group_M1": "group-limited, M=1 of 4",
    "group_M2": "group-limited, M=2 of 4",
    "adamoe": "AdaMoE (m=16, k=6)",
    "remoe": "ReMoE (target k=4)",
    "adak": "Ada-K (on the top-k model)",
    "topk_cont": "top-k, fine-tuned on",
    "adamoe_conv": "AdaMoE, converted (m=16, k=6)",
    "c2r_T4_ft": "C2R T=4, fine-tuned",
    "c2r_T8_ft": "C2R T=8, fine-tuned",
}


def expert_sets(masks_TE: np.ndarray) -> np.ndarray:
    """[T, E] bool -> [T, E] expert ids, -1 padded (the planner's trace form)."""
    ids = np.where(masks_TE, np.arange(masks_TE.shape[1]), -1)
    return -np.sort(-ids, axis=1)


def copies_per_token(masks_LTE: np.ndarray, num_ranks: int) -> dict[str, float]:
    """Mean over layers of copies per token on the second half of the tokens, contiguous vs planned (Mt-KaHyPar on
    the first half: the gain is measured on tokens the plan did not see)."""
    contiguous, planned, imbalance = [], [], []
    for masks_TE in masks_LTE:
        half = len(masks_TE) // 2
        plan_on = routing_from_expert_ids(expert_sets(masks_TE[:half]), masks_TE.shape[1])
        measure_on = routing_from_expert_ids(expert_sets(masks_TE[half:]), masks_TE.shape[1])
        base = ExpertLayout.contiguous(masks_TE.shape[1], num_ranks)
        contiguous.append(layer_metrics(measure_on, base)["copies_per_token"])
        planned_layout = ExpertLayout(plan_layer(plan_on, num_ranks, method="kahypar"), num_ranks)
        metrics = layer_metrics(measure_on, planned_layout)
        planned.append(metrics["copies_per_token"])
        imbalance.append(metrics["load_imbalance"])
    return {
        "copies_contiguous": float(np.mean(contiguous)),
        "copies_planned": float(np.mean(planned)),
        "load_imbalance_planned": float(np.mean(imbalance)),
    }


def load_results(out: Path, num_ranks: int) -> dict[str, dict[str, Any]]:
    evaluation = json.loads((out / "evaluation.json").read_text())
    for name, result in evaluation.items():
        with np.load(out / f"routing_{name}.npz") as data:
            E = int(data["num_experts"])
            masks = np.unpackbits(data["masks"], axis=-1, count=E).astype(bool)
        result.update(copies_per_token(masks, num_ranks))
    return evaluation


METRICS = ("val_loss", "active", "copies_contiguous", "copies_planned", "load_imbalance_planned")


def aggregate(per_seed: list[dict[str, dict[str, Any]]], baseline: str = "topk") -> dict[str, dict[str, Any]]:
    """Mean and standard deviation over seeds of each router's metrics, and of its difference to top-k in the same
    seed (the paired difference is what the claims are about: seeds move every router together)."""
    out = {}
    for name in per_seed[0]:
        runs = [seed[name] for seed in per_seed if name in seed]
        row: dict[str, Any] = {"seeds": len(runs)}
        for key in METRICS:
            values = np.array([r[key] for r in runs])
            row[key], row[f"{key}_std"] = float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0
        delta = np.array([seed[name]["val_loss"] - seed[baseline]["val_loss"] for seed in per_seed if name in seed])
        row["delta_loss"], row["delta_loss_std"] = (
            float(delta.mean()),
            float(delta.std(ddof=1)) if len(delta) > 1 else 0.0,
        )
        row["active_by_layer"] = np.mean([r["active_by_layer"] for r in runs], axis=0).round(2).tolist()
        out[name] = row
    return out


def markdown_table(results: dict[str, dict[str, Any]], num_ranks: int, baseline: str = "topk") -> str:
    base = results[baseline]
    rows = [
        "| router | val loss | vs top-k (paired) | active experts / token | expert FLOPs vs top-k | copies / token, "
        f"contiguous ({num_ranks} ranks) | copies / token, planned | active per layer |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in results.items():
        rows.append(
            f"| {LABELS.get(name, name)} | {r['val_loss']:.4f} ± {r['val_loss_std']:.4f} | "
            f"{r['delta_loss']:+.4f} ± {r['delta_loss_std']:.4f} | {r['active']:.2f} ± {r['active_std']:.2f} | "
            f"{100 * (r['active'] / base['active'] - 1):+.1f}% | {r['copies_contiguous']:.3f} | "
            f"{r['copies_planned']:.3f} | {' / '.join(f'{a:.2f}' for a in r['active_by_layer'])} |"
        )
    return "\n".join(rows)


def plot(results: dict[str, dict[str, Any]], html_path: Path, num_ranks: int) -> None:
    """Two panels sharing one legend (a color per router): loss vs active experts; loss vs copies per token, an open
    marker for the contiguous placement joined to a filled one for the planned placement."""
    import plotly.express as px
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=(
            "validation loss vs active experts per token (expert FLOPs)",
            f"validation loss vs all-to-all copies per token, {num_ranks} ranks (open: contiguous, filled: planned)",
        ),
        horizontal_spacing=0.07,
    )
    for index, (name, r) in enumerate(results.items()):
        color = px.colors.qualitative.D3[index % 10]
        label = LABELS.get(name, name)
        fig.add_trace(
            go.Scatter(
                x=[r["active"]],
                y=[r["val_loss"]],
                error_y={"array": [r["val_loss_std"]]},
                error_x={"array": [r["active_std"]]},
                mode="markers",
                marker={"size": 12, "color": color},
                name=label,
                legendgroup=name,
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=[r["copies_contiguous"], r["copies_planned"]],
                y=[r["val_loss"]] * 2,
                mode="lines+markers",
                marker={"size": 12, "color": color, "symbol": ["circle-open", "circle"]},
                line={"color": color, "width": 1, "dash": "dot"},
                name=label,
                legendgroup=name,
                showlegend=False,
            ),
            row=1,
            col=2,
        )
    fig.update_xaxes(title_text="active experts per token", row=1, col=1)
    fig.update_xaxes(title_text="copies per token (per-rank dispatch)", row=1, col=2)
    fig.update_yaxes(title_text="validation loss (nats per byte)", row=1, col=1)
    fig.update_layout(width=1500, height=650, template="plotly_white", font={"size": 14})
    fig.write_html(html_path, include_plotlyjs=True)


def screenshot(html_path: Path, png_path: Path) -> bool:
    """PNG of the plot through headless Chromium; False when no browser is available."""
    chromium = Path("/usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return False
    if not chromium.exists():
        return False
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"], headless=True)
        page = browser.new_page(viewport={"width": 1500, "height": 650})
        page.goto(html_path.resolve().as_uri())
        page.wait_for_selector(".main-svg")
        page.screenshot(path=str(png_path))
        browser.close()
    return True


def write_report(
    outs: list[Path], num_ranks: int, results_md: Path, baseline: str = "topk", plot_name: str = "router_quality"
) -> dict[str, dict[str, Any]]:
    """Aggregate the study directories ``outs`` (one per seed); write results.json, the plot and the table next to
    the first; return the aggregated rows."""
    per_seed = [load_results(out, num_ranks) for out in outs]
    results = aggregate(per_seed, baseline)
    base = outs[0].parent if len(outs) > 1 else outs[0]
    (base / f"{plot_name}.json").write_text(json.dumps({"seeds": per_seed, "mean": results}, indent=2))
    html = base / f"{plot_name}.html"
    plot(results, html, num_ranks)
    png = results_md.parent / "img" / f"{plot_name}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    shot = screenshot(html, png)
    table = markdown_table(results, num_ranks, baseline)
    print(table)
    print(f"plot: {html}" + (f", {png}" if shot else " (no PNG: headless Chromium not available)"))
    (base / f"{plot_name}_table.md").write_text(table + "\n")
    return results
