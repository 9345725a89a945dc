import json
import subprocess
import sys

import pytest
import torch

from c2r.config_utils import config_from_dict
from c2r.model import ModelConfig, MoEGPT
from c2r.moe import MoEConfig, MoELayer
from c2r.run_setup import RunConfig
from c2r.train import TRAIN_CLI, train
from tests.distributed import run_distributed


def tiny_model_config(**moe) -> ModelConfig:
    return config_from_dict(
        ModelConfig,
        {
            "block_size": 32,
            "n_layer": 2,
            "n_head": 2,
            "d_model": 32,
            "moe": {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 32, **moe},
        },
    )


def test_model_shapes_and_moe_placement():
    config = config_from_dict(ModelConfig, {"n_layer": 4, "moe_every": 2, "d_model": 32, "n_head": 2, "block_size": 16})
    model = MoEGPT(config)
    assert [isinstance(b.mlp, MoELayer) for b in model.blocks] == [False, True, False, True]
    idx = torch.randint(0, 256, (3, 16))
    out = model(idx, idx)
    assert out.logits.shape == (3, 16, 256)
    assert len(out.routing) == 2
    assert torch.isfinite(out.loss) and out.loss > out.lm_loss  # aux loss is added
    assert model.head.weight is model.tok_emb.weight
    params = model.num_parameters()
    assert params["active_per_token"] < params["total"]


def test_model_backends_give_same_loss_and_grads():
    results = []
    for backend in ("reference", "torch"):
        torch.manual_seed(0)
        model = MoEGPT(tiny_model_config(experts={"backend": backend}))
        idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
        out = model(idx, idx)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def test_bad_model_config():
    with pytest.raises(ValueError, match=r"d_model \(30\) must be divisible by n_head \(4\)"):
        config_from_dict(ModelConfig, {"d_model": 30, "n_head": 4})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['num_expert'\] in config section 'moe'"):
        config_from_dict(ModelConfig, {"moe": {"num_expert": 4}})
    model = MoEGPT(tiny_model_config())
    with pytest.raises(ValueError, match="sequence length 40 exceeds block_size 32"):
        model(torch.zeros(1, 40, dtype=torch.long))


def tiny_run_config(out_dir, **train) -> dict:
    return {
        "model": {
            "block_size": 32,
            "n_layer": 2,
            "n_head": 2,
            "d_model": 64,
            "moe": {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 64},
        },
        "train": {
            "steps": 60,
            "batch_size": 8,
            "eval_every": 20,
            "eval_batches": 4,
            "lr": 3e-3,
            "warmup_steps": 5,
            "out_dir": str(out_dir),
            **train,
        },
        "data": {"max_bytes": 400_000},
    }


def train_worker(rank, world, raw_config):
    result = train(config_from_dict(RunConfig, raw_config))
    return {k: v for k, v in result.items() if k != "engine"}


def test_training_lowers_loss_and_writes_metrics_and_checkpoint(tmp_path):
    (result,) = run_distributed(train_worker, 1, tmp_path / "ranks", tiny_run_config(tmp_path / "run"))
    history = result["history"]
    assert len(history) == 3 and len(result["step_losses"]) == 60
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.1
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.3
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [20, 40, 60]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step60"
    assert (tmp_path / "run" / "checkpoints" / "step60" / "layer_1_expert_3_mp_rank_00_model_states.pt").exists()
    # The saved run config loads back as the config the run was given.
    saved = TRAIN_CLI.resolve(["--config", str(tmp_path / "run" / "checkpoints" / "step60" / "c2r_config.json")])
    assert saved == config_from_dict(RunConfig, tiny_run_config(tmp_path / "run"))


def summary_worker(rank, world, raw_config):
    """The run's summary line, its step losses and the lines c2r.train logged."""
    import logging

    import c2r.train

    lines, results = [], []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("c2r.train").addHandler(handler)
    logging.getLogger("c2r.train").setLevel(logging.INFO)
    real_train = c2r.train.train
    c2r.train.train = lambda config: results.append(real_train(config)) or results[-1]
    summary = c2r.train.run(config_from_dict(RunConfig, raw_config))
    return summary, results[0]["step_losses"], lines


def test_a_run_with_one_evaluation_says_what_it_learned_and_counts_one_rank(tmp_path):
    """A run of at most eval_every steps evaluates once: its `done:` line read `train loss 3.668 -> 3.668, val loss
    2.702 -> 2.702`, as if nothing was learned; it starts from the first step's loss now. Its log said "1 ranks"."""
    raw = tiny_run_config(tmp_path / "run", steps=4, eval_every=10, eval_batches=1)
    raw["model"]["n_layer"] = 1
    ((summary, step_losses, lines),) = run_distributed(summary_worker, 1, tmp_path / "ranks", raw)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert summary == (
        f"done: train loss {step_losses[0]:.3f} (step 1) -> {record['train_loss']:.3f} (mean of steps 1-4), val loss "
        f"{record['val_loss']:.3f} over 4 steps"
    )
    assert record["train_loss"] == pytest.approx(sum(step_losses) / 4)  # the mean since the previous evaluation
    (model,) = [line for line in lines if line.startswith("model:")]
    assert "model: 1 MoE layer of 4 experts" in model and "1 rank on cpu, ep_size 1 (4 experts per rank)" in model
    assert "batch: 256 tokens per step (8 sequences of 32 per rank, 1 rank)" in lines


def test_cli_overrides_and_errors():
    config = TRAIN_CLI.resolve(
        ["--steps", "7", "--backend", "reference", "--set", "model.moe.top_k=1", "--set", "train.out_dir=/tmp/x"]
    )
    assert config.train.steps == 7 and config.model.moe.top_k == 1
    assert config.model.moe.experts.backend == "reference" and config.train.out_dir == "/tmp/x"
    with pytest.raises(ValueError, match="top_k"):
        TRAIN_CLI.resolve(["--set", "model.moe.top_k=99"])
    with pytest.raises(ValueError, match=r"ep_size \(3\) must divide num_experts \(8\)"):
        TRAIN_CLI.resolve(["--ep-size", "3"])


def test_cli_help_and_bad_config_exit_cleanly():
    help_text = subprocess.run([sys.executable, "-m", "c2r.train", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--data" in help_text.stdout
    assert "optimizer steps (train.steps, default 300)" in " ".join(help_text.stdout.split())  # from the config
    bad = subprocess.run([sys.executable, "-m", "c2r.train", "--backend", "gpu-magic"], capture_output=True, text=True)
    assert bad.returncode != 0
    assert "c2r-train: bad config: expert backend 'gpu-magic' is not one of" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_c2r_train_defaults_balance_the_topk_router_and_scale_wide_learning_rates():
    # c2r-train's defaults for wide models (docs/gpu_runs.md, part 4); the library's RouterConfig stays plain top-k.
    from c2r.routing import RouterConfig

    config = TRAIN_CLI.resolve([])
    assert config.model.moe.router.batch_balanced and config.train.lr_base_width == 128
    # "auto" balances the top-k router only: other kinds, and a config that switches the kind later, route as before
    assert not TRAIN_CLI.resolve(["--set", "model.moe.router.kind=remoe"]).model.moe.router.batch_balanced
    assert not TRAIN_CLI.resolve(["--set", "model.moe.router.balance=none"]).model.moe.router.batch_balanced
    assert not RouterConfig().batch_balanced


def test_gradient_accumulation_trains_on_the_same_global_batch_however_it_is_split(tmp_path):
    """One step's global batch of 8 sequences as 1 rank x 8, 1 rank x 2 micro-batches of 4, and 2 expert-parallel
    ranks x 2 micro-batches of 2: the same loss at every step. The router is plain top-k without the balance loss,
    which would depend on how tokens are grouped; everything else is a mean over tokens."""

    def run(name, world, batch, accum, **train):
        raw = tiny_run_config(tmp_path / name, steps=4, eval_every=4, eval_batches=1, **train)
        raw["train"].update(batch_size=batch, grad_accum=accum, save_last=False)
        raw["model"]["moe"]["router"] = {"aux_loss_weight": 0.0}
        return run_distributed(train_worker, world, tmp_path / f"{name}_ranks", raw)[0]

    whole = run("whole", 1, 8, 1)
    micro = run("micro", 1, 4, 2)
    ranks = run("ranks", 2, 2, 2, ep_size=2)
    assert len(micro["step_losses"]) == 4
    assert micro["step_losses"] == pytest.approx(whole["step_losses"], rel=1e-5)
    assert ranks["step_losses"] == pytest.approx(whole["step_losses"], rel=1e-5)
    record = json.loads((tmp_path / "micro" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["tokens_per_s"] > 0 and record["model_tflops_per_rank"] > 0


def test_zero_stage_3_is_refused_with_one_line(tmp_path):
    from c2r.deepspeed import load_deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match=r"zero_optimization.stage is 3; DeepSpeed's MoE runs under ZeRO stage 0, 1"):
        load_deepspeed_config(str(path), False, 4, 1.0, 1)


def test_gradient_accumulation_has_one_home(tmp_path):
    from c2r.deepspeed import load_deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_accumulation_steps": 4}))
    with pytest.raises(ValueError, match="gradient_accumulation_steps is 4 but train.grad_accum is 1"):
        load_deepspeed_config(str(path), False, 4, 1.0, 1)
    assert load_deepspeed_config(str(path), False, 4, 1.0, 4)["gradient_accumulation_steps"] == 4
    with pytest.raises(ValueError, match=r"train.grad_accum \(2\) needs the global batch sampler"):
        TRAIN_CLI.resolve(["--grad-accum", "2", "--set", "train.batch_sampler=per-rank"])
    assert TRAIN_CLI.resolve(["--grad-accum", "3"]).train.grad_accum == 3


def test_flops_per_token_counts_the_active_weights_and_attention():
    # The ~1B fine-grained model of docs/gpu_runs.md: 538.5M active weights, 3.43 GFLOP per token.
    moe = MoEConfig(num_experts=64, top_k=8, ffn_hidden_size=1024)
    config = ModelConfig(n_layer=8, d_model=2048, n_head=16, block_size=1024, moe=moe)
    weights = 8 * (4 * 2048**2 + 2048 * 64 + 8 * 3 * 2048 * 1024) + 2048 * 256
    assert config.flops_per_token() == 6 * weights + 12 * 8 * 2048 * 1024
    assert abs(config.flops_per_token() / 1e9 - 3.43) < 0.01


def diverging_worker(rank, world, raw_config, at=3, ranks=(0,), where="head"):
    """Training whose forward number ``at`` goes NaN on ``ranks``: at the LM head's output, or (``where="router"``)
    at the first router's input (its logits go NaN; the routers' check reports it). The run must stop at that step
    on every rank, before any save of it. Returns the error message, or None."""
    import c2r.train as train_module
    from c2r.routing import Router

    build = train_module.build_engine

    def poisoned(*args, **kwargs):
        engine = build(*args, **kwargs)
        if rank not in ranks:
            return engine
        forwards = {"count": 0}

        def nan_at(module, inputs, output):
            forwards["count"] += module.training
            return output * float("nan") if forwards["count"] == at and module.training else output

        def nan_input_at(module, inputs):
            forwards["count"] += module.training
            return (inputs[0] * float("nan"),) if forwards["count"] == at and module.training else None

        if where == "head":
            engine.module.head.register_forward_hook(nan_at)
        else:
            next(m for m in engine.module.modules() if isinstance(m, Router)).register_forward_pre_hook(nan_input_at)
        return engine

    train_module.build_engine = poisoned
    try:
        train(config_from_dict(RunConfig, raw_config))
    except train_module.TrainingDiverged as error:
        return str(error)
    return None


def test_a_diverged_run_stops_with_one_line_before_saving_the_step(tmp_path):
    # Step 3 is read at step 4's boundary (c2r/step_reads.py), before step 4's save.
    raw = tiny_run_config(tmp_path / "run", steps=6, save_every=2)
    (message,) = run_distributed(diverging_worker, 1, tmp_path / "ranks", raw)
    assert message is not None and message.startswith("training diverged at step 3: loss nan")
    assert "the last checkpoint is step2" in message
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step*")) == ["step2"]


def test_a_step_that_saves_checks_itself_before_the_save(tmp_path):
    # Step 2 diverges and saves: its boundary reads its own numbers first, so nothing is saved.
    raw = tiny_run_config(tmp_path / "run", steps=6, save_every=2)
    (message,) = run_distributed(diverging_worker, 1, tmp_path / "ranks", raw, 2)
    assert message is not None and message.startswith("training diverged at step 2: loss nan")
    assert "no checkpoint was saved" in message
    assert not list((tmp_path / "run" / "checkpoints").glob("step*"))


def test_nan_router_logits_on_one_rank_stop_every_rank_at_the_same_step(tmp_path):
    """Rank 1's router sees NaN at its third forward: no rank raises alone mid-forward (the others would wait for it
    in the next all-to-all); the counts, summed over the ranks with the step's loss, stop both at step 3."""
    raw = tiny_run_config(tmp_path / "run", steps=6, save_every=2, ep_size=2)
    messages = run_distributed(diverging_worker, 2, tmp_path / "ranks", raw, 3, (1,), "router")
    assert messages[0] == messages[1], messages
    assert messages[0].startswith("training diverged at step 3: loss nan"), messages[0]
    assert "(router logits of MoE layer 0 contain NaN/Inf for" in messages[0]
    assert "all ranks" in messages[0] and "the last checkpoint is step2" in messages[0]


def test_check_finite_step_reads_deepspeeds_invalid_norm(tmp_path):
    from c2r.train import TrainingDiverged, check_finite_step

    check_finite_step(5, 2.5, 0.7, tmp_path)  # finite: nothing happens
    check_finite_step(5, 2.5, None, tmp_path)  # no norm computed (ZeRO 0): the loss decides
    with pytest.raises(TrainingDiverged, match="step 5: loss 2.5, gradient norm NaN/Inf; .*no checkpoint was saved"):
        check_finite_step(5, 2.5, -1.0, tmp_path)  # DeepSpeed masks a non-finite norm to -1
    # NaN router logits found by the routers' own check (on a GPU it reports once a step, here): named as the cause
    with pytest.raises(TrainingDiverged, match=r"step 5: loss nan, gradient norm 0.7 \(router logits of MoE layer 1"):
        error = FloatingPointError("router logits of MoE layer 1 contain NaN/Inf for 3 tokens")
        check_finite_step(5, float("nan"), 0.7, tmp_path, error)


@pytest.mark.parametrize(
    "ds_config,expected",
    [
        ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, False),  # our check reads ZeRO's norm
        ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True, "check_grad_overflow": True}}, True),  # asked
        ({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}, None),  # no norm computed: DeepSpeed checks
        ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, None),  # loss scaling needs its check
    ],
)
def test_deepspeeds_bf16_overflow_check_is_off_only_where_the_gradient_norm_is_read(tmp_path, ds_config, expected):
    from c2r.deepspeed import load_deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds_config))
    config = load_deepspeed_config(str(path), True, 4, 1.0)
    assert (config.get("bf16") or {}).get("check_grad_overflow") == expected


def test_deepspeeds_throughput_timer_is_off_unless_the_config_asks_for_it(tmp_path):
    # It synchronizes the device at every forward and step for a log c2r-train silences; a user's choice stays.
    from c2r.deepspeed import load_deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert load_deepspeed_config(str(path), True, 4, 1.0)["timers"] == {"throughput": {"enabled": False}}
    for throughput in ({"enabled": True, "synchronized": False}, {"synchronized": False}):
        path.write_text(json.dumps({"timers": {"throughput": throughput}}))
        assert load_deepspeed_config(str(path), True, 4, 1.0)["timers"]["throughput"] == throughput


def clip_norm_worker(rank, world, raws):
    """Per run: DeepSpeed's first-step gradient norm (the one it clips by). A run with ``"deepspeeds_own"`` keeps
    DeepSpeed's unfused optimizer as it is, whose norm leaves the expert gradients out."""
    import c2r.deepspeed.zero0_norm as zero0_norm

    norms = []
    for raw in raws:
        raw = dict(raw)
        if raw.pop("deepspeeds_own", False):
            zero0_norm.clip_by_whole_model_norm = lambda engine: False  # build_engine imports it per call
        engine = train(config_from_dict(RunConfig, raw))["engine"]
        norms.append(float(engine.get_global_grad_norm()))
    return norms


def test_zero0_bf16_clips_by_the_whole_models_norm(tmp_path):
    """DeepSpeed runs a bf16 model without ZeRO through FP16_UnfusedOptimizer, whose clipping norm leaves the expert
    gradients out (the same first step reports a smaller norm than ZeRO 2's whole-model norm); c2r gives it the whole
    model's norm, which equals ZeRO 2's."""
    runs = []
    for stage, own in ((0, False), (2, False), (0, True)):
        ds_config = tmp_path / f"zero{stage}.json"
        ds_config.write_text(json.dumps({"zero_optimization": {"stage": stage}, "bf16": {"enabled": True}}))
        raw = tiny_run_config(tmp_path / f"run{stage}{own}", steps=1, deepspeed_config=str(ds_config))
        raw["train"].update(save_last=False)
        raw["model"]["moe"]["ffn_hidden_size"] = 1024  # experts a visible share of the gradient
        runs.append({**raw, "deepspeeds_own": own})
    zero0, zero2, deepspeeds_own = run_distributed(clip_norm_worker, 1, tmp_path / "ranks", runs)[0]
    assert zero0 == pytest.approx(zero2, rel=1e-6)  # the same gradients, the same norm
    assert deepspeeds_own < 0.995 * zero2  # DeepSpeed's own: the experts' share is missing (1.487 vs 1.500 here)


@pytest.mark.parametrize("width", [0, -4])
def test_a_dense_ffn_width_that_is_not_positive_is_refused(width):
    # 0 was silently 4 x d_model, a negative width a traceback inside nn.Linear
    with pytest.raises(ValueError, match=rf"dense_ffn_hidden_size \({width}\) must be > 0, or null for 4 x d_model"):
        ModelConfig(moe_every=2, dense_ffn_hidden_size=width)


def test_an_unknown_top_level_key_names_the_top_level_not_a_class():
    from c2r.config_utils import config_from_dict
    from c2r.train import RunConfig

    with pytest.raises(ValueError, match=r"unknown key\(s\) \['modle'\] in the config's top level; valid keys"):
        config_from_dict(RunConfig, {"modle": {}})
