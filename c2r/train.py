"""``c2r-train``: train the MoE GPT on the embedded corpus (default) or your own text.

c2r-train                                   # the demo: ~300 steps on the CPU, a few minutes
c2r-train --data my_texts/ --steps 2000     # your own .txt/.md/.py/.jsonl files
c2r-train --set model.moe.num_experts=16 --set model.moe.router.kind=topk --backend torch
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from c2r.config_utils import config_from_dict, config_to_dict, require_choice, require_positive
from c2r.data import BatchSampler, Corpus, DataConfig, load_corpus
from c2r.model import ModelConfig, ModelOutput, MoEGPT
from c2r.routing import RoutingResult

log = logging.getLogger("c2r.train")


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    out_dir: str = "runs/demo"

    def __post_init__(self) -> None:
        require_positive(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            eval_every=self.eval_every,
            eval_batches=self.eval_batches,
        )
        require_choice("dtype", self.dtype, ("float32", "bfloat16"))


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


def apply_override(config: dict[str, Any], assignment: str) -> None:
    """``a.b.c=value`` sets config["a"]["b"]["c"]; value is parsed as JSON, else kept as a string."""
    key, sep, raw = assignment.partition("=")
    if not sep:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    *parents, leaf = key.strip().split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {key}: {part!r} is not a config section")
    try:
        node[leaf] = json.loads(raw)
    except json.JSONDecodeError:
        node[leaf] = raw


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def routing_stats(routings: list[RoutingResult]) -> dict[str, float]:
    """Mean active experts per token and mean expert-load imbalance (max/mean tokens per expert) over layers."""
    if not routings:
        return {}
    active = torch.stack([r.active_experts_per_token() for r in routings]).mean()
    loads = torch.stack([r.tokens_per_expert_E.float() for r in routings])
    imbalance = (loads.max(dim=1).values / loads.mean(dim=1).clamp(min=1e-9)).mean()
    return {"active_experts_per_token": float(active), "load_imbalance": float(imbalance)}


@torch.no_grad()
def evaluate(model: MoEGPT, sampler: BatchSampler, batches: int, device: torch.device) -> float:
    model.eval()
    losses = [model(*sampler.next(device)).lm_loss.item() for _ in range(batches)]
    model.train()
    return sum(losses) / len(losses)


def save_checkpoint(model: MoEGPT, config: RunConfig, step: int, out_dir: Path) -> Path:
    """Write to a temporary file and rename: a crash mid-save leaves the previous checkpoint intact."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.pt"
    tmp = out_dir / "model.pt.tmp"
    torch.save({"model": model.state_dict(), "config": config_to_dict(config), "step": step}, tmp)
    os.replace(tmp, path)
    return path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(config: RunConfig) -> dict[str, Any]:
    tc = config.train
    torch.manual_seed(tc.seed)
    device = resolve_device(tc.device)
    corpus: Corpus = load_corpus(config.data)
    model = MoEGPT(config.model).to(device)
    if tc.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    params = model.num_parameters()
    log.info(
        "corpus: %s (%d documents, %.1f MB train, %.2f MB validation)",
        corpus.source,
        corpus.num_documents,
        len(corpus.train) / 1e6,
        len(corpus.val) / 1e6,
    )
    log.info(
        "model: %.2fM parameters (%.2fM in experts, %.2fM active per token), %d MoE layers of %d experts, "
        "top-%d, backend %s, on %s",
        params["total"] / 1e6,
        params["expert"] / 1e6,
        params["active_per_token"] / 1e6,
        config.model.num_moe_layers,
        config.model.moe.num_experts,
        config.model.moe.top_k,
        config.model.moe.experts.backend,
        device,
    )
    block = config.model.block_size
    train_batches = BatchSampler(corpus.train, block, tc.batch_size, seed=tc.seed)
    val_batches = BatchSampler(corpus.val, block, tc.batch_size, seed=tc.seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.95))
    out_dir = Path(tc.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, Any]] = []
    window: list[float] = []
    start = time.perf_counter()
    with open(out_dir / "metrics.jsonl", "w") as metrics_file, tqdm(range(tc.steps), desc="train", unit="step") as bar:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, tc)
            out: ModelOutput = model(*train_batches.next(device))
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            window.append(out.lm_loss.item())
            bar.set_postfix(loss=f"{window[-1]:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
            if (step + 1) % tc.eval_every == 0 or step + 1 == tc.steps:
                record = {
                    "step": step + 1,
                    "train_loss": sum(window) / len(window),
                    "val_loss": evaluate(model, val_batches, tc.eval_batches, device),
                    "aux_loss": out.aux_loss.item(),
                    **routing_stats(out.routing),
                    "elapsed_s": time.perf_counter() - start,
                }
                window.clear()
                history.append(record)
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                tqdm.write(
                    f"step {record['step']:>5}  train loss {record['train_loss']:.4f}  "
                    f"val loss {record['val_loss']:.4f}  active experts/token "
                    f"{record.get('active_experts_per_token', 0):.2f}  load imbalance "
                    f"{record.get('load_imbalance', 0):.2f}"
                )
    checkpoint = save_checkpoint(model, config, tc.steps, out_dir)
    log.info("saved %s; metrics in %s", checkpoint, out_dir / "metrics.jsonl")
    return {"history": history, "checkpoint": str(checkpoint), "parameters": params}


def build_config(args: argparse.Namespace) -> RunConfig:
    raw: dict[str, Any] = json.loads(Path(args.config).read_text()) if args.config else {}
    shortcuts = {
        "data.path": args.data,
        "train.steps": args.steps,
        "train.device": args.device,
        "train.out_dir": args.out,
        "model.moe.experts.backend": args.backend,
        "model.moe.router.kind": args.router,
    }
    for key, value in shortcuts.items():
        if value is not None:
            apply_override(raw, f"{key}={json.dumps(value)}")
    for assignment in args.set or []:
        apply_override(raw, assignment)
    return config_from_dict(RunConfig, raw)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="c2r-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="JSON file with sections model / train / data (see c2r/train.py)")
    parser.add_argument(
        "--data",
        help="text file or directory (.txt .md .rst .py .jsonl); default: the embedded Python standard-library corpus",
    )
    parser.add_argument("--steps", type=int, help="optimizer steps (default 300)")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    parser.add_argument("--backend", help="expert backend: auto, reference, torch, megablocks")
    parser.add_argument("--router", help="router kind (default topk)")
    parser.add_argument("--out", help="output directory (default runs/demo)")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set model.moe.num_experts=16 (repeatable)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    args = parse_args(argv)
    try:
        config = build_config(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise SystemExit(f"c2r-train: bad config: {error}") from None
    if args.print_config:
        print(json.dumps(config_to_dict(config), indent=2))
        return 0
    result = train(config)
    first, last = result["history"][0], result["history"][-1]
    print(
        f"done: train loss {first['train_loss']:.3f} -> {last['train_loss']:.3f}, "
        f"val loss {first['val_loss']:.3f} -> {last['val_loss']:.3f} over {config.train.steps} steps"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
