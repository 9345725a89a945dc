"""``c2r-train``: train the MoE GPT with DeepSpeed (ZeRO, expert parallelism) on the embedded corpus or your text.

c2r-train                                               # one process: the demo on the embedded corpus
deepspeed --num_gpus 2 --module c2r.train --ep-size 2   # 2 ranks (GPUs, or CPU processes on a CPU machine)
mpirun -np 4 python -m c2r.train --ep-size 2            # MPI launch (mpi4py discovers the ranks)
c2r-train --data my_texts/ --steps 2000 --set model.moe.num_experts=16
c2r-train --out runs/mine --resume --steps 600          # continue from runs/mine/checkpoints/latest
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from c2r.data import BatchSampler, load_corpus
from c2r.model import ModelOutput
from c2r.profiled import profiled_model
from c2r.routing import RoutingResult, after_optimizer_step
from c2r.run_setup import (
    ConfigCli,
    MetricsLog,
    RunConfig,
    Shorthand,
    batch_samplers,
    build_engine,
    global_mean,
    launcher_rank,
    lr_at,
    progress_bar,
    run_config_record,
    start_run,
)
from profiling.session import ProfileSession, open_comm_profiler

log = logging.getLogger("c2r.train")


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


def train(config: RunConfig) -> dict[str, Any]:
    from c2r.deepspeed.checkpoint import init_from_checkpoint, resume, save_checkpoint

    tc = config.train
    info = start_run(config)
    is_main = info.rank == 0
    corpus = load_corpus(config.data)
    # The all-to-all profiler exists before the engine: each dispatcher is built with its observer.
    use_cuda = info.device.type == "cuda"
    comm = open_comm_profiler(Path(tc.out_dir) / "profile", config.profile, config.model.num_moe_layers, use_cuda)
    engine = build_engine(config, info.device, observers=comm.observers if comm else None)
    run_config = run_config_record(config, engine.module)
    out_dir, ckpt_dir = Path(tc.out_dir), Path(tc.out_dir) / "checkpoints"
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_start(config, corpus, info, dtype=next(engine.module.parameters()).dtype)
    if tc.init_from and not tc.resume:
        init_from_checkpoint(engine, tc.init_from, run_config)
        if is_main:
            log.info("initialised from the weights in %s", tc.init_from)
    start = resume(engine, ckpt_dir, run_config) if tc.resume else 0
    train_batches, val_batches = batch_samplers(corpus, config, info.rank)
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
    bar = progress_bar(range(start, tc.steps), "train", enabled=is_main)
    metrics_log = MetricsLog(out_dir / "metrics.jsonl", append=tc.resume, enabled=is_main, format_record=format_record)
    with metrics_log as metrics:
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


TRAIN_CLI = ConfigCli(
    prog="c2r-train",
    description=__doc__,
    config_cls=RunConfig,
    shorthands=(
        Shorthand(
            "--data",
            "data.path",
            "text file or directory (.txt .md .rst .py .jsonl); default: the embedded Python standard-library corpus",
        ),
        Shorthand("--steps", "train.steps", "optimizer steps", int),
        Shorthand(
            "--ep-size",
            "train.ep_size",
            "expert-parallel ranks; must divide the world size and the number of experts",
            int,
        ),
        Shorthand(
            "--deepspeed-config",
            "train.deepspeed_config",
            "DeepSpeed JSON (default: deepspeed_configs/cpu_zero2.json on CPU, gpu_bf16_zero2.json on GPU)",
            aliases=("--deepspeed_config",),  # DeepSpeed's own spelling
        ),
        Shorthand("--device", "train.device", "auto, cpu or cuda"),
        Shorthand("--backend", "model.moe.experts.backend", "expert backend: auto, reference, torch, megablocks"),
        Shorthand(
            "--router",
            "model.moe.router.kind",
            "router kind: topk, c2r, group_limited, adamoe, remoe, adak (options: --set)",
        ),
        Shorthand("--out", "train.out_dir", "output directory"),
        Shorthand(
            "--dispatch",
            "train.dispatch",
            "per-expert: one token copy per routed expert; per-rank: one per destination rank, expanded there",
            choices=("per-expert", "per-rank"),
        ),
        Shorthand(
            "--plan", "train.placement_plan", "placement plan JSON from c2r-place plan (default: contiguous experts)"
        ),
        Shorthand("--resume", "train.resume", "continue from OUT/checkpoints/latest", switch=True),
        Shorthand(
            "--init-from",
            "train.init_from",
            "start from the weights of another run's checkpoint (fresh optimizer, step 0); e.g. convert a trained "
            "top-k model to --router adamoe",
            metavar="CKPT",
        ),
        Shorthand(
            "--profile",
            "profile.enabled",
            "record routing traces and all-to-all traffic in OUT/profile (see c2r-profile)",
            switch=True,
        ),
    ),
)


def starts_untrained_allocator(config: RunConfig) -> bool:
    """True for ``--router adak`` from weights without trained Ada-K allocators: c2r-train's loss does not train
    them (k is a discrete choice; c2r-adak trains them with PPO), so every token keeps the untrained allocator's k."""
    from c2r.deepspeed.checkpoint import CONFIG_FILE, resolve_checkpoint

    if config.model.moe.router.kind != "adak":
        return False
    tc = config.train
    source = Path(tc.out_dir) / "checkpoints" if tc.resume else tc.init_from
    if source is None:
        return True
    try:
        ckpt_dir, tag = resolve_checkpoint(source)
    except FileNotFoundError:
        return False  # the run itself reports the missing checkpoint
    saved = json.loads((ckpt_dir / tag / CONFIG_FILE).read_text())
    return saved["model"]["moe"]["router"]["kind"] != "adak"


def run(config: RunConfig) -> str | None:
    """Train; the summary line rank 0 prints."""
    if launcher_rank() == 0 and starts_untrained_allocator(config):
        log.warning(
            "--router adak starts from untrained Ada-K allocators, and c2r-train does not train them: train them on "
            "a top-k run with `c2r-adak --checkpoint RUN --out RUN_ADAK`, then `c2r-train --init-from RUN_ADAK "
            "--router adak`"
        )
    history = train(config)["history"]
    if not history:
        return None
    first, last = history[0], history[-1]
    return (
        f"done: train loss {first['train_loss']:.3f} -> {last['train_loss']:.3f}, "
        f"val loss {first['val_loss']:.3f} -> {last['val_loss']:.3f} over {config.train.steps} steps"
    )


def main(argv: list[str] | None = None) -> int:
    return TRAIN_CLI.main(argv, run)


if __name__ == "__main__":
    raise SystemExit(main())
