"""``c2r-adak``: train Ada-K allocators on a frozen ``c2r-train`` top-k model (P-Warm, then PPO) under DeepSpeed.

c2r-adak --checkpoint runs/demo --out runs/adak                     # one process (CPU or one GPU)
deepspeed --num_gpus 2 --module c2r.adak_train --checkpoint runs/demo --ep-size 2 --out runs/adak
c2r-adak --checkpoint runs/demo --warm-steps 50 --steps 200 --lambda 3e-3

Only the allocators train (ALGORITHMS.md section 6; Yue et al., "Ada-K Routing", ICLR 2025); the model, routers
included, is loaded from the checkpoint (its per-expert files, under any --ep-size) and frozen. Writes
OUT/checkpoints (a c2r-train checkpoint whose router is "adak" in "argmax" mode: evaluate or fine-tune it with
`c2r-train --init-from OUT --router adak`), OUT/adak_metrics.jsonl and OUT/adak_eval.json (validation loss and
active experts per token of the default top-k and of Ada-K on the same batches, per layer).

Shape legend: B batch, S sequence length, T = B * S tokens, V vocabulary, E experts, N largest k, L MoE layers.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from c2r.adak_objective import (
    calibrate_pwarm_p,
    layer_advantages,
    mean_pwarm_label,
    ppo_objective,
    pwarm_labels,
    pwarm_loss,
    sorted_cumsum,
    token_log_likelihood,
)
from c2r.config_utils import config_from_dict, config_to_dict, require_positive
from c2r.data import BatchSampler, load_corpus
from c2r.model import MoEGPT
from c2r.parallel import model_layouts
from c2r.routing.adak import AdaKRouter, adak_routers
from c2r.routing.updates import all_reduce_sum
from c2r.train import RunConfig, apply_override, global_mean, plan_layouts

log = logging.getLogger("c2r.adak")
ADAK_EVAL = "adak_eval.json"
SOURCE_ROUTERS = ("topk", "adak")  # an Ada-K checkpoint can be trained further


@dataclass
class AdaKTrainConfig:
    """Ada-K training options (defaults: the paper's, where it gives them).

    Attributes:
        checkpoint: the trained model: a run dir, its ``checkpoints/`` dir, or one tag dir.
        steps: PPO batches; each takes ``ppo_epochs`` optimizer steps.
        warm_steps: P-Warm optimizer steps (cross-entropy towards the P-Warm labels) before PPO.
        batch_size: sequences per rank and step; None: the checkpoint's.
        lr, weight_decay: AdamW over the allocators (paper: 1e-3, 0.1), constant learning rate.
        clip_eps: PPO's epsilon (unstated in the paper: 0.2).
        ppo_epochs: optimizer steps per rollout batch (paper: 2).
        gamma: A_l = gamma^(L-l) * (reward - baseline) (unstated: 1).
        k_penalty: lambda of the expected-k penalty ``lambda * (1/L) sum_l sum_n n P_l(n)`` (paper: 3e-3).
        pwarm_p: P-Warm's probability mass p; None: bisect for the p whose mean label is ``pwarm_target_k``.
        pwarm_target_k: the mean P-Warm label to aim for; None: the model's top-k.
        calib_batches: batches of router probabilities the p bisection looks at.
        max_k: N, the allocator's largest k; 0: the number of experts.
        eval_batches: validation batches of the final top-k vs Ada-K comparison.
    """

    checkpoint: str
    out_dir: str = "runs/adak"
    steps: int = 200
    warm_steps: int = 100
    batch_size: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.1
    clip_eps: float = 0.2
    ppo_epochs: int = 2
    gamma: float = 1.0
    k_penalty: float = 3e-3
    pwarm_p: float | None = None
    pwarm_target_k: float | None = None
    calib_batches: int = 4
    max_k: int = 0
    eval_batches: int = 8
    log_every: int = 10
    ep_size: int = 1
    device: str = "auto"
    deepspeed_config: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        require_positive(
            lr=self.lr,
            ppo_epochs=self.ppo_epochs,
            calib_batches=self.calib_batches,
            eval_batches=self.eval_batches,
            log_every=self.log_every,
            ep_size=self.ep_size,
        )
        if self.steps < 0 or self.warm_steps < 0:
            raise ValueError(f"steps ({self.steps}) and warm_steps ({self.warm_steps}) must be >= 0")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps ({self.clip_eps}) must be between 0 and 1")
        if not 0 < self.gamma <= 1 or self.k_penalty < 0 or self.weight_decay < 0:
            raise ValueError(
                f"need 0 < gamma <= 1 (got {self.gamma}), k_penalty >= 0 (got {self.k_penalty}) and "
                f"weight_decay >= 0 (got {self.weight_decay})"
            )
        if self.pwarm_p is not None and not 0 < self.pwarm_p <= 1:
            raise ValueError(f"pwarm_p ({self.pwarm_p}) must be in (0, 1]")


# ---------------------------------------------------------------------------------------------------------------
# Setting up: the run config of the Ada-K model, the engine with everything but the allocators frozen.


def read_source_config(checkpoint: str) -> tuple[Path, dict[str, Any]]:
    """The tag dir of ``checkpoint`` and its c2r_config.json; refuses routers Ada-K cannot start from."""
    from c2r.deepspeed.checkpoint import CONFIG_FILE, resolve_checkpoint

    ckpt_dir, tag = resolve_checkpoint(checkpoint)
    saved = json.loads((ckpt_dir / tag / CONFIG_FILE).read_text())
    kind = saved["model"]["moe"]["router"].get("kind", "topk")
    if kind not in SOURCE_ROUTERS:
        raise ValueError(
            f"c2r-adak trains allocators on a top-k model; {ckpt_dir / tag} has router kind {kind!r} "
            f"(expected one of {list(SOURCE_ROUTERS)})"
        )
    return ckpt_dir / tag, saved


def adak_run_config(saved: dict[str, Any], opts: AdaKTrainConfig, overrides: list[str]) -> RunConfig:
    """The checkpoint's run config with the Ada-K router (recorded as ``argmax``, the inference mode) and our
    training settings; ``overrides`` (``key=value``, as ``c2r-train --set``) come last."""
    raw = {key: copy.deepcopy(saved[key]) for key in ("model", "train", "data")}
    raw["profile"] = {"enabled": False}
    router = raw["model"]["moe"]["router"]
    router["kind"] = "adak"
    router.setdefault("adak", {})["mode"] = "argmax"
    if opts.max_k or "max_k" not in router["adak"]:
        router["adak"]["max_k"] = opts.max_k
    train = raw["train"]
    train.update(
        steps=max(1, opts.warm_steps + opts.steps),
        lr=opts.lr,
        weight_decay=opts.weight_decay,
        warmup_steps=0,
        grad_clip=0.0,  # the paper clips nothing; a DeepSpeed config's gradient_clipping still applies
        eval_batches=opts.eval_batches,
        save_every=0,
        resume=False,
        init_from=opts.checkpoint,
        ep_size=opts.ep_size,
        device=opts.device,
        out_dir=opts.out_dir,
        seed=opts.seed,
    )
    if opts.deepspeed_config is not None:
        train["deepspeed_config"] = opts.deepspeed_config
    if opts.batch_size is not None:
        train["batch_size"] = opts.batch_size
    for assignment in overrides:
        apply_override(raw, assignment)
    return config_from_dict(RunConfig, raw)


def engine_deepspeed_config(config: RunConfig, device: torch.device) -> tuple[dict[str, Any], torch.dtype]:
    """The user's DeepSpeed JSON, run at ZeRO stage 0 without DeepSpeed's mixed-precision optimizer; and the
    dtype the frozen model runs in (bf16/fp16 when the JSON enables it).

    Only the allocators train (a few thousand parameters): ZeRO has nothing worth sharding, and DeepSpeed 0.19.8's
    ZeRO-1/2 and bf16 optimizers refuse an MoE model whose expert parameters are all frozen ("None of the param
    groups are marked as MoE"). So: a plain float32 AdamW over the allocators (DeepSpeed all-reduces their
    gradients over every rank), the frozen rest cast to the 16-bit dtype by us.
    """
    from c2r.deepspeed import load_deepspeed_config

    tc = config.train
    ds_config = load_deepspeed_config(tc.deepspeed_config, device.type == "cuda", tc.batch_size, tc.grad_clip)
    dtype = torch.float32
    if ds_config.get("bf16", {}).get("enabled"):
        dtype = torch.bfloat16
    elif ds_config.get("fp16", {}).get("enabled"):
        dtype = torch.float16
    ds_config["zero_optimization"] = {"stage": 0}
    ds_config["bf16"] = {"enabled": False}
    ds_config["fp16"] = {"enabled": False}
    return ds_config, dtype


def build_adak_engine(config: RunConfig, device: torch.device):
    """Like ``c2r.train.build_engine``, but every parameter except the allocators is frozen before the optimizer
    is built (frozen parameters get no gradient, no optimizer state and no all-reduce)."""
    import deepspeed

    from c2r.deepspeed import make_expert_parallel

    tc = config.train
    ds_config, dtype = engine_deepspeed_config(config, device)
    torch.manual_seed(tc.seed)  # the same initial model on every rank; the checkpoint then overwrites it
    model = MoEGPT(config.model)
    make_expert_parallel(model, tc.ep_size, tc.dispatch, plan_layouts(config))
    routers = adak_routers(model)
    model.requires_grad_(False)
    model.to(device=device, dtype=dtype)
    for router in routers:
        router.allocator.float().requires_grad_(True)
    allocator_weights = [router.allocator.weight for router in routers]
    optimizer = torch.optim.AdamW(
        [{"name": "allocators", "params": allocator_weights, "weight_decay": tc.weight_decay}], lr=tc.lr
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, routers


def set_routers(routers: list[AdaKRouter], mode: str, forced_k: list[torch.Tensor] | None = None) -> None:
    for index, router in enumerate(routers):
        router.set_mode(mode)
        router.force_k(None if forced_k is None else forced_k[index])


# ---------------------------------------------------------------------------------------------------------------
# The phases: p calibration, P-Warm steps, PPO steps, evaluation.


@torch.no_grad()
def collect_router_probs(engine, routers: list[AdaKRouter], sampler: BatchSampler, batches: int, device) -> list:
    """Every layer's router probabilities on ``batches`` training batches under the default top-k routing."""
    set_routers(routers, "default")
    probs = []
    for step in range(batches):
        engine(sampler.batch_at(step, device)[0])
        probs += [router.last_allocation.router_probs_TE for router in routers]
    return probs


def pwarm_step(engine, routers: list[AdaKRouter], idx_BS: torch.Tensor, p: float) -> dict[str, torch.Tensor]:
    """One cross-entropy step of every allocator towards its layer's P-Warm labels (default top-k forward)."""
    set_routers(routers, "default")
    engine(idx_BS)
    allocations = [router.last_allocation for router in routers]
    labels = [pwarm_labels(a.router_probs_TE, p, router.max_k) for a, router in zip(allocations, routers)]
    loss = pwarm_loss(allocations, labels)
    engine.backward(loss)
    engine.step()
    predicted = [a.log_probs_TJ.detach().argmax(dim=-1) + 1 for a in allocations]
    return {
        "loss": loss.detach(),
        "label_k": torch.stack([k.float().mean() for k in labels]).mean(),
        "argmax_k": torch.stack([k.float().mean() for k in predicted]).mean(),
        "accuracy": torch.stack([(k == y).float().mean() for k, y in zip(predicted, labels)]).mean(),
    }


def ppo_step(
    engine, routers: list[AdaKRouter], batch: tuple[torch.Tensor, torch.Tensor], opts: AdaKTrainConfig
) -> dict[str, torch.Tensor]:
    """One rollout batch: baseline pass, sampled pass, ``ppo_epochs`` clipped-objective optimizer steps."""
    idx_BS, targets_BS = batch
    # 1. Baseline: every token's log-likelihood under the default top-k (no gradient anywhere).
    with torch.no_grad():
        set_routers(routers, "default")
        baseline_T = token_log_likelihood(engine(idx_BS).logits, targets_BS)
    # 2. Rollout: ks sampled per token and layer. Its forward is also epoch 1's: the policy has not moved, ratio 1.
    set_routers(routers, "sample")
    reward_T = token_log_likelihood(engine(idx_BS).logits.detach(), targets_BS)
    allocations = [router.last_allocation for router in routers]
    actions_LT = [a.k_T for a in allocations]
    log_prob_old_LT = [a.log_prob_T.detach() for a in allocations]
    advantage_LT = layer_advantages(reward_T, baseline_T, len(routers), opts.gamma)
    # 3. PPO epochs; later ones re-run the model with the rollout's ks forced, for the moved allocators' log-probs.
    for epoch in range(opts.ppo_epochs):
        if epoch > 0:
            set_routers(routers, "sample", forced_k=actions_LT)
            engine(idx_BS)
            allocations = [router.last_allocation for router in routers]
        loss, stats = ppo_objective(allocations, log_prob_old_LT, advantage_LT, opts.clip_eps, opts.k_penalty)
        engine.backward(loss)
        engine.step()
    set_routers(routers, "sample")
    return {
        "loss": loss.detach(),
        "reward": reward_T.mean(),
        "baseline": baseline_T.mean(),
        "advantage": (reward_T - baseline_T).mean(),
        "sampled_k": torch.stack([k.float().mean() for k in actions_LT]).mean(),
        **stats,
    }


@torch.no_grad()
def evaluate_modes(
    engine, routers: list[AdaKRouter], sampler: BatchSampler, batches: int, device, modes=("default", "argmax")
) -> dict[str, dict[str, Any]]:
    """Validation loss and active experts per token (mean and per MoE layer) of each routing mode on the same
    batches, averaged over ranks; for Ada-K modes also the mean k of tokens by quartile of their top-k loss."""
    engine.eval()
    sums = {mode: torch.zeros(1 + len(routers), dtype=torch.float64, device=device) for mode in modes}
    default_nll, mode_k = [], {mode: [] for mode in modes}
    for step in range(batches):
        idx_BS, targets_BS = sampler.batch_at(step, device)
        for mode in modes:
            set_routers(routers, mode)
            out = engine(idx_BS, targets_BS)
            active_L = torch.stack([r.active_experts_per_token() for r in out.routing]).double()
            sums[mode] += torch.cat([out.lm_loss.detach().double().view(1), active_L])
            mode_k[mode].append(torch.stack([r.valid_TK.sum(dim=1) for r in out.routing]).float().mean(dim=0))
            if mode == "default":
                default_nll.append(-token_log_likelihood(out.logits, targets_BS))
    engine.train()
    world = dist.get_world_size()
    nll_T = torch.cat(default_nll) if default_nll else None
    results = {}
    for mode in modes:
        loss_and_active = all_reduce_sum(sums[mode] / batches) / world
        results[mode] = {
            "val_loss": float(loss_and_active[0]),
            "active_experts_per_token": float(loss_and_active[1:].mean()),
            "active_experts_per_token_by_layer": [round(float(a), 4) for a in loss_and_active[1:]],
        }
        if mode != "default" and nll_T is not None:
            results[mode]["mean_k_by_difficulty_quartile"] = k_by_difficulty(nll_T, torch.cat(mode_k[mode]))
    return results


def k_by_difficulty(nll_T: torch.Tensor, k_T: torch.Tensor, buckets: int = 4) -> list[float]:
    """Mean k of the tokens in each quartile of their top-k loss, easiest first (per rank, averaged over ranks):
    Ada-K's finding is that harder tokens get more experts."""
    order = nll_T.argsort()
    means = torch.stack([k_T[chunk].mean() for chunk in order.chunk(buckets)]).double()
    return [round(float(m), 4) for m in all_reduce_sum(means) / dist.get_world_size()]


# ---------------------------------------------------------------------------------------------------------------
# The run.


@dataclass
class AdaKRun:
    """What the phases share: the engine, its Ada-K routers, the run config to save, this rank, the batches."""

    config: RunConfig
    run_config: dict[str, Any]
    source: Path
    engine: Any
    routers: list[AdaKRouter]
    info: Any
    train_batches: BatchSampler
    val_batches: BatchSampler
    out_dir: Path

    @property
    def is_main(self) -> bool:
        return self.info.rank == 0


def setup_run(opts: AdaKTrainConfig, overrides: list[str]) -> AdaKRun:
    """Join the job, build the frozen Ada-K model under DeepSpeed and load the checkpoint into it."""
    from c2r.deepspeed import init_distributed
    from c2r.deepspeed.checkpoint import init_from_checkpoint

    source, saved = read_source_config(opts.checkpoint)
    config = adak_run_config(saved, opts, overrides)
    tc = config.train
    info = init_distributed(tc.device)
    if info.world_size % tc.ep_size:
        raise ValueError(f"ep_size ({tc.ep_size}) must divide the world size ({info.world_size})")
    corpus = load_corpus(config.data)
    engine, routers = build_adak_engine(config, info.device)
    run_config = config_to_dict(config)
    run_config["expert_layouts"] = model_layouts(engine.module)
    init_from_checkpoint(engine, opts.checkpoint, run_config)
    torch.manual_seed(tc.seed + 1 + info.rank)  # each rank samples its own ks
    block, batch_size = config.model.block_size, tc.batch_size
    run = AdaKRun(
        config=config,
        run_config=run_config,
        source=source,
        engine=engine,
        routers=routers,
        info=info,
        train_batches=BatchSampler(corpus.train, block, batch_size, seed=tc.seed + 31337 + 7919 * info.rank),
        # c2r-train's validation batches, so its val_loss and ours compare
        val_batches=BatchSampler(corpus.val, block, batch_size, seed=tc.seed + 104729 + 7919 * info.rank),
        out_dir=Path(tc.out_dir),
    )
    if run.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        log_start(config, source, info, routers)
    return run


def train_adak(opts: AdaKTrainConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """P-Warm then PPO on the allocators of ``opts.checkpoint``; saves the Ada-K checkpoint and evaluation."""
    from c2r.deepspeed.checkpoint import save_checkpoint

    run = setup_run(opts, overrides or [])
    p, mean_label = calibrate(run, opts)
    history, after_pwarm = train_allocators(run, opts, p)
    evaluation = evaluate_modes(run.engine, run.routers, run.val_batches, opts.eval_batches, run.info.device)
    set_routers(run.routers, "argmax")
    run.run_config["adak_training"] = {
        "source_checkpoint": str(run.source),
        "pwarm_p": p,
        "pwarm_mean_label": mean_label,
        "options": asdict(opts),
    }
    save_checkpoint(run.engine, run.out_dir / "checkpoints", opts.warm_steps + opts.steps, run.run_config)
    summary = eval_summary(run.config, run.source, p, mean_label, evaluation, after_pwarm, opts)
    if run.is_main:
        (run.out_dir / ADAK_EVAL).write_text(json.dumps(summary, indent=2))
        tqdm.write(format_eval_table(summary))
        log.info("Ada-K checkpoint in %s; evaluation in %s", run.out_dir / "checkpoints", run.out_dir / ADAK_EVAL)
    return {"history": history, "eval": summary, "engine": run.engine, "routers": run.routers, "out_dir": run.out_dir}


def train_allocators(run: AdaKRun, opts: AdaKTrainConfig, p: float | None) -> tuple[list[dict], dict | None]:
    """The P-Warm steps, then the PPO batches; returns the logged records and the argmax evaluation after P-Warm."""
    device, started = run.info.device, time.perf_counter()
    history, after_pwarm = [], None
    bar = tqdm(
        total=opts.warm_steps + opts.steps,
        desc="p-warm" if opts.warm_steps else "ppo",
        unit="step",
        disable=not run.is_main,
        mininterval=0.1 if sys.stderr.isatty() else 5.0,  # keep logs of non-interactive runs short
    )
    metrics_path = run.out_dir / "adak_metrics.jsonl"
    metrics_file = open(metrics_path, "w") if run.is_main else contextlib.nullcontext()  # noqa: SIM115
    with metrics_file as metrics:
        for step in range(opts.warm_steps + opts.steps):
            warm = step < opts.warm_steps
            if warm:
                stats = pwarm_step(run.engine, run.routers, run.train_batches.batch_at(step, device)[0], p)
            else:
                stats = ppo_step(run.engine, run.routers, run.train_batches.batch_at(step, device), opts)
            record = report(step, warm, stats, run.info, bar, metrics, opts, started)
            if record is not None:
                history.append(record)
            if step + 1 == opts.warm_steps and opts.steps:
                bar.set_description("ppo")
                after_pwarm = evaluate_modes(
                    run.engine, run.routers, run.val_batches, opts.eval_batches, device, ("argmax",)
                )
    bar.close()
    return history, after_pwarm


def calibrate(run: AdaKRun, opts: AdaKTrainConfig) -> tuple[float | None, float | None]:
    """P-Warm's p: given, or bisected so that the mean label (all ranks, layers, tokens) equals the target k."""
    if not opts.warm_steps:
        return opts.pwarm_p, None
    probs = collect_router_probs(run.engine, run.routers, run.train_batches, opts.calib_batches, run.info.device)
    target = opts.pwarm_target_k or float(run.routers[0].top_k)
    max_k = run.routers[0].max_k
    if opts.pwarm_p is not None:
        p, mean_label = opts.pwarm_p, mean_pwarm_label([sorted_cumsum(q) for q in probs], opts.pwarm_p, max_k)
    else:
        p, mean_label = calibrate_pwarm_p(probs, target, max_k)
    if run.is_main:
        how = "given" if opts.pwarm_p is not None else f"bisected for mean label {target:g}"
        log.info("P-Warm p = %.4f (%s): mean label k = %.3f over %d batches", p, how, mean_label, opts.calib_batches)
    return p, mean_label


def report(step: int, warm: bool, stats, info, bar, metrics, opts: AdaKTrainConfig, started: float):
    """Progress bar every step; a log line and a metrics record every ``log_every`` steps and at the phase ends."""
    done = step + 1
    bar.update(1)
    last_of_phase = done in (opts.warm_steps, opts.warm_steps + opts.steps)
    if done % opts.log_every and not last_of_phase:
        bar.set_postfix(loss=f"{float(stats['loss']):.4f}")  # NOTE: host sync, one per step
        return None
    record = {"phase": "pwarm" if warm else "ppo", "step": done}
    record.update({key: global_mean(float(value), info.device) for key, value in stats.items()})
    record["elapsed_s"] = round(time.perf_counter() - started, 2)
    if metrics is not None:
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        tqdm.write(format_record(record))
    return record


def format_record(r: dict[str, Any]) -> str:
    if r["phase"] == "pwarm":
        return (
            f"p-warm {r['step']:>5}  ce {r['loss']:.4f}  label k {r['label_k']:.3f}  allocator argmax k "
            f"{r['argmax_k']:.3f}  accuracy {r['accuracy']:.3f}"
        )
    return (
        f"ppo    {r['step']:>5}  reward {r['reward']:.4f}  (top-k {r['baseline']:.4f})  advantage "
        f"{r['advantage']:+.4f}  sampled k {r['sampled_k']:.3f}  expected k {r['expected_k']:.3f}  "
        f"clipped {r['clip_fraction']:.2f}  loss {r['loss']:+.4f}"
    )


def eval_summary(config, source, p, mean_label, evaluation, after_pwarm, opts: AdaKTrainConfig) -> dict[str, Any]:
    topk, adak = evaluation["default"], evaluation["argmax"]
    return {
        "source_checkpoint": str(source),
        "top_k": config.model.moe.top_k,
        "max_k": config.model.moe.router.adak.resolved_max_k(config.model.moe.num_experts),
        "eval_batches": opts.eval_batches,
        "tokens_per_rank": opts.eval_batches * config.train.batch_size * config.model.block_size,
        "world_size": dist.get_world_size(),
        "warm_steps": opts.warm_steps,
        "ppo_steps": opts.steps,
        "pwarm_p": p,
        "pwarm_mean_label": mean_label,
        "k_penalty": opts.k_penalty,
        "topk": topk,
        "adak_argmax": adak,
        "adak_argmax_after_pwarm": None if after_pwarm is None else after_pwarm["argmax"],
        "val_loss_change": adak["val_loss"] - topk["val_loss"],
        "expert_compute_change": adak["active_experts_per_token"] / topk["active_experts_per_token"] - 1,
    }


def format_eval_table(s: dict[str, Any]) -> str:
    rows = [(f"top-{s['top_k']}", s["topk"])]
    if s["adak_argmax_after_pwarm"] is not None:
        rows.append(("P-Warm only (argmax)", s["adak_argmax_after_pwarm"]))
    rows.append(("Ada-K (argmax)", s["adak_argmax"]))
    lines = [
        f"Ada-K evaluation: {s['eval_batches']} validation batches per rank, the same for every row",
        f"{'routing':<22}{'val loss':>10}{'experts/token':>15}  per MoE layer",
    ]
    for name, r in rows:
        per_layer = " ".join(f"{a:.2f}" for a in r["active_experts_per_token_by_layer"])
        lines.append(f"{name:<22}{r['val_loss']:>10.4f}{r['active_experts_per_token']:>15.3f}  {per_layer}")
    quartiles = " ".join(f"{k:.2f}" for k in s["adak_argmax"].get("mean_k_by_difficulty_quartile", []))
    lines.append(
        f"expert compute {s['expert_compute_change']:+.1%}, val loss {s['val_loss_change']:+.4f}; Ada-K mean k by "
        f"quartile of top-k loss (easiest first): {quartiles}"
    )
    return "\n".join(lines)


def log_start(config: RunConfig, source: Path, info, routers: list[AdaKRouter]) -> None:
    trainable = sum(r.allocator.weight.numel() for r in routers)
    log.info(
        "Ada-K on %s: %d MoE layers, top-%d of %d experts, k in 1..%d; %d ranks on %s, ep_size %d; "
        "training %d allocator parameters, the rest frozen",
        source,
        len(routers),
        config.model.moe.top_k,
        config.model.moe.num_experts,
        routers[0].max_k,
        info.world_size,
        info.device.type,
        config.train.ep_size,
        trainable,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="c2r-adak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="c2r-train run dir, checkpoints dir or tag dir")
    parser.add_argument("--out", default="runs/adak", help="output directory (default runs/adak)")
    parser.add_argument("--steps", type=int, default=200, help="PPO batches (default 200)")
    parser.add_argument("--warm-steps", type=int, default=100, help="P-Warm steps before PPO (default 100)")
    parser.add_argument("--batch-size", type=int, help="sequences per rank and step (default: the checkpoint's)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1)")
    parser.add_argument(
        "--lambda", dest="k_penalty", type=float, default=3e-3, help="weight of the expected-k penalty (default 3e-3)"
    )
    parser.add_argument("--clip-eps", type=float, default=0.2, help="PPO clip epsilon (default 0.2)")
    parser.add_argument("--ppo-epochs", type=int, default=2, help="optimizer steps per rollout batch (default 2)")
    parser.add_argument("--gamma", type=float, default=1.0, help="advantage discount over layers (default 1)")
    parser.add_argument("--pwarm-p", type=float, help="P-Warm's p (default: bisected to hit --pwarm-target-k)")
    parser.add_argument("--pwarm-target-k", type=float, help="mean P-Warm label to aim for (default: the model's k)")
    parser.add_argument("--calib-batches", type=int, default=4, help="batches for the p bisection (default 4)")
    parser.add_argument("--max-k", type=int, default=0, help="largest k of the allocator (default: all experts)")
    parser.add_argument("--eval-batches", type=int, default=8, help="validation batches (default 8)")
    parser.add_argument("--log-every", type=int, default=10, help="steps between log lines (default 10)")
    parser.add_argument("--ep-size", type=int, default=1, help="expert-parallel ranks (default 1)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    parser.add_argument(
        "--deepspeed-config", help="DeepSpeed JSON (bf16 is honoured; run at ZeRO stage 0: only allocators train)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override the run config taken from the checkpoint, e.g. --set data.path=my_texts/ (repeatable)",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by the launcher
    return parser.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> AdaKTrainConfig:
    return AdaKTrainConfig(
        checkpoint=args.checkpoint,
        out_dir=args.out,
        steps=args.steps,
        warm_steps=args.warm_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        clip_eps=args.clip_eps,
        ppo_epochs=args.ppo_epochs,
        gamma=args.gamma,
        k_penalty=args.k_penalty,
        pwarm_p=args.pwarm_p,
        pwarm_target_k=args.pwarm_target_k,
        calib_batches=args.calib_batches,
        max_k=args.max_k,
        eval_batches=args.eval_batches,
        log_every=args.log_every,
        ep_size=args.ep_size,
        device=args.device,
        deepspeed_config=args.deepspeed_config,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    args = parse_args(argv)
    try:
        opts = options_from_args(args)
    except ValueError as error:
        raise SystemExit(f"c2r-adak: bad option: {error}") from None
    try:
        result = train_adak(opts, args.set or [])
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise SystemExit(f"c2r-adak: {error}") from None
    if dist.get_rank() == 0:
        s = result["eval"]
        print(
            f"done: val loss {s['topk']['val_loss']:.4f} (top-{s['top_k']}) -> {s['adak_argmax']['val_loss']:.4f} "
            f"(Ada-K), experts/token {s['topk']['active_experts_per_token']:.2f} -> "
            f"{s['adak_argmax']['active_experts_per_token']:.2f}"
        )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
