"""The GPU measurement scripts (benchmarks/two_gpu_runs.sh, benchmarks/multi_gpu_runs.sh) parse, refuse an unknown
part in one line, and multi_gpu_runs.sh's `cost` part runs end to end on 4 gloo CPU ranks (SMOKE=1): ep_bench on 2
and 4 ranks, then the cost model calibrated on the one and predicting the other (benchmarks/simulate_check.py). The
other parts' CPU smoke runs are in docs/gpu_runs.md (the e2e part takes ~2 minutes here)."""

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


def test_multi_gpu_cost_part_runs_on_cpu_ranks(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), SMOKE="1", NGPU="4")
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "multi_gpu_runs.sh"), "cost"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "== ep_bench on 2 GPUs rc 0" in done.stdout and "== ep_bench on 4 GPUs rc 0" in done.stdout, done.stdout
    assert "predicted runs:" in done.stdout and "| 4 ranks, 2 x 2 | per-rank-planned |" in done.stdout, done.stdout
    assert (tmp_path / "calibration.json").is_file()
