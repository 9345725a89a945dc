"""c2r-train under DeepSpeed on CPU ranks (gloo): expert parallelism, ZeRO stages, checkpoints, launchers."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from c2r.config_utils import config_from_dict
from c2r.deepspeed import DeepSpeedMoELayer
from c2r.train import RunConfig, train
from tests.distributed import run_distributed
from tests.run_configs import tiny_run_config as run_config

REPO = Path(__file__).resolve().parents[1]


def expert_weights_by_global_id(engine) -> dict:
    """{(layer, logical expert): w1 rows} of the experts this rank holds."""
    out = {}
    layers = [m for m in engine.module.modules() if isinstance(m, DeepSpeedMoELayer)]
    for index, wrapper in enumerate(layers):
        layer = wrapper.deepspeed_moe
        held = (
            layer.dispatcher.layout.local_experts(layer.dispatcher.rank)
            if layer.dispatcher
            else range(wrapper.num_experts)
        )
        w1 = layer.experts.stacked("w1").detach().clone()
        out.update({(index, e): w1[slot] for slot, e in enumerate(held)})
    return out


def train_worker(rank, world, raw):
    result = train(config_from_dict(RunConfig, raw))
    return {
        "step_losses": result["step_losses"],
        "history": result["history"],
        "experts": expert_weights_by_global_id(result["engine"]),
    }


def test_ep_1_2_4_train_identically(tmp_path):
    # World 4, same seed and global batch; only the expert layout differs. Expert gradients are summed over the
    # EP group by the all-to-all and averaged over the expert-data-parallel group by DeepSpeed: no double scaling.
    runs = {
        ep: run_distributed(train_worker, 4, tmp_path / f"ep{ep}", run_config(tmp_path / f"out{ep}", ep_size=ep))
        for ep in (1, 2, 4)
    }
    for ep in (2, 4):
        torch.testing.assert_close(runs[ep][0]["step_losses"], runs[1][0]["step_losses"], rtol=2e-5, atol=2e-5)
        final = {k: v for rank in runs[ep] for k, v in rank["experts"].items()}
        assert len(final) == 2 * 8
        for key, weight in final.items():
            torch.testing.assert_close(weight, runs[1][0]["experts"][key], rtol=1e-4, atol=1e-5, msg=str(key))
    losses = runs[1][0]["step_losses"]
    assert losses[-1] < losses[0]


class Killed(Exception):
    pass


def killed_worker(rank, world, raw, kill_after_step):
    """Train, but die (as if killed) right after the checkpoint of ``kill_after_step`` is complete."""
    import c2r.deepspeed.checkpoint as checkpoint

    real_save = checkpoint.save_checkpoint

    def save_then_die(engine, ckpt_dir, step, run_config):
        tag = real_save(engine, ckpt_dir, step, run_config)
        if step == kill_after_step:
            raise Killed
        return tag

    checkpoint.save_checkpoint = save_then_die
    try:
        train(config_from_dict(RunConfig, raw))
    except Killed:
        return "killed"
    return "finished"


def write_ds_config(path: Path, stage: int) -> str:
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}, "bf16": {"enabled": False}}))
    return str(path)


def with_dropout(raw: dict, dropout: float) -> dict:
    raw["model"]["dropout"] = dropout
    return raw


@pytest.mark.parametrize("stage,dropout", [(0, 0.0), (1, 0.0), (2, 0.0), (2, 0.1)])
def test_zero_stage_trains_and_resumes_like_an_uninterrupted_run(tmp_path, stage, dropout):
    # With dropout the resumed run must draw the masks the uninterrupted one drew at those steps.
    ds_config = write_ds_config(tmp_path / "ds.json", stage)
    full = run_distributed(
        train_worker,
        2,
        tmp_path / "r1",
        with_dropout(run_config(tmp_path / "full", steps=12, ep_size=2, deepspeed_config=ds_config), dropout),
    )
    # The "killed" run: dies right after its step-6 checkpoint; a fresh set of processes resumes it to step 12.
    run_distributed(
        killed_worker,
        2,
        tmp_path / "r2",
        with_dropout(
            run_config(tmp_path / "part", steps=12, ep_size=2, save_every=6, deepspeed_config=ds_config), dropout
        ),
        6,
    )
    part_dir = tmp_path / "part" / "checkpoints"
    assert (part_dir / "latest").read_text() == "step6"
    files = sorted(p.name for p in (part_dir / "step6").iterdir())
    assert [f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in (0, 1) for e in range(8)] == [
        f for f in files if f.startswith("layer_")
    ]
    resumed = run_distributed(
        train_worker,
        2,
        tmp_path / "r3",
        with_dropout(
            run_config(tmp_path / "part", steps=12, ep_size=2, deepspeed_config=ds_config, resume=True), dropout
        ),
    )
    torch.testing.assert_close(resumed[0]["step_losses"], full[0]["step_losses"][6:], rtol=1e-5, atol=1e-5)
    for key, weight in resumed[0]["experts"].items():
        torch.testing.assert_close(weight, full[0]["experts"][key], rtol=1e-5, atol=1e-6)


def batch_change_worker(rank, world, saved, here, ckpt_dir):
    import logging

    from c2r.deepspeed.checkpoint import check_same_size

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("c2r.deepspeed.checkpoint").addHandler(handler)
    check_same_size(saved, here, Path(ckpt_dir), "step4")
    return [record.getMessage() for record in records]


def test_resume_with_other_data_or_seed_says_the_batches_change(tmp_path):
    (tmp_path / "step4").mkdir()
    saved = {"train": {"ep_size": 1, "batch_size": 4, "seed": 0}, "data": {"max_bytes": 8_000_000}, "world_size": 1}
    same = {"train": {"ep_size": 1, "batch_size": 4, "seed": 0}, "data": {"max_bytes": None}}  # the same corpus
    other = {"train": {"ep_size": 1, "batch_size": 4, "seed": 5}, "data": {"path": "my.txt"}}
    ((quiet,),) = [run_distributed(batch_change_worker, 1, tmp_path / "a", saved, same, str(tmp_path))]
    ((warned,),) = [run_distributed(batch_change_worker, 1, tmp_path / "b", saved, other, str(tmp_path))]
    assert not [m for m in quiet if "other data or seed" in m]
    assert [m for m in warned if "other data or seed" in m] == [
        "resuming checkpoint step4 with other data or seed (train.seed=0 in the checkpoint, 5 here; data.path=None "
        "in the checkpoint, my.txt here; data.max_bytes=8000000 in the checkpoint, None here): other batches and "
        "another validation set than an uninterrupted run"
    ]


def resume_worker(rank, world, raw):
    try:
        train(config_from_dict(RunConfig, raw))
    except ValueError as error:
        return str(error)
    return None


def test_deepspeed_csv_monitor_gets_our_metrics(tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 2},
                "csv_monitor": {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "demo"},
            }
        )
    )
    raw = run_config(tmp_path / "run", steps=4, eval_every=2, ep_size=2, deepspeed_config=str(config))
    raw["profile"] = {"enabled": True}
    run_distributed(train_worker, 2, tmp_path / "w", raw)
    val_loss = (tmp_path / "csv" / "demo" / "c2r_val_loss.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in val_loss[1:]] == ["2", "4"]
    assert (tmp_path / "csv" / "demo" / "c2r_load_imbalance.csv").exists()
    # With --profile the all-to-all profiler's scalars go to the monitor too (per-expert dispatch: k copies).
    copies = (tmp_path / "csv" / "demo" / "c2r_comm_copies_per_token.csv").read_text().splitlines()
    assert [float(line.split(",")[1]) for line in copies[1:]] == [2.0, 2.0]
    assert (tmp_path / "csv" / "demo" / "c2r_comm_all_to_all_ms_per_step.csv").exists()


def test_resume_refuses_a_checkpoint_of_another_shape(tmp_path):
    """In one line naming the setting: a shape, tied embeddings (--init-from loaded the saved output head as the
    embedding without a word), or a router that saves other tensors (DeepSpeed's state-dict traceback before)."""
    run_distributed(train_worker, 1, tmp_path / "a", run_config(tmp_path / "run", steps=2))
    cases = {
        ("moe", "num_experts", 16): "does not fit this model: num_experts=8 in the checkpoint, 16 here",
        (None, "tie_embeddings", False): "does not fit this model: tie_embeddings=True in the checkpoint, False here",
        ("router", "balance", "batch"): "another router: batch balance=False in the checkpoint, True here",
    }
    for i, ((section, key, value), expected) in enumerate(cases.items()):
        other = run_config(tmp_path / "run", steps=4, resume=True)
        where = {None: other["model"], "moe": other["model"]["moe"]}.get(section)
        if section == "router":
            where = other["model"]["moe"].setdefault("router", {})
        where[key] = value
        (message,) = run_distributed(resume_worker, 1, tmp_path / f"b{i}", other)
        assert message is not None and expected in message, (key, message)
        assert "\n" not in message
    untied = run_config(tmp_path / "init", steps=2, init_from=str(tmp_path / "run"))
    untied["model"]["tie_embeddings"] = False
    (message,) = run_distributed(resume_worker, 1, tmp_path / "c", untied)
    assert message is not None and "tie_embeddings=True in the checkpoint, False here" in message


def crash_worker(rank, world, ckpt_dir):
    import torch.distributed as dist  # noqa: F401  (initialised by the harness)

    from c2r.deepspeed.checkpoint import latest_tag, save_checkpoint

    class Engine:
        def __init__(self, crash):
            self.crash = crash

        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            assert save_latest is False
            os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
            with open(os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"), "w") as f:
                f.write("partial")
            if self.crash:  # what torch's writer raises on a full disk
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4992 vs 4880")

    save_checkpoint(Engine(crash=False), ckpt_dir, 1, {"model": {}, "train": {}})
    try:
        save_checkpoint(Engine(crash=True), ckpt_dir, 2, {"model": {}, "train": {}})
    except OSError as error:
        return str(error), latest_tag(ckpt_dir)
    return "no crash", latest_tag(ckpt_dir)


def test_crash_mid_save_leaves_latest_on_the_last_complete_checkpoint(tmp_path):
    ((error, tag),) = run_distributed(crash_worker, 1, tmp_path / "w", str(tmp_path / "ckpt"))
    assert tag == "step1"
    # one line for the user (c2r-train prints an OSError as one line): what failed, where, and what is kept
    assert error.startswith(f"could not save checkpoint step2 in {tmp_path / 'ckpt'} ([enforce fail at ") and (
        "MiB free there); latest still names step1, which --resume continues from" in error
    )
    assert (tmp_path / "ckpt" / "step2").exists()  # the partial one is there, but nothing points at it


def flush_order_worker(rank, world, ckpt_dir):
    from types import SimpleNamespace

    from c2r.deepspeed.checkpoint import save_checkpoint
    from profiling import files
    from tests.test_files import record_fsyncs_and_renames

    real_fsync, real_replace = os.fsync, os.replace
    events = record_fsyncs_and_renames(SimpleNamespace(setattr=setattr))  # this worker process's own modules
    try:

        class Engine:
            def save_checkpoint(self, save_dir, tag, client_state, save_latest):
                os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
                with open(os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"), "w") as f:
                    f.write("weights")

        save_checkpoint(Engine(), ckpt_dir, 3, {"model": {}, "train": {}})
    finally:
        files.os.fsync, files.os.replace = real_fsync, real_replace
    return events


def test_a_checkpoint_is_on_the_disk_before_latest_names_it(tmp_path):
    ckpt = tmp_path / "ckpt"
    (events,) = run_distributed(flush_order_worker, 1, tmp_path / "w", str(ckpt))
    flushed_model = events.index(("fsync", str(ckpt / "step3" / "mp_rank_00_model_states.pt")))
    named = events.index(("replace", str(ckpt / "latest")))
    assert flushed_model < events.index(("fsync", str(ckpt / "step3"))) < named


def bad_ep_worker(rank, world):
    from c2r.deepspeed import ensure_expert_groups

    try:
        ensure_expert_groups(4)
    except ValueError as error:
        return str(error)
    return None


def test_ep_size_must_divide_world_size(tmp_path):
    messages = run_distributed(bad_ep_worker, 2, tmp_path)
    assert messages == ["ep_size (4) must divide the world size (2)"] * 2


def launcher_env() -> dict:
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        BIN=str(Path(sys.executable).parent),
        MASTER_PORT=str(29500 + os.getpid() % 1000),
    )
    env.pop("RANK", None)
    return env


DEMO_ARGS = ["--steps", "4", "--set", "train.eval_every=2", "--set", "data.max_bytes=200000"]


def test_quickstart_runs_the_demo_under_the_deepspeed_launcher_with_2_ranks(tmp_path):
    env = launcher_env()
    cmd = ["bash", "launch/quickstart.sh", *DEMO_ARGS, "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "done: train loss" in proc.stdout and "2 ranks on cpu, ep_size 2" in proc.stderr
    # The bar, drawn into a pipe: redrawn under the evaluation line of step 2, it counts 2 steps (it showed 0/4,
    # its count as of its last timed draw, while its loss changed).
    draws = [draw for draw in proc.stderr.replace("\r", "\n").splitlines() if draw.startswith("train:")]
    assert not [draw for draw in draws if " 0/4 " in draw and "loss=" in draw], draws
    assert any(" 2/4 " in draw for draw in draws), draws
    assert (tmp_path / "checkpoints" / "step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()
    # DeepSpeed's CPU all-reduce buffers (66 MiB a rank) are not left behind in /dev/shm
    left = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{env['MASTER_PORT']}_*"))
    assert left == []


def warnings_worker(rank, world, raw):
    """The warnings a rank shows after the run start-up: torch's deprecation of the all-gather DeepSpeed's ZeRO calls
    (every rank printed it, and a stack line), then another FutureWarning."""
    import warnings

    from c2r.run_setup import start_run

    start_run(config_from_dict(RunConfig, raw))
    gathered = torch.zeros(world)
    with warnings.catch_warnings(record=True) as shown:
        warnings.filterwarnings("always", append=True)  # behind the run's own filters
        torch.distributed.all_gather_into_tensor(gathered, torch.ones(1))
        warnings.warn("another deprecation", FutureWarning, stacklevel=1)
    return [str(warning.message) for warning in shown]


def test_the_run_start_up_filters_only_the_all_gather_deprecation(tmp_path):
    (shown,) = run_distributed(warnings_worker, 1, tmp_path / "w", run_config(tmp_path / "run"))
    assert shown == ["another deprecation"]


def mpi_available() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return shutil.which("mpirun") is not None


@pytest.mark.skipif(
    not mpi_available() and os.environ.get("CI") != "true",
    reason="needs OpenMPI and mpi4py (installed by .ci/run; `make mpi` installs them)",
)
def test_mpirun_script_runs_the_demo_with_2_ranks(tmp_path):
    cmd = ["bash", "launch/mpirun.sh", *DEMO_ARGS, "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(launcher_env(), NP="2"), timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "done: train loss" in proc.stdout
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step4"


def test_multinode_script_names_a_missing_hostfile(tmp_path):
    env = dict(launcher_env(), HOSTFILE=str(tmp_path / "hosts"))
    proc = subprocess.run(["bash", "launch/deepspeed_multinode.sh"], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 2
    assert f"hostfile '{tmp_path / 'hosts'}' not found" in proc.stderr


def fake_launcher(directory: Path) -> Path:
    """A bin directory whose ``deepspeed`` prints where it runs and its arguments, one per line."""
    directory.mkdir()
    (directory / "deepspeed").write_text('#!/bin/sh\necho "cwd=$PWD"\nfor a in "$@"; do echo "arg=$a"; done\n')
    (directory / "deepspeed").chmod(0o755)
    return directory


def test_multinode_script_reads_the_hostfile_from_the_callers_directory_and_its_slots(tmp_path):
    fake = fake_launcher(tmp_path / "bin")
    (tmp_path / "hosts").write_text("# two nodes of 4 GPUs\nnode-1 slots=4\n\nnode-2 slots=4\n")
    env = dict(launcher_env(), HOSTFILE="hosts", BIN=str(fake))
    script = str(REPO / "launch" / "deepspeed_multinode.sh")
    proc = subprocess.run(["bash", script, "--steps", "2"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    args = [line.removeprefix("arg=") for line in proc.stdout.splitlines() if line.startswith("arg=")]
    assert args[:6] == ["--hostfile", str(tmp_path / "hosts"), "--num_nodes", "2", "--num_gpus", "4"]
    assert args[args.index("--ep-size") + 1] == "4" and args[-2:] == ["--steps", "2"]
    (tmp_path / "hosts").write_text("# nobody here\n\n")
    proc = subprocess.run(["bash", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"deepspeed_multinode.sh: hostfile '{tmp_path / 'hosts'}' names no host (one line per node: \"node-1 slots=8\")"
    ]


def test_quickstart_reads_relative_paths_from_the_callers_directory(tmp_path):
    fake = fake_launcher(tmp_path / "bin")
    env = dict(launcher_env(), BIN=str(fake))
    script = str(REPO / "launch" / "quickstart.sh")
    proc = subprocess.run(["bash", script, "--data", "my.txt"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"cwd={tmp_path}" and "arg=my.txt" in proc.stdout


def test_optimizer_groups_have_no_empty_group_when_an_expert_parameter_is_bigger_than_a_group():
    # DeepSpeed's MoE split starts a new group before a parameter larger than max_group_size, leaving an empty one;
    # DeepSpeed drops empty groups inside initialize, after an LR scheduler counted them (Qwen3-30B-A3B's layer
    # shape on a GPU failed so). Our groups leave them out, and every parameter is in exactly one group.
    from c2r.deepspeed import optimizer_param_groups

    model = torch.nn.Module()
    model.dense = torch.nn.Linear(4, 4)
    model.experts_w1 = torch.nn.Parameter(torch.zeros(8, 4))
    model.experts_w2 = torch.nn.Parameter(torch.zeros(4, 8))
    for param in (model.experts_w1, model.experts_w2):
        param.allreduce, param.group_name = False, "ep_size_2"  # what DeepSpeed's MoE marks expert parameters with
    groups = optimizer_param_groups(model, 0.1, max_group_size=10)
    assert all(group["params"] for group in groups)
    ids = [id(p) for group in groups for p in group["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert [len(g["params"]) for g in groups if g.get("moe")] == [1, 1]  # each expert matrix in its own group


def test_width_scaling_gives_hidden_matrices_their_own_rate_and_keeps_embeddings():
    # train.lr_base_width: every matrix but an embedding table (experts included, in DeepSpeed's MoE groups) trains at
    # lr * base / width; embeddings, norms and biases at lr. Off (1.0), the groups are exactly as before.
    from c2r.deepspeed import optimizer_param_groups
    from c2r.model import ModelConfig, MoEGPT
    from c2r.run_setup import TrainConfig, hidden_lr_scale

    model = MoEGPT(ModelConfig(d_model=256, n_head=4, n_layer=2))
    for name, param in model.named_parameters():
        if ".experts." in name:
            param.allreduce, param.group_name = False, "ep_size_1"  # what DeepSpeed's MoE marks expert parameters with
    assert hidden_lr_scale(model, TrainConfig(lr_base_width=128)) == 0.5
    assert hidden_lr_scale(model, TrainConfig(lr_base_width=0)) == 1.0
    assert hidden_lr_scale(model, TrainConfig(lr_base_width=512)) == 1.0  # narrower than the base: unscaled
    groups = optimizer_param_groups(model, 0.1, hidden_lr=1e-3)
    scaled = {id(p) for g in groups if g.get("lr") == 1e-3 for p in g["params"]}
    embeddings = {id(model.tok_emb.weight), id(model.pos_emb.weight)}
    matrices = {id(p) for p in model.parameters() if p.ndim >= 2}
    assert scaled == matrices - embeddings
    assert any(g.get("moe") and g.get("lr") == 1e-3 for g in groups)  # the experts' own groups keep the rate
    plain = optimizer_param_groups(model, 0.1)
    assert all("lr" not in g for g in plain) and {g["name"] for g in plain if not g.get("moe")} == {"decay", "no_decay"}


def test_resume_names_a_width_scaling_that_would_change_the_optimizer_groups():
    from c2r.deepspeed.checkpoint import check_same_width_scaling

    def cfg(d_model, base=None, hf=None):
        train = {} if base is None else {"lr_base_width": base}
        return {"model": {"d_model": d_model}, "train": train, "hf": {"model_dir": hf}}

    with pytest.raises(ValueError, match=r"trained with train.lr_base_width=0, this run has 128.*lr_base_width=0"):
        check_same_width_scaling(cfg(256), cfg(256, 128), "step4")  # saved before the setting existed
    check_same_width_scaling(cfg(128), cfg(128, 128), "step4")  # the demo's width: nothing scaled either way
    check_same_width_scaling(cfg(256, 128), cfg(256, 128), "step4")
    with pytest.raises(ValueError, match="lr_base_width=64, this run has 0"):
        check_same_width_scaling(cfg(None, 64, hf="m"), cfg(None, 0, hf="m"), "step4")
