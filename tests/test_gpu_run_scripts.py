"""The GPU measurement scripts (benchmarks/two_gpu_runs.sh, benchmarks/multi_gpu_runs.sh) parse, refuse an unknown
part in one line, and multi_gpu_runs.sh's `cost` and `ep-fine` parts run end to end on 4 gloo CPU ranks (SMOKE=1):
ep_bench on 2 and 4 ranks, then the cost model calibrated on the one and predicting the other
(benchmarks/simulate_check.py); ep_bench's plans, per-node dispatch and the router-routing peers. Each part leaves at
most 8 files in $OUT (what a GPU call brings back). The e2e part's CPU smoke run is in docs/gpu_runs.md (~3 minutes
here)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("two_gpu_runs.sh", "multi_gpu_runs.sh")


@pytest.mark.parametrize("script", SCRIPTS)
def test_gpu_run_script_parses_and_refuses_an_unknown_part(script, tmp_path):
    path = REPO / "benchmarks" / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    env = dict(os.environ, OUT=str(tmp_path), SMOKE="1", NGPU="2")
    done = subprocess.run(["bash", str(path), "warp-drive"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{script}: unknown part 'warp-drive'" in done.stderr


def smoke_multi_gpu_part(part: str, out) -> subprocess.CompletedProcess:
    """multi_gpu_runs.sh PART on 4 CPU ranks with tiny sizes (SMOKE=1), its outputs in ``out``."""
    env = dict(os.environ, OUT=str(out), SMOKE="1", NGPU="4")
    script = str(REPO / "benchmarks" / "multi_gpu_runs.sh")
    return subprocess.run(["bash", script, part], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def test_multi_gpu_cost_part_runs_on_cpu_ranks(tmp_path):
    done = smoke_multi_gpu_part("cost", tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "== ep_bench on 2 GPUs rc 0" in done.stdout and "== ep_bench on 4 GPUs rc 0" in done.stdout, done.stdout
    assert "predicted runs:" in done.stdout and "| 4 ranks, 2 x 2 | per-rank-planned |" in done.stdout, done.stdout
    assert (tmp_path / "calibration.json").is_file()
    assert len(list(tmp_path.iterdir())) <= 8


def test_multi_gpu_ep_fine_part_runs_on_cpu_ranks(tmp_path):
    done = smoke_multi_gpu_part("ep-fine", tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    finished = (
        "== ep-fine on 4 GPUs rc 0",
        "== ep-fine on 4 GPUs in nodes of 2 rc 0",
        "== ep-fine peers on 4 GPUs rc 0",
    )
    assert all(line in done.stdout for line in finished), done.stdout
    # the plans are made and measured under synthetic routing, with the planner's name and each layout's seconds
    assert "| tiny | synthetic | c2r-per-rank-capped | kahypar, --max-load 1.1 |" in done.stdout
    assert "ep_bench: tiny: planned on 256 synthetic tokens (kahypar): planned " in done.stdout
    # under each layer's own router the c2r rows are the contiguous layout's, measured (no plan from other routing)
    peers = json.loads((tmp_path / "ep-fine-peers.json").read_text())["rows"]
    c2r = [r for r in peers if r["contender"].startswith("c2r-")]
    assert c2r and all(r["routing"] == "router" and r["ms_median"] > 0 for r in c2r), c2r
    assert len(list(tmp_path.iterdir())) <= 8
