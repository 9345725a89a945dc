"""``c2r-train``: train the MoE GPT with DeepSpeed (ZeRO, expert parallelism) on the embedded corpus or your text.

c2r-train                                               # one process: the demo on the embedded corpus
deepspeed --num_gpus 2 -m c2r.train --ep-size 2         # 2 ranks (GPUs, or CPU processes on a CPU machine)
mpirun -np 4 python -m c2r.train --ep-size 2            # MPI launch (mpi4py discovers the ranks)
c2r-train --data my_texts/ --steps 2000 --set model.moe.num_experts=16
c2r-train --out runs/demo --resume                      # continue from runs/demo/checkpoints/latest
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from c2r.config_utils import config_from_dict, config_to_dict, require_choice, require_positive
from c2r.data import BatchSampler, DataConfig, load_corpus
from c2r.model import ModelConfig, ModelOutput, MoEGPT
from c2r.parallel import DISPATCH_MODES, DispatchObserver, model_layouts
from c2r.profiled import profiled_model
from c2r.routing import RoutingResult, after_optimizer_step
from placement.layout import require_divides
from profiling.session import ProfileConfig, ProfileSession, open_comm_profiler

log = logging.getLogger("c2r.train")


@dataclass
class TrainConfig:
    """Optimisation and parallelism. ``batch_size`` is per rank (DeepSpeed's micro batch)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 0  # 0: only at the end
    resume: bool = False
    init_from: str | None = None  # start from another run's weights (fresh optimizer, step 0), e.g. to switch router
    seed: int = 0
    device: str = "auto"
    ep_size: int = 1
    dispatch: str = "per-expert"  # or "per-rank": one token copy per destination rank (DESIGN.md, "Dispatch")
    placement_plan: str | None = None  # c2r-place plan JSON: which experts live on which EP rank, per MoE layer
    deepspeed_config: str | None = None  # default: deepspeed_configs/cpu_zero2.json or gpu_bf16_zero2.json
    out_dir: str = "runs/demo"

    def __post_init__(self) -> None:
        require_positive(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            eval_every=self.eval_every,
            eval_batches=self.eval_batches,
            ep_size=self.ep_size,
        )
        require_choice("dispatch", self.dispatch, DISPATCH_MODES)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def __post_init__(self) -> None:
        require_divides(self.train.ep_size, "ep_size", self.model.moe.num_experts, "num_experts")


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


def global_mean(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def routing_stats(routings: list[RoutingResult], device: torch.device) -> dict[str, Any]:
    """Active experts per token (per MoE layer and their mean: variable-k routers spend less where it is lower) and
    load imbalance (max/mean tokens per expert over the whole job, averaged over MoE layers)."""
    if not routings:
        return {}
    loads = torch.stack([r.tokens_per_expert_E.float() for r in routings]).to(device)
    active_L = torch.stack([r.active_experts_per_token() for r in routings]).to(device)
    dist.all_reduce(loads)
    dist.all_reduce(active_L)
    active_L = active_L / dist.get_world_size()
    imbalance = (loads.max(dim=1).values / loads.mean(dim=1).clamp(min=1e-9)).mean()
    return {
        "active_experts_per_token": float(active_L.mean()),
        "active_experts_per_token_by_layer": [round(float(a), 4) for a in active_L],
        "load_imbalance": float(imbalance),
    }


@torch.no_grad()
def evaluate(engine, sampler: BatchSampler, batches: int, device: torch.device) -> float:
    engine.eval()
    loss = sum(engine(*sampler.batch_at(i, device)).lm_loss.item() for i in range(batches)) / batches
    engine.train()
    return global_mean(loss, device)


def build_engine(config: RunConfig, device: torch.device, observers: list[DispatchObserver] | None = None):
    import deepspeed

    from c2r.deepspeed import load_deepspeed_config, make_expert_parallel, optimizer_param_groups

    tc = config.train
    ds_config = load_deepspeed_config(tc.deepspeed_config, device.type == "cuda", tc.batch_size, tc.grad_clip)
    torch.manual_seed(tc.seed)  # the same initial model on every rank; each then keeps its own experts
    model = MoEGPT(config.model)
    make_expert_parallel(model, tc.ep_size, tc.dispatch, plan_layouts(config), observers)
    model.to(device)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, tc) / tc.lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


def plan_layouts(config: RunConfig):
    """The placement plan's per-layer expert layouts, checked against the model; None for contiguous."""
    if config.train.placement_plan is None:
        return None
    from placement.plan import load_plan

    return load_plan(
        config.train.placement_plan,
        num_layers=config.model.num_moe_layers,
        num_experts=config.model.moe.num_experts,
        num_ranks=config.train.ep_size,
    ).layouts


def train(config: RunConfig) -> dict[str, Any]:
    from c2r.deepspeed import init_distributed
    from c2r.deepspeed.checkpoint import init_from_checkpoint, resume, save_checkpoint

    tc = config.train
    info = init_distributed(tc.device)
    if info.world_size % tc.ep_size:
        raise ValueError(f"ep_size ({tc.ep_size}) must divide the world size ({info.world_size})")
    is_main = info.rank == 0
    corpus = load_corpus(config.data)
    # The all-to-all profiler exists before the engine: each dispatcher is built with its observer.
    use_cuda = info.device.type == "cuda"
    comm = open_comm_profiler(Path(tc.out_dir) / "profile", config.profile, config.model.num_moe_layers, use_cuda)
    engine = build_engine(config, info.device, comm.observers if comm else None)
    run_config = config_to_dict(config)
    run_config["expert_layouts"] = model_layouts(engine.module)
    out_dir, ckpt_dir = Path(tc.out_dir), Path(tc.out_dir) / "checkpoints"
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_start(config, corpus, info, dtype=next(engine.module.parameters()).dtype)
    if tc.init_from and not tc.resume:
        init_from_checkpoint(engine, tc.init_from, run_config)
        if is_main:
            log.info("initialised from the weights in %s", tc.init_from)
    start = resume(engine, ckpt_dir, run_config) if tc.resume else 0
    block = config.model.block_size
    train_batches = BatchSampler(corpus.train, block, tc.batch_size, seed=tc.seed + 7919 * info.rank)
    val_batches = BatchSampler(corpus.val, block, tc.batch_size, seed=tc.seed + 104729 + 7919 * info.rank)
    profiler = None
    if config.profile.enabled:
        profiler = ProfileSession(
            out_dir / "profile",
            profiled_model(engine.module),
            config.profile,
            {"ep_size": tc.ep_size, "run": str(out_dir), "steps": tc.steps},
            comm,
        )
    history, step_losses, window, router_state = [], [], [], {}
    started = time.perf_counter()
    bar = tqdm(
        range(start, tc.steps),
        desc="train",
        unit="step",
        disable=not is_main,
        initial=start,
        total=tc.steps,
        mininterval=0.1 if sys.stderr.isatty() else 5.0,
    )  # keep logs of non-interactive runs short
    with MetricsLog(out_dir / "metrics.jsonl", append=tc.resume, enabled=is_main) as metrics:
        for step in bar:
            if profiler:
                profiler.begin_step(step)
            out: ModelOutput = engine(*train_batches.batch_at(step, info.device))
            engine.backward(out.loss)
            boundary = engine.is_gradient_accumulation_boundary()  # before step(), which advances the micro step
            engine.step()
            if boundary:
                router_state = after_optimizer_step(engine.module)  # ReMoE's lambda, group-limited bias, ...
            if profiler:
                profiler.end_step(step)
            step_losses.append(global_mean(out.lm_loss.item(), info.device))
            window.append(step_losses[-1])
            bar.set_postfix(loss=f"{step_losses[-1]:.3f}", lr=f"{lr_at(step, tc):.1e}")
            done = step + 1
            if done % tc.eval_every == 0 or done == tc.steps:
                record = {
                    "step": done,
                    "train_loss": sum(window) / len(window),
                    "val_loss": evaluate(engine, val_batches, tc.eval_batches, info.device),
                    "aux_loss": out.aux_loss.item(),
                    **routing_stats(out.routing, info.device),
                    **router_state,
                    **(profiler.scalars() if profiler else {}),
                    "elapsed_s": time.perf_counter() - started,
                }
                window.clear()
                history.append(record)
                metrics.write(record)
                write_monitor(engine, record)
            if (tc.save_every and done % tc.save_every == 0) or done == tc.steps:
                save_checkpoint(engine, ckpt_dir, done, run_config)
    if profiler:
        profiler.close()
    if is_main:
        log.info("checkpoint in %s; metrics in %s", ckpt_dir, out_dir / "metrics.jsonl")
        if profiler:
            log.info("profile in %s (c2r-profile summarize %s)", out_dir / "profile", out_dir)
    return {"history": history, "step_losses": step_losses, "checkpoint_dir": str(ckpt_dir), "engine": engine}


def write_monitor(engine, record: dict[str, Any]) -> None:
    """Our eval record to DeepSpeed's monitor (TensorBoard / CSV / W&B), when the DeepSpeed config enables one."""
    if engine.monitor.enabled:
        step = record["step"]
        engine.monitor.write_events([(f"c2r/{key}", value, step) for key, value in record.items() if key != "step"])


class MetricsLog:
    """metrics.jsonl and the terminal lines, written by rank 0 only."""

    def __init__(self, path: Path, append: bool, enabled: bool):
        self.path, self.mode, self.enabled, self.file = path, "a" if append else "w", enabled, None

    def __enter__(self) -> MetricsLog:
        if self.enabled:
            self.file = open(self.path, self.mode)  # noqa: SIM115 (closed in __exit__)
        return self

    def write(self, record: dict[str, Any]) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            tqdm.write(format_record(record))

    def __exit__(self, *exc) -> None:
        if self.file:
            self.file.close()


def format_record(r: dict[str, Any]) -> str:
    return (
        f"step {r['step']:>5}  train loss {r['train_loss']:.4f}  val loss {r['val_loss']:.4f}  "
        f"active experts/token {r.get('active_experts_per_token', 0):.2f}  "
        f"load imbalance {r.get('load_imbalance', 0):.2f}"
    )


def log_start(config: RunConfig, corpus, info, dtype: torch.dtype) -> None:
    from c2r.experts import resolve_backend_name

    moe = config.model.moe
    backend = resolve_backend_name(moe.experts, info.device, dtype)
    log.info(
        "corpus: %s (%d documents, %.1f MB train, %.2f MB validation)",
        corpus.source,
        corpus.num_documents,
        len(corpus.train) / 1e6,
        len(corpus.val) / 1e6,
    )
    log.info(
        "model: %d MoE layers of %d experts (top-%d, %s router, %s expert backend, %s), %d ranks on %s, "
        "ep_size %d (%d experts per rank)",
        config.model.num_moe_layers,
        moe.num_experts,
        moe.top_k,
        moe.router.kind,
        backend,
        str(dtype).removeprefix("torch."),
        info.world_size,
        info.device.type,
        config.train.ep_size,
        moe.num_experts // config.train.ep_size,
    )


def build_config(args: argparse.Namespace) -> RunConfig:
    raw: dict[str, Any] = json.loads(Path(args.config).read_text()) if args.config else {}
    shortcuts = {
        "data.path": args.data,
        "train.steps": args.steps,
        "train.device": args.device,
        "train.out_dir": args.out,
        "train.ep_size": args.ep_size,
        "train.dispatch": args.dispatch,
        "train.placement_plan": args.plan,
        "train.init_from": args.init_from,
        "train.deepspeed_config": args.deepspeed_config,
        "model.moe.experts.backend": args.backend,
        "model.moe.router.kind": args.router,
    }
    for key, value in shortcuts.items():
        if value is not None:
            apply_override(raw, f"{key}={json.dumps(value)}")
    if args.resume:
        apply_override(raw, "train.resume=true")
    if args.profile:
        apply_override(raw, "profile.enabled=true")
    for assignment in args.set or []:
        apply_override(raw, assignment)
    return config_from_dict(RunConfig, raw)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="c2r-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="JSON file with sections model / train / data (see --print-config)")
    parser.add_argument(
        "--data",
        help="text file or directory (.txt .md .rst .py .jsonl); default: the embedded Python standard-library corpus",
    )
    parser.add_argument("--steps", type=int, help="optimizer steps (default 300)")
    parser.add_argument(
        "--ep-size",
        type=int,
        help="expert-parallel ranks; must divide the world size and the number of experts (default 1)",
    )
    parser.add_argument(
        "--deepspeed-config",
        help="DeepSpeed JSON (default: deepspeed_configs/cpu_zero2.json on CPU, gpu_bf16_zero2.json on GPU)",
    )
    parser.add_argument("--device", help="auto (default), cpu or cuda")
    parser.add_argument("--backend", help="expert backend: auto, reference, torch, megablocks")
    parser.add_argument(
        "--router", help="router kind: topk (default), c2r, group_limited, adamoe, remoe, adak (options: --set)"
    )
    parser.add_argument("--out", help="output directory (default runs/demo)")
    parser.add_argument(
        "--dispatch",
        choices=["per-expert", "per-rank"],
        help="per-expert (default): one token copy per routed expert; per-rank: one per destination "
        "rank, expanded there",
    )
    parser.add_argument("--plan", help="placement plan JSON from c2r-place plan (default: contiguous experts)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest")
    parser.add_argument(
        "--init-from",
        metavar="CKPT",
        help="start from the weights of another run's checkpoint (fresh optimizer, step 0); e.g. convert a trained "
        "top-k model to --router adamoe",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record routing traces and all-to-all traffic in OUT/profile (see c2r-profile)",
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set model.moe.num_experts=16 (repeatable)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by the launcher
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
    try:
        result = train(config)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"c2r-train: {error}") from None
    if dist.get_rank() == 0 and result["history"]:
        first, last = result["history"][0], result["history"][-1]
        print(
            f"done: train loss {first['train_loss']:.3f} -> {last['train_loss']:.3f}, "
            f"val loss {first['val_loss']:.3f} -> {last['val_loss']:.3f} over {config.train.steps} steps"
        )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
