"""A training run's output directory: what ``c2r-train`` writes there, and refusing to mix two runs in one.

``c2r-train --out DIR`` writes ``DIR/checkpoints/``, ``DIR/metrics.jsonl`` and (``--profile``) ``DIR/profile/``.
A second run into the same directory would replace the metrics and interleave checkpoints (a stale
``zero_pp_rank_1_...`` shard of a 2-rank run next to a 1-rank run's files), so it is refused unless it continues
the run (``--resume``) or replaces it (``--overwrite``, which deletes those three and nothing else of DIR).
"""

from __future__ import annotations

import shutil
from pathlib import Path

RUN_FILES = ("checkpoints", "metrics.jsonl", "profile")


def run_files(out_dir: str | Path) -> list[str]:
    """The files and folders of a c2r-train run in ``out_dir`` (an empty ``checkpoints/`` is no run)."""
    out_dir = Path(out_dir)
    found = []
    for name in RUN_FILES:
        path = out_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name + ("/" if path.is_dir() else ""))
    return found


def check_out_dir(out_dir: str | Path, resume: bool, overwrite: bool, init_from: str | None = None) -> None:
    """Refuse to start a fresh run over an existing one. Call on every rank before any rank writes."""
    found = run_files(out_dir)
    if found and not (resume or overwrite):
        raise ValueError(
            f"{str(out_dir)!r} already holds a run ({', '.join(found)}); continue it with --resume, or replace it "
            "with --overwrite (or choose another --out)"
        )
    source = Path(init_from).resolve() if init_from else None
    if overwrite and source and Path(out_dir).resolve() in (source, *source.parents):
        raise ValueError(f"--overwrite would delete the --init-from checkpoint {init_from!r}; choose another --out")


def clear_run(out_dir: str | Path) -> list[str]:
    """Delete the run in ``out_dir`` (its checkpoints, metrics and profile); returns what was there."""
    found = run_files(out_dir)
    for name in RUN_FILES:
        path = Path(out_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return found
