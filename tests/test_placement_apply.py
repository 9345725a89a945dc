"""c2r-place apply: experts moved between ranks' checkpoint files; the model computes the same function."""

import json
import subprocess
import sys

import pytest
import torch

from c2r.config_utils import config_from_dict, config_to_dict
from c2r.data import BatchSampler, load_corpus
from c2r.parallel import model_layouts
from c2r.train import RunConfig, build_engine, train
from placement.apply import apply_plan
from placement.plan import plan_from_dict
from tests.distributed import run_distributed
from tests.run_configs import tiny_run_config


def raw_config(out_dir, steps=4, **train_options) -> dict:
    return tiny_run_config(out_dir, steps, ep_size=2, eval_every=2, **train_options)


PLAN_LAYOUTS = [[1, 0, 1, 0, 0, 1, 1, 0], [0, 1, 1, 0, 1, 0, 0, 1]]


def plan_dict() -> dict:
    return {
        "format": "c2r-placement",
        "version": 1,
        "num_layers": 2,
        "num_experts": 8,
        "num_ranks": 2,
        "layers": [{"layer": i, "expert_to_rank": layout} for i, layout in enumerate(PLAN_LAYOUTS)],
    }


def train_worker(rank, world, raw):
    train(config_from_dict(RunConfig, raw))


def loss_worker(rank, world, raw):
    """Load the latest checkpoint of raw's run under raw's placement; the loss of fixed batches, and the layouts."""
    from c2r.deepspeed import init_distributed
    from c2r.deepspeed.checkpoint import resume

    config = config_from_dict(RunConfig, raw)
    info = init_distributed("cpu")
    engine = build_engine(config, info.device)
    run_config = config_to_dict(config)
    run_config["expert_layouts"] = model_layouts(engine.module)
    step = resume(engine, f"{config.train.out_dir}/checkpoints", run_config)
    engine.eval()
    batches = BatchSampler(load_corpus(config.data).val, 32, 4, seed=123 + rank)
    with torch.no_grad():
        losses = [engine(*batches.batch_at(i)).lm_loss.item() for i in range(3)]
    return {"step": step, "losses": losses, "layouts": run_config["expert_layouts"]}


def test_applied_plan_computes_the_same_function(tmp_path):
    run_distributed(train_worker, 2, tmp_path / "w1", raw_config(tmp_path / "before"))
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan_dict()))
    moved = apply_plan(
        plan_from_dict(plan_dict()),
        tmp_path / "before" / "checkpoints",
        tmp_path / "after" / "checkpoints",
        plan_path=str(plan_path),
    )
    assert moved.name == "step4" and (tmp_path / "after" / "checkpoints" / "latest").read_text() == "step4"
    assert not list(moved.glob("*optim_states.pt"))  # moments are not carried over a move (module docstring)
    # Logical expert 0 of layer 0 now lives on rank 1, first slot: physical id 4.
    state = torch.load(moved / "layer_0_expert_4_mp_rank_00_model_states.pt", weights_only=False)
    original = torch.load(
        tmp_path / "before" / "checkpoints" / "step4" / "layer_0_expert_0_mp_rank_00_model_states.pt",
        weights_only=False,
    )
    assert [k.split("deepspeed_experts.")[1] for k in state] == [
        k.split("deepspeed_experts.")[1].replace("0.", "4.", 1) for k in original
    ]
    for new_value, old_value in zip(state.values(), original.values()):
        assert torch.equal(new_value, old_value)

    before = run_distributed(loss_worker, 2, tmp_path / "w2", raw_config(tmp_path / "before", resume=True))
    after = run_distributed(
        loss_worker, 2, tmp_path / "w3", raw_config(tmp_path / "after", resume=True, placement_plan=str(plan_path))
    )
    assert after[0]["layouts"] == PLAN_LAYOUTS and before[0]["layouts"] != PLAN_LAYOUTS
    for b, a in zip(before, after):
        assert a["step"] == b["step"] == 4
        torch.testing.assert_close(a["losses"], b["losses"], rtol=1e-5, atol=1e-6)

    # Training continues from the moved checkpoint (fresh Adam moments, same step and schedule).
    run_distributed(
        train_worker,
        2,
        tmp_path / "w4",
        raw_config(tmp_path / "after", steps=6, resume=True, placement_plan=str(plan_path)),
    )
    assert (tmp_path / "after" / "checkpoints" / "latest").read_text() == "step6"


def resume_error_worker(rank, world, raw):
    try:
        loss_worker(rank, world, raw)
    except ValueError as error:
        return str(error)
    return None


def test_resume_under_a_different_placement_is_refused(tmp_path):
    run_distributed(train_worker, 2, tmp_path / "w1", raw_config(tmp_path / "run"))
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan_dict()))
    messages = run_distributed(
        resume_error_worker,
        2,
        tmp_path / "w2",
        raw_config(tmp_path / "run", resume=True, placement_plan=str(plan_path)),
    )
    assert "places experts differently from this run" in messages[0]


def test_apply_refuses_a_plan_of_another_shape(tmp_path):
    run_distributed(train_worker, 2, tmp_path / "w1", raw_config(tmp_path / "run", steps=2))
    raw = plan_dict()
    raw["num_experts"], raw["num_ranks"] = 16, 4
    raw["layers"] = [{"layer": i, "expert_to_rank": [e // 4 for e in range(16)]} for i in range(2)]
    plan = plan_from_dict(raw)
    with pytest.raises(
        ValueError,
        match="num_experts=16 in the plan, 8 in the checkpoint; num_ranks=4 in the plan, 2 in the checkpoint",
    ):
        apply_plan(plan, tmp_path / "run" / "checkpoints", tmp_path / "out")
    bad_plan = tmp_path / "bad_plan.json"
    bad_plan.write_text(json.dumps(raw))
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "placement.cli",
            "apply",
            "--plan",
            str(bad_plan),
            "--checkpoint",
            str(tmp_path / "run" / "checkpoints"),
            "--out",
            str(tmp_path / "out2"),
        ],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and "num_experts=16 in the plan, 8 in the checkpoint" in cli.stderr
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        apply_plan(plan_from_dict(plan_dict()), tmp_path / "nowhere", tmp_path / "out")
