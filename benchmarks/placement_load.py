"""Copies per token vs rank load under the planner's load cap (`c2r-place plan --max-load`), held out.

Two traces, both recorded by our profiler:
1. synthetic: clustered routing with skewed expert popularity (placement/synthetic.py), 64 experts, top-8, 8 layers,
   10 steps x 4000 tokens per layer, recorded with profiling.trace.RoutingTraceRecorder;
2. hf-olmoe: a tiny *randomly initialised* OLMoE (transformers OlmoeConfig, 64 experts, top-8, 4 layers, hidden
   128; no download, so its router is untrained) run on random token ids through profiling.hf_hooks.trace_hf_model,
   10 batches of 8 x 256 tokens;
3. hf-olmoe trained: the same shape trained by `c2r-train --hf-model` for 400 steps on the demo corpus, its routing
   recorded on validation text (benchmarks/placement_trained_olmoe.py; the trained model is cached under --dir).

For each trace and ranks in (8, 16): plan on the first 80% of steps (``--holdout 0.2``) without a cap and with the
caps 1.5, 1.25, 1.05 (the uncapped partition repaired under each cap, as ``--pareto`` prints them) and 1.10 (the
plan `c2r-place plan --max-load 1.10` writes: Mt-KaHyPar under the cap where it can; again with
``--no-per-step-cap``, the "pooled only" row), judge each on the held-out 20%: copies per token and rank load
max/mean per layer, pooled over the held-out steps and per step (each step's busiest rank: what a step waits
for). Prints a markdown table and writes docs/img/placement_load.svg (copies vs load).

Run from the repository root (CPU, a few minutes):
    python benchmarks/placement_load.py [--dir /tmp/c2r_placement_load]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from placement.inputs import load_trace_input  # noqa: E402
from placement.kahypar_context import DEFAULT_PRESET, KAHYPAR_PRESETS  # noqa: E402
from placement.loadcap import needs_replication  # noqa: E402
from placement.methods import cap_layouts, plan_placement  # noqa: E402
from placement.objective import layer_metrics  # noqa: E402
from placement.pool import usable_cpus  # noqa: E402
from placement.replicate import replicate_layouts  # noqa: E402
from profiling.cli_errors import positive  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from placement_trained_olmoe import trained_olmoe_traces  # noqa: E402

CAPS = (None, 1.5, 1.25, 1.1, 1.05)
PLAN_CAP = 1.1
MAX_TOKENS = 20000  # c2r-place plan's default planning sample
REPLICA_CAP = 1.05  # judged held out
# planned with `--max-load 1.02`: a margin for the held-out drift of expert loads (planned at 1.05, the synthetic
# trace's layers land at 1.05-1.08 held out)
REPLICA_PLAN_CAP = 1.02
JOBS = usable_cpus()  # layers in parallel (the same plans as one process)
DOC_PLOT = REPO / "docs" / "img" / "placement_load.svg"
TRACES = {"synthetic": "synthetic", "hf-olmoe": "olmoe", "hf-olmoe trained": "olmoe_trained"}  # name: folder
REPLICA_EXTRA_PER_RANK = (2, 4, 8)  # P = E + ranks x this, smallest first, until every layer holds 1.05 held out


def synthetic_traces(out: Path) -> None:
    import torch

    from placement.synthetic import synthetic_expert_ids
    from profiling.trace import RoutingTraceRecorder, TraceConfig

    layers, experts, top_k = 8, 64, 8
    recorder = RoutingTraceRecorder(
        out, num_layers=layers, num_experts=experts, top_k=top_k, source="benchmarks/placement_load.py",
        config=TraceConfig(shard_rows=1 << 16),
    )  # fmt: skip
    for step in range(10):
        recorder.step = step
        for layer in range(layers):
            ids = synthetic_expert_ids(
                4000, experts, top_k, num_clusters=8, zipf=0.6, cluster_bonus=2.0, seed=100 * layer + step,
                structure_seed=layer,
            )  # fmt: skip
            recorder.record(layer, torch.from_numpy(ids.astype(np.int64)))
    recorder.close()


def olmoe_traces(out: Path, num_batches: int = 10) -> None:
    import torch
    import transformers

    from profiling.hf_hooks import trace_hf_model
    from profiling.trace import TraceConfig

    torch.manual_seed(0)
    config = transformers.OlmoeConfig(
        num_hidden_layers=4, num_experts=64, num_experts_per_tok=8, hidden_size=128, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, norm_topk_prob=False,
    )  # fmt: skip
    model = transformers.OlmoeForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 1000, (8, 256), generator=gen) for _ in range(num_batches)]
    trace_hf_model(model, out, batches, TraceConfig(shard_rows=1 << 16), source="tiny random OLMoE")


def sweep(trace_dir: Path, ranks: int, preset: str = DEFAULT_PRESET) -> list[dict]:
    """One row per cap: mean copies, per-layer loads, layers meeting the cap / layers where it is possible."""
    inp = load_trace_input(trace_dir, holdout=0.2, progress=False)
    base = plan_placement(inp.plan_routings, ranks, max_tokens=MAX_TOKENS, progress=False, jobs=JOBS, preset=preset)
    rows = []
    for cap, per_step in [(c, True) for c in CAPS] + [(PLAN_CAP, False)]:
        if cap is None:
            layouts = base
        elif cap == PLAN_CAP:  # what `c2r-place plan --max-load 1.10` writes (Mt-KaHyPar under the cap where it can)
            layouts = plan_placement(
                inp.plan_routings,
                ranks,
                max_tokens=MAX_TOKENS,
                progress=False,
                max_load=cap,
                per_step=per_step,
                preset=preset,
                jobs=JOBS,
            )
        else:  # what `--pareto` prints: the one uncapped partition, repaired and descended under each cap
            layouts = cap_layouts(inp.plan_routings, base, cap, max_tokens=MAX_TOKENS, jobs=JOBS)
        layers = [layer_metrics(r, lay) for r, lay in zip(inp.eval_routings, layouts)]
        loads = np.array([m["load_imbalance"] for m in layers])
        step_loads = np.array([m.get("step_load_imbalance", np.nan) for m in layers])  # each step's busiest rank
        possible = (
            np.ones(len(layers), bool)
            if cap is None
            else ~np.array([needs_replication(r.expert_load_E, ranks, cap) for r in inp.plan_routings])
        )
        rows.append(
            {
                "cap": cap,
                "per_step": per_step,
                "copies": float(np.mean([m["copies_per_token"] for m in layers])),
                "load_mean": float(loads.mean()),
                "load_max": float(loads.max()),
                "step_load_mean": float(step_loads.mean()),
                "step_load_max": float(step_loads.max()),
                "met": int(((loads <= (cap or np.inf) + 1e-9) & possible).sum()),
                "possible": int(possible.sum()),
                "max_where_possible": float(loads[possible].max()) if possible.any() else float("nan"),
                "contiguous": float(
                    np.mean(
                        [
                            layer_metrics(r, base[0].contiguous(r.num_experts, ranks))["copies_per_token"]
                            for r in inp.eval_routings
                        ]
                    )
                ),
            }
        )
    return rows


def replica_sweep(
    trace_dir: Path, ranks: int, preset: str = DEFAULT_PRESET, extras: tuple[int, ...] = REPLICA_EXTRA_PER_RANK
) -> list[dict]:
    """What `c2r-place plan --max-load 1.02 --replicas P` writes, for growing P, judged held out against 1.05; stops
    at the first P where every layer is at or under 1.05."""
    inp = load_trace_input(trace_dir, holdout=0.2, progress=False)
    homes = plan_placement(
        inp.plan_routings, ranks, max_tokens=MAX_TOKENS, progress=False, max_load=REPLICA_PLAN_CAP, preset=preset
    )
    rows = []
    for extra in extras:
        num_slots = homes[0].num_experts + ranks * extra
        layouts = replicate_layouts(inp.plan_routings, homes, num_slots, REPLICA_PLAN_CAP, MAX_TOKENS, jobs=JOBS)
        layers = [layer_metrics(r, lay) for r, lay in zip(inp.eval_routings, layouts)]
        loads = np.array([m["load_imbalance"] for m in layers])
        planned = [layer_metrics(r, lay)["load_imbalance"] for r, lay in zip(inp.plan_routings, layouts)]
        rows.append(
            {
                "cap": REPLICA_CAP,
                "replicas": num_slots,
                "copies": float(np.mean([m["copies_per_token"] for m in layers])),
                "load_mean": float(loads.mean()),
                "load_max": float(loads.max()),
                "planned_max": float(max(planned)),
                "met": int((loads <= REPLICA_CAP + 1e-9).sum()),
                "possible": len(layers),
                "max_where_possible": float(loads.max()),
            }
        )
        if rows[-1]["met"] == len(layers):
            break
    return rows


def svg(results: dict[str, list[dict]], path: Path) -> None:
    """A small scatter plot, copies/token (y) vs mean held-out load max/mean (x), one polyline per case."""
    w, h, pad = 640, 400, 60
    pts = [(r["load_mean"], r["copies"]) for rows in results.values() for r in rows]
    x0, x1 = 1.0, max(p[0] for p in pts) * 1.05
    y0, y1 = min(p[1] for p in pts) * 0.95, max(p[1] for p in pts) * 1.05

    def xy(x: float, y: float) -> tuple[float, float]:
        return pad + (x - x0) / (x1 - x0) * (w - 2 * pad), h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)

    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">']
    out.append(f'<rect width="{w}" height="{h}" fill="white"/>')
    out.append(f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>')
    out.append(f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>')
    for i in range(6):
        x = x0 + i * (x1 - x0) / 5
        y = y0 + i * (y1 - y0) / 5
        px, _ = xy(x, y0)
        _, py = xy(x0, y)
        out.append(f'<text x="{px:.0f}" y="{h - pad + 15}" text-anchor="middle">{x:.2f}</text>')
        out.append(f'<text x="{pad - 5}" y="{py + 4:.0f}" text-anchor="end">{y:.2f}</text>')
    out.append(
        f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle">rank load max/mean (held out, mean over layers)</text>'
    )
    out.append(
        f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" text-anchor="middle">copies per token</text>'
    )
    for i, (name, rows) in enumerate(results.items()):
        rows = [r for r in rows if r.get("per_step", True)]  # the curve: the default plans ("pooled only" is a row)
        color = colors[i % len(colors)]  # a case and its replica rows share a colour (6 cases, then 6 replica lines)
        dash = ' stroke-dasharray="4 3"' if "replicas" in name else ""
        coords = [xy(r["load_mean"], r["copies"]) for r in rows]
        out.append(
            f'<polyline fill="none" stroke="{color}"{dash} points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in coords)}"/>'
        )
        for r, (a, b) in zip(rows, coords):
            label = "none" if r["cap"] is None else f"{r['cap']:g}"
            label += f" P={r['replicas']}" if r.get("replicas") else ""
            out.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"/>')
            out.append(f'<text x="{a + 4:.1f}" y="{b - 4:.1f}" fill="{color}">{label}</text>')
        out.append(f'<text x="{w - pad - 190}" y="{pad + 15 * i}" fill="{color}">{name}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("/tmp/c2r_placement_load"))
    p.add_argument(
        "--plot",
        type=Path,
        help=f"the copies-vs-load plot (default {DOC_PLOT.relative_to(REPO)}, the documented one: only with the "
        "default preset and every trace; otherwise no plot unless named)",
    )
    p.add_argument("--replicas-only", action="store_true", help="only the replica rows (no cap sweep, no plot)")
    p.add_argument(
        "--extra-slots",
        type=positive(int),
        nargs="+",
        default=list(REPLICA_EXTRA_PER_RANK),
        metavar="N",
        help="replica slots per rank to try, smallest first, until every layer holds 1.05 held out (P = E + ranks x N; "
        f"default {' '.join(map(str, REPLICA_EXTRA_PER_RANK))})",
    )
    p.add_argument("--traces", nargs="+", choices=TRACES, default=list(TRACES), help="the traces to run (default all)")
    p.add_argument(
        "--olmoe-batches",
        type=int,
        default=10,
        help="hf-olmoe batches of 8 x 256 tokens (default 10: 4096 held-out tokens per layer; 40: 16384)",
    )
    p.add_argument("--train-steps", type=int, default=400, help="training steps of the trained OLMoE (default 400)")
    p.add_argument(
        "--trained-batches",
        type=int,
        default=10,
        help="batches of 32 x 128 tokens recorded from the trained OLMoE (default 10: 8192 held-out tokens per layer)",
    )
    p.add_argument(
        "--preset", choices=KAHYPAR_PRESETS, default=DEFAULT_PRESET, help="Mt-KaHyPar preset (c2r-place plan --preset)"
    )
    args = p.parse_args()
    traces = {name: args.dir / folder for name, folder in TRACES.items() if name in args.traces}
    for trace_dir in traces.values():  # the traces are redone; the trained model is kept (args.dir / "trained_model")
        shutil.rmtree(trace_dir, ignore_errors=True)
    record = {
        "synthetic": synthetic_traces,
        "hf-olmoe": lambda out: olmoe_traces(out, args.olmoe_batches),
        "hf-olmoe trained": lambda out: trained_olmoe_traces(
            out, args.dir / "trained_model", args.train_steps, args.trained_batches
        ),
    }
    for name, trace_dir in traces.items():
        record[name](trace_dir)
    results = {}
    print("| trace | ranks | max-load | copies/token (held out) | vs uncapped | load max/mean, mean / worst layer | "
          "per step: busiest rank / mean, mean / worst layer | layers <= cap / where possible without replicas | "
          "worst layer where possible |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, trace_dir in traces.items():
        for ranks in () if args.replicas_only else (8, 16):
            rows = sweep(trace_dir, ranks, args.preset)
            results[f"{name}, {ranks} ranks"] = rows
            for r in rows:
                cap = "none" if r["cap"] is None else f"{r['cap']:.2f}" + ("" if r["per_step"] else " pooled only")
                change = f"{100 * (r['copies'] / rows[0]['copies'] - 1):+.1f}%"
                met = "-" if r["cap"] is None else f"{r['met']} / {r['possible']}"
                worst = "-" if r["cap"] is None else f"{r['max_where_possible']:.3f}"
                print(
                    f"| {name} | {ranks} | {cap} | {r['copies']:.3f} (contiguous {r['contiguous']:.3f}) | {change} | "
                    f"{r['load_mean']:.3f} / {r['load_max']:.3f} | "
                    f"{r['step_load_mean']:.3f} / {r['step_load_max']:.3f} | {met} | {worst} |"
                )
    print(f"\nWith replicas (`--max-load {REPLICA_PLAN_CAP} --replicas P`, judged against {REPLICA_CAP} held out):\n")
    print("| trace | ranks | P (slots) | copies/token (held out) | vs uncapped | load max/mean, mean / worst layer | "
          "worst layer, planning tokens | layers <= 1.05 held out |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, trace_dir in traces.items():
        for ranks in (8, 16):
            rows = replica_sweep(trace_dir, ranks, args.preset, tuple(sorted(set(args.extra_slots))))
            uncapped = results.get(f"{name}, {ranks} ranks", [{}])[0].get("copies")
            results[f"{name}, {ranks} ranks, replicas"] = rows
            for r in rows:
                change = f"{100 * (r['copies'] / uncapped - 1):+.1f}%" if uncapped else "-"
                print(
                    f"| {name} | {ranks} | {r['replicas']} | {r['copies']:.3f} | "
                    f"{change} | {r['load_mean']:.3f} / {r['load_max']:.3f} | "
                    f"{r['planned_max']:.3f} | {r['met']} / {r['possible']} |"
                )
    if args.replicas_only:
        return
    documented = args.preset == DEFAULT_PRESET and list(traces) == list(TRACES)
    plot = args.plot or (DOC_PLOT if documented else None)
    if plot is not None:
        svg(results, plot)
        print(f"\nwrote {plot}")


if __name__ == "__main__":
    main()
