"""benchmarks/hf_train_bench.py --smoke end to end: a model directory (config, tokenizer, one set of random weights)
written, c2r-train --hf-model run under the deepspeed launcher beside the Hugging Face model under DeepSpeed's own
step, tokens/s read from their timing windows, and the same losses from the same starting weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tests.test_deepspeed_training import REPO, launcher_env  # noqa: E402


def test_smoke_measures_c2r_tokens_per_second(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "hf_train_bench.py"), "--smoke", "--configs", "olmoe-layers"]
    cmd += ["--contenders", "c2r-torch,hf-eager", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result, eager = json.loads(out.read_text())["results"]
    # the same weights, batches, optimizer and objective (c2r's router balance loss off, as the others have none)
    assert eager["error"] is None and result["final_loss"] == pytest.approx(eager["final_loss"], abs=0.01)
    # and the same loss curve, window by window (--smoke: 2 windows of 2 steps), in the JSON and the table
    assert len(result["window_losses"]) == 2
    assert result["window_losses"] == pytest.approx(eager["window_losses"], abs=0.01)
    assert " / ".join(f"{x:.3f}" for x in result["window_losses"]) in proc.stdout
    assert result["error"] is None
    # --smoke: 4 steps, the first 2 untimed; 2 x 32 tokens per step
    assert result["steps_timed"] == 2
    assert result["tokens_per_s"] > 0
    assert result["ms_per_step"] == pytest.approx(1000 * 2 * 32 / result["tokens_per_s"], rel=1e-6)
    assert 0 < result["final_loss"] < 20
    assert "| olmoe-layers | c2r-torch | 2 |" in proc.stdout
