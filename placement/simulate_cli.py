"""``c2r-place simulate``: PREDICTED all-to-all and step time per MoE layer on a cluster of N nodes x G GPUs, for
per-expert, per-rank and per-node dispatch under the contiguous, planned and load-capped placements
(placement/simulate.py has the model).

c2r-place simulate --traces runs/before --nodes 2 --gpus-per-node 4
c2r-place simulate --synthetic deepseek-v3 --layers 4 --nodes 8 --gpus-per-node 8 --json sim.json
c2r-place simulate --traces runs/before --nodes 1 --gpus-per-node 2 --calibrate calibration.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from placement.copy_choice import COPY_CHOICES
from placement.cost import CostModel, fit_latency_bandwidth
from placement.errors import PlacementError
from placement.inputs import (
    ELEMENT_DTYPES,
    LayerRouting,
    find_trace_dir,
    holdout_cutoff,
    recorded_activation,
    routing_from_expert_ids,
    steps_for_loads,
)
from placement.layout import ExpertLayout
from placement.methods import METHODS, plan_placement
from placement.objective import DTYPE_BYTES
from placement.plan import check_output_path, dumps, write_text_atomic
from placement.replicate import parse_num_slots, replicate_layouts
from placement.simulate import Cluster, predict_layer, totals, with_overrides
from placement.synthetic import synthetic_expert_ids
from profiling.cli_errors import positive

# DeepSeek-V3's routed experts (the shared expert and group-limited routing are not modelled): 58 MoE layers,
# 256 experts, top-8, hidden 7168, expert FFN 2048, SwiGLU (3 matrices), bf16; routing from placement/synthetic.py
# with the structure benchmarks/placement_scale.py uses (32 clusters, Zipf 0.3, bonus 3).
SYNTHETIC = {
    "deepseek-v3": {
        "layers": 58,
        "experts": 256,
        "top_k": 8,
        "hidden": 7168,
        "ffn": 2048,
        "matrices": 3,
        "dtype": "bf16",
        "clusters": 32,
        "zipf": 0.3,
        "bonus": 3.0,
    }
}
CLUSTER_DEFAULTS = CostModel()  # an H100/H200 cluster: the cost model's defaults (placement/cost.py)
PLANS = ("contiguous", "planned", "capped")
MIN_SYNTHETIC_TOKENS = 16384  # per layer: a small cluster still gets enough tokens for a stable busiest rank


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0; got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0; got {text!r}")
    return value


def load_calibration(path: str | Path, base: CostModel) -> CostModel:
    """A calibration JSON (benchmarks/simulate_check.py writes one: intra/inter GB/s, latency, expert TFLOP/s),
    or a profiled run directory (its all-to-all records give the bandwidth; `placement.cost.calibrate`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--calibrate {path} does not exist")
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise PlacementError(f"--calibrate {path} is not a calibration JSON file: {error}") from None
        keys = ("intra_node_gb_s", "inter_node_gb_s", "latency_us", "expert_tflop_s")
        found = {k: doc[k] for k in keys if isinstance(doc, dict) and k in doc}
        bad = {k: v for k, v in found.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
        if bad:
            raise PlacementError(f"--calibrate {path}: these must be numbers: {bad}")
        if not found:
            raise PlacementError(f"--calibrate {path} holds none of {', '.join(keys)}")
        return with_overrides(base, **found, source=f"calibrated on {path} ({doc.get('source', 'no source')})")
    from profiling.reader import read_comm_records

    comm_dir = next(d for d in (path / "profile" / "comm", path / "comm", path) if d.is_dir())
    try:
        latency_us, gb_s = fit_latency_bandwidth(read_comm_records(comm_dir))
    except PlacementError as error:
        raise PlacementError(f"--calibrate {comm_dir}: {error}") from None
    source = f"latency and bandwidth fitted on {comm_dir}, one rate for both links; expert rate not recorded there"
    return with_overrides(base, intra_node_gb_s=gb_s, inter_node_gb_s=gb_s, latency_us=latency_us, source=source)


def _synthetic_ids(
    args: argparse.Namespace, cluster: Cluster
) -> tuple[list[np.ndarray], list[LayerRouting], int, dict]:
    """(tokens to simulate, the routing to plan on: another draw of the same structure, experts, input record)."""
    shape = SYNTHETIC[args.synthetic]
    layers = args.layers or shape["layers"]
    tokens = max(cluster.num_ranks * args.synthetic_tokens, MIN_SYNTHETIC_TOKENS)

    def draw(layer: int, seed: int) -> np.ndarray:
        return synthetic_expert_ids(
            tokens,
            shape["experts"],
            shape["top_k"],
            num_clusters=shape["clusters"],
            zipf=shape["zipf"],
            cluster_bonus=shape["bonus"],
            seed=seed,
            structure_seed=layer,
        )

    progress = tqdm(range(layers), desc="synthetic routing", unit="layer", disable=not _progress(args))
    pairs = [(draw(layer, 1000 * layer + args.seed), draw(layer, 1000 * layer + args.seed + 500)) for layer in progress]
    info = {"kind": "synthetic", "name": args.synthetic, "tokens_per_layer": tokens, "planned_on": "another draw"}
    plan_routings = [routing_from_expert_ids(p[1], shape["experts"]) for p in pairs]
    return [p[0] for p in pairs], plan_routings, shape["experts"], {**info, **shape}


def _trace_ids(args: argparse.Namespace) -> tuple[list[np.ndarray], list[LayerRouting], int, dict]:
    """(tokens to simulate, the routing to plan on, experts, input record); with --holdout the plans are made on the
    earlier steps and judged on the later ones, else both on every token."""
    from profiling.reader import read_traces

    trace_dir = find_trace_dir(args.traces)
    traces = read_traces(trace_dir, progress=_progress(args))
    empty = np.zeros((0, int(traces.header["top_k"])), dtype=np.int16)
    layers = range(min(args.layers or traces.num_layers, traces.num_layers))
    ids = [traces.expert_ids.get(layer, empty) for layer in layers]
    info: dict[str, Any] = {"kind": "traces", "path": str(trace_dir), "planned_on": "the same tokens"}
    steps = [traces.steps.get(layer, np.zeros(0, np.int32)) for layer in layers]
    plan_ids, plan_steps = ids, steps
    if args.holdout:
        cutoff = holdout_cutoff(steps, args.holdout)
        plan_ids = [x[s < cutoff] for x, s in zip(ids, steps)]
        plan_steps = [s[s < cutoff] for s in steps]
        ids = [x[s >= cutoff] for x, s in zip(ids, steps)]
        info["planned_on"] = f"steps < {cutoff}; simulated on steps >= {cutoff}"
    # the planning steps: the capped plans hold the cap on each step's load too, as `c2r-place plan` does
    plan_steps = steps_for_loads(traces.header, plan_steps, info)
    plan_routings = [routing_from_expert_ids(x, traces.num_experts, s) for x, s in zip(plan_ids, plan_steps)]
    info["tokens"] = int(sum(map(len, ids)))
    return ids, plan_routings, traces.num_experts, info


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _cost_model(args: argparse.Namespace, info: dict[str, Any]) -> CostModel:
    """Defaults < the synthetic shape or the traced model's hidden / dtype < --calibrate < explicit flags."""
    model, dtype, hidden = CLUSTER_DEFAULTS, None, None
    if info["kind"] == "synthetic":
        hidden, dtype = info["hidden"], info["dtype"]
        model = with_overrides(model, ffn=info["ffn"], matrices=info["matrices"])
    else:
        hidden, dtype, _ = recorded_activation(args.traces)
    if args.calibrate:
        model = load_calibration(args.calibrate, model)
    dtype = args.dtype or (dtype if dtype in DTYPE_BYTES else None)
    hidden = args.hidden or hidden
    ffn = args.ffn or (None if info["kind"] == "synthetic" or not hidden else round(3.5 * hidden))
    return with_overrides(
        model,
        hidden=hidden,
        ffn=ffn,
        matrices=args.matrices,
        bytes_per_element=DTYPE_BYTES[dtype] if dtype else None,
        tokens_per_rank=args.tokens_per_gpu,
        intra_node_gb_s=args.intra_gb_s,
        inter_node_gb_s=args.inter_gb_s,
        latency_us=args.latency_us,
        expert_tflop_s=args.expert_tflop_s,
    )


def _layouts(args, routings: list[LayerRouting], num_experts: int, cluster: Cluster) -> dict[str, list[ExpertLayout]]:
    R, N = cluster.num_ranks, cluster.num_nodes
    planner = dict(method=args.method, seed=args.seed, max_tokens=args.max_tokens or None, progress=_progress(args))
    out = {"contiguous": [ExpertLayout.contiguous(num_experts, R)] * len(routings)}
    if "planned" in args.plans:
        out["planned"] = plan_placement(routings, R, N, **planner)
    if "capped" in args.plans or args.replicas is not None:
        out["capped"] = plan_placement(routings, R, N, max_load=args.max_load, **planner)
    if args.replicas is not None:  # the capped homes plus replicas (placement/replicate.py), as `plan --replicas`
        num_slots = parse_num_slots(args.replicas, num_experts, R)
        target = 1.0 if args.max_load is None else args.max_load
        out["replicated"] = replicate_layouts(
            routings, out["capped"], num_slots, target, args.max_tokens or None, args.seed, _progress(args)
        )
        if "capped" not in args.plans:
            del out["capped"]
    return out


def _header(model: CostModel, cluster: Cluster, info: dict[str, Any]) -> str:
    dtype = ELEMENT_DTYPES.get(model.bytes_per_element, f"{model.bytes_per_element} B per element")
    return (
        f"PREDICTED by a cost model, not measured: {cluster.num_nodes} node(s) x {cluster.gpus_per_node} GPU(s) = "
        f"{cluster.num_ranks} ranks; {model.intra_node_gb_s:g} GB/s intra-node, {model.inter_node_gb_s:g} GB/s "
        f"inter-node per GPU, {model.latency_us:g} us per peer per exchange, {model.expert_tflop_s:g} TFLOP/s "
        f"experts ({model.source}); {model.tokens_per_rank} tokens/GPU, hidden {model.hidden}, ffn {model.ffn}, "
        f"{model.matrices} matrices, {dtype}; input: {info['kind']} "
        f"{info.get('name') or info.get('path')}, plans made on {info['planned_on']}"
    )


def format_simulation(layers: list[dict], model: CostModel, cluster: Cluster, info: dict[str, Any]) -> str:
    lines = [
        _header(model, cluster, info),
        "copies/tok: rows each token's dispatch makes (per-node: both stages; own rank included); inter-node: of "
        "them over the network; intra-node: to other ranks of the same node. a2a: every exchange, forward and backward",
        "layer  plan        mode        a2a ms  step ms  copies/tok  inter-node/tok  intra-node/tok",
    ]
    for i, layer in enumerate(layers):
        for plan, modes in layer.items():
            for mode, m in modes.items():
                if not m.get("tokens"):
                    continue
                lines.append(
                    f"{i:5d}  {plan:10s}  {mode:10s}  {m['all_to_all_ms']:6.3f}  {m['step_ms']:7.3f}  "
                    f"{m['copies_per_token']:10.3f}  {m['inter_node_copies_per_token']:14.3f}  "
                    f"{m['intra_node_copies_per_token']:14.3f}"
                )
    total = totals(layers)
    base = total["contiguous"]["per-expert"]
    lines.append(f"PREDICTED, all {len(layers)} MoE layers summed (x: speed-up over per-expert contiguous):")
    lines.append("plan        mode        a2a ms       x   step ms       x")
    for plan, modes in total.items():
        for mode, t in modes.items():
            a2a_x = base["all_to_all_ms"] / t["all_to_all_ms"] if t["all_to_all_ms"] else float("nan")
            step_x = base["step_ms"] / t["step_ms"] if t["step_ms"] else float("nan")
            lines.append(
                f"{plan:10s}  {mode:10s}  {t['all_to_all_ms']:8.2f}  {a2a_x:5.2f}x  {t['step_ms']:8.2f}  {step_x:5.2f}x"
            )
    return "\n".join(lines)


def cmd_simulate(args: argparse.Namespace) -> int:
    if args.json:
        check_output_path(args.json)
    cluster = Cluster(args.nodes, args.gpus_per_node)
    ids, plan_routings, num_experts, info = _synthetic_ids(args, cluster) if args.synthetic else _trace_ids(args)
    cluster.check_experts(num_experts)
    model = _cost_model(args, info)
    layouts = _layouts(args, plan_routings, num_experts, cluster)
    layers = []
    for i, x in enumerate(tqdm(ids, desc="simulating", unit="layer", disable=not _progress(args))):
        layers.append(
            {plan: predict_layer(x, lay[i], cluster, model, args.copy_choice) for plan, lay in layouts.items()}
        )
    print(format_simulation(layers, model, cluster, info))
    if args.json:
        doc = {
            "predicted": True,
            "cluster": {"nodes": cluster.num_nodes, "gpus_per_node": cluster.gpus_per_node},
            "cost_model": {**vars(model)},
            "input": info,
            "options": {
                "method": args.method,
                "max_load": args.max_load,
                "seed": args.seed,
                "copy_choice": args.copy_choice,
            },
            "layers": layers,
            "totals": totals(layers),
            "expert_to_rank": {plan: [lay.to_json() for lay in lays] for plan, lays in layouts.items()},
        }
        write_text_atomic(args.json, dumps(doc) + "\n")
        print(f"wrote {args.json}")
    return 0


def add_simulate_command(sub: argparse._SubParsersAction) -> None:
    from placement.loadcap import DEFAULT_MAX_LOAD, max_load_arg

    d = CLUSTER_DEFAULTS
    p = sub.add_parser(
        "simulate",
        help="PREDICT per-layer all-to-all and step time on N nodes x G GPUs for each dispatch mode and plan",
        description=__doc__.split("\n\n")[0]
        + " Copies are counted exactly from the traces; times come from a first-order model (bandwidth, latency, "
        "expert rate).",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--traces", metavar="DIR", help="routing traces: trace, profile or run directory")
    source.add_argument("--synthetic", choices=sorted(SYNTHETIC), help="a synthetic routing of a published shape")
    p.add_argument("--nodes", type=int, required=True, help="nodes N")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (ranks) per node G")
    p.add_argument(
        "--intra-gb-s", type=positive(float), help=f"intra-node GB/s per GPU (default {d.intra_node_gb_s:g})"
    )
    p.add_argument(
        "--inter-gb-s", type=positive(float), help=f"inter-node GB/s per GPU (default {d.inter_node_gb_s:g}: 400 Gb/s)"
    )
    p.add_argument("--latency-us", type=_non_negative, help=f"us per peer per exchange (default {d.latency_us:g})")
    p.add_argument("--expert-tflop-s", type=positive(float), help=f"expert GEMM rate (default {d.expert_tflop_s:g})")
    p.add_argument(
        "--calibrate",
        metavar="PATH",
        help="a calibration JSON (benchmarks/simulate_check.py: bandwidth, latency, expert rate) or a profiled run "
        "directory (bandwidth from its all-to-all records); explicit flags still win",
    )
    p.add_argument(
        "--tokens-per-gpu", type=positive(int), help=f"tokens per GPU per step (default {d.tokens_per_rank})"
    )
    p.add_argument("--hidden", type=positive(int), help="hidden size D (default: traced, else 4096)")
    p.add_argument("--ffn", type=positive(int), help="expert FFN width F (default 3.5 x hidden)")
    p.add_argument("--matrices", type=positive(int), help="expert weight matrices: 3 SwiGLU, 2 GELU (default 3)")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), help="activation dtype (default: traced, else bf16)")
    p.add_argument("--layers", type=positive(int), help="only the first LAYERS MoE layers")
    p.add_argument(
        "--synthetic-tokens",
        type=positive(int),
        default=256,
        help=f"--synthetic: tokens per rank drawn per layer (default 256; at least {MIN_SYNTHETIC_TOKENS} per layer)",
    )
    p.add_argument(
        "--holdout",
        type=float,
        metavar="FRACTION",
        help="--traces: plan on the earlier steps, simulate the latest FRACTION (default: both on every token)",
    )
    p.add_argument("--plans", nargs="+", choices=PLANS, default=list(PLANS), help="placements (default all)")
    p.add_argument(
        "--replicas",
        metavar="P",
        help="also the load-capped plan with replicated experts: P slots, +N extra or 2E (as `plan --replicas`)",
    )
    p.add_argument(
        "--copy-choice",
        choices=COPY_CHOICES,
        default="rule",
        help="how replicated experts' copies are chosen, as c2r-train's --copy-choice (default rule)",
    )
    p.add_argument("--method", choices=list(METHODS), default="kahypar", help="planner method (default kahypar)")
    p.add_argument(
        "--max-load",
        type=max_load_arg,
        default=DEFAULT_MAX_LOAD,
        metavar="CAP",
        help=f"the load-capped plan's cap on rank load max/mean (default {DEFAULT_MAX_LOAD})",
    )
    p.add_argument(
        "--max-tokens",
        type=positive(int, allow_zero=True),
        default=20000,
        help="planning sample per layer (default 20000; 0: all)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the planner and the synthetic tokens")
    p.add_argument("--json", metavar="OUT", help="also write every number as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_simulate)
