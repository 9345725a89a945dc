"""The atomic writers leave the target whole and no temporary file behind."""

from __future__ import annotations

import numpy as np

from profiling.files import atomic_save_npz, atomic_write_text


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
