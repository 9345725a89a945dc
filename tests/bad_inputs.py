"""Bad input to the five console scripts, and the one line each answers with.

Shared by tests/test_bad_input.py (each case: exit code 2, one line on stderr naming the values, no traceback) and by
the table in docs/status.md, which is this module's real output:

    PYTHONPATH=. .venv/bin/python -m tests.bad_inputs      # builds a tiny profiled run in a temp dir (~20 s), runs all

Every case runs in a scratch directory holding ``run/`` (a 4-step profiled c2r-train run: 2 MoE layers of 8 experts,
one rank), ``plan.json`` (a 2-rank plan from its traces), ``random.bin`` (random bytes), ``notjson.txt``, an
empty directory ``empty/`` and ``other/checkpoints/latest`` (another run's checkpoints, naming step9); arguments
name them by relative path, so the messages read as the user would see them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULES = {
    "c2r-train": "c2r.train",
    "c2r-adak": "c2r.adak_train",
    "c2r-place": "c2r.place_cli",
    "c2r-profile": "profiling.cli",
    "c2r-route": "c2r.routing.cli",
}
EXECUTABLE = "EXE"  # stands for an executable file (the Python interpreter) in a case's arguments


@dataclass(frozen=True)
class BadInput:
    """``cli args`` must exit with code 2 and one stderr line containing every string of ``names``."""

    cli: str
    args: tuple[str, ...]
    names: tuple[str, ...]

    def command(self) -> list[str]:
        args = [str(Path(sys.executable).resolve()) if a == EXECUTABLE else a for a in self.args]
        return [sys.executable, "-m", MODULES[self.cli], *args]

    def shown(self) -> str:
        return " ".join([self.cli, *("PYTHON_EXECUTABLE" if a == EXECUTABLE else a for a in self.args)])


def case(cli: str, args: str, *names: str) -> BadInput:
    return BadInput(cli, tuple(args.split()), names)


CASES = (
    # c2r-train: the config
    case("c2r-train", "--set model.moe.num_experts=abc", "model.moe.num_experts", "'abc'", "integer"),
    case("c2r-train", "--set model.moe.num_experts=8.5", "model.moe.num_experts", "8.5", "integer"),
    case("c2r-train", "--set train.lr=fast", "train.lr", "'fast'", "number"),
    case("c2r-train", "--set train.resume=yes", "train.resume", "'yes'", "true or false"),
    case("c2r-train", "--set model.moe.tpo_k=2", "tpo_k", "top_k"),
    case("c2r-train", "--set model.moe.top_k=0", "top_k", "0"),
    case("c2r-train", "--set model.moe.router=topk", "model.moe.router", "section", "'topk'"),
    case("c2r-train", "--set train.ep_size=3", "ep_size (3)", "num_experts (8)"),
    case("c2r-train", "--set train", "--set", "key=value", "'train'"),
    case("c2r-train", "--router nope", "'nope'", "topk"),
    case("c2r-train", "--steps ten", "--steps", "'ten'"),
    case("c2r-train", "--dispatch sideways", "--dispatch", "'sideways'", "per-rank"),
    case("c2r-train", "--set train.overlap_chunks=0", "train.overlap_chunks (0)", ">= 1"),
    case("c2r-train", "--set train.copy_choice=nearest", "train.copy_choice", "'nearest'", "balanced"),
    case("c2r-train", "--config notjson.txt", "notjson.txt"),
    case("c2r-train", "--config missing.json", "missing.json"),
    # c2r-train: the machine and the files
    case("c2r-train", "--device cuda", "--device cuda", "CUDA"),
    case("c2r-train", "--device tpu", "'tpu'"),
    case("c2r-train", "--backend megablocks", "--backend megablocks", "CUDA"),
    case("c2r-train", "--data random.bin --out out", "'random.bin'", "binary"),
    case("c2r-train", f"--data {EXECUTABLE} --out out", "binary"),
    case("c2r-train", "--data missing/ --out out", "'missing'", "does not exist"),
    case("c2r-train", "--data empty --out out", "'empty'", "no text files"),
    case("c2r-train", "--deepspeed_config missing.json --out out", "'missing.json'"),
    case("c2r-train", "--plan plan.json --out out", "plan.json", "2 MoE layers", "4 MoE layers"),
    case("c2r-train", "--resume --out empty", "'empty/checkpoints'"),
    # c2r-adak
    case("c2r-adak", "--out adak", "adak.checkpoint"),
    case("c2r-adak", "--checkpoint missing --out adak", "'missing'"),
    case("c2r-adak", "--checkpoint run --lambda -1 --out adak", "k_penalty", "-1"),
    case("c2r-adak", "--checkpoint run --clip-eps 2 --out adak", "clip_eps (2.0)"),
    case("c2r-adak", "--checkpoint run --set adak.ppo_epochs=two --out adak", "adak.ppo_epochs", "'two'"),
    # c2r-place
    case("c2r-place", "plan --traces missing --ranks 2 --out p.json", "missing"),
    case("c2r-place", "plan --traces run --ranks 3 --out p.json", "3", "8"),
    case("c2r-place", "plan --traces run --ranks two --out p.json", "--ranks", "'two'"),
    case("c2r-place", "evaluate --plan missing.json --traces run", "missing.json"),
    case("c2r-place", "export --plan notjson.txt --format eplb", "notjson.txt"),
    case("c2r-place", "export --plan plan.json --format deepspeed", "'deepspeed'", "eplb"),
    case(
        "c2r-place",
        "apply --plan plan.json --checkpoint run/checkpoints --out run/checkpoints/step4",
        "run/checkpoints/step4",
        "inside",
    ),
    case("c2r-place", "apply --plan plan.json --checkpoint empty --out out/checkpoints", "empty", "latest"),
    case(
        "c2r-place",
        "apply --plan plan.json --checkpoint run/checkpoints --out other/checkpoints",
        "other/checkpoints",
        "another run's checkpoints",
        "step9",
    ),
    case(
        "c2r-place",
        "reshard --checkpoint run/checkpoints --world-size 1 --out run/checkpoints/step4",
        "run/checkpoints/step4",
        "inside",
    ),
    # c2r-profile
    case("c2r-profile", "summarize missing", "missing"),
    case("c2r-profile", "summarize empty", "empty"),
    case("c2r-profile", "dashboard run run run -o d.html", "3"),
    case("c2r-profile", "coactivation run -o missing/coact.npy", "missing/coact.npy"),
    # c2r-route
    case("c2r-route", "collaborators --out lists.npz", "--coactivation"),
    case("c2r-route", "collaborators missing --out lists.npz", "missing"),
    case("c2r-route", "collaborators --coactivation random.bin --out lists.npz", "random.bin"),
    case("c2r-route", "collaborators --coactivation notjson.txt --out lists.npz", "notjson.txt"),
)


def make_scratch(root: Path) -> Path:
    """The files the cases name (module docstring), under ``root``."""
    from tests.run_configs import tiny_run_config

    root.mkdir(parents=True, exist_ok=True)
    (root / "empty").mkdir(exist_ok=True)
    (root / "random.bin").write_bytes(os.urandom(20_000))
    (root / "notjson.txt").write_text("this is not JSON\n")
    (root / "other" / "checkpoints").mkdir(parents=True, exist_ok=True)  # another run's checkpoints, at step 9
    (root / "other" / "checkpoints" / "latest").write_text("step9")
    config = tiny_run_config("run", steps=4, profile=True, eval_every=2)
    (root / "tiny.json").write_text(json.dumps(config))
    for argv in (
        [sys.executable, "-m", "c2r.train", "--config", "tiny.json"],
        [sys.executable, "-m", "c2r.place_cli", "plan", "--traces", "run", "--ranks", "2", "--out", "plan.json", "-q"],
    ):
        subprocess.run(argv, cwd=root, env=child_env(), check=True, capture_output=True)
    return root


def child_env() -> dict[str, str]:
    """This checkout first on the path; no launcher variables from a surrounding job."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_case(c: BadInput, scratch: Path) -> subprocess.CompletedProcess:
    return subprocess.run(c.command(), cwd=scratch, env=child_env(), capture_output=True, text=True, timeout=300)


def run_all(scratch: Path, workers: int = 4) -> list[subprocess.CompletedProcess]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda c: run_case(c, scratch), CASES))


# Not error lines: what DeepSpeed prints on import (its accelerator and op-build notices) and our INFO log lines
# (c2r-train logs its corpus and model before it looks for a checkpoint to resume).
NOISE = re.compile(r"\[WARNING\] \[real_accelerator\.py|DeepSpeed deepspeed\.ops|^\d\d:\d\d:\d\d INFO ")


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """stderr's lines that are not ``NOISE``."""
    return [line for line in result.stderr.splitlines() if line.strip() and not NOISE.search(line)]


def markdown_table(results: list[subprocess.CompletedProcess]) -> str:
    rows = ["| command | exit | message (stderr) |", "| --- | --- | --- |"]
    for c, result in zip(CASES, results):
        message = " / ".join(error_lines(result)).replace("|", "\\|")
        rows.append(f"| `{c.shown()}` | {result.returncode} | {message} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        scratch = make_scratch(Path(tmp) / "scratch")
        print(markdown_table(run_all(scratch)))
