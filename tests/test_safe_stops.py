"""Safe stops and honest resume (c2r/stops.py, c2r/run_dir.py, the loop in c2r/train.py): a signal stops every rank
at the same step boundary with a checkpoint, a killed rank leaves the last periodic checkpoint loadable, an existing
run is never silently replaced, DeepSpeed monitors get scalars only."""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import c2r.train
from c2r.config_utils import config_from_dict
from c2r.deepspeed.checkpoint import prune_checkpoints
from c2r.train import RunConfig, monitor_events
from tests.distributed import run_distributed
from tests.run_configs import tiny_run_config
from tests.test_deepspeed_training import REPO, launcher_env

STEPS = 8


def raw_config(out_dir, **train) -> dict:
    return tiny_run_config(out_dir, steps=STEPS, **{"ep_size": 2, "eval_every": 4, "save_every": 0, **train})


def run_worker(rank, world, raw, signal_at: dict | None = None, again: bool = False):
    """``c2r.train.run`` (the summary line) and what ``train`` returned. ``signal_at``: {rank: (step, signum)}: that
    rank sends itself the signal during that step (0-based), right after its optimizer step. ``again``: then run the
    same config once more (a resume at the final step), its summary as ``again``."""
    handler_before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under a background shell job
    if signal_at and rank in signal_at:
        at_step, signum = signal_at[rank]
        real_update, calls = c2r.train.after_optimizer_step, []

        def update_then_signal(model):
            calls.append(None)
            if len(calls) - 1 == at_step:
                os.kill(os.getpid(), signum)  # a real signal; SIGKILL ends this rank here
            return real_update(model)

        c2r.train.after_optimizer_step = update_then_signal
    results = []
    real_train = c2r.train.train
    c2r.train.train = lambda config: results.append(real_train(config)) or results[-1]
    try:
        summary = c2r.train.run(config_from_dict(RunConfig, raw))
        again_summary = c2r.train.run(config_from_dict(RunConfig, raw)) if again else None
    finally:
        c2r.train.train = real_train
    result = results[0]
    keys = ("step_losses", "start_step", "end_step", "stopped_by")
    return {
        "summary": summary,
        "again": again_summary,
        "handler_restored": signal.getsignal(signal.SIGINT) is handler_before,
        **{k: result[k] for k in keys},
    }


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    root = tmp_path_factory.mktemp("full")
    return root / "run", run_distributed(run_worker, 2, root / "w", raw_config(root / "run"))


def test_sigint_on_one_rank_stops_both_at_the_same_boundary_and_resume_continues_exactly(tmp_path, full_run):
    stop_step = random.randrange(0, STEPS - 2)  # only rank 1 is signalled, while step `stop_step` runs
    raw = raw_config(tmp_path / "run")
    stopped = run_distributed(run_worker, 2, tmp_path / "a", raw, {1: (stop_step, signal.SIGINT)})
    # The step in flight completes, and the next one (the ranks' flags are read a step late, with the loss:
    # c2r/step_reads.py), then both ranks save and stop.
    done = stop_step + 2
    for rank in stopped:
        assert (rank["stopped_by"], rank["end_step"]) == ("SIGINT", done), f"signal during step {stop_step}"
        assert rank["handler_restored"]  # our handler is gone after the run: SIGINT does what it did before
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").read_text() == f"step{done}"
    assert stopped[0]["summary"] == (
        f"stopped by SIGINT at step {done} of {STEPS} ({done} steps): checkpoint {ckpt / f'step{done}'}; "
        "run the same command with --resume (and without --overwrite) to continue"
    )
    torch.testing.assert_close(stopped[0]["step_losses"], full_run[1][0]["step_losses"][:done], rtol=1e-5, atol=1e-5)

    resume = {**raw, "train": {**raw["train"], "resume": True}}
    resumed = run_distributed(run_worker, 2, tmp_path / "b", resume, None, True)
    torch.testing.assert_close(resumed[0]["step_losses"], full_run[1][0]["step_losses"][done:], rtol=1e-5, atol=1e-5)
    assert resumed[0]["summary"].startswith("done: train loss")
    assert resumed[0]["summary"].endswith(f"over {STEPS - done} steps, resumed at step {done}")
    # The metrics log holds each evaluation once, across the two runs.
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8]

    assert resumed[0]["again"] == (
        f"nothing to do: {tmp_path / 'run'} is at step {STEPS} and train.steps is {STEPS} (--steps N trains further)"
    )


def test_sigkill_of_one_rank_leaves_the_last_periodic_checkpoint_loadable(tmp_path, full_run):
    raw = raw_config(tmp_path / "run", save_every=3)
    with pytest.raises(AssertionError, match="a rank failed"):
        run_distributed(run_worker, 2, tmp_path / "a", raw, {1: (4, signal.SIGKILL)})  # dies in step 5 of 8
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step3"
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [4]  # evaluated, not saved
    with metrics.open("a") as f:
        f.write('{"step": 5, "train_lo')  # a line cut short by the crash
    resumed = run_distributed(run_worker, 2, tmp_path / "b", {**raw, "train": {**raw["train"], "resume": True}})
    assert resumed[0]["start_step"] == 3
    torch.testing.assert_close(resumed[0]["step_losses"], full_run[1][0]["step_losses"][3:], rtol=1e-5, atol=1e-5)
    # the records of the steps the resume repeated are written once, by the resume (step 4 was twice)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [4, 8]


def ep_mismatch_worker(rank, world, raw):
    try:
        c2r.train.train(config_from_dict(RunConfig, raw))
    except ValueError as error:
        return str(error)
    return None


def test_resume_on_another_number_of_ranks_says_how_to_reshard(tmp_path, full_run):
    run_dir, _ = full_run
    raw = tiny_run_config(run_dir, steps=STEPS + 1, ep_size=1, resume=True)
    (message,) = run_distributed(ep_mismatch_worker, 1, tmp_path / "w", raw)
    assert message == (
        f"checkpoint step{STEPS} was saved with ep_size=2 on 2 ranks, this run has ep_size=1 on 1 rank; convert it "
        f"first: c2r-place reshard --checkpoint {run_dir / 'checkpoints'} --world-size 1 --ep-size 1 "
        "--out NEW_RUN/checkpoints"
    )


def test_ctrl_c_under_the_deepspeed_launcher_saves_and_stops_every_rank_without_a_traceback(tmp_path):
    out = tmp_path / "run"
    args = ["--steps", "200", "--set", "train.eval_every=1", "--set", "data.max_bytes=200000", "--out", str(out)]
    tiny = ["--set", "model.n_layer=2", "--set", "model.d_model=32", "--set", "model.moe.ffn_hidden_size=32"]
    proc = subprocess.Popen(
        ["bash", "launch/quickstart.sh", *args, *tiny],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=launcher_env(),
        cwd=REPO,
        start_new_session=True,  # its own process group: the terminal's Ctrl-C goes to the whole group
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while proc.poll() is None and not (metrics.exists() and metrics.read_text().strip()):
        assert time.monotonic() < deadline, "no training step within 240 s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    (line,) = [line for line in output.splitlines() if line.startswith("stopped by SIGINT at step")]
    step = int(line.split()[5])
    assert 0 < step < 200
    assert (out / "checkpoints" / "latest").read_text() == f"step{step}"
    # Both ranks saved: their ZeRO optimizer shards are there.
    assert (out / "checkpoints" / f"step{step}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()
    # The ranks exit 0; the launcher's node process then exits 1 on its own ("Main process received SIGINT").
    assert proc.returncode in (0, 1), output[-3000:]


def tensorboard_worker(rank, world, raw):
    return c2r.train.run(config_from_dict(RunConfig, raw))


def test_tensorboard_monitor_gets_scalars_per_layer(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ds_config = tmp_path / "ds.json"
    tensorboard = {"enabled": True, "output_path": str(tmp_path / "tb"), "job_name": "demo"}
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "tensorboard": tensorboard}))
    raw = tiny_run_config(tmp_path / "run", steps=2, eval_every=1, deepspeed_config=str(ds_config))
    (summary,) = run_distributed(tensorboard_worker, 1, tmp_path / "w", raw)
    assert summary.startswith("done:")
    (events_dir,) = {path.parent for path in (tmp_path / "tb").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(events_dir))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"c2r/val_loss", "c2r/active_experts_per_token", "c2r/active_experts_per_token_by_layer/layer_0"} <= set(
        tags
    ), tags
    assert [e.step for e in events.Scalars("c2r/active_experts_per_token_by_layer/layer_1")] == [1, 2]
    assert [e.value for e in events.Scalars("c2r/active_experts_per_token_by_layer/layer_1")] == [2.0, 2.0]


def test_monitor_events_are_numbers_only():
    record = {"step": 7, "val_loss": 1.5, "by_layer": [2.0, 1.5], "note": "x", "flag": True, "bias": None}
    assert monitor_events(record) == [
        ("c2r/val_loss", 1.5, 7),
        ("c2r/by_layer/layer_0", 2.0, 7),
        ("c2r/by_layer/layer_1", 1.5, 7),
        ("c2r/flag", 1.0, 7),
    ]


def fake_run(out_dir: Path) -> None:
    """A previous 2-rank run's files: a fresh 1-rank run must not inherit its rank-1 optimizer shard."""
    (out_dir / "checkpoints" / "step9").mkdir(parents=True)
    (out_dir / "checkpoints" / "step9" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_text("stale")
    (out_dir / "checkpoints" / "latest").write_text("step9")
    (out_dir / "metrics.jsonl").write_text('{"step": 9}\n')
    (out_dir / "plan.json").write_text("{}")  # not c2r-train's: --overwrite leaves it


def test_out_with_a_run_refuses_without_resume_or_overwrite(tmp_path, capsys):
    fake_run(tmp_path)
    assert c2r.train.main(["--out", str(tmp_path), "--steps", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"c2r-train: {str(tmp_path)!r} already holds a run (checkpoints/, metrics.jsonl); continue it with --resume, "
        "or replace it with --overwrite (or choose another --out)"
    ]
    assert c2r.train.main(["--out", str(tmp_path), "--resume", "--overwrite"]) == 2
    assert "resume and overwrite exclude each other" in capsys.readouterr().err
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step9"  # nothing touched


def test_overwrite_replaces_the_previous_run_and_leaves_other_files(tmp_path):
    fake_run(tmp_path)
    raw = tiny_run_config(tmp_path, steps=2, eval_every=1, overwrite=True)
    run_distributed(tensorboard_worker, 1, tmp_path / "w", raw)
    ckpt = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step2"]
    assert not list(ckpt.rglob("zero_pp_rank_1_*"))
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (tmp_path / "plan.json").exists()


def test_prune_keeps_the_newest_checkpoints_up_to_latest(tmp_path):
    for step in (2, 4, 6, 8, 10):
        (tmp_path / f"step{step}").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "latest").write_text("step8")  # step10: a crashed save's leftover
    assert prune_checkpoints(tmp_path, keep=2) == ["step2", "step4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "other", "step10", "step6", "step8"]
    assert prune_checkpoints(tmp_path, keep=0) == []


def policy_worker(rank, world):
    import c2r.stops

    clock = [0.0]
    c2r.stops.time.monotonic = lambda: clock[0]
    with c2r.stops.StopSignals() as signals:
        policy = c2r.stops.SavePolicy(4, 1.0, 10, signals)
        saves = []
        for done, minutes in zip(range(1, 11), (0.2, 0.5, 0.9, 1.0, 1.5, 2.1, 2.2, 2.4, 3.0, 3.1), strict=True):
            clock[0] = 60 * minutes
            saves.append(policy.decide(done, policy.flags(), done).save)  # this step's own flags, one rank
    return saves


def test_save_policy_saves_every_n_steps_every_m_minutes_and_at_the_end(tmp_path):
    (saves,) = run_distributed(policy_worker, 1, tmp_path)
    # steps 4 and 8 (every 4), 6 (a minute after step 4's save at 1.0 min: 2.1), 10 (the last step)
    assert [done for done, save in enumerate(saves, start=1) if save] == [4, 6, 8, 10]


def lagged_policy_worker(rank, world):
    """The policy as c2r-train drives it: each boundary's flags are decided on at the next one."""
    import c2r.stops

    clock = [0.0]
    c2r.stops.time.monotonic = lambda: clock[0]
    with c2r.stops.StopSignals() as signals:
        policy = c2r.stops.SavePolicy(4, 1.0, 10, signals)
        saves, previous = [], None  # previous: (flags, the step they were sampled after)
        for done, minutes in zip(range(1, 11), (0.2, 0.5, 0.9, 1.0, 1.5, 2.1, 2.2, 2.4, 3.0, 3.1), strict=True):
            clock[0] = 60 * minutes
            flags = policy.flags()
            saves.append(policy.decide(done, *(previous or (None, None))).save)
            previous = (flags, done)
        # A signal on one of two ranks (flags summed over them) stops at the next boundary; SIGINT before SIGTERM.
        boundary = policy.decide(11, [0.0, 1.0, 0.0], 10)
        both = policy.decide(12, [1.0, 1.0, 0.0], 11)
    return saves, boundary.stop_signal, boundary.save, both.stop_signal


def test_save_policy_on_flags_read_a_step_late(tmp_path):
    ((saves, signal_name, saved, both),) = run_distributed(lagged_policy_worker, 1, tmp_path)
    # steps 4 and 8 (every 4), 7 (due by step 6's flags, a minute after step 4's save, decided a step late), 10
    # (the last); step 4's own flags (sampled before its save, due by the clock) are no second save at step 5.
    assert [done for done, save in enumerate(saves, start=1) if save] == [4, 7, 8, 10]
    assert (signal_name, saved, both) == ("SIGTERM", True, "SIGINT")


def profiled_worker(rank, world, raws: list[dict]):
    """``train`` on each config in turn: its (start step, end step), or its error's message; and the warnings of
    c2r.train's log."""
    import logging

    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("c2r.train").addHandler(handler)
    results = []
    for raw in raws:
        try:
            result = c2r.train.train(config_from_dict(RunConfig, raw))
            results.append((result["start_step"], result["end_step"]))
        except ValueError as error:
            results.append(str(error))
    return results, warnings


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_resumed_profile_keeps_the_earlier_one_whole(tmp_path):
    """--resume --profile restarted the trace shards at rank000-00000 and rewrote the counts: the recording of the
    steps before the resume was lost. The earlier profile is now moved aside whole; the new one starts at the resume.
    A resume that is refused (here: another expert count) or has nothing to do (--steps at the checkpoint's) left
    an empty profile/ and the earlier one moved aside (c2r-profile summarize then found no profile): now it leaves
    the directory's profile as it was. The longer resume stretches the learning-rate schedule: it says so."""
    import numpy as np

    from c2r.run_dir import clear_run
    from c2r.run_setup import lr_at

    run = tmp_path / "run"
    raw = tiny_run_config(run, steps=4, profile=True, eval_every=2, save_every=0, ep_size=2, dispatch="per-rank")
    run_distributed(profiled_worker, 2, tmp_path / "a", [raw])
    shard = "traces/rank000-00000.npz"
    before = np.load(run / "profile" / shard)
    recorded = files_in(run / "profile")
    assert recorded["comm/comm-rank001.jsonl"]  # the all-to-all records too

    def resume(steps: int, **model: int) -> dict:
        longer = tiny_run_config(run, steps=steps, profile=True, eval_every=2, save_every=0, resume=True, ep_size=2)
        longer["train"]["dispatch"] = "per-rank"
        longer["model"]["moe"].update(model)
        return longer

    (results, warnings), _ = run_distributed(profiled_worker, 2, tmp_path / "b", [resume(8, num_experts=4), resume(4)])
    assert results == [
        f"checkpoint {run / 'checkpoints' / 'step4'} does not fit this model: num_experts=8 in the checkpoint, 4 here",
        (4, 4),
    ]
    assert warnings == []
    assert sorted(path.name for path in run.iterdir()) == ["checkpoints", "metrics.jsonl", "profile"]
    assert files_in(run / "profile") == recorded

    (results, warnings), _ = run_distributed(profiled_worker, 2, tmp_path / "c", [resume(8)])
    assert results == [(4, 8)]
    tc = config_from_dict(RunConfig, resume(8)).train
    lr_saved, lr_now = lr_at(4, dataclasses.replace(tc, steps=4)), lr_at(4, tc)
    assert lr_saved != lr_now and warnings == [
        "train.steps changes on resume (4 in checkpoint step4, 8 here): the cosine learning-rate schedule now decays "
        f"over 8 steps, so the learning rate at the resume (step 4) is {lr_now:.1e}, where the saved schedule had "
        f"{lr_saved:.1e}"
    ]
    kept = run / "profile-before-resume-at-step4"
    assert files_in(kept) == recorded
    with np.load(kept / shard) as old, np.load(run / "profile" / shard) as new:
        assert np.array_equal(old["step"], before["step"]) and set(old["step"].tolist()) == {0, 1, 2, 3}
        assert set(new["step"].tolist()) == {4, 5, 6, 7}
    assert sorted(clear_run(run)) == sorted(
        ["checkpoints/", "metrics.jsonl", "profile/", "profile-before-resume-at-step4/"]
    )
    assert not kept.exists()


# What a rank does on stop signals, in a process of its own: the signals end it, or it prints `exited` with the
# signal it would stop by.
SIGNALS_SCRIPT = """
import os, signal, sys
from c2r.stops import StopSignals
with StopSignals(rank=int(sys.argv[2])) as signals:
    if sys.argv[1] == "training":
        signals.begin_training()
    for name in sys.argv[3:]:
        os.kill(os.getpid(), getattr(signal, name))  # handled before the next line
print("exited", signals.received and signal.Signals(signals.received).name)
"""


def send_signals(phase: str, *names: str, rank: int = 0) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", SIGNALS_SCRIPT, phase, str(rank), *names]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=60)


def test_a_repeated_stop_signal_aborts_at_once_in_one_line():
    """The deepspeed launcher forwards a Ctrl-C as SIGTERM: one SIGINT and one SIGTERM are one stop. A second Ctrl-C
    (or SIGTERM) printed a traceback (`Signal 15 ignored due to race condition` inside an all-to-all, then a
    KeyboardInterrupt) and did not abort: now it ends the rank at once, killed by the signal, with one line."""
    one_stop = send_signals("training", "SIGINT", "SIGTERM")
    assert (one_stop.returncode, one_stop.stdout, one_stop.stderr) == (0, "exited SIGINT\n", "")
    for rank, names in ((0, ("SIGINT", "SIGTERM", "SIGINT")), (1, ("SIGTERM", "SIGTERM"))):
        again = send_signals("training", *names, rank=rank)
        assert (again.returncode, again.stdout) == (-signal.Signals[names[-1]], ""), names
        line = f"{names[-1]} again: aborted at once, without a checkpoint (the last saved one stays loadable)"
        # rank 0 starts a line of its own: its progress bar's is not ended
        assert again.stderr == (f"\n{line}\n" if rank == 0 else f"{line} (rank 1)\n")


def test_a_stop_signal_before_training_ends_the_rank_in_one_line():
    early = send_signals("start-up", "SIGTERM")
    assert (early.returncode, early.stdout) == (-signal.SIGTERM, "")
    assert early.stderr == "stopped by SIGTERM before training began; nothing saved\n"


STARTUP_SCRIPT = """
import os, signal, sys
import c2r.train
real_build = c2r.train.build_engine

def build_after_ctrl_c(*args, **kwargs):  # Ctrl-C while DeepSpeed builds the engine (and its shm op)
    os.kill(os.getpid(), signal.SIGINT)
    return real_build(*args, **kwargs)

c2r.train.build_engine = build_after_ctrl_c
sys.exit(c2r.train.main(sys.argv[1:]))
"""


def test_ctrl_c_during_start_up_ends_the_run_in_one_line(tmp_path):
    """Ctrl-C before step 1 gave two tracebacks and a 30 s wait under the launcher; now one line and a non-zero
    exit, nothing written."""
    tiny = ["--set", "model.n_layer=1", "--set", "model.d_model=16", "--set", "data.max_bytes=100000"]
    command = [sys.executable, "-c", STARTUP_SCRIPT, "--steps", "2", "--out", str(tmp_path / "run"), *tiny]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=launcher_env(), timeout=120)
    assert proc.returncode == -signal.SIGINT, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == "stopped by SIGINT before training began; nothing saved"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_stop_that_would_outlast_the_deepspeed_launchers_grace_is_warned_of():
    """DeepSpeed's node launcher kills its ranks 30 s after a Ctrl-C: a run whose checkpoint (plus the two steps a
    stop finishes first) takes longer is told so, with the way round it (signal one rank: the launcher, whose
    children then exit 0, lets them finish)."""
    from c2r.stops import stop_deadline_warning

    launcher = {"CROSS_RANK": "0", "RANK": "0"}
    assert stop_deadline_warning(40.0, 1.0, 1234, environ={"RANK": "0"}) is None  # torchrun, mpirun: no such kill
    assert stop_deadline_warning(5.0, 2.0, 1234, environ=launcher) is None
    warning = stop_deadline_warning(30.0, 1.5, 1234, environ=launcher)
    assert "~33 s" in warning and "kills its ranks 30 s after a Ctrl-C" in warning and "kill -INT 1234" in warning
