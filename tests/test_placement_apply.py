"""c2r-place apply: experts moved between ranks' checkpoint files, weights and optimizer state; the model computes the
same function, and training resumed under the new placement follows an uninterrupted run."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from c2r.config_utils import config_from_dict
from c2r.data import BatchSampler, load_corpus
from c2r.deepspeed.move_experts import REMAPPED, move_experts, move_rows
from c2r.parallel import model_layouts
from c2r.train import RunConfig, build_engine, train
from placement.layout import ExpertLayout
from placement.plan import plan_from_dict
from tests.distributed import run_distributed
from tests.run_configs import tiny_run_config

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "deepspeed_configs"


def raw_config(out_dir, steps=4, ep_size=2, **train_options) -> dict:
    return tiny_run_config(out_dir, steps, ep_size=ep_size, eval_every=2, **train_options)


PLAN_LAYOUTS = [[1, 0, 1, 0, 0, 1, 1, 0], [0, 1, 1, 0, 1, 0, 0, 1]]
# 4 EP ranks, 2 experts each: every expert changes rank in layer 0; layer 1 also swaps slots within ranks.
PLAN_LAYOUTS_EP4 = [[3, 2, 1, 0, 0, 1, 2, 3], [1, 1, 0, 3, 0, 2, 3, 2]]


def plan_dict(layouts=PLAN_LAYOUTS) -> dict:
    return {
        "format": "c2r-placement",
        "version": 2 if any(isinstance(e, list) for layout in layouts for e in layout) else 1,  # replicas: 2
        "num_layers": len(layouts),
        "num_experts": len(layouts[0]),
        "num_ranks": max(layouts[0]) + 1,
        "layers": [{"layer": i, "expert_to_rank": layout} for i, layout in enumerate(layouts)],
    }


def write_plan(path, layouts=PLAN_LAYOUTS) -> str:
    path.write_text(json.dumps(plan_dict(layouts)))
    return str(path)


MOMENTS = ("exp_avg", "exp_avg_sq")


def expert_state(engine) -> dict:
    """{(layer, logical expert, param, kind): float32 rows} for the experts this rank holds; kind: the module's
    weight, the optimizer's fp32 master, exp_avg, exp_avg_sq (found the way DeepSpeed itself reads them)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from c2r.deepspeed import DeepSpeedMoELayer

    optimizer = engine.optimizer
    # Moments exist once a step ran or a checkpoint loaded them (all ranks agree: the ZeRO reads below are collective).
    stepped = any(getattr(optimizer, "optimizer", optimizer).state.values())
    if stepped and hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO: link loaded moments to params
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    out = {}
    wrappers = [m for m in engine.module.modules() if isinstance(m, DeepSpeedMoELayer)]
    for index, wrapper in enumerate(wrappers):
        layer = wrapper.deepspeed_moe
        held = layer.dispatcher.layout.local_experts(layer.dispatcher.rank)
        for name in ("w1", "v1", "w2"):
            param = getattr(layer.experts, name)
            if param is None:
                continue
            if hasattr(param, "_hp_mapping"):  # ZeRO-1/2: gathered over the expert-data-parallel group
                master, state = safe_get_full_fp32_param(param), {}
                if stepped:
                    state = {k: safe_get_full_optimizer_state(param, k) for k in MOMENTS}
            elif isinstance(optimizer, torch.optim.Optimizer):  # no ZeRO, fp32: the parameter is its own master
                master, state = param, optimizer.state[param]
            else:  # no ZeRO, bf16: DeepSpeed's unfused wrapper keeps fp32 masters per parameter
                ((i, j),) = [(i, j) for i, g in enumerate(optimizer.fp16_groups) for j, p in enumerate(g) if p is param]
                master = optimizer.fp32_groups[i][j]
                state = optimizer.optimizer.state[master]
            views = {"weight": param, "fp32": master}
            views.update({k: state[k] if k in state else torch.zeros_like(master) for k in MOMENTS})  # fresh: zeros
            for kind, value in views.items():
                rows = value.detach().float().reshape(len(held), -1)
                out.update({(index, e, name, kind): rows[slot].clone() for slot, e in enumerate(held)})
    return out


def train_worker(rank, world, raw):
    result = train(config_from_dict(RunConfig, raw))
    return {"step_losses": result["step_losses"], "experts": expert_state(result["engine"])}


def loss_worker(rank, world, raw):
    """Load the latest checkpoint of raw's run under raw's placement: the loss of fixed batches, the layouts, and
    every expert's weights and optimizer state by logical id."""
    from c2r.deepspeed import init_distributed
    from c2r.deepspeed.checkpoint import resume

    config = config_from_dict(RunConfig, raw)
    info = init_distributed("cpu")
    engine = build_engine(config, info.device)
    run_config = dataclasses.asdict(config)
    run_config["expert_layouts"] = model_layouts(engine.module)
    step = resume(engine, f"{config.train.out_dir}/checkpoints", run_config)
    engine.eval()
    batches = BatchSampler(load_corpus(config.data).val, 32, 4, seed=123 + rank)
    with torch.no_grad():
        losses = [engine(*batches.batch_at(i)).lm_loss.item() for i in range(3)]
    return {"step": step, "losses": losses, "layouts": run_config["expert_layouts"], "experts": expert_state(engine)}


def merged(per_rank: list[dict]) -> dict:
    """Expert state of all ranks; replicas over the expert-data-parallel group must agree."""
    out = {}
    for rank in per_rank:
        for key, value in rank["experts"].items():
            if key in out:
                torch.testing.assert_close(value, out[key], rtol=0, atol=0, msg=str(key))
            out[key] = value
    return out


def strip_slice_mappings(ckpt_dir, tag) -> None:
    """Make a checkpoint look like one from a DeepSpeed that did not record where parameters sit in the partitions."""
    for path in (ckpt_dir / tag).glob("*optim_states.pt"):
        state = torch.load(path, weights_only=False)
        del state["optimizer_state_dict"]["param_slice_mappings"]
        torch.save(state, path)


def test_move_rows_moves_each_expert_block_to_its_new_rank_and_slot():
    before, after = ExpertLayout.contiguous(4, 2), ExpertLayout((1, 0, 0, 1), 2)
    old = [torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([[2.0, 2.0], [3.0, 3.0]])]  # rows = expert ids
    new = move_rows(old, before, after)
    assert [t.tolist() for t in new] == [[[1.0, 1.0], [2.0, 2.0]], [[0.0, 0.0], [3.0, 3.0]]]


def test_applied_plan_computes_the_same_function(tmp_path):
    run_distributed(train_worker, 2, tmp_path / "w1", raw_config(tmp_path / "before"))
    plan_path = write_plan(tmp_path / "plan.json")
    source = tmp_path / "before" / "checkpoints" / "step4"
    optimizer_bytes = {p.name: p.read_bytes() for p in source.glob("*optim_states.pt")}
    moved = move_experts(
        plan_from_dict(plan_dict()).layouts,
        tmp_path / "before" / "checkpoints",
        tmp_path / "after" / "checkpoints",
        plan_path=plan_path,
    )
    assert moved.name == "step4" and (tmp_path / "after" / "checkpoints" / "latest").read_text() == "step4"
    assert sorted(p.name for p in moved.glob("*optim_states.pt")) == sorted(optimizer_bytes)
    assert {p.name: p.read_bytes() for p in source.glob("*optim_states.pt")} == optimizer_bytes  # source untouched
    assert json.loads((moved / "c2r_config.json").read_text())["optimizer_state"] == REMAPPED
    # Logical expert 0 of layer 0 now lives on rank 1, first slot: physical id 4.
    state = torch.load(moved / "layer_0_expert_4_mp_rank_00_model_states.pt", weights_only=False)
    original = torch.load(source / "layer_0_expert_0_mp_rank_00_model_states.pt", weights_only=False)
    assert [k.split("deepspeed_experts.")[1] for k in state] == [
        k.split("deepspeed_experts.")[1].replace("0.", "4.", 1) for k in original
    ]
    for new_value, old_value in zip(state.values(), original.values()):
        assert torch.equal(new_value, old_value)

    # A layout apply does not know (here: no param_slice_mappings) drops the optimizer state, and says why.
    shutil.copytree(tmp_path / "before" / "checkpoints", tmp_path / "old_format" / "checkpoints")
    strip_slice_mappings(tmp_path / "old_format" / "checkpoints", "step4")
    dropped = move_experts(
        plan_from_dict(plan_dict()).layouts,
        tmp_path / "old_format" / "checkpoints",
        tmp_path / "dropped" / "checkpoints",
    )
    assert not list(dropped.glob("*optim_states.pt"))
    note = json.loads((dropped / "c2r_config.json").read_text())["optimizer_state"]
    assert note.startswith("dropped by c2r-place apply: zero_pp_rank_0_mp_rank_00_optim_states.pt has no param_slice")
    assert "fresh optimizer moments" in note

    before = run_distributed(loss_worker, 2, tmp_path / "w2", raw_config(tmp_path / "before", resume=True))
    after = run_distributed(
        loss_worker, 2, tmp_path / "w3", raw_config(tmp_path / "after", resume=True, placement_plan=plan_path)
    )
    weights_only = run_distributed(
        loss_worker, 2, tmp_path / "w4", raw_config(tmp_path / "dropped", resume=True, placement_plan=plan_path)
    )
    assert after[0]["layouts"] == PLAN_LAYOUTS and before[0]["layouts"] != PLAN_LAYOUTS
    for b, a, w in zip(before, after, weights_only):
        assert a["step"] == b["step"] == w["step"] == 4
        torch.testing.assert_close(a["losses"], b["losses"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w["losses"], b["losses"], rtol=1e-5, atol=1e-6)
    # Every expert's weights, fp32 master and Adam moments are at its new place, bit for bit; the dropped copy has
    # the weights and fresh (zero) moments.
    b, a, w = merged(before), merged(after), merged(weights_only)
    assert a.keys() == b.keys() == w.keys() and len(b) == 2 * 8 * 3 * 4
    for key, value in b.items():
        assert torch.equal(a[key], value), key
        if key[3] in ("weight", "fp32"):
            assert torch.equal(w[key], value), key
        else:
            assert not w[key].any(), key

    # Training continues from the moved checkpoint.
    run_distributed(
        train_worker, 2, tmp_path / "w5", raw_config(tmp_path / "after", steps=6, resume=True, placement_plan=plan_path)
    )
    assert (tmp_path / "after" / "checkpoints" / "latest").read_text() == "step6"


def write_ds_config(path, stage: int, bf16: bool = False) -> str:
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}}))
    return str(path)


@pytest.mark.parametrize(
    ("stage", "world", "ep_size"),
    [(0, 2, 2), (1, 4, 2), (2, 2, 2), (2, 4, 4)],
    ids=["zero0-2ranks", "zero1-4ranks-ep2", "zero2-2ranks", "zero2-4ranks-ep4"],
)
def test_resumed_under_the_plan_follows_the_uninterrupted_run(tmp_path, stage, world, ep_size):
    # Uninterrupted: 6 steps, contiguous placement, a checkpoint at step 3. Moved: the step-3 checkpoint with its
    # experts moved to the plan's ranks (4 ranks, ep 2: each expert's state is sharded over 2 strided ranks), resumed
    # to step 6 under the plan. Same seed and batches: only float summation order may differ.
    ds_config = write_ds_config(tmp_path / "ds.json", stage)
    layouts = PLAN_LAYOUTS if ep_size == 2 else PLAN_LAYOUTS_EP4
    plan_path = write_plan(tmp_path / "plan.json", layouts)
    full = run_distributed(
        train_worker,
        world,
        tmp_path / "w1",
        raw_config(tmp_path / "full", steps=6, ep_size=ep_size, save_every=3, deepspeed_config=ds_config),
    )
    move_experts(
        plan_from_dict(plan_dict(layouts)).layouts,
        tmp_path / "full" / "checkpoints",
        tmp_path / "moved" / "checkpoints",
        "step3",
    )
    resumed = run_distributed(
        train_worker,
        world,
        tmp_path / "w2",
        raw_config(
            tmp_path / "moved",
            steps=6,
            ep_size=ep_size,
            resume=True,
            placement_plan=plan_path,
            deepspeed_config=ds_config,
        ),
    )
    assert len(resumed[0]["step_losses"]) == 3
    torch.testing.assert_close(resumed[0]["step_losses"], full[0]["step_losses"][3:], rtol=1e-5, atol=1e-5)
    expected, got = merged(full), merged(resumed)
    assert got.keys() == expected.keys() and len(got) == 2 * 8 * 3 * 4
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=str(key))


BF16_CONFIGS = {
    "gpu_bf16_zero2.json": None,  # the GPU default: DeepSpeed's ZeRO optimizer, bf16 weights, fp32 partitions
    "bf16_zero0": {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}},  # the unfused bf16 wrapper
    "bf16_fp32_accum_zero1": {  # DeepSpeed's BF16_Optimizer
        "zero_optimization": {"stage": 1},
        "bf16": {"enabled": True},
        "data_types": {"grad_accum_dtype": "fp32"},
    },
}


@pytest.mark.parametrize("config", list(BF16_CONFIGS))
def test_bf16_master_weights_and_moments_move_with_their_experts(tmp_path, config):
    # bf16 keeps fp32 masters apart from the bf16 weights: in flat partitions (ZeRO, BF16_Optimizer) or per
    # parameter (no ZeRO). Loaded under the plan, every expert's bf16 weights, fp32 master and moments are those the
    # trained engine held for that logical expert, bit for bit.
    if BF16_CONFIGS[config] is None:
        ds_config = str(REPO_CONFIGS / config)
    else:
        ds_config = str(tmp_path / "ds.json")
        (tmp_path / "ds.json").write_text(json.dumps(BF16_CONFIGS[config]))

    def raw(out, **options):
        cfg = raw_config(out, steps=2, deepspeed_config=ds_config, **options)
        cfg["model"]["moe"]["experts"] = {"backend": "reference"}  # the CPU build's grouped GEMM is float32 only
        return cfg

    trained = run_distributed(train_worker, 2, tmp_path / "w1", raw(tmp_path / "before"))  # its state is saved
    plan_path = write_plan(tmp_path / "plan.json")
    moved = move_experts(
        plan_from_dict(plan_dict()).layouts,
        tmp_path / "before" / "checkpoints",
        tmp_path / "after" / "checkpoints",
        plan_path=plan_path,
    )
    assert json.loads((moved / "c2r_config.json").read_text())["optimizer_state"] == REMAPPED
    after = run_distributed(
        loss_worker, 2, tmp_path / "w2", raw(tmp_path / "after", resume=True, placement_plan=plan_path)
    )
    assert after[0]["layouts"] == PLAN_LAYOUTS
    b, a = merged(trained), merged(after)
    assert a.keys() == b.keys() and len(b) == 2 * 8 * 3 * 4
    for key, value in b.items():
        assert torch.equal(a[key], value), key
    assert all(value.any() for key, value in b.items() if key[3] == "exp_avg")


def resume_error_worker(rank, world, raw):
    try:
        loss_worker(rank, world, raw)
    except ValueError as error:
        return str(error)
    return None


def test_resume_under_a_different_placement_is_refused(tmp_path):
    run_distributed(train_worker, 2, tmp_path / "w1", raw_config(tmp_path / "run"))
    plan_path = write_plan(tmp_path / "plan.json")
    messages = run_distributed(
        resume_error_worker, 2, tmp_path / "w2", raw_config(tmp_path / "run", resume=True, placement_plan=plan_path)
    )
    assert (
        f"places experts differently from this run (its plan: the contiguous placement; this run's: {plan_path})"
        in (messages[0])
    )
    # the other way round: the checkpoint's plan is named (c2r-train records it in its train section)
    run_distributed(train_worker, 2, tmp_path / "w3", raw_config(tmp_path / "planned", placement_plan=plan_path))
    messages = run_distributed(resume_error_worker, 2, tmp_path / "w4", raw_config(tmp_path / "planned", resume=True))
    assert f"(its plan: {plan_path}; this run's: the contiguous placement)" in messages[0]


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
        move_experts(plan.layouts, tmp_path / "run" / "checkpoints", tmp_path / "out")
    bad_plan = tmp_path / "bad_plan.json"
    bad_plan.write_text(json.dumps(raw))
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "c2r.place_cli",
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
        move_experts(plan_from_dict(plan_dict()).layouts, tmp_path / "nowhere", tmp_path / "out")


def test_the_printed_continue_commands_run_as_written(tmp_path):
    # `c2r-place apply` and `reshard` print the command that continues the run: with the checkpoint's ranks (4, ep 2:
    # apply keeps the world size), its config (a run started with --overwrite must not make --resume fail, a run
    # trained under a plan must not bring that plan back into a reshard to contiguous placement), and --steps past
    # the checkpoint's step; c2r-train accepts each as printed (--print-config), and the resharded one resumes
    import re

    plan = write_plan(tmp_path / "plan.json")
    source = raw_config(tmp_path / "run", steps=2, overwrite=True, placement_plan=plan)
    run_distributed(train_worker, 4, tmp_path / "w1", source)
    commands = {  # name: (c2r-place arguments, ranks, resolved batch per rank, resolved plan)
        "apply": (["apply", "--plan", plan], "4", 4, plan),
        "reshard": (["reshard", "--world-size", "2"], "2", 8, None),
    }
    for name, (argv, ranks, batch, plan_path) in commands.items():
        out = tmp_path / name / "checkpoints"
        done = subprocess.run(
            [sys.executable, "-m", "c2r.place_cli", *argv, "--checkpoint", str(tmp_path / "run" / "checkpoints")]
            + ["--out", str(out)],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        printed = re.search(
            r"continue with `NUM_RANKS=(\d+) EP_SIZE=(\d+) bash launch/quickstart.sh (.*?)` \(N > 2\)", done.stdout
        )
        assert printed is not None, done.stdout
        assert printed.group(1) == ranks, printed.group(0)
        # what quickstart.sh runs: c2r.train under the deepspeed launcher with --ep-size EP_SIZE, then the arguments
        args = ["--ep-size", printed.group(2), *printed.group(3).replace("--steps N", "--steps 3").split()]
        check = subprocess.run(
            [sys.executable, "-m", "c2r.train", *args, "--print-config"], capture_output=True, text=True
        )
        assert check.returncode == 0, (printed.group(0), check.stderr)
        settings = json.loads(check.stdout)
        train_settings = settings["train"]
        assert train_settings["resume"] and not train_settings["overwrite"] and train_settings["steps"] == 3
        assert (train_settings["batch_size"], train_settings["ep_size"]) == (batch, 2)
        assert train_settings["placement_plan"] == plan_path
    # the resharded run resumes as printed: 2 ranks, one more step
    resumed = run_distributed(train_worker, 2, tmp_path / "w2", settings)
    assert len(resumed[0]["step_losses"]) == 1
