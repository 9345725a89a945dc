"""The router quality study (issue 6): one MoE GPT, the same data, steps and seed for every router; validation loss
against active experts per token (expert FLOPs) and against all-to-all copies per token.

    python benchmarks/router_quality.py train --out runs/quality            # on a GPU: every router, in parallel
    python benchmarks/router_quality.py evaluate --out runs/quality         # on a GPU: val loss + routing masks
    python benchmarks/router_quality.py report --out runs/quality           # anywhere: copies/token, table, plot

``train`` runs two waves of single-GPU processes sharing the GPU (the model is small, so one process leaves it mostly
idle): first top-k (profiled, for the C2R lists and the Ada-K base), group-limited M=1/2, AdaMoE and ReMoE; then C2R
with two T values (lists from the top-k profile) and Ada-K (allocators trained by c2r-adak on the top-k checkpoint).
``evaluate`` runs every final model on the same held-out batches and stores, per MoE layer, each token's expert set.
``report`` computes copies per token for R ranks under the contiguous placement and under a plan made (Mt-KaHyPar)
on the first half of those tokens and measured on the second half, then writes the table and the plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = {
    "block_size": 256,
    "n_layer": 4,
    "n_head": 4,
    "d_model": 256,
    "moe": {"num_experts": 16, "top_k": 4, "ffn_hidden_size": 512},
}
WAVE_1 = {
    "topk": {},
    "group_M1": {"router": {"kind": "group_limited", "group_limited": {"max_groups": 1, "num_groups": 4}}},
    "group_M2": {"router": {"kind": "group_limited", "group_limited": {"max_groups": 2, "num_groups": 4}}},
    # The paper raises k by half (Mixtral 2 -> 3) with as many nulls as experts.
    "adamoe": {"top_k": 6, "router": {"kind": "adamoe", "aux_loss_weight": 0.02, "adamoe": {"num_null_experts": 16}}},
    "remoe": {"router": {"kind": "remoe"}},
}
C2R_TOP_T = (4, 8)  # T >= k - 1 = 3; the official code uses T = E / 2


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    model = json.loads(json.dumps(MODEL))
    if args.tiny:  # a CPU smoke run of the whole pipeline
        model.update(block_size=64, d_model=64, n_layer=2)
        model["moe"]["ffn_hidden_size"] = 64
    return model


def run_config(name: str, moe_overrides: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    model = model_config(args)
    model["moe"].update(moe_overrides)
    return {
        "model": model,
        "train": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": 2e-3,
            "warmup_steps": max(1, args.steps // 20),
            "eval_every": max(1, args.steps // 4),
            "eval_batches": 8,
            "seed": args.seed,
            "out_dir": str(Path(args.out) / name),
        },
        "data": {"max_bytes": 400_000} if args.tiny else {},
        "profile": {"enabled": Path(name).name == "topk", "trace": {"sample_rate": 0.01}},  # for the C2R lists
    }


def launch(name: str, config: dict[str, Any], args: argparse.Namespace) -> subprocess.Popen:
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_config.json").write_text(json.dumps(config, indent=2))
    cmd = [sys.executable, "-m", "c2r.train", "--config", str(out / "run_config.json")]
    return start(name, cmd, out)


def start(name: str, cmd: list[str], out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)  # each run is its own world of one
    log = open(out / "log.txt", "w")  # noqa: SIM115 (closed with the process)
    print(f"[{time.strftime('%H:%M:%S')}] start {name}: {' '.join(cmd)}", flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def wait_all(procs: dict[str, subprocess.Popen], args: argparse.Namespace) -> None:
    failed = []
    for name, proc in procs.items():
        code = proc.wait()
        print(f"[{time.strftime('%H:%M:%S')}] {name} exited {code}", flush=True)
        if code:
            failed.append(name)
            tail = (Path(args.out) / name / "log.txt").read_text().replace("\r", "\n").splitlines()[-25:]
            print("\n".join(tail), flush=True)
    if failed:
        raise SystemExit(f"runs failed: {failed}")


def cmd_train(args: argparse.Namespace) -> None:
    started = time.time()
    wave_1 = {name: run_config(name, moe, args) for name, moe in WAVE_1.items()}
    epoch_steps = epoch_length(args)
    wave_1["adamoe"]["model"]["moe"]["router"]["adamoe"]["aux_loss_switch_step"] = min(epoch_steps, args.steps)
    wait_all({name: launch(name, config, args) for name, config in wave_1.items()}, args)
    print(f"wave 1 done in {time.time() - started:.0f} s", flush=True)
    out = Path(args.out)
    lists = out / "c2r_lists.npz"
    subprocess.run(
        [sys.executable, "-m", "c2r.routing.cli", "collaborators", str(out / "topk"), "--out", str(lists)], check=True
    )
    procs = {}
    for top_t in C2R_TOP_T:
        name = f"c2r_T{top_t}"
        router = {"kind": "c2r", "c2r": {"collaborators": str(lists), "top_t": top_t}}
        procs[name] = launch(name, run_config(name, {"router": router}, args), args)
    if not args.no_adak:
        adak_out = out / "adak"
        adak_out.mkdir(parents=True, exist_ok=True)
        adak_cmd = [sys.executable, "-m", "c2r.adak_train", "--checkpoint", str(out / "topk"), "--out", str(adak_out)]
        adak_cmd += ["--seed", str(args.seed)]
        procs["adak"] = start("adak", adak_cmd + args.adak_args, adak_out)
    wait_all(procs, args)
    print(f"all training done in {time.time() - started:.0f} s", flush=True)


FINETUNES = {
    "topk_cont": {},
    # m = E null twins and k doubled: the converted layer starts as exactly the trained top-4 function.
    "adamoe_conv": {
        "top_k": 8,
        "router": {"kind": "adamoe", "aux_loss_weight": 0.02, "adamoe": {"num_null_experts": 16}},
    },
    **{f"c2r_T{t}_ft": {"router": {"kind": "c2r", "c2r": {"top_t": t}}} for t in C2R_TOP_T},
}


def cmd_finetune(args: argparse.Namespace) -> None:
    """The papers' own setting for AdaMoE and C2R: switch a trained top-k model's router and fine-tune it, against
    the same model fine-tuned as top-k for the same steps. One base model per seed, all runs sharing the GPU."""
    started, out = time.time(), Path(args.out)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    bases = {}
    for seed in seeds:
        args.seed = seed
        bases[f"s{seed}/topk"] = run_config(f"s{seed}/topk", {}, args)
    wait_all({name: launch(name, config, args) for name, config in bases.items()}, args)
    print(f"base models done in {time.time() - started:.0f} s", flush=True)
    procs = {}
    for seed in seeds:
        args.seed = seed
        base = out / f"s{seed}" / "topk"
        lists = out / f"s{seed}" / "c2r_lists.npz"
        subprocess.run(
            [sys.executable, "-m", "c2r.routing.cli", "collaborators", str(base), "--out", str(lists)], check=True
        )
        for name, moe in FINETUNES.items():
            moe = json.loads(json.dumps(moe))
            if moe.get("router", {}).get("kind") == "c2r":
                moe["router"]["c2r"]["collaborators"] = str(lists)
            config = run_config(f"s{seed}/{name}", moe, args)
            config["train"].update(
                steps=args.finetune_steps,
                init_from=str(base),
                lr=args.finetune_lr,
                warmup_steps=10,
                eval_every=args.finetune_steps,
            )
            procs[f"s{seed}/{name}"] = launch(f"s{seed}/{name}", config, args)
    wait_all(procs, args)
    print(f"fine-tuning done in {time.time() - started:.0f} s", flush=True)


def epoch_length(args: argparse.Namespace) -> int:
    from c2r.data import DataConfig, load_corpus

    corpus = load_corpus(DataConfig(max_bytes=400_000) if args.tiny else DataConfig())
    return len(corpus.train) // (args.batch_size * model_config(args)["block_size"])


def run_names(out: Path) -> list[str]:
    order = ["topk", *(f"c2r_T{t}" for t in C2R_TOP_T), "group_M1", "group_M2", "adamoe", "remoe", "adak", *FINETUNES]
    found = sorted(path.parent.parent.name for path in out.glob("*/checkpoints/latest"))
    return [name for name in order if name in found] + [name for name in found if name not in order]


def cmd_evaluate(args: argparse.Namespace) -> None:
    from c2r.deepspeed import init_distributed

    info = init_distributed("auto")
    out = Path(args.out)
    results = {}
    for name in run_names(out):
        results[name] = evaluate_run(out / name, info.device, args, out / f"routing_{name}.npz")
        print(f"{name:>10}: val loss {results[name]['val_loss']:.4f}, active {results[name]['active']:.3f}", flush=True)
    (out / "evaluation.json").write_text(json.dumps(results, indent=2))


def evaluate_run(run_dir: Path, device, args: argparse.Namespace, masks_path: Path) -> dict[str, Any]:
    """Validation loss and per-layer expert sets of a run's final model on the same held-out batches."""
    import torch

    from c2r.config_utils import config_from_dict
    from c2r.data import BatchSampler, load_corpus
    from c2r.deepspeed.checkpoint import CONFIG_FILE, init_from_checkpoint, resolve_checkpoint
    from c2r.train import RunConfig, build_engine

    ckpt_dir, tag = resolve_checkpoint(run_dir / "checkpoints")
    saved = json.loads((ckpt_dir / tag / CONFIG_FILE).read_text())
    raw = {key: saved[key] for key in ("model", "train", "data")}
    raw["train"].update(init_from=None, resume=False)
    config = config_from_dict(RunConfig, raw)
    engine = build_engine(config, device)
    init_from_checkpoint(engine, ckpt_dir / tag, dataclasses.asdict(config))
    engine.eval()
    corpus = load_corpus(config.data)
    sampler = BatchSampler(corpus.val, config.model.block_size, args.eval_batch_size, seed=12345)
    losses, masks = [], [[] for _ in range(config.model.num_moe_layers)]
    num_experts = config.model.moe.num_experts
    with torch.no_grad():
        for i in range(args.eval_batches):
            output = engine(*sampler.batch_at(i, device))
            losses.append(float(output.lm_loss))
            for layer, routing in enumerate(output.routing):
                mask_TE = torch.zeros(routing.num_tokens, num_experts, dtype=torch.bool, device=device)
                mask_TE.scatter_(1, routing.expert_ids_TK, routing.valid_TK)
                masks[layer].append(mask_TE.cpu().numpy())
    masks_LTE = np.stack([np.concatenate(m) for m in masks])
    np.savez_compressed(masks_path, masks=np.packbits(masks_LTE, axis=-1), num_experts=num_experts)
    active_L = masks_LTE.sum(axis=-1).mean(axis=-1)
    metrics = run_dir / "metrics.jsonl"  # c2r-adak writes adak_metrics.jsonl instead
    history = (
        [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    )
    return {
        "val_loss": float(np.mean(losses)),
        "active": float(active_L.mean()),
        "active_by_layer": active_L.round(4).tolist(),
        "train_val_loss": history[-1]["val_loss"] if history else None,
        "router": saved["model"]["moe"]["router"]["kind"],
        "top_k": saved["model"]["moe"]["top_k"],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["train", "finetune", "evaluate", "report"])
    parser.add_argument("--out", default="runs/quality", help="study directory (report: several, comma-separated)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--ranks", type=int, default=4, help="expert-parallel ranks for copies per token (report)")
    parser.add_argument("--results", default="docs/results.md", help="report: the markdown file to write")
    parser.add_argument("--seed", type=int, default=0, help="model init and data order (the same for every router)")
    parser.add_argument("--seeds", default="0,1,2", help="finetune: the seeds, one base model each")
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--baseline", default="topk", help="report: the run the others are compared with")
    parser.add_argument("--plot-name", default="router_quality", help="report: docs/img/<name>.png")
    parser.add_argument("--tiny", action="store_true", help="a small model on little data: a CPU smoke run")
    parser.add_argument("--no-adak", action="store_true", help="skip the Ada-K run")
    parser.add_argument("--adak-args", nargs=argparse.REMAINDER, default=[], help="passed to c2r-adak (last)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "train":
        cmd_train(args)
    elif args.command == "finetune":
        cmd_finetune(args)
    elif args.command == "evaluate":
        cmd_evaluate(args)
    else:
        from benchmarks.router_quality_report import write_report

        outs = [Path(out) for out in args.out.split(",")]
        write_report(outs, args.ranks, Path(args.results), args.baseline, args.plot_name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
