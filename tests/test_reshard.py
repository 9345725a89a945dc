"""c2r-place reshard: a checkpoint saved on one number of ranks / ep_size continues on another (2 -> 4, 4 -> 2,
2 -> 1), experts and every parameter's fp32 master and Adam moments carried over, and the continued run follows the
uninterrupted run of the same global batch step by step (ZeRO 0, 1, 2)."""

import json
import subprocess
import sys

import pytest
import torch

from c2r.config_utils import config_from_dict
from c2r.data import BatchSampler
from c2r.deepspeed.move_experts import move_rows
from c2r.deepspeed.reshard import RESHARDED, reshard
from c2r.train import RunConfig, train
from placement.layout import ExpertLayout
from tests.distributed import run_distributed
from tests.run_configs import tiny_run_config

STEPS = 8
MOMENTS = ("exp_avg", "exp_avg_sq")


def raw_config(out_dir, ds_config, ep_size=2, batch_size=4, **train_options) -> dict:
    raw = tiny_run_config(
        out_dir,
        STEPS,
        ep_size=ep_size,
        batch_size=batch_size,
        eval_every=STEPS,
        save_every=3,
        deepspeed_config=ds_config,
        **train_options,
    )
    # The Switch balance loss is computed over each rank's micro batch (as in DeepSpeed and Megatron), so it depends
    # on how the global batch is split; without it the objective is a mean over the global batch's tokens.
    raw["model"]["moe"]["router"] = {"aux_loss_weight": 0.0}
    return raw


def full_state(engine) -> dict:
    """{(parameter, logical expert or -1, kind): float32 values} over the whole model; kind: the weight, the
    optimizer's fp32 master, exp_avg, exp_avg_sq. Experts are keyed by logical id, so any ep_size compares."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from c2r.deepspeed import DeepSpeedMoELayer

    optimizer = engine.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO: link loaded moments to the parameters
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    held = {}
    for module in engine.module.modules():
        if isinstance(module, DeepSpeedMoELayer):
            layer = module.deepspeed_moe
            dispatcher = getattr(layer, "dispatcher", None)
            experts = layer.experts
            local = list(range(layer.config.num_experts))
            if dispatcher is not None:
                local = dispatcher.layout.local_experts(dispatcher.rank)
            for name in ("w1", "v1", "w2"):
                if getattr(experts, name) is not None:
                    held[id(getattr(experts, name))] = local
    out = {}
    for name, param in engine.module.named_parameters():
        if hasattr(param, "_hp_mapping"):  # ZeRO-1/2: gathered over the (expert-)data-parallel group
            master = safe_get_full_fp32_param(param)
            state = {k: safe_get_full_optimizer_state(param, k) for k in MOMENTS}
        else:  # no ZeRO, fp32: the parameter is its own master
            master, state = param, optimizer.state[param]
        views = {"weight": param, "fp32": master, **{k: state[k] for k in MOMENTS}}
        experts = held.get(id(param))
        for kind, value in views.items():
            value = value.detach().float()
            if experts is None:
                out[(name, -1, kind)] = value.clone()
            else:
                rows = value.reshape(len(experts), -1)
                out.update({(name, e, kind): rows[slot].clone() for slot, e in enumerate(experts)})
    return out


def train_worker(rank, world, raw):
    result = train(config_from_dict(RunConfig, raw))
    return {"step_losses": result["step_losses"], "state": full_state(result["engine"])}


def merged(per_rank: list[dict]) -> dict:
    out = {}
    for rank in per_rank:
        for key, value in rank["state"].items():
            if key in out:  # replicas over the (expert-)data-parallel group agree
                torch.testing.assert_close(value, out[key], rtol=0, atol=0, msg=str(key))
            out[key] = value
    return out


def write_ds_config(path, stage: int) -> str:
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    return str(path)


def resume_resharded(tmp_path, name, source, tag, world, ep_size, ds_config, cli=False):
    """Reshard ``source``'s checkpoint ``tag`` for ``world`` ranks into run ``name`` and train it to the end."""
    out = tmp_path / name / "checkpoints"
    if cli:
        done = subprocess.run(
            [sys.executable, "-m", "c2r.place_cli", "reshard", "--checkpoint", str(source / "checkpoints")]
            + ["--tag", tag, "--out", str(out), "--world-size", str(world), "--ep-size", str(ep_size)],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        assert f"continue with `NUM_RANKS={world} EP_SIZE={ep_size} bash launch/quickstart.sh " in done.stdout
        assert f"--resume --set train.batch_size={8 // world} --steps N`" in done.stdout
        written = out / tag
    else:
        written = reshard(source / "checkpoints", out, world, ep_size, tag=tag)
    saved = json.loads((written / "c2r_config.json").read_text())
    assert saved["optimizer_state"] == RESHARDED and saved["world_size"] == world
    assert saved["train"]["batch_size"] * world == 8  # the same global batch
    raw = raw_config(tmp_path / name, ds_config, ep_size, saved["train"]["batch_size"], resume=True)
    return run_distributed(train_worker, world, tmp_path / f"w_{name}", raw)


def assert_follows(resumed, full, start: int) -> None:
    assert len(resumed[0]["step_losses"]) == STEPS - start
    torch.testing.assert_close(resumed[0]["step_losses"], full[0]["step_losses"][start:], rtol=1e-5, atol=1e-5)
    expected, got = merged(full), merged(resumed)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6, msg=str(key))


def test_global_batches_are_the_same_at_any_world_size():
    tokens = torch.arange(1000).numpy()
    one = BatchSampler(tokens, 8, 8, seed=3).batch_at(5)[0]
    four = torch.cat([BatchSampler(tokens, 8, 2, seed=3, rank=r, world_size=4).batch_at(5)[0] for r in range(4)])
    assert torch.equal(one, four)


def test_move_rows_between_ep_sizes():
    # 4 experts on 2 ranks (2 each) -> 4 ranks (1 each), reversed: logical e goes to rank 3 - e.
    old = [torch.tensor([[0.0], [1.0]]), torch.tensor([[2.0], [3.0]])]  # rows = expert ids
    new = move_rows(old, ExpertLayout.contiguous(4, 2), ExpertLayout((3, 2, 1, 0), 4))
    assert [t.tolist() for t in new] == [[[3.0]], [[2.0]], [[1.0]], [[0.0]]]
    back = move_rows(new, ExpertLayout((3, 2, 1, 0), 4), ExpertLayout.contiguous(4, 1))
    assert [t.tolist() for t in back] == [[[0.0], [1.0], [2.0], [3.0]]]


def resume_error_worker(rank, world, raw):
    try:
        train(config_from_dict(RunConfig, raw))
    except ValueError as error:
        return str(error)
    return None


@pytest.mark.parametrize("stage", [0, 1, 2], ids=["zero0", "zero1", "zero2"])
def test_resharded_resume_follows_the_uninterrupted_run(tmp_path, stage):
    # Uninterrupted: 2 ranks, ep 2, 4 sequences per rank (global batch 8), checkpoints at steps 3 and 6.
    # 2 -> 4: step 3 resharded to 4 ranks (ep 4, 2 per rank), trained to the end (checkpoint at 6).
    # 4 -> 2: that run's step 6 back to 2 ranks (ep 2). 2 -> 1: step 3 on one rank (ep 1, 8 per rank).
    # Each continued run's losses and final state (every weight, fp32 master and moment) are the uninterrupted run's.
    ds_config = write_ds_config(tmp_path / "ds.json", stage)
    full = run_distributed(train_worker, 2, tmp_path / "w_full", raw_config(tmp_path / "full", ds_config))
    up = resume_resharded(tmp_path, "up", tmp_path / "full", "step3", 4, 4, ds_config)
    assert_follows(up, full, 3)
    down = resume_resharded(tmp_path, "down", tmp_path / "up", "step6", 2, 2, ds_config, cli=stage == 2)
    assert_follows(down, full, 6)
    one = resume_resharded(tmp_path, "one", tmp_path / "full", "step3", 1, 1, ds_config)
    assert_follows(one, full, 3)
    if stage == 2:  # the unconverted checkpoint on another world size: one line that says what to do
        raw = raw_config(tmp_path / "full", ds_config, ep_size=1, batch_size=8, resume=True)
        (message,) = run_distributed(resume_error_worker, 1, tmp_path / "w_refused", raw)
        assert "saved with ep_size=2 on 2 ranks, this run has ep_size=1 on 1 rank" in message
        assert "c2r-place reshard --checkpoint" in message


def test_round_robin_gradients_drops_the_optimizer_state_instead_of_scrambling_it(tmp_path):
    """ZeRO's round_robin_gradients stores a group's flat buffer in round-robin order, not the order of its
    param_slice_mappings: carried over as if it were, every dense parameter got another one's fp32 master and moments
    (a review found the resumed loss 0.5 above the uninterrupted run's after one step, without a word). The
    optimizer state is dropped instead (said in the run config); the weights carry over and the run goes on close to
    the uninterrupted one (fresh moments)."""
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 2, "round_robin_gradients": True}}))
    full = run_distributed(train_worker, 2, tmp_path / "w_full", raw_config(tmp_path / "full", str(ds_config)))
    written = reshard(tmp_path / "full" / "checkpoints", tmp_path / "one" / "checkpoints", 1, 1, tag="step3")
    saved = json.loads((written / "c2r_config.json").read_text())
    assert saved["optimizer_state"].startswith("dropped") and "round_robin_gradients" in saved["optimizer_state"]
    raw = raw_config(tmp_path / "one", str(ds_config), 1, saved["train"]["batch_size"], resume=True)
    one = run_distributed(train_worker, 1, tmp_path / "w_one", raw)
    assert one[0]["step_losses"][0] == pytest.approx(full[0]["step_losses"][3], abs=1e-4)  # the same weights
    torch.testing.assert_close(one[0]["step_losses"], full[0]["step_losses"][3:], rtol=0, atol=0.05)
