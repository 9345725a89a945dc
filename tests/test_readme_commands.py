"""README.md's commands run as written, and every console script answers --help.

A shell block of README.md preceded by the line ``<!-- runnable -->`` is run here, line by line as bash would, in a
scratch directory that looks like a checkout with its venv (``launch/``, ``deepspeed_configs/``, ``README.md`` and
``.venv`` are links to this checkout and to the running interpreter's venv). Only the length of training changes, so
that the whole walkthrough takes a minute or two: ``SMALL`` below says how, and it is the one hook (README blocks are
written for real runs: 300 steps and more).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bad_inputs import MODULES, REPO, child_env

README = REPO / "README.md"
MARK = "<!-- runnable -->"
# Small settings for commands that train: `--steps N` becomes N // STEPS_DIVISOR (so a resumed run still runs past
# the one it resumes from: 300 then 400 become 6 then 8), a training command without --steps gets the default's
# share, and every one evaluates on one batch of a smaller corpus. c2r-adak runs 2 P-Warm and 2 PPO steps.
STEPS_DIVISOR = 50
DEFAULT_STEPS = 300
SMALL = ("--set", "train.eval_batches=1", "--set", "data.max_bytes=400000")
ADAK_SMALL = ("--warm-steps", "2", "--steps", "2", "--calib-batches", "1", "--eval-batches", "1")
TRAINS = re.compile(r"(c2r-train|launch/\S+\.sh)\b")


def runnable_blocks(text: str) -> list[str]:
    """The bodies of the fenced blocks that follow a ``MARK`` line."""
    return re.findall(rf"^{re.escape(MARK)}\n```(?:bash|sh)\n(.*?)^```", text, flags=re.M | re.S)


HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1$")  # a command ending in <<'PY' reads the lines up to PY


def commands(block: str) -> list[str]:
    """One string per command: continuation lines joined, comments and blank lines dropped; a here-document stays
    with the command that reads it, its lines as written."""
    result, current, heredoc_end = [], "", None
    for line in block.splitlines():
        if heredoc_end is not None:
            result[-1] += "\n" + line
            heredoc_end = None if line.strip() == heredoc_end else heredoc_end
            continue
        current += line.lstrip() if current else line
        if current.endswith("\\"):
            current = current[:-1].rstrip() + " "
            continue
        command, current = current.split(" #")[0].strip(), ""
        if command and command[0] != "#":
            result.append(command)
            heredoc_end = match.group(2) if (match := HEREDOC.search(command)) else None
    return result


def small(command: str) -> str:
    """``command`` with the small settings (module docstring)."""
    words = shlex.split(command)
    if "c2r-adak" in command:
        return shlex.join([*words, *ADAK_SMALL])
    if not TRAINS.search(command):
        return command
    if "--steps" in words:
        at = words.index("--steps") + 1
        words[at] = str(max(2, int(words[at]) // STEPS_DIVISOR))
    else:
        words += ["--steps", str(DEFAULT_STEPS // STEPS_DIVISOR)]
    return shlex.join([*words, *SMALL])


def test_readme_marks_runnable_blocks():
    blocks = runnable_blocks(README.read_text())
    assert len(blocks) >= 2
    assert any("c2r-place apply" in block for block in blocks)


def test_small_settings_keep_the_order_of_runs():
    assert small("bash launch/quickstart.sh --resume --out r --steps 400").split()[:6] == [
        "bash",
        "launch/quickstart.sh",
        "--resume",
        "--out",
        "r",
        "--steps",
    ]
    assert "--steps 8" in small("bash launch/quickstart.sh --steps 400")
    assert "--steps 6" in small(".venv/bin/c2r-train --router remoe")
    assert small(".venv/bin/c2r-profile summarize runs/before") == ".venv/bin/c2r-profile summarize runs/before"
    assert commands("a \\\n   b  # note\n# comment\n\nc\n") == ["a b", "c"]
    heredoc = "python - <<'PY'\nx = 1  # one\n\nPY"
    assert commands(heredoc.replace("<<'PY'", "<<'PY'  # make it") + "\nc\n") == [heredoc, "c"]


@pytest.fixture
def checkout(tmp_path) -> Path:
    for name in ("launch", "deepspeed_configs", "README.md"):
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    return tmp_path


@pytest.mark.parametrize("index", range(len(runnable_blocks(README.read_text()))))
def test_readme_block_runs_as_written(index, checkout):
    env = {**child_env(), "MASTER_PORT": str(29600 + index)}
    for command in commands(runnable_blocks(README.read_text())[index]):
        run = small(command)
        result = subprocess.run(["bash", "-c", run], cwd=checkout, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"README command failed: {run}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("script", sorted(MODULES))
def test_console_script_help(script):
    bin_dir = Path(sys.executable).parent
    result = subprocess.run([str(bin_dir / script), "--help"], env=child_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script}"), result.stdout[:200]
    # Files the help names must be in the repository, and launcher commands must be the launcher's spelling.
    for path in re.findall(r"\b(?:docs|deepspeed_configs|launch|benchmarks)/[\w./-]+\w", result.stdout):
        assert (REPO / path).exists(), f"{script} --help names {path}, which is not in the repository"
    assert "deepspeed --num_gpus" not in result.stdout or "--module" in result.stdout
    assert not re.search(r"deepspeed [^\n]*\s-m\s", result.stdout), "the deepspeed launcher wants --module, not -m"
