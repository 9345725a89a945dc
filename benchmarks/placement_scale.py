"""Scale check of the placement planner on a DeepSeek-V3-shaped case: 58 MoE layers, 256 routed experts, top-8,
64 expert-parallel ranks over 8 nodes, 200k synthetic tokens per layer with skewed expert popularity (Zipf-like)
and clustered co-activation (placement/synthetic.py).

What it does:
1. writes the routing traces with the profiler's own recorder (profiling.trace.RoutingTraceRecorder), once; a
   trace directory already written with the same settings is reused;
2. runs ``python -m placement.cli plan --traces DIR --ranks 64 --nodes 8 ...`` (exactly what ``c2r-place plan``
   runs) under ``/usr/bin/time -v`` and reports its wall time and peak resident memory;
3. prints the plan's predicted metrics beside contiguous and random placement.

Run from the repository root (CPU only):
    python benchmarks/placement_scale.py                 # the full case; traces go to /tmp/c2r_placement_scale
    python benchmarks/placement_scale.py --layers 2 --tokens 20000     # a quick smoke run
    python benchmarks/placement_scale.py --replicas 320                 # with 64 replicas (5 slots per rank)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from placement.kahypar_context import DEFAULT_PRESET, KAHYPAR_PRESETS  # noqa: E402
from placement.synthetic import synthetic_expert_ids  # noqa: E402


def write_traces(args: argparse.Namespace, trace_dir: Path) -> float:
    """Synthetic routing, recorded shard by shard exactly as c2r-train --profile records it; returns seconds."""
    import torch

    from profiling.trace import RoutingTraceRecorder, TraceConfig

    settings = {k: getattr(args, k) for k in ("layers", "experts", "top_k", "tokens", "clusters", "zipf", "bonus")}
    stamp = trace_dir / "benchmark_settings.json"
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return 0.0
    shutil.rmtree(trace_dir, ignore_errors=True)
    start = time.perf_counter()
    recorder = RoutingTraceRecorder(
        trace_dir,
        num_layers=args.layers,
        num_experts=args.experts,
        top_k=args.top_k,
        source="benchmarks/placement_scale.py",
        config=TraceConfig(shard_rows=1 << 18),
    )
    steps, per_step = 10, args.tokens // 10
    for step in range(steps):
        recorder.step = step
        for layer in range(args.layers):
            ids = synthetic_expert_ids(
                per_step,
                args.experts,
                args.top_k,
                num_clusters=args.clusters,
                zipf=args.zipf,
                cluster_bonus=args.bonus,
                seed=1000 * layer + step,
                structure_seed=layer,
            )
            recorder.record(layer, torch.from_numpy(ids.astype(np.int64)))
    recorder.close()
    stamp.write_text(json.dumps(settings))
    return time.perf_counter() - start


def run_planner(args: argparse.Namespace, trace_dir: Path, plan_path: Path) -> dict[str, float]:
    cmd = [
        sys.executable,
        "-m",
        "placement.cli",
        "plan",
        "--traces",
        str(trace_dir),
        "--ranks",
        str(args.ranks),
        "--nodes",
        str(args.nodes),
        "--method",
        args.method,
        "--max-tokens",
        str(args.max_tokens),
        "--max-load",
        args.max_load,
        "--out",
        str(plan_path),
        "-q",
    ]
    if args.replicas:
        cmd += ["--replicas", args.replicas]
    if args.preset:
        cmd += ["--preset", args.preset]
    if args.jobs:
        cmd += ["--jobs", str(args.jobs)]
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(timer + cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tree_peak, stdout, stderr = _watch_tree_rss(proc)  # the planner and its worker processes together
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"planner failed ({proc.returncode}):\n{stdout}\n{stderr}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", stderr))
    # CPU seconds beside wall time: on a shared machine wall time measures the neighbours too
    return {
        "wall_s": wall,
        "cpu_s": cpu or float("nan"),
        "peak_rss_gib": int(peak.group(1)) / 2**20 if peak else float("nan"),
        "tree_peak_rss_gib": tree_peak / 2**30,
    }


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (Linux /proc), 0 where it is gone."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, AttributeError):  # exited meanwhile, or a zombie without VmRSS
            continue
    return total


def _watch_tree_rss(proc: subprocess.Popen) -> tuple[int, str, str]:
    """The largest summed RSS of the process tree, sampled every 0.2 s until it exits (``time -v`` reports one
    process's peak, not the sum over the planner's workers); with its stdout and stderr, drained meanwhile so no
    pipe fills."""
    out: dict[str, str] = {}
    readers = [
        threading.Thread(target=lambda name=name, f=f: out.__setitem__(name, f.read()), daemon=True)
        for name, f in (("stdout", proc.stdout), ("stderr", proc.stderr))
    ]
    for r in readers:
        r.start()
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.2)
    for r in readers:
        r.join()
    return peak, out["stdout"], out["stderr"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("/tmp/c2r_placement_scale"), help="work directory")
    p.add_argument("--layers", type=int, default=58)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--ranks", type=int, default=64)
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--tokens", type=int, default=200_000, help="tokens per layer")
    p.add_argument("--clusters", type=int, default=32, help="co-activation clusters of experts")
    p.add_argument("--zipf", type=float, default=0.3, help="popularity exponent (0.3: hottest expert ~3x mean)")
    p.add_argument("--bonus", type=float, default=3.0, help="log-odds bonus of a token's own cluster")
    p.add_argument("--method", default="kahypar")
    p.add_argument("--max-tokens", type=int, default=20000, help="planning sample per layer (c2r-place default)")
    p.add_argument("--max-load", default="1.10", help="load cap (c2r-place default 1.10; none: copies only)")
    p.add_argument("--replicas", help="physical expert slots P or +N (c2r-place plan --replicas; default none)")
    p.add_argument("--jobs", type=int, help="c2r-place plan --jobs (default: its own, the usable CPUs)")
    p.add_argument(
        "--preset", choices=KAHYPAR_PRESETS, help=f"c2r-place plan --preset (default: its own, {DEFAULT_PRESET})"
    )
    args = p.parse_args()

    trace_dir, plan_path = args.dir / "traces", args.dir / "plan.json"
    generate_s = write_traces(args, trace_dir)
    run = run_planner(args, trace_dir, plan_path)
    plan = json.loads(plan_path.read_text())
    pred, contig, rand = plan["predicted"], plan["baseline_contiguous"], plan["baseline_random"]
    load = np.array([e["expert_load"] for e in plan["layers"]], dtype=float)

    print(
        f"\n{args.layers} layers, {args.experts} experts, top-{args.top_k}, {args.ranks} ranks / {args.nodes} nodes, "
        f"{args.tokens} tokens per layer (hottest expert {np.mean(load.max(1) / load.mean(1)):.2f}x mean load)"
    )
    print(f"trace generation: {generate_s:.1f} s (0 = reused)")
    print(
        f"c2r-place plan ({args.method}, --max-tokens {args.max_tokens}, --max-load {args.max_load}"
        f"{', --replicas ' + args.replicas if args.replicas else ''}{f', --jobs {args.jobs}' if args.jobs else ''}"
        f"{f', --preset {args.preset}' if args.preset else ''}): "
        f"wall {run['wall_s']:.0f} s (CPU {run['cpu_s']:.0f} s), "
        f"peak RSS {run['tree_peak_rss_gib']:.2f} GiB summed over the planner and its workers (largest single "
        f"process {run['peak_rss_gib']:.2f} GiB)\n"
    )
    rows = [
        ("copies/token (distinct ranks)", "copies_per_token", "{:.3f}"),
        ("sum(lambda-1)/token (KM1)", "km1_per_token", "{:.3f}"),
        ("cross-rank KiB/token (h4096 bf16)", "cross_rank_bytes_per_token", "{:.1f}"),
        ("node fan-out/token", "node_fanout_per_token", "{:.3f}"),
        ("inter-node copies/token", "inter_node_copies_per_token", "{:.3f}"),
        ("rank load max/mean (mean over layers)", "load_imbalance", "{:.2f}"),
        ("rank load max/mean (worst layer)", "max_load_imbalance", "{:.2f}"),
    ]
    print(f"| metric | {args.method} | contiguous | random |\n| --- | --- | --- | --- |")
    for label, key, fmt in rows:
        scale = 1 / 1024 if "bytes" in key else 1
        cells = [fmt.format(m[key] * scale) for m in (pred, contig, rand)]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
