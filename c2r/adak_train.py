"""``c2r-adak``: train Ada-K allocators on a frozen ``c2r-train`` top-k model (P-Warm, then PPO) under DeepSpeed.

c2r-adak --checkpoint runs/demo --out runs/adak                     # one process (CPU or one GPU)
deepspeed --num_gpus 2 --module c2r.adak_train --checkpoint runs/demo --ep-size 2 --out runs/adak
c2r-adak --checkpoint runs/demo --warm-steps 50 --steps 200 --lambda 3e-3 --set adak.ppo_epochs=3
c2r-adak --config runs/adak/checkpoints/step300/c2r_config.json --print-config   # a saved Ada-K run's settings

Only the allocators train (docs/adak.md; Yue et al., "Ada-K Routing", ICLR 2025); the model, routers included, is
loaded from the checkpoint (its per-expert files, under any --ep-size) and frozen. The run config is the
checkpoint's, with the Ada-K router, the paper's training defaults and an ``adak`` section (--set adak.KEY=VALUE).
Writes OUT/checkpoints (a c2r-train checkpoint whose router is "adak" in "argmax" mode: evaluate or fine-tune it
with `c2r-train --init-from OUT --router adak`), OUT/adak_metrics.jsonl and OUT/adak_eval.json (validation loss
and active experts per token of the default top-k and of Ada-K on the same batches, per layer).

Shape legend: B batch, S sequence length, T = B * S tokens, V vocabulary, E experts, N largest k, L MoE layers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
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
from c2r.config_utils import require_positive
from c2r.data import BatchSampler, load_corpus
from c2r.routing.adak import AdaKRouter, adak_routers
from c2r.routing.updates import all_reduce_sum, raise_if_router_logits_were_not_finite
from c2r.run_dir import check_out_dir, clear_run
from c2r.run_setup import (
    ConfigCli,
    MetricsLog,
    RunConfig,
    Shorthand,
    TrainOnly,
    batch_samplers,
    build_engine,
    check_same_corpus,
    flatten,
    global_mean,
    merge,
    nested,
    plural,
    progress_bar,
    run_config_record,
    start_run,
)

log = logging.getLogger("c2r.adak")
ADAK_EVAL = "adak_eval.json"
SOURCE_ROUTERS = ("topk", "adak")  # an Ada-K checkpoint can be trained further
SOURCE_SECTIONS = ("model", "train", "data")  # what the run takes from its source checkpoint
ADAK_BATCHES = 31337  # batch_samplers stream: other training batches than the ones the model was trained on


@dataclass
class AdaKTrainConfig:
    """The ``adak`` section: Ada-K training options (defaults: the paper's, where it gives them). The optimizer's
    settings (lr, weight decay), batch size, ranks and output directory are the ``train`` section's.

    Attributes:
        checkpoint: the trained model: a run dir, its ``checkpoints/`` dir, or one tag dir.
        steps: PPO batches; each takes ``ppo_epochs`` optimizer steps.
        warm_steps: P-Warm optimizer steps (cross-entropy towards the P-Warm labels) before PPO.
        clip_eps: PPO's epsilon (unstated in the paper: 0.2).
        ppo_epochs: optimizer steps per rollout batch (paper: 2).
        gamma: A_l = gamma^(L-l) * (reward - baseline) (unstated: 1).
        k_penalty: lambda of the expected-k penalty ``lambda * (1/L) sum_l sum_n n P_l(n)`` (paper: 3e-3).
        pwarm_p: P-Warm's probability mass p; None: bisect for the p whose mean label is ``pwarm_target_k``.
        pwarm_target_k: the mean P-Warm label to aim for; None: the model's top-k.
        calib_batches: batches of router probabilities the p bisection looks at.
        log_every: steps between log lines and metrics records.
    """

    checkpoint: str
    steps: int = 200
    warm_steps: int = 100
    clip_eps: float = 0.2
    ppo_epochs: int = 2
    gamma: float = 1.0
    k_penalty: float = 3e-3
    pwarm_p: float | None = None
    pwarm_target_k: float | None = None
    calib_batches: int = 4
    log_every: int = 10

    def __post_init__(self) -> None:
        require_positive(ppo_epochs=self.ppo_epochs, calib_batches=self.calib_batches, log_every=self.log_every)
        if self.steps < 0 or self.warm_steps < 0:
            raise ValueError(f"steps ({self.steps}) and warm_steps ({self.warm_steps}) must be >= 0")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps ({self.clip_eps}) must be between 0 and 1")
        if not 0 < self.gamma <= 1 or self.k_penalty < 0:
            raise ValueError(f"need 0 < gamma <= 1 (got {self.gamma}) and k_penalty >= 0 (got {self.k_penalty})")
        if self.pwarm_p is not None and not 0 < self.pwarm_p <= 1:
            raise ValueError(f"pwarm_p ({self.pwarm_p}) must be in (0, 1]")


# Settings c2r-adak has no other value for (a source's, e.g. its dropout, are replaced; a user's are refused): a
# fresh run (no resume), one save at the end, a constant learning rate, one optimizer step per engine.step() (DeepSpeed
# would otherwise step every grad_accum-th call: half the P-Warm steps, PPO epochs merged into one), a frozen model
# without dropout (the baseline, rollout and replayed passes must see the same model), no profiling.
FIXED_SETTINGS: dict[str, Any] = {
    "train.resume": False,
    "train.save_every": 0,
    "train.save_every_minutes": 0.0,
    "train.warmup_steps": 0,
    "train.grad_accum": 1,
    "model.dropout": 0.0,
    "profile.enabled": False,
}


@dataclass
class AdaKRunConfig(RunConfig):
    """A c2r-train run config plus the ``adak`` section; the router must be Ada-K's."""

    adak: AdaKTrainConfig = field(kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        kind = self.model.moe.router.kind
        if kind != "adak":
            raise ValueError(f"c2r-adak trains Ada-K routers; model.moe.router.kind is {kind!r}, expected 'adak'")
        if self.train.weight_decay < 0:
            raise ValueError(f"train.weight_decay ({self.train.weight_decay}) must be >= 0")
        if self.hf.model_dir is not None:
            raise ValueError(
                f"c2r-adak trains c2r's own GPT, not a Hugging Face model (hf.model_dir {self.hf.model_dir})"
            )
        settings = flatten(dataclasses.asdict(self))
        others = [f"{key}={settings[key]}" for key, value in FIXED_SETTINGS.items() if settings[key] != value]
        if others:
            fixed = ", ".join(f"{key}={value}" for key, value in FIXED_SETTINGS.items())
            raise ValueError(f"c2r-adak does not support {', '.join(others)} (it always runs with {fixed})")
        max_k = self.model.moe.router.adak.resolved_max_k(self.model.moe.num_experts)
        target = self.adak.pwarm_target_k
        if target is not None and not 1 <= target <= max_k:
            raise ValueError(f"adak.pwarm_target_k ({target}) must be between 1 and adak max_k ({max_k})")
        # Recorded so that the saved run reads like a c2r-train one: its length and the weights it started from.
        steps = max(1, self.adak.warm_steps + self.adak.steps)
        self.train = dataclasses.replace(self.train, steps=steps, init_from=self.adak.checkpoint)


# c2r-adak's defaults over the source checkpoint's settings: the Ada-K router, recorded in its inference mode; the
# paper's optimizer (AdamW, lr 1e-3, weight decay 0.1, constant learning rate, no clipping; a DeepSpeed config's
# gradient_clipping still applies); the fixed settings; an output directory that is not replaced unless asked.
ADAK_DEFAULTS: dict[str, Any] = merge(
    nested(FIXED_SETTINGS),
    {
        "model": {"moe": {"router": {"kind": "adak", "adak": {"mode": "argmax"}}}},
        "train": {
            "lr": 1e-3,
            "weight_decay": 0.1,
            "grad_clip": 0.0,
            "eval_batches": 8,
            "overwrite": False,
            "ep_size": 1,
            "device": "auto",
            "out_dir": "runs/adak",
            "seed": 0,
        },
    },
)


# ---------------------------------------------------------------------------------------------------------------
# Setting up: the source checkpoint (the base of the run config), the modules that train.


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
    hf_model = (saved.get("hf") or {}).get("model_dir")
    if hf_model:
        raise ValueError(
            f"c2r-adak trains allocators on c2r's own GPT; {ckpt_dir / tag} is a Hugging Face model's run "
            f"(hf.model_dir {hf_model}), which it does not support"
        )
    return ckpt_dir / tag, saved


def source_settings(user: dict[str, Any]) -> dict[str, Any]:
    """The base of c2r-adak's config: the model, train and data sections of the checkpoint the user names."""
    adak = user.get("adak")
    checkpoint = adak.get("checkpoint") if isinstance(adak, dict) else None
    if not checkpoint:
        raise ValueError("c2r-adak needs the model to train allocators on: --checkpoint RUN (adak.checkpoint)")
    _, saved = read_source_config(checkpoint)
    settings = {key: copy.deepcopy(saved[key]) for key in SOURCE_SECTIONS}
    router = settings["model"]["moe"]["router"]
    if router.get("balance") == "batch":  # "batch" is the topk kind's; Ada-K keeps the running bias under "auto"
        router["balance"] = "auto"
    return settings


def allocators(model: torch.nn.Module) -> list[torch.nn.Module]:
    """What c2r-adak trains: every Ada-K router's allocator (``TrainOnly`` freezes the rest)."""
    return [router.allocator for router in adak_routers(model)]


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

    config: AdaKRunConfig
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


def setup_run(config: AdaKRunConfig) -> AdaKRun:
    """Join the job, build the frozen Ada-K model under DeepSpeed and load the checkpoint into it."""
    from c2r.deepspeed.checkpoint import init_from_checkpoint

    source, _ = read_source_config(config.adak.checkpoint)
    tc = config.train
    check_out_dir(tc.out_dir, False, tc.overwrite, tc.init_from, resumable=False)  # every rank, before any writes
    info = start_run(config)
    if tc.overwrite:
        if info.rank == 0 and (replaced := clear_run(tc.out_dir)):
            log.info("--overwrite: deleted the previous run's %s in %s", ", ".join(replaced), tc.out_dir)
        dist.barrier()
    corpus = load_corpus(config.data)
    check_same_corpus(corpus)
    engine = build_engine(config, info.device, TrainOnly("allocators", allocators))
    routers = adak_routers(engine.module)
    run_config = run_config_record(config, engine.module)
    init_from_checkpoint(engine, config.adak.checkpoint, run_config)
    torch.manual_seed(tc.seed + 1 + info.rank)  # each rank samples its own ks
    # c2r-train's validation batches, so its val_loss and ours compare
    train_batches, val_batches = batch_samplers(corpus, config, info.rank, info.world_size, stream=ADAK_BATCHES)
    run = AdaKRun(
        config=config,
        run_config=run_config,
        source=source,
        engine=engine,
        routers=routers,
        info=info,
        train_batches=train_batches,
        val_batches=val_batches,
        out_dir=Path(tc.out_dir),
    )
    if run.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        log_start(config, source, info, routers)
    return run


def train_adak(config: AdaKRunConfig) -> dict[str, Any]:
    """P-Warm then PPO on the allocators of ``config.adak.checkpoint``; saves the Ada-K checkpoint and evaluation."""
    from c2r.deepspeed.checkpoint import save_checkpoint

    opts = config.adak
    run = setup_run(config)
    p, mean_label = calibrate(run, opts)
    history, after_pwarm = train_allocators(run, opts, p)
    evaluation = evaluate_modes(run.engine, run.routers, run.val_batches, config.train.eval_batches, run.info.device)
    raise_if_router_logits_were_not_finite(run.engine.module)  # on a GPU the routers report here, before the save
    set_routers(run.routers, "argmax")
    restore_source_weights(run)
    save_checkpoint(run.engine, run.out_dir / "checkpoints", opts.warm_steps + opts.steps, run.run_config)
    summary = eval_summary(config, run.source, p, mean_label, evaluation, after_pwarm)
    if run.is_main:
        (run.out_dir / ADAK_EVAL).write_text(json.dumps(summary, indent=2))
        tqdm.write(format_eval_table(summary))
        log.info("Ada-K checkpoint in %s; evaluation in %s", run.out_dir / "checkpoints", run.out_dir / ADAK_EVAL)
    return {"history": history, "eval": summary, "engine": run.engine, "routers": run.routers, "out_dir": run.out_dir}


def restore_source_weights(run: AdaKRun) -> None:
    """Before the save: where the frozen model ran in another dtype than the source checkpoint holds (a bf16 DeepSpeed
    config), load the source's tensors again in its own dtype, so that only the allocators differ from it (float32
    weights rounded to bf16 and back would not be the source's)."""
    from c2r.deepspeed.checkpoint import init_from_checkpoint
    from c2r.deepspeed.move_experts import MODEL_FILE

    states = torch.load(run.source / MODEL_FILE, map_location="cpu", mmap=True, weights_only=False)["module"]
    dtype = next(t.dtype for t in states.values() if torch.is_tensor(t) and t.is_floating_point())
    module = run.engine.module
    if all(p.dtype == dtype for p in module.parameters() if not p.requires_grad):
        return
    trained = [allocator.weight.detach().clone() for allocator in allocators(module)]
    module.to(dtype)
    init_from_checkpoint(run.engine, run.config.adak.checkpoint, run.run_config)  # the source's allocators too
    for allocator, weight in zip(allocators(module), trained):
        allocator.float().weight.data.copy_(weight)


def train_allocators(run: AdaKRun, opts: AdaKTrainConfig, p: float | None) -> tuple[list[dict], dict | None]:
    """The P-Warm steps, then the PPO batches; returns the logged records and the argmax evaluation after P-Warm."""
    device, started, eval_batches = run.info.device, time.perf_counter(), run.config.train.eval_batches
    history, after_pwarm = [], None
    metrics_log = MetricsLog(run.out_dir / "adak_metrics.jsonl", None, enabled=run.is_main, format_record=format_record)
    with metrics_log as metrics:
        # one bar per phase, each counting its own steps; ``step`` counts both (the records' and checkpoint's step)
        for name, first, count in (("p-warm", 0, opts.warm_steps), ("ppo", opts.warm_steps, opts.steps)):
            if not count:
                continue
            bar = progress_bar(range(count), name, run.is_main)
            for step in range(first, first + count):
                warm = step < opts.warm_steps
                if warm:
                    stats = pwarm_step(run.engine, run.routers, run.train_batches.batch_at(step, device)[0], p)
                else:
                    stats = ppo_step(run.engine, run.routers, run.train_batches.batch_at(step, device), opts)
                bar.update()
                record = report(step, warm, stats, run.info, bar, opts, started)
                if record is not None:
                    history.append(record)
                    metrics.write(record)
            bar.close()
            if name == "p-warm" and opts.steps:
                after_pwarm = evaluate_modes(
                    run.engine, run.routers, run.val_batches, eval_batches, device, ("argmax",)
                )
    return history, after_pwarm


def calibrate(run: AdaKRun, opts: AdaKTrainConfig) -> tuple[float | None, float | None]:
    """P-Warm's p: given, or bisected so that the mean label (all ranks, layers, tokens) equals the target k."""
    if not opts.warm_steps:
        return opts.pwarm_p, None
    probs = collect_router_probs(run.engine, run.routers, run.train_batches, opts.calib_batches, run.info.device)
    target = float(run.routers[0].top_k) if opts.pwarm_target_k is None else opts.pwarm_target_k
    max_k = run.routers[0].max_k
    if opts.pwarm_p is not None:
        p, mean_label = opts.pwarm_p, mean_pwarm_label([sorted_cumsum(q) for q in probs], opts.pwarm_p, max_k)
    else:
        p, mean_label = calibrate_pwarm_p(probs, target, max_k)
    if run.is_main:
        how = "given" if opts.pwarm_p is not None else f"bisected for mean label {target:g}"
        log.info("P-Warm p = %.4f (%s): mean label k = %.3f over %d batches", p, how, mean_label, opts.calib_batches)
    return p, mean_label


def report(step: int, warm: bool, stats, info, bar, opts: AdaKTrainConfig, started: float) -> dict | None:
    """Progress bar every step; a record (all ranks' mean) every ``log_every`` steps and at the phase ends."""
    done = step + 1
    last_of_phase = done in (opts.warm_steps, opts.warm_steps + opts.steps)
    if done % opts.log_every and not last_of_phase:
        # NOTE: host sync, one per step; refresh=False: the bar redraws at its own interval (progress_bar)
        bar.set_postfix(loss=f"{float(stats['loss']):.4f}", refresh=False)
        return None
    record = {"phase": "pwarm" if warm else "ppo", "step": done}
    record.update({key: global_mean(float(value), info.device) for key, value in stats.items()})
    record["elapsed_s"] = round(time.perf_counter() - started, 2)
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


def eval_summary(config: AdaKRunConfig, source, p, mean_label, evaluation, after_pwarm) -> dict[str, Any]:
    topk, adak, opts = evaluation["default"], evaluation["argmax"], config.adak
    return {
        "source_checkpoint": str(source),
        "top_k": config.model.moe.top_k,
        "max_k": config.model.moe.router.adak.resolved_max_k(config.model.moe.num_experts),
        "eval_batches": config.train.eval_batches,
        "tokens_per_rank": config.train.eval_batches * config.train.batch_size * config.model.block_size,
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
        "Ada-K on %s: %s, top-%d of %d experts, k in 1..%d; %s on %s, ep_size %d; "
        "training %d allocator parameters, the rest frozen",
        source,
        plural(len(routers), "MoE layer"),
        config.model.moe.top_k,
        config.model.moe.num_experts,
        routers[0].max_k,
        plural(info.world_size, "rank"),
        info.device.type,
        config.train.ep_size,
        trainable,
    )


ADAK_CLI = ConfigCli(
    prog="c2r-adak",
    description=__doc__,
    config_cls=AdaKRunConfig,
    shorthands=(
        Shorthand(
            "--checkpoint",
            "adak.checkpoint",
            "c2r-train run dir, checkpoints dir or tag dir (required: here, or adak.checkpoint in --config / --set)",
        ),
        Shorthand("--out", "train.out_dir", "output directory"),
        Shorthand("--overwrite", "train.overwrite", "replace the run already in --out", switch=True),
        Shorthand("--steps", "adak.steps", "PPO batches", int),
        Shorthand("--warm-steps", "adak.warm_steps", "P-Warm steps before PPO", int),
        Shorthand("--batch-size", "train.batch_size", "sequences per rank and step (default: the checkpoint's)", int),
        Shorthand("--lr", "train.lr", "AdamW learning rate", float),
        Shorthand("--weight-decay", "train.weight_decay", "AdamW weight decay", float),
        Shorthand("--lambda", "adak.k_penalty", "weight of the expected-k penalty", float),
        Shorthand("--clip-eps", "adak.clip_eps", "PPO clip epsilon", float),
        Shorthand("--ppo-epochs", "adak.ppo_epochs", "optimizer steps per rollout batch", int),
        Shorthand("--gamma", "adak.gamma", "advantage discount over layers", float),
        Shorthand("--pwarm-p", "adak.pwarm_p", "P-Warm's p (default: bisected to hit --pwarm-target-k)", float),
        Shorthand(
            "--pwarm-target-k", "adak.pwarm_target_k", "mean P-Warm label to aim for (default: the model's k)", float
        ),
        Shorthand("--calib-batches", "adak.calib_batches", "batches for the p bisection", int),
        Shorthand(
            "--max-k",
            "model.moe.router.adak.max_k",
            "largest k of the allocator, 0: all experts (default: the checkpoint's, 0 for a top-k one)",
            int,
        ),
        Shorthand("--eval-batches", "train.eval_batches", "validation batches", int),
        Shorthand("--log-every", "adak.log_every", "steps between log lines", int),
        Shorthand("--ep-size", "train.ep_size", "expert-parallel ranks", int),
        Shorthand("--device", "train.device", "auto, cpu or cuda"),
        Shorthand(
            "--deepspeed-config",
            "train.deepspeed_config",
            "DeepSpeed JSON (bf16 is honoured; run at ZeRO stage 0: only allocators train; default: the checkpoint's)",
            aliases=("--deepspeed_config",),  # DeepSpeed's own spelling
        ),
        Shorthand("--seed", "train.seed", "seed of the model build, the batches and the sampled ks", int),
    ),
    defaults=ADAK_DEFAULTS,
    base=source_settings,
    inherited=SOURCE_SECTIONS,
)


def run(config: AdaKRunConfig) -> str:
    """Train the allocators; the summary line rank 0 prints."""
    s = train_adak(config)["eval"]
    return (
        f"done: val loss {s['topk']['val_loss']:.4f} (top-{s['top_k']}) -> {s['adak_argmax']['val_loss']:.4f} "
        f"(Ada-K), experts/token {s['topk']['active_experts_per_token']:.2f} -> "
        f"{s['adak_argmax']['active_experts_per_token']:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    return ADAK_CLI.main(argv, run)


if __name__ == "__main__":
    raise SystemExit(main())
