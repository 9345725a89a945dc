"""A training run's output directory: what ``c2r-train`` writes there, and refusing to mix two runs in one.

``c2r-train --out DIR`` writes ``DIR/checkpoints/``, ``DIR/metrics.jsonl`` and (``--profile``) ``DIR/profile/`` (a
resumed run's ``--profile`` moves an earlier one to ``DIR/profile-before-resume-at-step<N>/`` once the resume has
loaded its checkpoint and has steps to train; until then its all-to-all records start in ``DIR/profile-starting/``,
which becomes ``DIR/profile/`` then, and is deleted where the resume is refused or has nothing to do).
A second run into the same directory would replace the metrics and interleave checkpoints (a stale
``zero_pp_rank_1_...`` shard of a 2-rank run next to a 1-rank run's files), so it is refused unless it continues
the run (``--resume``) or replaces it (``--overwrite``, which deletes those and nothing else of DIR).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

RUN_FILES = ("checkpoints", "metrics.jsonl", "profile")
EARLIER_PROFILE = "profile-before-resume-at-step{step}"  # a resumed run's --profile keeps the earlier one here
STARTING_PROFILE = "profile-starting"  # a resumed run's profile until the resume is known to train


def earlier_profiles(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob(EARLIER_PROFILE.format(step="*")))


def set_aside_profile(out_dir: str | Path, step: int) -> Path | None:
    """Before a resumed run profiles into ``out_dir/profile``: move what an earlier run recorded there to
    ``profile-before-resume-at-step<step>`` (its traces and records would otherwise be overwritten shard by shard).
    Returns the new place, or None when there was nothing to keep."""
    profile = Path(out_dir) / "profile"
    if not (profile.is_dir() and any(profile.iterdir())):
        return None
    kept = Path(out_dir) / EARLIER_PROFILE.format(step=step)
    if kept.exists():  # a second resume at the same step: keep every recording
        kept = Path(out_dir) / (kept.name + f"-{len(list(Path(out_dir).glob(kept.name + '*')))}")
    profile.rename(kept)
    return kept


def start_resumed_profile(out_dir: str | Path, step: int) -> Path | None:
    """A resume that loaded its checkpoint at ``step`` and trains: set the earlier profile aside
    (:func:`set_aside_profile`) and make the one recorded since the start (``STARTING_PROFILE``) ``profile``.
    Returns where the earlier one went, None when there was none. Call on one rank, the others waiting."""
    kept = set_aside_profile(out_dir, step)
    profile, starting = Path(out_dir) / "profile", Path(out_dir) / STARTING_PROFILE
    if profile.is_dir() and not any(profile.iterdir()):
        profile.rmdir()
    if starting.exists():
        starting.rename(profile)  # the files the all-to-all profiler has open move with it
    return kept


def discard_starting_profile(out_dir: str | Path, own_files: list[Path]) -> None:
    """A resume that was refused or has nothing to do: delete this rank's ``own_files`` in ``STARTING_PROFILE`` and
    their folders once every rank has (the last one to get here removes them; the earlier profile stays as it was).
    No listing of the folders: another rank may remove one while it is read."""
    starting = Path(out_dir) / STARTING_PROFILE
    for path in own_files:
        path.unlink(missing_ok=True)
        for folder in [parent for parent in path.parents if starting in (parent, *parent.parents)]:
            with contextlib.suppress(OSError):  # another rank's files still there, or the folder already gone
                folder.rmdir()


def run_files(out_dir: str | Path) -> list[str]:
    """The files and folders of a c2r-train run in ``out_dir`` (an empty ``checkpoints/`` is no run)."""
    out_dir = Path(out_dir)
    found = []
    for path in [out_dir / name for name in RUN_FILES] + earlier_profiles(out_dir):
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(path.name + ("/" if path.is_dir() else ""))
    return found


def check_out_dir(
    out_dir: str | Path, resume: bool, overwrite: bool, init_from: str | None = None, resumable: bool = True
) -> None:
    """Refuse to start a fresh run over an existing one. Call on every rank before any rank writes. ``resumable``:
    whether the command can continue a run (the message offers --resume only then)."""
    found = run_files(out_dir)
    if found and not (resume or overwrite):
        how = "continue it with --resume, or replace it" if resumable else "replace it"
        raise ValueError(
            f"{str(out_dir)!r} already holds a run ({', '.join(found)}); {how} with --overwrite (or choose another "
            "--out)"
        )
    source = Path(init_from).resolve() if init_from else None
    if overwrite and source and Path(out_dir).resolve() in (source, *source.parents):
        raise ValueError(f"--overwrite would delete the --init-from checkpoint {init_from!r}; choose another --out")


def clear_run(out_dir: str | Path) -> list[str]:
    """Delete the run in ``out_dir`` (its checkpoints, metrics and profile); returns what was there."""
    found = run_files(out_dir)
    for path in [Path(out_dir) / name for name in (*RUN_FILES, STARTING_PROFILE)] + earlier_profiles(Path(out_dir)):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return found
