"""C2R collaborator lists: for each MoE layer and expert, the other experts ordered by how often they fire together
(docs/algorithms.md section 2, step 1), made from a profiled top-k run and stored in one ``.npz`` file.

File format (``np.savez``): ``collaborators`` int64 [L, E, E] (row i = argsort(-C[i]) with C[i, i] = -1, so i itself
comes last; ties in index order), ``coactivation`` int64 [L, E, E] (the counts they came from) and ``meta`` (a JSON
string: source, tokens counted per layer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from profiling.files import atomic_save_npz


def collaborator_lists(coactivation_LEE: np.ndarray) -> np.ndarray:
    """[L, E, E] (or [E, E]) symmetric co-activation counts -> int64 [L, E, E] collaborator lists."""
    counts = np.array(coactivation_LEE, dtype=np.float64, copy=True)
    if counts.ndim == 2:
        counts = counts[None]
    if counts.ndim != 3 or counts.shape[1] != counts.shape[2]:
        raise ValueError(
            f"co-activation counts must be [E, E] or [L, E, E]; got shape {list(np.shape(coactivation_LEE))}"
        )
    num_experts = counts.shape[-1]
    counts[:, np.arange(num_experts), np.arange(num_experts)] = -1
    # Stable sort of -C: equal counts keep index order, so the lists are reproducible.
    return np.argsort(-counts, axis=-1, kind="stable").astype(np.int64)


def save_collaborators(path: str | Path, coactivation_LEE: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """Write the lists made from ``coactivation_LEE`` (and the counts) to ``path``; return the lists."""
    counts = np.asarray(coactivation_LEE)
    if counts.ndim == 2:
        counts = counts[None]
    lists = collaborator_lists(counts)
    path = Path(path)
    atomic_save_npz(path, {"collaborators": lists, "coactivation": counts.astype(np.int64), "meta": json.dumps(meta)})
    return lists


def load_collaborators(path: str | Path, layer_index: int, num_experts: int) -> np.ndarray:
    """The [E, E] lists of MoE layer ``layer_index``, checked against the model's expert count."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"C2R collaborator lists {str(path)!r} do not exist (make them with c2r-route)")
    try:
        with np.load(path) as data:
            lists = data["collaborators"]
    except (KeyError, ValueError, OSError) as error:
        raise ValueError(f"{path} is not a collaborator-list file from c2r-route: {error}") from None
    if lists.ndim != 3 or lists.shape[1:] != (num_experts, num_experts):
        raise ValueError(
            f"{path} holds collaborator lists of shape {list(lists.shape)}; this model has {num_experts} experts "
            f"(expected [L, {num_experts}, {num_experts}])"
        )
    if layer_index >= lists.shape[0]:
        raise ValueError(
            f"{path} holds lists for {lists.shape[0]} MoE layers; this model has at least {layer_index + 1}"
        )
    layer = lists[layer_index]
    if not (np.sort(layer, axis=1) == np.arange(num_experts)).all():
        raise ValueError(f"{path}: layer {layer_index}'s lists are not permutations of 0..{num_experts - 1}")
    return layer
