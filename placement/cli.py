"""``c2r-place``: plan where each expert lives, judge a plan, export it, apply it to a checkpoint.

c2r-place plan --traces runs/before --ranks 2 --out plan.json           # Mt-KaHyPar, KM1, exactly E/R per rank,
                                                                        # rank load <= 1.10 x mean (--max-load)
c2r-place plan --traces runs/before --ranks 8 --holdout 0.2 --pareto --calibrate runs/before --out plan.json
c2r-place plan --traces runs/big --ranks 16 --nodes 2 --holdout 0.2 --out plan.json
c2r-place plan --traces runs/big --ranks 16 --nodes 2 --topology map --inter-node-cost 10 --out plan.json
c2r-place plan --coactivation coact.npy --ranks 4 --method greedy --out plan.json
c2r-place plan --traces runs/before --ranks 8 --holdout 0.2 --max-load 1.05 --replicas +8 --out plan.json  # replicas
c2r-place plan --traces runs/big --ranks 64 --nodes 8 --jobs 8 --out plan.json   # 8 layers at a time (default: CPUs)
c2r-place evaluate --plan plan.json --traces runs/before [--hidden 4096 --dtype bf16] [--json]   # default: traced
c2r-place export --plan plan.json --format eplb|autoep [--out placement.json]
c2r-place simulate --traces runs/before --nodes 2 --gpus-per-node 4    # PREDICTED a2a / step ms per dispatch mode
c2r-place apply --plan plan.json --checkpoint RUN/checkpoints --out RUN2/checkpoints   # c2r-place only

--traces takes a trace directory, a profile directory or a run directory (c2r-train --profile writes
run/profile/traces: runs/before above is README's profiled run; `make demo`'s runs/demo records no traces);
--coactivation a [L, E, E] or [E, E] .npy (c2r-profile coactivation) or counts-rank*.npz.
Bad input exits with code 2 and a message naming the values.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from placement.copy_choice import balanced_rank_loads
from placement.cost import CostModel, calibrate, format_costs, layer_cost
from placement.errors import PlacementError
from placement.evaluate import (
    baseline_placements,
    evaluate_placement,
    evaluate_with_baselines,
    format_comparison,
    keep_contiguous_where_plan_loses,
)
from placement.export import EXPORT_FORMATS, export_plan
from placement.inputs import PlannerInput, load_input, recorded_activation, recorded_experts
from placement.kahypar_context import DEFAULT_PRESET, KAHYPAR_PRESETS, mtkahypar_version
from placement.loadcap import DEFAULT_MAX_LOAD, max_load_arg, min_max_load, needs_replication
from placement.methods import (
    DEFAULT_INTER_NODE_COST,
    METHODS,
    TOPOLOGIES,
    cap_layouts,
    plan_placement,
)
from placement.objective import DTYPE_BYTES, check_topology, layer_metrics, load_key, overall_metrics
from placement.plan import check_output_path, dumps, load_plan, make_plan, save_plan, write_text_atomic
from placement.pool import check_jobs
from placement.replicate import parse_num_slots, replicate_layouts
from placement.simulate_cli import add_simulate_command
from profiling.cli_errors import BAD_INPUT_ERRORS, OneLineParser, positive

PARETO_CAPS = (None, 1.5, 1.25, 1.1, 1.05)


def _add_input_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--traces", metavar="DIR", help="routing traces: trace, profile or run directory")
    group.add_argument(
        "--coactivation", metavar="FILE", help="co-activation counts .npy [L,E,E]/[E,E] or .npz (pairwise approx.)"
    )


DEFAULT_HIDDEN, DEFAULT_DTYPE = 4096, "bf16"


def _add_bytes_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--hidden",
        type=positive(int),
        help=f"hidden size for bytes per token (default: the traced model's, else {DEFAULT_HIDDEN})",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPE_BYTES),
        help=f"activation dtype (default: the traced model's, else {DEFAULT_DTYPE})",
    )


def _resolve_bytes_args(args: argparse.Namespace) -> str:
    """Fill ``--hidden`` / ``--dtype`` left out with the traced model's (the trace header or profile.json), else the
    defaults; returns a line saying which were used and where they came from."""
    given = {"hidden": args.hidden is not None, "dtype": args.dtype is not None}
    hidden, dtype, source = recorded_activation(args.traces) if args.traces else (None, None, "")
    if dtype not in DTYPE_BYTES:
        dtype = None
    if args.hidden is None:
        args.hidden = hidden or DEFAULT_HIDDEN
    if args.dtype is None:
        args.dtype = dtype or DEFAULT_DTYPE
    parts = []
    for key, value, traced in (("hidden", args.hidden, hidden), ("dtype", args.dtype, dtype)):
        origin = "--" + key if given[key] else (f"traced, from {source}" if traced else "a default: not recorded")
        parts.append(f"{key} {value} ({origin})")
    return f"bytes per token copy: {args.hidden * DTYPE_BYTES[args.dtype]} = " + ", ".join(parts)


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _load(args: argparse.Namespace, holdout: float | None) -> PlannerInput:
    return load_input(args.traces, args.coactivation, holdout, progress=_progress(args))


def _summary_line(results: dict[str, dict[str, Any]], name: str) -> str:
    plan, contig, rand = (results[k]["overall"] for k in ("plan", "contiguous", "random"))
    cut = 100.0 * (1 - plan["copies_per_token"] / contig["copies_per_token"]) if contig["copies_per_token"] else 0.0
    estimate = "" if plan.get("exact", True) else " (estimates: co-activation input)"
    return (
        f"{name}: {plan['copies_per_token']:.3f} copies/token vs {contig['copies_per_token']:.3f} contiguous "
        f"({cut:.1f}% fewer) and {rand['copies_per_token']:.3f} random{estimate}; rank load max/mean "
        f"{plan['load_imbalance']:.2f} (worst layer {plan['max_load_imbalance']:.2f}) vs "
        f"{contig['load_imbalance']:.2f} ({contig['max_load_imbalance']:.2f}) contiguous"
        + (
            f"; per step {plan['step_load_imbalance']:.2f} vs {contig['step_load_imbalance']:.2f}"
            if load_key(results["plan"]["layers"], results["contiguous"]["layers"]) == "step_load_imbalance"
            else ""
        )
    )


def _cap_report(inp: PlannerInput, results: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict]:
    """Per layer: the cap, whether the judged (held-out) load meets it, and whether it could without replicas."""
    reports = []
    for routing, m in zip(inp.plan_routings, results["plan"]["layers"]):
        entry: dict[str, Any] = {"max_load": args.max_load, "load_imbalance": m.get("load_imbalance")}
        if args.max_load is not None and m.get("tokens"):
            entry["met"] = bool(m["load_imbalance"] <= args.max_load + 1e-9)
            entry["needs_replication"] = needs_replication(routing.expert_load_E, args.ranks, args.max_load)
            entry["lower_bound_without_replication"] = round(min_max_load(routing.expert_load_E, args.ranks), 4)
        reports.append(entry)
    return reports


def _print_cap_report(
    reports: list[dict], kept_contiguous: list[int], cap: float | None, judged: str, replicated: bool = False
) -> None:
    if kept_contiguous:
        print(f"kept the contiguous placement on layers {kept_contiguous}: the plan did not beat it on {judged}")
    if cap is None:
        return
    met = [i for i, r in enumerate(reports) if r.get("met")]
    if replicated:
        missed = [i for i, r in enumerate(reports) if not r.get("met", True)]
        print(f"load cap {cap:g} x mean with replicas: met on {len(met)} of {len(reports)} layers ({judged})")
        if missed:
            print(f"  layers {missed}: above the cap: {judged} load differs from planned, or too few replicas")
        return
    replicas = [i for i, r in enumerate(reports) if not r.get("met", True) and r["needs_replication"]]
    missed = [i for i, r in enumerate(reports) if not r.get("met", True) and not r["needs_replication"]]
    print(f"load cap {cap:g} x mean: met on {len(met)} of {len(reports)} layers ({judged})")
    for i in replicas:
        print(
            f"  layer {i}: {reports[i]['load_imbalance']:.2f}; the cap needs replication (no placement without "
            f"replicas gets below {reports[i]['lower_bound_without_replication']:.2f}: the hottest expert)"
        )
    if missed:
        print(f"  layers {missed}: above the cap though it looked reachable: {judged} load differs from planned")


def _num_slots(args: argparse.Namespace, inp: PlannerInput) -> int | None:
    """--replicas as P physical slots (None: no replicas), checked against the experts and ranks."""
    if args.replicas is None:
        return None
    num_slots = parse_num_slots(args.replicas, inp.num_experts, args.ranks)
    if num_slots == inp.num_experts:
        return None
    if args.coactivation:
        raise PlacementError("--replicas needs --traces: the replica rule routes each token by its whole expert set")
    return num_slots


def _replica_line(layouts: list, routings: list | None = None) -> str:
    """How many replicas, and of which experts (per layer: the replicated experts and their copies)."""
    layout = layouts[0]
    per_layer = [{e: len(r) + 1 for e, r in enumerate(lay.replicas) if r} for lay in layouts]
    most = max((max(x.values(), default=1) for x in per_layer), default=1)
    extra, mean_replicated = layout.num_slots - layout.num_experts, sum(map(len, per_layer)) / len(layouts)
    line = (
        f"replicas: {layout.num_slots} slots ({layout.experts_per_rank} per rank, {extra} replicas per layer) on "
        f"{mean_replicated:.1f} replicated experts per layer (mean), at most {most} copies of one expert; "
        f"layer 0 copies: {per_layer[0]}"
    )
    if layout.num_slots >= 2 * layout.num_experts:  # placement/replicate.py, step 0
        single = sum(sum(len(ranks) == 1 for ranks in lay.ranks_of_experts) for lay in layouts) / len(layouts)
        line += (
            f"\nevery expert got a partner copy ({single:.1f} per layer, light ones, later gave theirs to a hot "
            "expert): train with `c2r-train --copy-choice balanced` to level the ranks in every batch (the loads "
            "above are the default rule's; docs/placement.md, 'A load-aware copy choice')"
        )
        if routings:
            line += "\n" + _balanced_load_line(routings, layouts)
    return line


def _balanced_load_line(routings: list, layouts: list) -> str:
    """The rank loads ``--copy-choice balanced`` would give on these (judged) tokens: each recorded step as one batch
    (all of them as one where the trace has no step loads), its expert loads split by the balanced shares; pooled
    over the steps (as the rule's load above) and each step's own busiest rank. Optimistic by a little: a run
    balances each layer forward's micro-batch, and rounds its quotas to whole pairs per source rank."""
    pooled, per_step = [], []
    for routing, layout in zip(routings, layouts):
        steps = routing.step_load_SE if routing.step_load_SE is not None else routing.expert_load_E[None]
        steps = steps[steps.sum(axis=1) > 0]
        if not len(steps):  # a layer with no judged tokens
            continue
        loads_SR = balanced_rank_loads(steps, layout)
        total_R = loads_SR.sum(axis=0)
        pooled.append(float(total_R.max() / total_R.mean()))
        if routing.step_load_SE is not None:
            per_step.append(float(loads_SR.max(axis=1).sum() / loads_SR.mean(axis=1).sum()))
    head = "PREDICTION with --copy-choice balanced, each step's expert loads split by the balanced shares: "
    if not pooled:
        return head + "no judged tokens"
    steps_part = (
        f"; per step (each step's busiest rank) {np.mean(per_step):.3f} mean over layers, {max(per_step):.3f} worst"
        if per_step
        else " (the trace has no per-step loads: all of it as one batch)"
    )
    return (
        f"{head}rank load max/mean {np.mean(pooled):.3f} mean over layers, {max(pooled):.3f} worst layer{steps_part} "
        "(copies per token not predicted here: `c2r-place simulate --copy-choice balanced` counts them token by token)"
    )


def _cost_model(args: argparse.Namespace) -> CostModel:
    """The defaults with this plan's hidden size and dtype, the traced experts' width and matrices (else 3.5 x hidden,
    SwiGLU), calibrated on ``--calibrate`` when given."""
    hidden = args.hidden
    ffn, matrices = recorded_experts(args.traces) if args.traces else (None, None)
    model = CostModel(
        hidden=hidden,
        ffn=args.ffn or ffn or round(3.5 * hidden),
        matrices=matrices or 3,
        bytes_per_element=DTYPE_BYTES[args.dtype],
    )
    return calibrate(args.calibrate, model) if args.calibrate else model


def _predicted_costs(model: CostModel, args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> str:
    """Attach "predicted_step_ms" (`placement.cost`) to every layer's metrics; returns the load ratio its compute
    term used (`placement.objective.load_key`)."""
    names = ("plan", "contiguous", "random")
    load = load_key(*(results[name]["layers"] for name in names))
    for name in names:
        for m in results[name]["layers"]:
            if m.get("tokens"):
                m["predicted_step_ms"] = layer_cost(m, model, args.ranks, args.nodes, load)["step_ms"]
        results[name]["overall"] = overall_metrics(results[name]["layers"])
    return load


def _print_pareto(inp: PlannerInput, base: list, args: argparse.Namespace, replicated: list | None = None) -> None:
    """Copies vs load for a few caps, from the one uncapped partition (judged on the held-out tokens)."""
    print("copies vs load (--pareto; judged on " + ("held-out" if inp.info.get("holdout") else "planning") + " tokens)")
    print("max-load  copies/tok  load max/mean (mean over layers)  worst layer  layers at or under the cap")
    for cap in PARETO_CAPS:
        layouts = (
            base
            if cap is None
            else cap_layouts(
                inp.plan_routings,
                base,
                cap,
                args.nodes,
                args.seed,
                args.max_tokens or None,
                args.inter_node_cost,
                jobs=check_jobs(args.jobs, inp.num_layers, inp.num_experts),
                per_step=args.per_step_cap,
            )
        )
        layers = [layer_metrics(r, lay, args.nodes) for r, lay in zip(inp.eval_routings, layouts)]
        o = overall_metrics(layers)
        at = "-" if cap is None else str(sum(m["load_imbalance"] <= cap + 1e-9 for m in layers if m.get("tokens")))
        print(
            f"{'none' if cap is None else f'{cap:.2f}':>8}  {o['copies_per_token']:10.3f}  "
            f"{o['load_imbalance']:32.3f}  {o['max_load_imbalance']:11.3f}  {at:>26}"
        )
    if replicated:  # the plan written, with its replicas (the rows above have none)
        layers = [layer_metrics(r, lay) for r, lay in zip(inp.eval_routings, replicated)]
        o, cap = overall_metrics(layers), args.max_load or 1.0
        at = str(sum(m["load_imbalance"] <= cap + 1e-9 for m in layers if m.get("tokens")))
        print(
            f"{cap:8.2f}  {o['copies_per_token']:10.3f}  {o['load_imbalance']:32.3f}  {o['max_load_imbalance']:11.3f}  "
            f"{at:>26}   with replicas: {replicated[0].num_slots} slots"
        )


# ---- plan ------------------------------------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    check_output_path(args.out)  # before the work, not after it
    bytes_line = _resolve_bytes_args(args)
    model = _cost_model(args)
    inp = _load(args, args.holdout)
    check_topology(inp.num_experts, args.ranks, args.nodes)
    dtype_bytes = DTYPE_BYTES[args.dtype]
    planner_args = (args.ranks, args.nodes, args.method, args.seed, args.preset, args.threads, args.max_tokens or None)
    jobs = check_jobs(args.jobs, inp.num_layers, inp.num_experts)
    more = {
        "progress": _progress(args),
        "topology": args.topology,
        "inter_node_cost": args.inter_node_cost,
        "jobs": jobs,
    }
    layouts = plan_placement(
        inp.plan_routings, *planner_args, **more, max_load=args.max_load, per_step=args.per_step_cap
    )
    num_slots = _num_slots(args, inp)
    if num_slots is not None:  # homes from the plan above, then the replicas (placement/replicate.py)
        target = 1.0 if args.max_load is None else args.max_load
        layouts = replicate_layouts(
            inp.plan_routings,
            layouts,
            num_slots,
            target,
            args.max_tokens or None,
            args.seed,
            _progress(args),
            jobs,
            per_step=args.per_step_cap,
        )
    # --pareto: the trade-off from the one uncapped partition (the capped plan above may start elsewhere)
    base = plan_placement(inp.plan_routings, *planner_args, **more) if args.pareto else None
    results = evaluate_with_baselines(
        inp.eval_routings, layouts, args.nodes, args.hidden, dtype_bytes, args.seed, _progress(args), jobs
    )
    kept_contiguous: list[int] = []
    if num_slots is None:  # (contiguous placement has no replicas: a replicated plan is not compared for this)
        judged = results  # decided on the planning tokens; reported on the held-out ones
        if inp.eval_routings is not inp.plan_routings:
            contiguous = baseline_placements(len(layouts), layouts[0].num_experts, layouts[0].num_ranks)["contiguous"]
            judged = {
                name: evaluate_placement(inp.plan_routings, placed, args.nodes)
                for name, placed in (("plan", layouts), ("contiguous", contiguous))
            }
        layouts, kept_contiguous = keep_contiguous_where_plan_loses(judged, layouts, args.max_load, results)
    compute_load = _predicted_costs(model, args, results)
    reports = _cap_report(inp, results, args)
    for layer, report in enumerate(reports):
        report["kept_contiguous"] = layer in kept_contiguous
    plan = make_plan(
        layouts,
        num_nodes=args.nodes,
        method=args.method,
        seed=args.seed,
        inputs=inp.info,
        layer_metrics={
            "predicted": results["plan"]["layers"],
            "baseline_contiguous": results["contiguous"]["layers"],
            "baseline_random": results["random"]["layers"],
            "load_cap": reports,
        },
        overall={
            "predicted": results["plan"]["overall"],
            "baseline_contiguous": results["contiguous"]["overall"],
            "baseline_random": results["random"]["overall"],
        },
        expert_load_LE=np.stack([r.expert_load_E for r in inp.plan_routings]),
        options={
            "preset": args.preset,
            "mtkahypar": mtkahypar_version() if args.method == "kahypar" else None,
            "max_tokens": args.max_tokens,
            "hidden": args.hidden,
            "dtype": args.dtype,
            "topology": args.topology,
            "inter_node_cost": args.inter_node_cost,
            "max_load": args.max_load,
            "per_step_cap": args.per_step_cap,
            "replicas": num_slots,
            "cost_model": {**vars(model), "compute_load": compute_load},
        },
    )
    save_plan(plan, args.out)
    print(format_comparison(results, detailed=False))
    judged = "the held-out tokens" if inp.info.get("holdout") else "the planning tokens (no --holdout)"
    if inp.info.get("holdout"):
        h = inp.info["holdout"]
        print(
            f"planned on steps < {h['first_held_out_step']} ({h['plan_tokens']} tokens); predicted on the held-out "
            f"steps >= {h['first_held_out_step']} ({h['eval_tokens']} tokens)"
        )
    _print_cap_report(reports, kept_contiguous, args.max_load, judged, replicated=num_slots is not None)
    if num_slots is not None:
        print(_replica_line(layouts, inp.eval_routings))
    pairs = list(zip(results["plan"]["layers"], results["contiguous"]["layers"]))
    print(format_costs(pairs, model, args.ranks, args.nodes))
    print(bytes_line)
    if args.pareto:
        _print_pareto(inp, base, args, layouts if num_slots is not None else None)
    print(_summary_line(results, f"wrote {args.out} ({args.method}, {args.ranks} ranks, {args.nodes} node(s))"))
    return 0


def add_plan_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="plan a balanced expert placement (exactly E/R experts per rank) minimising token copies",
        description="Plan where each expert lives: per MoE layer, minimise the ranks each token reaches (KM1) "
        "with exactly E/R experts per rank; write a plan file and print predicted copies per token beside "
        "contiguous and random placement.",
    )
    _add_input_args(p)
    p.add_argument(
        "--ranks", type=positive(int), required=True, help="expert-parallel ranks R (must divide the experts)"
    )
    p.add_argument(
        "--nodes",
        type=positive(int),
        default=1,
        help="nodes N (R/N GPUs each): topology-aware placement, see --topology (default 1)",
    )
    p.add_argument("--method", choices=list(METHODS), default="kahypar", help="partitioner (default kahypar)")
    p.add_argument(
        "--topology",
        choices=TOPOLOGIES,
        default="two-level",
        help="with 1 < nodes < ranks: two-level (nodes first, then GPUs; any method) or map (Mt-KaHyPar maps onto "
        "the ranks' graph, inter-node edges costing --inter-node-cost; needs --method kahypar). Default two-level",
    )
    p.add_argument(
        "--inter-node-cost",
        type=int,
        default=DEFAULT_INTER_NODE_COST,
        metavar="C",
        help=f"--topology map: cost of an inter-node edge, intra-node edges cost 1 (default {DEFAULT_INTER_NODE_COST})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed (every method is deterministic given it)")
    p.add_argument(
        "--holdout", type=float, metavar="FRACTION", help="hold out the latest FRACTION of steps; predict on them"
    )
    p.add_argument(
        "--preset",
        choices=KAHYPAR_PRESETS,
        default=DEFAULT_PRESET,
        help=f"Mt-KaHyPar preset (default {DEFAULT_PRESET}: its deterministic preset made to coarsen a few hundred "
        "experts; see placement/kahypar_context.py)",
    )
    p.add_argument(
        "--threads", type=positive(int), help="Mt-KaHyPar threads (default: all cores with --jobs 1, else 1 per worker)"
    )
    p.add_argument(
        "--jobs",
        "-j",
        type=int,
        metavar="N",
        help="layers planned in parallel worker processes (default: the usable CPUs for 2+ layers of 64+ experts, "
        "else 1: this process only); with the deterministic presets the plan is the same for any N",
    )
    p.add_argument(
        "--max-tokens",
        type=positive(int, allow_zero=True),
        metavar="N",
        default=20000,
        help="plan each layer on a seeded sample of at most this many tokens (default 20000; 0: all); the "
        "prediction uses every (held-out) token",
    )
    p.add_argument(
        "--max-load",
        type=max_load_arg,
        default=DEFAULT_MAX_LOAD,
        metavar="CAP",
        help=f"cap on every rank's token load, max/mean (default {DEFAULT_MAX_LOAD}; 'none': copies only): swaps "
        "experts between ranks after partitioning, keeping E/R per rank; a layer whose hottest expert makes the cap "
        "impossible without replication gets the lowest max load found, and is named",
    )
    p.add_argument(
        "--per-step-cap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="hold --max-load on the expert load of recorded planning steps too (at most 8, evenly spaced), not only "
        "on their sum (default on): the margin for the step-to-step drift of expert loads, so the cap holds on "
        "unseen steps; traces of one step, sampled traces and co-activation input have only the sum",
    )
    p.add_argument(
        "--replicas",
        metavar="P",
        help="P physical expert slots (P >= E, a multiple of --ranks, <= E x ranks), +N for E + N, or 2E: hot experts "
        "get replicas, placed where their co-activated experts live, until every rank is under --max-load; from P = 2E "
        "every expert first gets a second copy on a partner rank, for c2r-train --copy-choice balanced to level the "
        "ranks in every batch (placement/replicate.py); needs --traces",
    )
    p.add_argument("--pareto", action="store_true", help="also print copies vs load for caps none, 1.5 ... 1.05")
    p.add_argument(
        "--calibrate",
        metavar="RUN_DIR",
        help="predicted step time: take bandwidth and tokens per rank from a profiled run's all-to-all records "
        "(default: stated H200-class defaults)",
    )
    p.add_argument(
        "--ffn",
        type=positive(int),
        help="expert FFN width for the predicted compute time (default: the traced model's, else 3.5 x hidden)",
    )
    _add_bytes_args(p)
    p.add_argument("--out", "-o", required=True, help="plan file to write (JSON)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_plan)


# ---- evaluate --------------------------------------------------------------------------------------------------


def _evaluate_holdout(args: argparse.Namespace, plan_inputs: dict[str, Any]) -> float | None:
    """An explicit --holdout, else the plan's own holdout when evaluating on the very traces it was made from."""
    if args.holdout is not None:
        return args.holdout or None
    recorded = plan_inputs.get("holdout")
    if args.traces and recorded and plan_inputs.get("kind") == "traces":
        from placement.inputs import find_trace_dir, trace_digest

        if trace_digest(find_trace_dir(args.traces)) == plan_inputs.get("digest"):
            print(f"evaluating on the plan's held-out steps (--holdout {recorded['fraction']}; --holdout 0: all)")
            return recorded["fraction"]
    return None


def cmd_evaluate(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan)
    inp = _load(args, _evaluate_holdout(args, plan.data.get("inputs", {})))
    plan = load_plan(args.plan, num_layers=inp.num_layers, num_experts=inp.num_experts)
    nodes = args.nodes or plan.num_nodes
    check_topology(plan.num_experts, plan.num_ranks, nodes)
    bytes_line = _resolve_bytes_args(args)
    results = evaluate_with_baselines(
        inp.eval_routings, plan.layouts, nodes, args.hidden, DTYPE_BYTES[args.dtype], args.seed
    )
    if args.json:
        doc = {"plan": str(args.plan), "num_ranks": plan.num_ranks, "num_nodes": nodes, "inputs": inp.info, **results}
        doc["bytes"] = {"hidden": args.hidden, "dtype": args.dtype, "used": bytes_line}
        print(dumps(doc))
        return 0
    print(format_comparison(results, detailed=True))
    print(bytes_line)
    print(_summary_line(results, f"{args.plan} ({plan.method}, {plan.num_ranks} ranks, {nodes} node(s))"))
    return 0


def add_evaluate_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="judge a plan on routing data, beside contiguous and random placement",
        description="Per layer and overall: copies per token (distinct ranks, what per-rank dispatch sends), "
        "sum(lambda-1) per token, cross-rank bytes per token, load imbalance; for the plan, contiguous and random.",
    )
    p.add_argument("--plan", required=True, help="plan file (c2r-place plan)")
    _add_input_args(p)
    _add_bytes_args(p)
    p.add_argument("--nodes", type=positive(int), help="nodes for inter-node metrics (default: the plan's)")
    p.add_argument(
        "--holdout",
        type=float,
        metavar="FRACTION",
        help="evaluate on the latest FRACTION of steps only (0: all steps; default: the plan's own --holdout when "
        "these are the traces it was made from, else all steps)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)


# ---- export ----------------------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    if args.out:
        check_output_path(args.out)
    doc = export_plan(load_plan(args.plan), args.format, args.replicas)
    text = dumps(doc) + "\n"
    if args.out:
        write_text_atomic(args.out, text)
        print(f"wrote {args.out} ({args.format}, {doc['num_layers']} layers)")
    else:
        sys.stdout.write(text)
    return 0


def add_export_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a plan as EPLB phy2log/log2phy/logcnt or DeepSpeed AutoEP placement descriptors",
        description="eplb: {phy2log [L][P], log2phy [L][E][X], logcnt [L][E]} (no replication: logcnt all 1). "
        "autoep: per layer {version, num_experts, ep_size, ranks: [{rank, experts}]}.",
    )
    p.add_argument("--plan", required=True, help="plan file (c2r-place plan)")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="target format")
    p.add_argument(
        "--replicas", type=int, help="eplb only: physical slots P > E, hot experts replicated (load-only packing)"
    )
    p.add_argument("--out", "-o", help="output file (default: stdout)")
    p.set_defaults(func=cmd_export)


# ---- entry point -----------------------------------------------------------------------------------------------

# One function per subcommand. ``apply`` (checkpoint surgery) needs the training system: c2r.place_cli adds it to
# these for the ``c2r-place`` console script, so this module stays free of c2r.
COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_plan_command,
    add_evaluate_command,
    add_export_command,
    add_simulate_command,
)


def build_parser(commands: tuple[Callable[[argparse._SubParsersAction], None], ...] = COMMANDS):
    parser = OneLineParser(prog="c2r-place", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in commands:
        add_command(sub)
    return parser


def main(
    argv: list[str] | None = None, commands: tuple[Callable[[argparse._SubParsersAction], None], ...] = COMMANDS
) -> int:
    args = build_parser(commands).parse_args(argv)
    try:
        return args.func(args)
    except BAD_INPUT_ERRORS as error:  # PlacementError is a ValueError
        print(f"c2r-place {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
