"""Bad input to every console script: exit code 2, one line on stderr naming the offending values, no traceback; once
per job under the deepspeed launcher. The cases (and the table in docs/status.md) are in tests/bad_inputs.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from c2r.parallel.ports import free_port
from tests.bad_inputs import CASES, child_env, error_lines, make_scratch, run_all


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return make_scratch(tmp_path_factory.mktemp("bad_input") / "scratch")


@pytest.fixture(scope="module")
def outcomes(scratch) -> dict:
    # All cases at once: each is a fresh interpreter importing torch, so running them side by side saves minutes.
    return dict(zip(CASES, run_all(scratch)))


@pytest.mark.parametrize("case", CASES, ids=[c.shown() for c in CASES])
def test_bad_input_gives_one_line_naming_the_values(case, outcomes):
    result = outcomes[case]
    assert "Traceback" not in result.stderr, result.stderr
    lines = error_lines(result)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1, lines
    assert lines[0].startswith(case.cli), lines[0]
    for name in case.names:
        assert name in lines[0], (name, lines[0])


def test_apply_into_the_source_checkpoint_writes_nothing_and_stale_partials_are_ignored(scratch, outcomes):
    from c2r.deepspeed.move_experts import move_experts
    from placement.layout import ExpertLayout

    step = scratch / "run" / "checkpoints" / "step4"
    into_source = next(c for c in CASES if c.cli == "c2r-place" and "run/checkpoints/step4" in c.args)
    assert outcomes[into_source].returncode == 2
    assert not list(step.glob(".*")), "apply --out inside the source wrote into it"
    # A partial directory an older apply left inside the source is not copied (it used to crash every later apply).
    stale = step / ".step4.partial"
    stale.mkdir()
    (stale / "layer_0_expert_0_mp_rank_00_model_states.pt").write_bytes(b"half")
    try:
        dst = move_experts([ExpertLayout.contiguous(8, 1)] * 2, scratch / "run" / "checkpoints", scratch / "moved")
    finally:
        shutil.rmtree(stale)
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in step.iterdir())


def test_an_error_under_the_deepspeed_launcher_is_printed_once(tmp_path):
    deepspeed = Path(sys.executable).parent / "deepspeed"
    port = str(free_port())
    argv = [str(deepspeed), "--num_gpus", "2", "--master_port", port, "--module", "c2r.train"]
    result = subprocess.run(
        [*argv, "--set", "model.moe.num_experts=abc", "--out", str(tmp_path / "run")],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output, output
    assert output.count("model.moe.num_experts expects an integer, got 'abc'") == 1, output


def test_adak_router_without_trained_allocators_is_flagged(scratch):
    from c2r.train import TRAIN_CLI, starts_untrained_allocator

    def flagged(*argv: str) -> bool:
        return starts_untrained_allocator(TRAIN_CLI.resolve(["--set", "model.n_layer=2", *argv]))

    assert flagged("--router", "adak")
    assert flagged("--router", "adak", "--init-from", str(scratch / "run"))  # a top-k run: no allocators
    assert not flagged("--router", "topk")
    adak_run = scratch / "adak_run" / "checkpoints" / "step1"
    adak_run.mkdir(parents=True)
    saved = json.loads((scratch / "run" / "checkpoints" / "step4" / "c2r_config.json").read_text())
    saved["model"]["moe"]["router"]["kind"] = "adak"
    (adak_run / "c2r_config.json").write_text(json.dumps(saved))
    assert not flagged("--router", "adak", "--init-from", str(adak_run))
