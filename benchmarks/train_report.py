"""c2r-train runs side by side from their metrics.jsonl: tokens/s per GPU and model FLOPs utilisation over a window
of steps (time-weighted: every evaluation's window counts by its seconds), the losses at the window's end, and the
routing load. Prints a markdown table, one row a run, and with ``--evaluations`` every evaluation too.

    python benchmarks/train_report.py runs/control runs/after --gpus 8 --from-step 40
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

H100_H200_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 / H200 SXM


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        sys.exit(f"train_report: {path} does not exist (a c2r-train --out directory holds it)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def window(records: list[dict], from_step: int) -> list[dict]:
    """The evaluations after ``from_step`` that timed training steps."""
    return [r for r in records if r["step"] > from_step and r.get("train_window_s", 0) > 0]


def summary(run: Path, records: list[dict], gpus: int, from_step: int, peak_tflops: float) -> str:
    timed = window(records, from_step)
    if not timed:
        return f"| {run} | no timed evaluation after step {from_step} | | | | | |"
    seconds = sum(r["train_window_s"] for r in timed)
    tokens = sum(r["tokens_per_s"] * r["train_window_s"] for r in timed)
    tflops = sum(r.get("model_tflops_per_rank", 0.0) * r["train_window_s"] for r in timed) / seconds
    last = timed[-1]
    worst = max(max(r.get("load_imbalance_by_layer") or [float("nan")]) for r in timed)
    return (
        f"| {run} | {timed[0]['step']}-{last['step']} | {tokens / seconds / gpus:,.0f} | {tflops / peak_tflops:.1%} | "
        f"{last['train_loss']:.4f} | {last.get('val_loss', float('nan')):.4f} | {worst:.3f} |"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="c2r-train --out directories")
    p.add_argument("--gpus", type=int, required=True, help="GPUs (ranks) of the runs: tokens/s is per GPU")
    p.add_argument("--from-step", type=int, default=0, help="count evaluations after this step (default 0)")
    p.add_argument("--peak-tflops", type=float, default=H100_H200_BF16_TFLOPS, help="per GPU, for MFU (default 989)")
    p.add_argument("--evaluations", action="store_true", help="also print every evaluation of every run")
    args = p.parse_args(argv)
    print(
        "| run | evaluations at steps | tokens/s per GPU | MFU | train loss | val loss | load max/mean, worst layer |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    metrics = {run: read_metrics(run) for run in args.runs}
    for run, records in metrics.items():
        print(summary(run, records, args.gpus, args.from_step, args.peak_tflops))
    if args.evaluations:
        for run, records in metrics.items():
            for r in records:
                by_layer = r.get("load_imbalance_by_layer") or [float("nan")]
                print(
                    f"{run} step {r['step']}: {r.get('tokens_per_s', 0) / args.gpus:,.0f} tokens/s per GPU, "
                    f"loss {r['train_loss']:.3f}, val {r.get('val_loss', float('nan')):.3f}, "
                    f"load max/mean {max(by_layer):.2f}"
                )


if __name__ == "__main__":
    main()
