"""Writing files so that a crash never leaves a half-written one under the real name.

Each writer writes a temporary sibling (``<name>.tmp``, same directory, so the rename stays on one filesystem) and
renames it over the target with :func:`os.replace`, which is atomic on POSIX: a reader sees the old file or the new
one, never a mix. The lowest layer owns these helpers, so ``placement/`` and ``c2r/`` import them from here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save_npz(path: str | Path, arrays: dict[str, ArrayLike]) -> None:
    """``np.savez(path, **arrays)`` atomically. Through a file handle: given a name, ``np.savez`` would append
    ``.npz`` to the temporary one."""
    path = Path(path)
    if not path.parent.is_dir():  # else the error would name the temporary file
        raise FileNotFoundError(f"cannot write {path}: its directory {path.parent} does not exist")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
