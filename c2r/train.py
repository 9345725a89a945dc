"""``c2r-train``: train the MoE GPT with DeepSpeed (ZeRO, expert parallelism) on the embedded corpus or your text.

c2r-train                                               # one process: the demo on the embedded corpus
deepspeed --num_gpus 2 --module c2r.train --ep-size 2   # 2 ranks (GPUs, or CPU processes on a CPU machine)
mpirun -np 4 python -m c2r.train --ep-size 2            # MPI launch (mpi4py discovers the ranks)
c2r-train --data my_texts/ --steps 2000 --set model.moe.num_experts=16
c2r-train --out runs/mine --resume --steps 600          # continue runs/mine (under the launch it started with)
c2r-train --hf-model path/to/qwen3-moe --data my.jsonl  # a Hugging Face MoE model, its own tokenizer (c2r/hf)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from c2r.data import BatchSampler, load_corpus
from c2r.hf.training import base_settings
from c2r.model import ModelOutput
from c2r.profiled import profiled_model
from c2r.routing import RoutingResult, after_optimizer_step
from c2r.run_dir import (
    STARTING_PROFILE,
    check_out_dir,
    clear_run,
    discard_starting_profile,
    start_resumed_profile,
)
from c2r.run_setup import (
    ConfigCli,
    MetricsLog,
    RunConfig,
    Shorthand,
    TrainConfig,
    batch_samplers,
    build_engine,
    check_same_corpus,
    corpus_tokenizer,
    global_mean,
    hidden_lr_scale,
    launcher_rank,
    lr_at,
    model_width,
    num_moe_layers,
    plural,
    progress_bar,
    run_config_record,
    start_run,
    tokens_per_step,
)
from c2r.step_reads import StepReader
from c2r.stops import SavePolicy, StopSignals, stop_deadline_warning
from placement.copy_choice import COPY_CHOICES
from profiling.kernels import KernelProfile, phase
from profiling.session import ProfileSession, open_comm_profiler

log = logging.getLogger("c2r.train")


def routing_stats(routings: list[RoutingResult], device: torch.device) -> dict[str, Any]:
    """Active experts per token (per MoE layer and their mean: variable-k routers spend less where it is lower) and
    load imbalance (max/mean tokens per expert over the whole job, per MoE layer and averaged over them)."""
    if not routings:
        return {}
    loads = torch.stack([r.tokens_per_expert_E.float() for r in routings]).to(device)
    active_L = torch.stack([r.active_experts_per_token() for r in routings]).to(device)
    dist.all_reduce(loads)
    dist.all_reduce(active_L)
    active_L = active_L / dist.get_world_size()
    imbalance_L = loads.max(dim=1).values / loads.mean(dim=1).clamp(min=1e-9)
    return {
        "active_experts_per_token": float(active_L.mean()),
        "active_experts_per_token_by_layer": [round(float(a), 4) for a in active_L],
        "load_imbalance": float(imbalance_L.mean()),
        "load_imbalance_by_layer": [round(float(i), 4) for i in imbalance_L],
    }


class TrainingDiverged(FloatingPointError):
    """The training loss or gradient norm is not finite: the run stops before the step can reach a checkpoint."""


def check_finite_step(
    step: int, loss: float, grad_norm: float | None, ckpt_dir: Path, router_error: FloatingPointError | None = None
) -> None:
    """Stop the run at the first step whose loss or gradient norm is NaN/Inf (DeepSpeed reports an invalid norm as
    -1), or whose router logits were (``router_error``, the routers' own error), before anything saves it.
    DeepSpeed's own bf16 check would skip such steps one after another without a word, at a launch per parameter
    per step; ``load_deepspeed_config`` turns it off where this check reads the norm."""
    bad_norm = grad_norm is not None and not (math.isfinite(grad_norm) and grad_norm >= 0)
    if math.isfinite(loss) and not bad_norm and router_error is None:
        return
    latest = ckpt_dir / "latest"
    saved = f"the last checkpoint is {latest.read_text().strip()}" if latest.exists() else "no checkpoint was saved"
    norm = "not computed" if grad_norm is None else ("NaN/Inf" if bad_norm else f"{grad_norm:.4g}")
    cause = f" ({router_error})" if router_error is not None else ""
    raise TrainingDiverged(
        f"training diverged at step {step}: loss {loss:.4g}, gradient norm {norm}{cause}; stopped before saving it, "
        f"{saved} (--resume, in place of any --overwrite, continues from it; a lower --set train.lr=... or "
        "train.grad_clip=... may hold it)"
    )


@torch.no_grad()
def evaluate(engine, sampler: BatchSampler, batches: int, device: torch.device, reads: StepReader) -> float:
    engine.eval()
    loss = sum(engine(*sampler.batch_at(i, device)).lm_loss.item() for i in range(batches)) / batches
    engine.train()
    # the routers' NaN/Inf counts so far, summed over the ranks (every rank raises or none): before anything saves
    if (error := reads.router_error_now()) is not None:
        raise error
    return global_mean(loss, device)


def train(config: RunConfig) -> dict[str, Any]:
    tc = config.train
    out_dir, ckpt_dir = Path(tc.out_dir), Path(tc.out_dir) / "checkpoints"
    check_out_dir(out_dir, tc.resume, tc.overwrite, tc.init_from)  # every rank, before any of them writes
    # From here on, Ctrl-C ends the rank at once (nothing to save yet); once training begins, it stops at a step
    # boundary with a checkpoint.
    with StopSignals(rank=launcher_rank()) as signals:
        info = start_run(config)
        is_main = info.rank == 0
        if tc.overwrite:
            if is_main and (replaced := clear_run(out_dir)):
                log.info("--overwrite: deleted the previous run's %s in %s", ", ".join(replaced), out_dir)
            dist.barrier()
        corpus = load_corpus(config.data, corpus_tokenizer(config), progress=is_main)
        check_same_corpus(corpus)
        # The all-to-all profiler exists before the engine: each dispatcher is built with its observer. A resume's
        # starts in STARTING_PROFILE: the run's profile/ stays as it is until the resume is known to train.
        staged = config.profile.enabled and tc.resume
        comm = open_comm_profiler(
            out_dir / (STARTING_PROFILE if staged else "profile"),
            config.profile,
            num_moe_layers(config),
            info.device.type == "cuda",
        )
        try:
            engine, run_config, start = start_engine(config, corpus, info, comm)
        except BaseException:  # a refused resume leaves the directory's profile as it was
            drop_comm_profiler(comm, out_dir, staged)
            raise
        result = {"history": [], "step_losses": [], "checkpoint_dir": str(ckpt_dir), "engine": engine}
        result.update(start_step=start, end_step=start, stopped_by=None)
        if start >= tc.steps:
            drop_comm_profiler(comm, out_dir, staged)
            return result
        if staged:
            if is_main and (kept := start_resumed_profile(out_dir, start)):
                log.info("--profile on --resume: the earlier profile is kept in %s; this one starts at step %d",
                         kept, start)  # fmt: skip
            dist.barrier()  # every rank, before any of them writes the new profile
        last_save = tc.steps if tc.save_last else -1  # -1: no step is the last one to save
        policy = SavePolicy(tc.save_every, tc.save_every_minutes, last_save, signals)
        signals.begin_training()
        result.update(train_steps(config, engine, corpus, info, comm, policy, start, run_config))
    if is_main:
        log.info("checkpoint in %s; metrics in %s", ckpt_dir, out_dir / "metrics.jsonl")
        if config.profile.enabled:
            log.info("profile in %s (c2r-profile summarize %s)", out_dir / "profile", out_dir)
    return result


def start_engine(config: RunConfig, corpus, info, comm) -> tuple[Any, dict[str, Any], int]:
    """The engine with its weights (fresh, ``--init-from``'s or the resumed checkpoint's), the run config its
    checkpoints record and the step training starts from."""
    from c2r.deepspeed import checkpoint

    tc, is_main = config.train, info.rank == 0
    ckpt_dir = Path(tc.out_dir) / "checkpoints"
    engine = build_engine(config, info.device, observers=comm.observers if comm else None)
    run_config = run_config_record(config, engine.module)
    if is_main:
        Path(tc.out_dir).mkdir(parents=True, exist_ok=True)
        log_start(config, corpus, info, engine.module)
    if tc.init_from and not tc.resume:
        checkpoint.init_from_checkpoint(engine, tc.init_from, run_config)
        if is_main:
            log.info("initialised from the weights in %s", tc.init_from)
    if not tc.resume:
        return engine, run_config, 0
    start = checkpoint.resume(engine, ckpt_dir, run_config)
    if is_main:
        log.info("resumed from %s at step %d of %d", ckpt_dir / f"step{start}", start, tc.steps)
        if start < tc.steps and (warning := schedule_change_warning(ckpt_dir, start, tc)):
            log.warning(warning)
    return engine, run_config, start


def schedule_change_warning(ckpt_dir: Path, start: int, tc: TrainConfig) -> str | None:
    """Where a resume changes ``train.steps``, the cosine learning-rate schedule (``lr_at``) stretches or shrinks to
    the new length: the warning names the learning rate of the first resumed step under the saved schedule and now.
    None where the length is the saved one."""
    from c2r.deepspeed.checkpoint import CONFIG_FILE, latest_tag

    tag = latest_tag(ckpt_dir)
    saved_steps = json.loads((ckpt_dir / tag / CONFIG_FILE).read_text())["train"].get("steps")
    if saved_steps is None or saved_steps == tc.steps:
        return None
    before, now = lr_at(start, dataclasses.replace(tc, steps=saved_steps)), lr_at(start, tc)
    return (
        f"train.steps changes on resume ({saved_steps} in checkpoint {tag}, {tc.steps} here): the cosine learning-rate "
        f"schedule now decays over {tc.steps} steps, so the learning rate at the resume (step {start}) is {now:.1e}, "
        f"where the saved schedule had {before:.1e}"
    )


def drop_comm_profiler(comm, out_dir: Path, staged: bool) -> None:
    """Close the all-to-all profiler of a run that does not train; a resume's starting profile goes with it."""
    if comm is None:
        return
    comm.close()
    if staged:
        discard_starting_profile(out_dir, [comm.dir / f"comm-rank{comm.rank:03d}.jsonl"])  # the file it opened


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of step ``step``'s random draws on ``rank`` (each rank its own, every step its own)."""
    return (seed * 1_000_003 + step) * 1_000_003 + rank


def train_steps(config: RunConfig, engine, corpus, info, comm, policy: SavePolicy, start: int, run_config) -> dict:
    """Steps ``start`` .. ``train.steps`` (or up to a stop signal): evaluations, checkpoints, the metrics log."""
    from c2r.deepspeed import checkpoint

    tc, is_main = config.train, info.rank == 0
    out_dir, ckpt_dir = Path(tc.out_dir), Path(tc.out_dir) / "checkpoints"
    train_batches, val_batches = batch_samplers(corpus, config, info.rank, info.world_size)
    profiler = None
    if config.profile.enabled:
        profiler = ProfileSession(
            out_dir / "profile",
            profiled_model(engine.module),
            config.profile,
            {"ep_size": tc.ep_size, "run": str(out_dir), "steps": tc.steps},
            comm,
        )
    kernels = None
    if config.profile.kernel_steps:
        first = start + config.profile.kernel_warmup
        kernels = KernelProfile(out_dir / "profile", first, config.profile.kernel_steps, info.device.type == "cuda")
    history, step_losses, window, router_state = [], [], [], {}
    reads, latest = StepReader(engine.module, info.device), None  # latest: the newest step numbers read
    started = time.perf_counter()
    bar = progress_bar(range(start, tc.steps), "train", enabled=is_main)
    metrics_log = MetricsLog(
        out_dir / "metrics.jsonl", start if tc.resume else None, enabled=is_main, format_record=format_record
    )
    done, stopped_by, warned_stop_deadline = start, None, False
    window_s = 0.0  # training-step time since the last record, evaluations and checkpoints left out (tokens/s)
    tokens = tokens_per_step(config, info.world_size)
    # the profilers end with the loop however it ends: a kernel profile left open keeps torch's sync debug mode on
    with metrics_log as metrics, contextlib.ExitStack() as cleanup:
        cleanup.callback(bar.close)
        for closable in (profiler, kernels):
            if closable:
                cleanup.callback(closable.close)
        for step in range(start, tc.steps):
            step_started = time.perf_counter()
            # Random draws in the step (dropout, Ada-K's sampled k, Mixtral's jitter) from (seed, step, rank): a
            # resumed run draws what the uninterrupted one drew at that step.
            torch.manual_seed(step_seed(tc.seed, step, info.rank))
            if profiler:
                profiler.begin_step(step)
            if kernels:
                kernels.begin_step(step)
            micro_losses = []
            for micro in range(tc.grad_accum):  # DeepSpeed scales each loss by 1 / grad_accum
                with phase("forward"):
                    out: ModelOutput = engine(*train_batches.batch_at(step, info.device, micro))
                with phase("backward"):
                    engine.backward(out.loss)
                boundary = engine.is_gradient_accumulation_boundary()  # before step(), which advances the micro step
                with phase("optimizer"):
                    engine.step()  # the optimizer steps at the last micro-batch only
                micro_losses.append(out.lm_loss.detach())
            if boundary:
                with phase("router_update"):
                    router_state = after_optimizer_step(engine.module)  # ReMoE's lambda, group-limited bias, ...
            if profiler:
                profiler.end_step(step)
            done = step + 1
            eval_due = done % tc.eval_every == 0 or done == tc.steps
            with phase("loss_log"):
                # fp16's dynamic loss scaling overflows on purpose now and then (DeepSpeed skips that step and
                # lowers the scale): there only a non-finite loss is divergence.
                norm = engine.get_global_grad_norm() if boundary and not engine.fp16_enabled() else None
                # This step's numbers are queued, the previous step's read (c2r/step_reads.py): the host goes on
                # to the next step while the GPU finishes this one. A boundary that evaluates or saves reads its
                # own step too, and every step is checked before anything saves it.
                reads.queue(done, micro_losses, norm, policy.flags())
                numbers = reads.read(wait_newest=eval_due)
                # Signals and clocks are decided on one step late at every boundary, whatever it reads: a signal
                # during step s stops every rank after step s + 1 (0-based), with a checkpoint.
                latest = ([n for n in numbers if n.step < done] or [latest])[-1]
                after = policy.decide(done, latest and latest.flags, latest and latest.step)
                if after.save and not eval_due:
                    numbers += reads.read(wait_newest=True)
                latest = numbers[-1] if numbers else latest
                for n in numbers:
                    check_finite_step(n.step, n.loss, n.grad_norm, ckpt_dir, n.router_error)
                    step_losses.append(n.loss)
                    window.append(n.loss)
            if kernels:
                kernels.end_step(step)
                if kernels.summary and is_main:
                    log.info("kernel profile in %s:\n%s", out_dir / "profile" / "kernels.txt", kernels.summary)
                    kernels.summary = None
            # Summed over a window that ends with its own step's numbers read (the GPU done): its wall time.
            step_s = time.perf_counter() - step_started  # the step alone: evaluations and checkpoints come after
            window_s += step_s
            bar.update()
            if step_losses:
                bar.set_postfix(loss=f"{step_losses[-1]:.3f}", lr=f"{lr_at(step, tc):.1e}", refresh=False)
            if eval_due:
                record = {
                    "step": done,
                    "train_loss": sum(window) / len(window),
                    "val_loss": evaluate(engine, val_batches, tc.eval_batches, info.device, reads),
                    "aux_loss": out.aux_loss.item(),
                    **routing_stats(out.routing, info.device),
                    **router_state,
                    **(profiler.scalars() if profiler else {}),
                    "elapsed_s": time.perf_counter() - started,
                    "train_window_s": window_s,
                    **throughput(config, len(window) * tokens, window_s, info.world_size),
                    **peak_memory(info.device),
                }
                window.clear()
                window_s = 0.0
                history.append(record)
                metrics.write(record)
                write_monitor(engine, record)
            if after.save:
                save_started = time.perf_counter()
                checkpoint.save_checkpoint(engine, ckpt_dir, done, run_config)
                if is_main:
                    checkpoint.prune_checkpoints(ckpt_dir, tc.keep_checkpoints)
                    warning = stop_deadline_warning(time.perf_counter() - save_started, step_s, os.getpid())
                    if warning and not warned_stop_deadline:
                        log.warning(warning)
                        warned_stop_deadline = True
            if after.stop_signal:
                stopped_by = after.stop_signal
                break
    return {"history": history, "step_losses": step_losses, "end_step": done, "stopped_by": stopped_by}


def throughput(config: RunConfig, tokens: int, seconds: float, world_size: int) -> dict[str, float]:
    """Tokens per second over all ranks and, for our own model, the model TFLOP/s each rank delivered (divide by
    the device's peak for model FLOPs utilisation; ``ModelConfig.flops_per_token``). ``seconds`` leaves evaluations
    and checkpoints out."""
    if seconds <= 0:
        return {}
    rates = {"tokens_per_s": tokens / seconds}
    if config.hf.model_dir is None:
        rates["model_tflops_per_rank"] = rates["tokens_per_s"] * config.model.flops_per_token() / world_size / 1e12
    return rates


def peak_memory(device: torch.device) -> dict[str, float]:
    """The GPU's peak allocated memory so far, in GiB (none on a CPU)."""
    if device.type != "cuda":
        return {}
    return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def monitor_events(record: dict[str, Any]) -> list[tuple[str, float, int]]:
    """Our eval record as DeepSpeed monitor events: numbers only (TensorBoard's ``add_scalar`` refuses anything
    else); a per-layer list becomes one scalar per layer, ``c2r/<key>/layer_<i>``; other values are left out."""
    step, events = record["step"], []
    for key, value in record.items():
        values = {f"c2r/{key}": value}
        if isinstance(value, (list, tuple)):
            values = {f"c2r/{key}/layer_{i}": v for i, v in enumerate(value)}
        for name, v in values.items():
            if isinstance(v, (int, float)) and key != "step":  # bool is an int: 0 / 1
                events.append((name, float(v), step))
    return events


def write_monitor(engine, record: dict[str, Any]) -> None:
    """Our eval record to DeepSpeed's monitor (TensorBoard / CSV / W&B), when the DeepSpeed config enables one."""
    if engine.monitor.enabled:
        engine.monitor.write_events(monitor_events(record))


def format_record(r: dict[str, Any]) -> str:
    line = (
        f"step {r['step']:>5}  train loss {r['train_loss']:.4f}  val loss {r['val_loss']:.4f}  "
        f"active experts/token {r.get('active_experts_per_token', 0):.2f}  "
        f"load imbalance {r.get('load_imbalance', 0):.2f}"
    )
    if "tokens_per_s" in r:
        line += f"  {r['tokens_per_s']:,.0f} tokens/s"
    return line


def log_start(config: RunConfig, corpus, info, model: torch.nn.Module) -> None:
    from c2r.moe import MoELayer

    moe = config.model.moe
    dtype = next(model.parameters()).dtype
    layer = next(m for m in model.modules() if isinstance(m, MoELayer))
    backend = layer.backend_for(torch.empty(0, device=info.device, dtype=dtype)).name  # what `auto` resolves to
    unit = "M tokens" if config.hf.model_dir else "MB"  # byte tokens are bytes
    layout = layer.dispatcher.layout if layer.dispatcher is not None else None
    per_rank = plural(moe.num_experts // config.train.ep_size, "expert")
    if layout is not None and layout.is_replicated:  # a plan with replicas: P / R slots per rank (first MoE layer)
        per_rank = f"{layout.experts_per_rank} expert slots, replicas included,"
    log.info(
        "corpus: %s (%d documents, %.1f %s train, %.2f %s validation)",
        corpus.source,
        corpus.num_documents,
        len(corpus.train) / 1e6,
        unit,
        len(corpus.val) / 1e6,
        unit,
    )
    log.info(
        "model: %s%s of %d experts (top-%d, %s router, %s expert backend, %s), %s on %s, ep_size %d (%s per rank)",
        f"{config.hf.model_dir}, " if config.hf.model_dir else "",
        plural(num_moe_layers(config), "MoE layer"),
        moe.num_experts,
        moe.top_k,
        "the model's own"
        if config.hf.model_dir and moe.router.kind == "topk"
        else moe.router.kind + (" batch-balanced" if moe.router.batch_balanced else ""),
        backend,
        str(dtype).removeprefix("torch."),
        plural(info.world_size, "rank"),
        info.device.type,
        config.train.ep_size,
        per_rank,
    )
    tc = config.train
    log.info(
        "batch: %d tokens per step (%s of %d per rank%s, %s)",
        tokens_per_step(config, info.world_size),
        plural(tc.batch_size, "sequence"),
        config.model.block_size,
        f" x {tc.grad_accum} micro-batches" if tc.grad_accum > 1 else "",
        plural(info.world_size, "rank"),
    )
    scale = hidden_lr_scale(model, config.train)
    if scale < 1.0:
        log.info(
            "width scaling: hidden matrices train at lr x %.4g (train.lr_base_width %d / width %d; 0 turns it off)",
            scale,
            config.train.lr_base_width,
            model_width(model),
        )


TRAIN_CLI = ConfigCli(
    prog="c2r-train",
    description=__doc__,
    config_cls=RunConfig,
    # The top-k router balances each training batch (docs/gpu_runs.md: without it, a fine-grained model at d_model
    # 2048 sends every token to 8 of 64 experts); the library's RouterConfig stays plain top-k.
    defaults={"model": {"moe": {"router": {"balance": "auto"}}}},
    base=base_settings,  # with --hf-model: the model's expert count and k
    shorthands=(
        Shorthand(
            "--data",
            "data.path",
            "text file or directory (.txt .md .rst .py .jsonl); default: the embedded Python standard-library corpus",
        ),
        Shorthand(
            "--hf-model",
            "hf.model_dir",
            "train a local Hugging Face MoE model directory (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, Granite-MoE) "
            "with its own tokenizer; --router topk keeps its own routing; sequence length: model.block_size",
            metavar="DIR",
        ),
        Shorthand("--steps", "train.steps", "optimizer steps", int),
        Shorthand(
            "--grad-accum",
            "train.grad_accum",
            "micro-batches per optimizer step (gradient accumulation): each step trains on batch_size x N sequences "
            "per rank at the memory of one micro-batch",
            int,
            metavar="N",
        ),
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
            "per-expert: one token copy per routed expert; per-rank: one per destination rank, expanded there; "
            "per-node: one per destination node over the network, then per rank within it",
            choices=("per-expert", "per-rank", "per-node"),
        ),
        Shorthand(
            "--overlap-chunks",
            "train.overlap_chunks",
            "split each MoE layer's per-expert or per-rank dispatch into that many token chunks, whose exchanges "
            "overlap the expert compute (default 1: off)",
            int,
        ),
        Shorthand(
            "--copy-choice",
            "train.copy_choice",
            "how a slot of a replicated expert (a plan with --replicas) picks its copy: rule (a rank the token "
            "visits, else an even split; the default) or balanced (shares that level the ranks for each batch, one "
            "more small all-reduce per layer)",
            choices=COPY_CHOICES,
        ),
        Shorthand(
            "--gpus-per-node",
            "train.gpus_per_node",
            "ranks per node (default: the launcher's local world size); groups CPU ranks into virtual nodes",
            int,
        ),
        Shorthand(
            "--plan", "train.placement_plan", "placement plan JSON from c2r-place plan (default: contiguous experts)"
        ),
        Shorthand("--resume", "train.resume", "continue from OUT/checkpoints/latest", switch=True),
        Shorthand(
            "--overwrite",
            "train.overwrite",
            "replace the run already in OUT (deletes its checkpoints, metrics.jsonl and profile)",
            switch=True,
        ),
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
        Shorthand(
            "--profile-kernels",
            "profile.kernel_steps",
            "torch.profiler over N steps after profile.kernel_warmup (10) steps: OUT/profile/kernels.txt (where the "
            "step's time goes, by phase and op) and a Chrome trace per rank",
            int,
            metavar="N",
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
    """Train; the summary line rank 0 prints: what this run did (a resumed run counts its own steps only)."""
    if launcher_rank() == 0 and starts_untrained_allocator(config):
        log.warning(
            "--router adak starts from untrained Ada-K allocators, and c2r-train does not train them: train them on "
            "a top-k run with `c2r-adak --checkpoint RUN --out RUN_ADAK`, then `c2r-train --init-from RUN_ADAK "
            "--router adak`"
        )
    result = train(config)
    start, end, steps = result["start_step"], result["end_step"], config.train.steps
    if end == start and result["stopped_by"] is None:
        return (
            f"nothing to do: {config.train.out_dir} is at step {start} and train.steps is {steps} "
            "(--steps N trains further)"
        )
    this_run = f"{end - start} steps" + (f", resumed at step {start}" if start else "")
    if result["stopped_by"]:
        return (
            f"stopped by {result['stopped_by']} at step {end} of {steps} ({this_run}): checkpoint "
            f"{Path(result['checkpoint_dir']) / f'step{end}'}; run the same command with --resume (and without "
            "--overwrite) to continue"
        )
    first, last = result["history"][0], result["history"][-1]
    if len(result["history"]) == 1:  # its train loss is the mean of every step: from the first step's own
        return (
            f"done: train loss {result['step_losses'][0]:.3f} (step {start + 1}) -> {last['train_loss']:.3f} (mean of "
            f"steps {start + 1}-{end}), val loss {last['val_loss']:.3f} over {this_run}"
        )
    return (
        f"done: train loss {first['train_loss']:.3f} -> {last['train_loss']:.3f}, "
        f"val loss {first['val_loss']:.3f} -> {last['val_loss']:.3f} over {this_run}"
    )


def main(argv: list[str] | None = None) -> int:
    return TRAIN_CLI.main(argv, run)


if __name__ == "__main__":
    raise SystemExit(main())
