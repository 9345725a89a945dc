"""A stale build lock of DeepSpeed's CPU op (c2r/deepspeed/setup.py `warn_if_op_build_is_locked`): a run killed
while DeepSpeed builds it leaves a lock file that makes every later CPU run wait silently; c2r-train says so, once per
machine, naming the file, and says nothing for a fresh lock (a build going on) or none."""

import logging
import os
import time

from c2r.deepspeed.setup import SHM_OP, warn_if_op_build_is_locked


def warnings_for(caplog) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="c2r.deepspeed.setup"):
        warn_if_op_build_is_locked()
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_stale_op_build_lock_is_named_once_per_machine(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert warnings_for(caplog) == []  # no lock
    lock = tmp_path / SHM_OP / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)  # torch makes the folder when asked for its name
    lock.touch()
    assert warnings_for(caplog) == []  # a build going on now
    old = time.time() - 3600
    os.utime(lock, (old, old))
    [warning] = warnings_for(caplog)
    assert str(lock) in warning and "60 minutes ago" in warning and "delete the file" in warning
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert warnings_for(caplog) == []  # the machine's other ranks stay quiet
