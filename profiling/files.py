"""Writing files so that a crash never leaves a half-written one under the real name.

Each writer writes a temporary sibling (``<name>.tmp``, same directory, so the rename stays on one filesystem) and
renames it over the target with :func:`os.replace`, which is atomic on POSIX: a reader sees the old file or the new
one, never a mix. The temporary file is fsynced before the rename and the directory after it, so that after a
power loss or a kernel crash too the name holds the old file or the whole new one (a rename can reach the disk before
the data it names). The lowest layer owns these helpers, so ``placement/`` and ``c2r/`` import them from here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike


def fsync_path(path: str | Path) -> None:
    """Flush one file's or directory's data and metadata to the disk (a directory: the names in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under ``root`` (``root`` too). Any process may call it for files another
    process of its machine wrote (the page cache is the machine's); on a shared filesystem each machine flushes what
    its own processes wrote."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def atomic_save_npz(path: str | Path, arrays: dict[str, ArrayLike]) -> None:
    """``np.savez(path, **arrays)`` atomically. Through a file handle: given a name, ``np.savez`` would append
    ``.npz`` to the temporary one."""
    path = Path(path)
    if not path.parent.is_dir():  # else the error would name the temporary file
        raise FileNotFoundError(f"cannot write {path}: its directory {path.parent} does not exist")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
