"""Validate ``c2r-place simulate``'s cost model against measured ``benchmarks/ep_bench.py`` runs: calibrate it on
one run, predict the others, print predicted vs measured (docs/scaling.md holds the table).

Each c2r row of an ep_bench JSON (``--routing synthetic``) names its routing (the synthetic routing ep_bench draws:
seed, ``STRUCTURE_SEED``, tokens in contiguous blocks per rank, as `placement.simulate.source_ranks` assumes), its
layout (``expert_to_rank``), its dispatch mode and its nodes (``gpus_per_node``). `placement.simulate.predict_layer`
then counts its rows exactly; the model is linear in its three unknowns,

    step_ms = latency_us x (latency units) + (transfer ms at 1 GB/s) / GB/s + (compute ms at 1 TFLOP/s) / TFLOP/s,

so the calibration is a non-negative least-squares fit over the calibration run's rows (step medians); when the
calibration files also hold ep_bench's ``single-device`` rows (no exchanges), the expert rate is taken from them and
only latency and bandwidth are fitted. On one host every "node" shares the same loopback, so intra- and inter-node
bandwidth are one number here.

    python benchmarks/simulate_check.py --calibrate-on r2.json --predict r2x1.json r4.json r4x2.json \\
        --write-calibration calibration.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from placement.cost import CostModel  # noqa: E402
from placement.layout import ExpertLayout  # noqa: E402
from placement.simulate import Cluster, predict_layer  # noqa: E402
from placement.synthetic import synthetic_expert_ids  # noqa: E402

STRUCTURE_SEED = 11  # benchmarks/ep_bench.py's
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
HUGE = 1e12


def load_rows(paths: list[Path]) -> list[dict]:
    """The c2r rows of ep_bench JSONs; rows of the same ranks, nodes and contender from several files (repeated runs)
    merge: the median of their medians, every round's median kept."""
    merged: dict[tuple, dict] = {}
    for path in paths:
        doc = json.loads(path.read_text())
        world, seed, dtype = doc["world"], int(doc["args"]["seed"]), doc["args"]["dtype"]
        for r in doc["rows"]:
            if r.get("routing") != "synthetic" or not r["contender"].startswith("c2r-") or "ms_median" not in r:
                continue
            if "-overlap" in r["contender"]:  # its a2a time is only the part compute did not hide: nothing to fit
                continue
            W = r.get("gpus_per_node") or world
            key = (world, W, r["config"], r["contender"])
            row = merged.setdefault(key, {**r, "world": world, "seed": seed, "dtype": dtype, "runs": []})
            row["runs"].append(r)
            row["run"] = f"{world} ranks, {world // W} x {W}"
    for row in merged.values():
        row["ms_median"] = float(np.median([r["ms_median"] for r in row["runs"]]))
        row["all_to_all_ms"] = float(np.median([r.get("all_to_all_ms", np.nan) for r in row["runs"]]))
        row["round_medians"] = [m for r in row["runs"] for m in r["round_medians"]]
    return list(merged.values())


def components(row: dict) -> dict[str, float]:
    """The row's latency units, transfer ms at 1 GB/s, compute ms at 1 TFLOP/s (and its exchange-only parts)."""
    world, W = row["world"], row.get("gpus_per_node") or row["world"]
    ids = synthetic_expert_ids(world * row["T"], row["E"], row["K"], seed=row["seed"], structure_seed=STRUCTURE_SEED)
    layout = ExpertLayout(tuple(row["expert_to_rank"]), world)
    cluster = Cluster(world // W, W)
    mode = "-".join(row["contender"].split("-")[1:3])
    shape = dict(
        tokens_per_rank=row["T"],
        hidden=row["D"],
        ffn=row["F"],
        matrices=3 if row["activation"] == "swiglu" else 2,
        bytes_per_element=DTYPE_BYTES[row["dtype"]],
    )

    def run(**rates) -> dict:
        return predict_layer(ids, layout, cluster, CostModel(**shape, **rates))[mode]

    lat = run(latency_us=1.0, intra_node_gb_s=HUGE, inter_node_gb_s=HUGE, expert_tflop_s=HUGE)
    xfer = run(latency_us=0.0, intra_node_gb_s=1.0, inter_node_gb_s=1.0, expert_tflop_s=HUGE)
    comp = run(latency_us=0.0, intra_node_gb_s=HUGE, inter_node_gb_s=HUGE, expert_tflop_s=1.0)
    return {
        "latency_units": lat["step_ms"] * 1e3,  # ms at 1 us per unit -> units
        "a2a_latency_units": lat["latency_ms"] * 1e3,
        "transfer_ms_1gbs": xfer["transfer_ms"],
        "compute_ms_1tflops": comp["compute_ms"],
        "remote_copies_per_token": lat["inter_node_copies_per_token"] + lat["intra_node_copies_per_token"],
    }


def single_device_rate(paths: list[Path]) -> float | None:
    """TFLOP/s of the experts measured without expert parallelism: ep_bench's ``single-device`` rows (every rank runs
    its T tokens through all E experts, no exchange), median over files; None without such rows."""
    rates = []
    for path in paths:
        for r in json.loads(path.read_text())["rows"]:
            if r["contender"] == "single-device" and r.get("routing") == "synthetic" and "ms_median" in r:
                matrices = 3 if r["activation"] == "swiglu" else 2
                flops = 3 * 2 * matrices * r["D"] * r["F"] * r["T"] * r["K"]
                rates.append(flops / (r["ms_median"] * 1e-3) / 1e12)
    return float(np.median(rates)) if rates else None


def fit(rows: list[dict], tflop_s: float | None = None) -> tuple[float, float, float]:
    """(latency us, GB/s, TFLOP/s) minimising the squared error of the step medians, all >= 0; with ``tflop_s``
    (measured apart, `single_device_rate`) only latency and bandwidth are fitted, to the step minus the compute."""
    if tflop_s is not None:
        A = np.array([[r["c"]["latency_units"] * 1e-3, r["c"]["transfer_ms_1gbs"]] for r in rows])
        b = np.array([r["ms_median"] - r["c"]["compute_ms_1tflops"] / tflop_s for r in rows])
        (latency_us, inv_bw), _ = nnls(A, b)
        return latency_us, 1 / inv_bw if inv_bw else HUGE, tflop_s
    A = np.array(
        [[r["c"]["latency_units"] * 1e-3, r["c"]["transfer_ms_1gbs"], r["c"]["compute_ms_1tflops"]] for r in rows]
    )
    b = np.array([r["ms_median"] for r in rows])
    (latency_us, inv_bw, inv_rate), _ = nnls(A, b)
    return latency_us, 1 / inv_bw if inv_bw else HUGE, 1 / inv_rate if inv_rate else HUGE


def predict(row: dict, latency_us: float, gb_s: float, tflop_s: float) -> tuple[float, float]:
    c = row["c"]
    a2a = c["a2a_latency_units"] * latency_us * 1e-3 + c["transfer_ms_1gbs"] / gb_s
    step = c["latency_units"] * latency_us * 1e-3 + c["transfer_ms_1gbs"] / gb_s + c["compute_ms_1tflops"] / tflop_s
    return a2a, step


def table(rows: list[dict], params: tuple[float, float, float]) -> str:
    lines = [
        "| run | contender | copies/token to other ranks: dispatcher / simulate | measured step ms (round medians) "
        "| predicted step ms | error | measured a2a ms | predicted a2a ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    errors = []
    for r in rows:
        a2a, step = predict(r, *params)
        err = step / r["ms_median"] - 1
        errors.append(abs(err))
        rounds = " / ".join(f"{m:.0f}" for m in r["round_medians"])
        counted = r["remote_bytes_per_token"] / (r["D"] * DTYPE_BYTES[r["dtype"]])
        lines.append(
            f"| {r['run']} | {r['contender'][4:]} | {counted:.4f} / {r['c']['remote_copies_per_token']:.4f} "
            f"| {r['ms_median']:.1f} "
            f"({rounds}) | {step:.1f} | {err:+.0%} | {r.get('all_to_all_ms', float('nan')):.1f} | {a2a:.1f} |"
        )
    lines.append(
        f"\n|error| median {np.median(errors):.0%}, max {max(errors):.0%}; within 15%: "
        f"{sum(e <= 0.15 for e in errors)} of {len(errors)} rows"
    )
    return "\n".join(lines)


# 2 x H200 over NVLink, issue 11 (2026-11-30): ep_bench's DeepSeek-like row, its synthetic routing; all-to-all ms per
# step (every exchange, forward and backward) as the issue states them, "~4.3 ms" and "~1.0 ms".
H200_MEASURED = {("per-expert", "contiguous"): 4.3, ("per-rank", "planned"): 1.0}
H200_GB_S = 235.0  # a raw all_to_all_single at 128 MiB per GPU on that machine (docs/design.md facts)


def h200_check(latency_us: float = 5.0) -> str:
    """Predict the 2-GPU all-to-all times of issue 11 from bandwidth alone (235 GB/s, 5 us per exchange)."""
    from placement.inputs import routing_from_expert_ids
    from placement.methods import plan_layer

    T, D, F, E, K = 16384, 2048, 1024, 64, 8
    sample = routing_from_expert_ids(synthetic_expert_ids(2 * T, E, K, seed=1, structure_seed=STRUCTURE_SEED), E)
    layouts = {"contiguous": ExpertLayout.contiguous(E, 2), "planned": ExpertLayout(tuple(plan_layer(sample, 2)), 2)}
    ids = synthetic_expert_ids(2 * T, E, K, seed=0, structure_seed=STRUCTURE_SEED)
    model = CostModel(
        tokens_per_rank=T,
        hidden=D,
        ffn=F,
        matrices=2,
        bytes_per_element=2,
        intra_node_gb_s=H200_GB_S,
        inter_node_gb_s=H200_GB_S,
        latency_us=latency_us,
    )
    lines = ["| contender | measured a2a ms | predicted a2a ms | error |", "|---|---|---|---|"]
    for (mode, plan), measured in H200_MEASURED.items():
        predicted = predict_layer(ids, layouts[plan], Cluster(1, 2), model)[mode]["all_to_all_ms"]
        lines.append(f"| {mode}, {plan} | {measured:.1f} | {predicted:.2f} | {predicted / measured - 1:+.0%} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--calibrate-on", type=Path, nargs="+", required=True, help="ep_bench JSON(s) of the run the model is fitted on"
    )
    p.add_argument("--predict", type=Path, nargs="*", default=[], help="ep_bench JSONs of the runs to predict")
    p.add_argument("--write-calibration", type=Path, help="write the fitted numbers for c2r-place simulate --calibrate")
    p.add_argument("--h200", action="store_true", help="also predict issue 11's 2 x H200 all-to-all times")
    args = p.parse_args()
    calib = load_rows(args.calibrate_on)
    others = load_rows(args.predict)
    for r in calib + others:
        r["c"] = components(r)
    latency_us, gb_s, tflop_s = fit(calib, single_device_rate(args.calibrate_on))
    print(
        f"fitted on {' '.join(map(str, args.calibrate_on))} ({len(calib)} rows): {latency_us:.0f} us per peer per "
        "exchange, "
        f"{gb_s:.2f} GB/s, {tflop_s * 1e3:.1f} GFLOP/s expert rate"
    )
    print("\ncalibration run (fitted, so not a prediction):\n" + table(calib, (latency_us, gb_s, tflop_s)))
    if others:
        print("\npredicted runs:\n" + table(others, (latency_us, gb_s, tflop_s)))
    if args.h200:
        print(f"\n2 x H200 (issue 11), {H200_GB_S:g} GB/s, 5 us per exchange, no fitting:\n" + h200_check())
    if args.write_calibration:
        doc = {
            "intra_node_gb_s": gb_s,
            "inter_node_gb_s": gb_s,
            "latency_us": latency_us,
            "expert_tflop_s": tflop_s,
            "source": f"benchmarks/simulate_check.py fit on {calib[0]['run']}",
        }
        args.write_calibration.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.write_calibration}")


if __name__ == "__main__":
    main()
