"""The multi-node launchers, run for real on a two-"node" loopback cluster (.ci/loopback_cluster.sh up): c2r-node1 =
127.0.0.1 and c2r-node2 = 127.0.0.2, one CPU rank on each, ep_size 2 across them. Each launcher's losses must equal
the same command under the plain single-node deepspeed launcher with 2 ranks.

Without the cluster these tests skip with the reason; with C2R_REQUIRE_LAUNCHERS=1 (set by .ci/run) they fail
instead, so CI cannot pass by skipping them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from c2r.parallel.ports import free_port

REPO = Path(__file__).resolve().parents[1]
NODES = ("c2r-node1", "c2r-node2")
REQUIRED = os.environ.get("C2R_REQUIRE_LAUNCHERS") == "1"
SETUP = "run `bash .ci/loopback_cluster.sh up` as root"

# A tiny model and 4 steps: each run is ~20-40 s, nearly all of it process start-up.
# Per-node dispatch with one rank per "node": each token crosses to the other node once if any of its experts live
# there, then fans out within that node.
TRAIN_ARGS = [
    *("--steps", "4", "--dispatch", "per-node", "--gpus-per-node", "1"),
    *("--set", "train.eval_every=2", "--set", "train.eval_batches=1", "--set", "train.batch_size=4"),
    *("--set", "data.max_bytes=100000", "--set", "model.block_size=32", "--set", "model.n_layer=2"),
    *("--set", "model.n_head=2", "--set", "model.d_model=32", "--set", "model.moe.ffn_hidden_size=32"),
]


def need(ok: bool, reason: str) -> None:
    """Skip when a service is absent, unless CI requires the launchers: then fail with the same reason."""
    if not ok:
        (pytest.fail if REQUIRED else pytest.skip)(f"{reason} ({SETUP})")


def quiet(*cmd: str) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def need_ssh() -> None:
    for node in NODES:
        need(
            quiet("ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", node, "true"),
            f"no passwordless ssh to {node}",
        )


def launcher_env(**extra: str) -> dict[str, str]:
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        BIN=str(Path(sys.executable).parent),
        MASTER_PORT=str(free_port()),
    )
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(name, None)
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, " ".join(cmd) + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(out: Path) -> list[tuple[int, float, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"], r["val_loss"]) for r in records if "train_loss" in r]


@pytest.fixture(scope="module")
def single_host(tmp_path_factory) -> list[tuple[int, float, float]]:
    """The reference: the same training under the plain deepspeed launcher, 2 ranks on this host."""
    out = tmp_path_factory.mktemp("single")
    run(["bash", "launch/quickstart.sh", *TRAIN_ARGS, "--out", str(out)], launcher_env(NUM_RANKS="2", EP_SIZE="2"))
    result = losses(out)
    assert [step for step, _, _ in result] == [2, 4]
    return result


def assert_same_losses(out: Path, reference: list[tuple[int, float, float]]) -> None:
    # Same ranks, same data, same seed; only the process start-up differs. The threads per rank may (a rank alone on
    # its "node" gets both cores), so summation order may too: equal to float32 rounding, not necessarily bitwise.
    got = losses(out)
    assert [step for step, _, _ in got] == [step for step, _, _ in reference]
    for (step, train, val), (_, train_ref, val_ref) in zip(got, reference):
        assert train == pytest.approx(train_ref, rel=1e-5), f"step {step} train loss"
        assert val == pytest.approx(val_ref, rel=1e-5), f"step {step} val loss"


def test_deepspeed_launcher_with_a_hostfile_of_two_nodes(tmp_path, request):
    need(shutil.which("pdsh") is not None, "pdsh not installed (Debian: apt-get install pdsh)")
    need_ssh()
    reference = request.getfixturevalue("single_host")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{node} slots=1\n" for node in NODES))
    env = launcher_env(HOSTFILE=str(hostfile), GPUS_PER_NODE="1", EP_SIZE="2", MASTER_ADDR=NODES[0])
    proc = run(["bash", "launch/deepspeed_multinode.sh", *TRAIN_ARGS, "--out", str(tmp_path / "run")], env)
    log = proc.stdout + proc.stderr
    # pdsh prefixes each node's lines with its name: one launcher per node, one rank each.
    assert "c2r-node1: " in log and "c2r-node2: " in log and "dist_world_size=2" in log
    assert_same_losses(tmp_path / "run", reference)


def test_mpirun_with_a_hostfile_of_two_nodes(tmp_path, request):
    need(shutil.which("mpirun") is not None, "mpirun not installed (Debian: apt-get install openmpi-bin)")
    need_ssh()
    reference = request.getfixturevalue("single_host")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{node} slots=1\n" for node in NODES))
    # --display-map lists where each rank runs; the remote node's rank starts through ssh and OpenMPI's orted.
    env = launcher_env(
        NP="2", EP_SIZE="2", MASTER_ADDR=NODES[0], MPI_ARGS=f"--hostfile {hostfile} --display-map -x PYTHONPATH"
    )
    proc = run(["bash", "launch/mpirun.sh", *TRAIN_ARGS, "--out", str(tmp_path / "run")], env)
    # OpenMPI shows its own node by this host's name (c2r-node1 is 127.0.0.1), the other as in the hostfile.
    node_of = {
        rank: node for node, rank in re.findall(r"Data for node: (\S+)[^\n]*\n[^\n]*Process rank: (\d+)", proc.stdout)
    }
    assert node_of.get("1") == NODES[1] and node_of.get("0") not in (None, NODES[1]), proc.stdout[-3000:]
    assert_same_losses(tmp_path / "run", reference)


def slurm_nodes_idle() -> bool:
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    states = dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)
    return all(states.get(node) == "idle" for node in NODES)


def test_slurm_sbatch_on_two_nodes(tmp_path, request):
    need(
        shutil.which("sbatch") is not None,
        "SLURM not installed (Debian: apt-get install slurmctld slurmd slurm-client munge)",
    )
    need(slurm_nodes_idle(), f"SLURM nodes {', '.join(NODES)} not idle (`sinfo -N`)")
    reference = request.getfixturevalue("single_host")
    log = tmp_path / "slurm.out"
    # The script asks for 8 GPUs and 8 tasks a node; here it is 1 task a node, no GPUs, 1 CPU each.
    cmd = [
        *("sbatch", "--wait", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"),
        *("--gpus-per-node=0", "--time=10", f"--output={log}", "launch/slurm.sbatch"),
        *(*TRAIN_ARGS, "--out", str(tmp_path / "run")),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=launcher_env(EP_SIZE="2"), timeout=300, cwd=REPO)
    job_log = log.read_text() if log.exists() else "(no job log)"
    assert proc.returncode == 0, proc.stdout + proc.stderr + job_log[-3000:]
    job = proc.stdout.strip().split(";")[0]
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert " NodeList=c2r-node[1-2]" in shown and "NumNodes=2 " in shown, shown
    assert "done: train loss" in job_log
    assert_same_losses(tmp_path / "run", reference)
