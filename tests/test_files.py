"""The atomic writers leave the target whole and no temporary file behind, and flush it to the disk before the
rename names it."""

from __future__ import annotations

import os

import numpy as np

from profiling import files
from profiling.files import atomic_save_npz, atomic_write_text, fsync_tree


def record_fsyncs_and_renames(monkeypatch) -> list[tuple[str, str]]:
    """Patch the writers' os.fsync / os.replace (through ``monkeypatch.setattr``, or any function of the same
    signature) to log ("fsync", path) and ("replace", target) in the order they happen."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    return events


def test_atomic_write_text_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "latest"
    path.write_text("old")
    atomic_write_text(path, "global_step7")
    assert path.read_text() == "global_step7"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_atomic_save_npz_keeps_the_name_it_is_given(tmp_path):
    # np.savez would append ".npz" to a temporary name; the helper must still end with exactly ``path``.
    path = tmp_path / "lists.npz"
    atomic_save_npz(path, {"a": np.arange(3), "meta": '{"source": "test"}'})
    with np.load(path) as data:
        assert data["a"].tolist() == [0, 1, 2] and str(data["meta"]) == '{"source": "test"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lists.npz"]


def test_the_writers_flush_the_data_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    # A rename can reach the disk before the data it names: after a power loss "latest" would name an empty file.
    events = record_fsyncs_and_renames(monkeypatch)
    atomic_write_text(tmp_path / "latest", "step7")
    atomic_save_npz(tmp_path / "a.npz", {"a": np.arange(3)})
    d = str(tmp_path)
    assert events == [
        ("fsync", f"{d}/latest.tmp"), ("replace", f"{d}/latest"), ("fsync", d),
        ("fsync", f"{d}/a.npz.tmp"), ("replace", f"{d}/a.npz"), ("fsync", d),
    ]  # fmt: skip


def test_fsync_tree_flushes_every_file_and_directory(tmp_path, monkeypatch):
    (tmp_path / "tag" / "experts").mkdir(parents=True)
    for name in ("tag/model.pt", "tag/experts/e0.pt", "tag/experts/e1.pt"):
        (tmp_path / name).write_text(name)
    events = record_fsyncs_and_renames(monkeypatch)
    fsync_tree(tmp_path / "tag")
    flushed = {path.removeprefix(str(tmp_path) + "/") for _, path in events}
    assert flushed == {"tag", "tag/model.pt", "tag/experts", "tag/experts/e0.pt", "tag/experts/e1.pt"}
