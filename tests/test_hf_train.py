"""c2r-train --hf-model: tiny Hugging Face MoE models (saved with a tokenizer, loaded the way a user's model is) train
under DeepSpeed on 2 CPU ranks with expert parallelism, resume exactly, switch routers, and export back to a
checkpoint transformers loads with the trained model's logits.

Kept small for 2 shared cores: one architecture goes through the deepspeed launcher (train, resume, export: the
launcher's path, a fresh set of processes reading the checkpoint); every architecture, and the switched routers, train
4 steps, resume from their step-2 checkpoint and export, all in one in-process 2-rank gloo job. Resuming in-process
runs the same code (``train`` with ``--resume``: DeepSpeed's load_checkpoint, the router state, the batch sampler at
step 2) for a few seconds per architecture where a launcher run costs 20-30 s.
"""

from __future__ import annotations

import json
import re
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

ARCHITECTURES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "granitemoe"]
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


def run_at_step(full: Path, resumed: Path, step: int) -> None:
    """``resumed``: the run directory ``full`` as it was right after its step-``step`` checkpoint (later checkpoints
    gone, ``latest`` naming it, the metrics log cut there: one line a step, ``SMALL``'s eval_every=1), what a run
    killed then leaves behind."""
    shutil.copytree(full, resumed)
    for later in (full / "checkpoints").glob("step*"):
        if int(later.name[4:]) > step:
            shutil.rmtree(resumed / "checkpoints" / later.name)
    (resumed / "checkpoints" / "latest").write_text(f"step{step}")
    (resumed / "metrics.jsonl").write_text("".join((full / "metrics.jsonl").read_text().splitlines(True)[:step]))


def train_worker(rank, world, runs):
    """Train each ``(argv, resumes)`` in turn; return its step losses and the trained model's logits on ``ids_BS``.
    ``resumes``: None, or ``(full, step)``: the run starts as a copy of the run directory ``full`` cut back to its
    step-``step`` checkpoint (``run_at_step``, made by rank 0) and ``argv`` continues it with ``--resume``."""
    import torch.distributed as dist

    results = []
    for argv, resumes in runs:
        if resumes is not None:
            if rank == 0:
                run_at_step(Path(resumes[0]), Path(TRAIN_CLI.resolve(argv).train.out_dir), resumes[1])
            dist.barrier()
        result = train(TRAIN_CLI.resolve(argv))
        engine = result["engine"]
        engine.eval()
        with torch.no_grad():
            logits = engine.module(ids_BS()).logits
        results.append({"step_losses": result["step_losses"], "start_step": result["start_step"], "logits": logits})
    return results


def exported_logits(run_dir, out_dir):
    assert export_main([str(run_dir), "--out", str(out_dir)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        return model(input_ids=ids_BS()).logits


def test_architectures_and_routers_train_resume_exactly_with_ep2_and_export(models, tmp_path, capsys):
    """Each architecture and each switched router: 4 steps with a checkpoint at step 2, then a second run resumed
    from that checkpoint, whose steps 3 and 4 (losses and final logits) equal the uninterrupted run's bit for bit."""
    dirs, data = models
    coactivation = np.random.default_rng(0).integers(0, 50, (2, E, E))
    lists = write_lists(str(tmp_path / "lists.npz"), coactivation + coactivation.transpose(0, 2, 1))
    routers = {
        "c2r": ["--router", "c2r", "--set", f"model.moe.router.c2r.collaborators={lists}"],
        "adamoe": ["--router", "adamoe", "--set", "model.moe.router.adamoe.num_null_experts=2"],
        "remoe": ["--router", "remoe"],
    }
    ep2 = ["--ep-size", "2", "--set", "train.save_every=2"]
    models_of = {family: (dirs[family], []) for family in ARCHITECTURES}
    models_of |= {router: (dirs["qwen3_moe"], extra) for router, extra in routers.items()}
    runs = {}
    for name, (model_dir, extra) in models_of.items():
        runs[name] = (args_for(model_dir, data, tmp_path / name, *ep2, *extra, steps=4), None)
        resumed = args_for(model_dir, data, tmp_path / f"{name}-resumed", *ep2, *extra, "--resume", steps=4)
        runs[f"{name} resumed"] = (resumed, (str(tmp_path / name), 2))
    per_rank = args_for(dirs["olmoe"], data, tmp_path / "per-rank", *ep2, "--dispatch", "per-rank", steps=4)
    runs["per-rank"] = (per_rank, None)
    results = dict(zip(runs, run_distributed(train_worker, 2, tmp_path / "job", list(runs.values()))[0], strict=True))
    for name in models_of:
        full, resumed = results[name], results[f"{name} resumed"]
        assert len(full["step_losses"]) == 4 and all(np.isfinite(full["step_losses"])), name
        assert resumed["start_step"] == 2, name
        assert resumed["step_losses"] == full["step_losses"][2:], name  # bit for bit
        assert torch.equal(resumed["logits"], full["logits"]), name
    # Both dispatch modes compute the same function: same model, same batches, same losses.
    np.testing.assert_allclose(results["per-rank"]["step_losses"], results["olmoe"]["step_losses"], rtol=1e-5)
    for family in ARCHITECTURES:
        logits = exported_logits(tmp_path / f"{family}-resumed", tmp_path / f"{family}_hf")
        torch.testing.assert_close(logits, results[family]["logits"], atol=1e-5, rtol=0, msg=family)
    assert export_main([str(tmp_path / "adamoe"), "--out", str(tmp_path / "adamoe_hf")]) == 2
    assert re.search(r"c2r-export-hf: cannot export to qwen3_moe: .*'adamoe' router", capsys.readouterr().err)


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
    run_at_step(full, resumed, 2)  # what a run killed after its step-2 checkpoint leaves
    launch([*args_for(dirs["deepseek_v3"], data, resumed, "--ep-size", "2", steps=4), "--resume"])
    assert losses(resumed) == losses(full)  # bit for bit: steps 3 and 4 after resuming equal the uninterrupted run's
    original = transformers.AutoModelForCausalLM.from_pretrained(dirs["deepseek_v3"]).eval()
    with torch.no_grad():
        before = original(input_ids=ids_BS()).logits
    after = exported_logits(resumed, tmp_path / "hf")
    assert not torch.allclose(before, after)  # the exported model is the trained one, not the source


def replicated_plan(path: Path, num_layers: int) -> Path:
    """A valid 2-rank plan for E=8 experts whose expert 0 has a replica on rank 1 and expert 4 one on rank 0 (each
    rank then holds 5 slots), in every layer: the plan file's ``[home, replica, ...]`` form."""
    expert_to_rank = [[0, 1], 0, 0, 0, [1, 0], 1, 1, 1]
    layers = [{"layer": layer, "expert_to_rank": expert_to_rank} for layer in range(num_layers)]
    document = {"format": "c2r-placement", "version": 2, "num_layers": num_layers, "num_experts": E, "num_ranks": 2}
    path.write_text(json.dumps(document | {"layers": layers}))
    return path


def test_a_replicated_plan_is_refused_once_in_one_line(models, tmp_path):
    """The Hugging Face loader places one copy per expert, so a plan with replicas is refused, never half applied:
    exit code 2 and one line naming the replicated experts, printed once for the 2-rank job, no traceback."""
    from c2r.hf.training import model_shape
    from placement.plan import load_plan

    dirs, data = models
    plan = replicated_plan(tmp_path / "replicated.json", model_shape(str(dirs["olmoe"])).num_moe_layers)
    assert load_plan(plan).layouts[0].is_replicated  # a plan c2r-train takes for our GPT
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port"]
    cmd += [launcher_env()["MASTER_PORT"], "--module", "c2r.train", "--plan", str(plan)]
    cmd += args_for(dirs["olmoe"], data, tmp_path / "run", "--ep-size", "2")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=launcher_env(), timeout=300, cwd=REPO)
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    message = "c2r-train: c2r-train --hf-model does not handle replicated experts yet (experts [0, 4] have replicas)"
    assert output.count("does not handle replicated experts") == 1 and message in output, output
    assert proc.returncode == 2, (proc.returncode, output[-3000:])
    assert not (tmp_path / "run" / "checkpoints").exists()
