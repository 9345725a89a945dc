"""c2r-train --hf-model: tiny Hugging Face MoE models (saved with a tokenizer, loaded the way a user's model is) train
under DeepSpeed on 2 CPU ranks with expert parallelism, resume exactly, switch routers, and export back to a
checkpoint transformers loads with the trained model's logits.

Kept small for 2 shared cores: one architecture goes through the deepspeed launcher (train, resume, export); the
others, and the switched routers, train 2 steps each in one 2-rank gloo job, then export.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from c2r.hf.export_cli import main as export_main  # noqa: E402
from c2r.train import TRAIN_CLI, train  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402
from tests.router_helpers import write_lists  # noqa: E402
from tests.test_deepspeed_training import REPO, launcher_env  # noqa: E402
from tests.test_hf_convert import save_model, tokenizer_files  # noqa: E402, F401 (a fixture)
from tests.test_hf_hooks import VOCAB, E  # noqa: E402

ARCHITECTURES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]
SMALL = [
    *("--set", "model.block_size=16", "--set", "train.batch_size=2", "--set", "train.eval_every=1"),
    *("--set", "train.eval_batches=1", "--set", "train.warmup_steps=1", "--set", "train.lr=1e-2"),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_files):  # noqa: F811 (the fixture imported above)
    """{family: saved model directory} and a text file to train on."""
    root = tmp_path_factory.mktemp("hf_models")
    dirs = {}
    for family in ARCHITECTURES:
        dirs[family] = root / family
        save_model(family, dirs[family], tokenizer_files)
    data = root / "data.txt"
    data.write_text((REPO / "README.md").read_text()[:20000])
    return dirs, data


def args_for(model_dir, data, out, *extra, steps=2):
    return ["--hf-model", str(model_dir), "--data", str(data), "--out", str(out), "--steps", str(steps), *SMALL, *extra]


def ids_BS():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))


def train_worker(rank, world, runs):
    """Train each command line in turn; return its step losses and the trained model's logits on ``ids_BS``."""
    results = []
    for argv in runs:
        result = train(TRAIN_CLI.resolve(argv))
        engine = result["engine"]
        engine.eval()
        with torch.no_grad():
            logits = engine.module(ids_BS()).logits
        results.append({"step_losses": result["step_losses"], "logits": logits})
    return results


def exported_logits(run_dir, out_dir):
    assert export_main([str(run_dir), "--out", str(out_dir)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        return model(input_ids=ids_BS()).logits


def test_architectures_and_routers_train_with_ep2_and_export(models, tmp_path):
    dirs, data = models
    coactivation = np.random.default_rng(0).integers(0, 50, (2, E, E))
    lists = write_lists(str(tmp_path / "lists.npz"), coactivation + coactivation.transpose(0, 2, 1))
    routers = {
        "c2r": ["--router", "c2r", "--set", f"model.moe.router.c2r.collaborators={lists}"],
        "adamoe": ["--router", "adamoe", "--set", "model.moe.router.adamoe.num_null_experts=2"],
        "remoe": ["--router", "remoe"],
    }
    runs = {family: args_for(dirs[family], data, tmp_path / family, "--ep-size", "2") for family in ARCHITECTURES}
    runs |= {
        router: args_for(dirs["qwen3_moe"], data, tmp_path / router, "--ep-size", "2", *extra)
        for router, extra in routers.items()
    }
    runs["per-rank"] = args_for(dirs["olmoe"], data, tmp_path / "per-rank", "--ep-size", "2", "--dispatch", "per-rank")
    results = dict(zip(runs, run_distributed(train_worker, 2, tmp_path / "job", list(runs.values()))[0], strict=True))
    for name, result in results.items():
        assert len(result["step_losses"]) == 2 and all(np.isfinite(result["step_losses"])), name
    # Both dispatch modes compute the same function: same model, same batches, same losses.
    np.testing.assert_allclose(results["per-rank"]["step_losses"], results["olmoe"]["step_losses"], rtol=1e-5)
    for family in ARCHITECTURES:
        logits = exported_logits(tmp_path / family, tmp_path / f"{family}_hf")
        torch.testing.assert_close(logits, results[family]["logits"], atol=1e-5, rtol=0, msg=family)
    with pytest.raises(SystemExit, match=r"c2r-export-hf: cannot export to qwen3_moe: .*'adamoe' router"):
        export_main([str(tmp_path / "adamoe"), "--out", str(tmp_path / "adamoe_hf")])


def launch(argv):
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port"]
    cmd += [launcher_env()["MASTER_PORT"], "--module", "c2r.train", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=launcher_env(), timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(run_dir):
    return [json.loads(line)["train_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_deepspeed_launcher_trains_resumes_exactly_and_exports(models, tmp_path):
    dirs, data = models
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    argv = args_for(dirs["deepseek_v3"], data, full, "--ep-size", "2", "--set", "train.save_every=2", steps=4)
    proc = launch(argv)
    assert "done: train loss" in proc.stdout and "ep_size 2 (4 experts per rank)" in proc.stderr
    # The resumed run: the full run's directory as it was after step 2.
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step4")
    (resumed / "checkpoints" / "latest").write_text("step2")
    (resumed / "metrics.jsonl").write_text("".join((full / "metrics.jsonl").read_text().splitlines(True)[:2]))
    launch([*args_for(dirs["deepseek_v3"], data, resumed, "--ep-size", "2", steps=4), "--resume"])
    assert losses(resumed) == losses(full)  # bit for bit: steps 3 and 4 after resuming equal the uninterrupted run's
    original = transformers.AutoModelForCausalLM.from_pretrained(dirs["deepseek_v3"]).eval()
    with torch.no_grad():
        before = original(input_ids=ids_BS()).logits
    after = exported_logits(resumed, tmp_path / "hf")
    assert not torch.allclose(before, after)  # the exported model is the trained one, not the source
