"""Which file of a ``c2r-train`` checkpoint holds each expert slot's weights: a replicated expert is stored once.

DeepSpeed writes one file per physical slot, ``layer_<l>_expert_<physical>_mp_rank_<mp>_model_states.pt``, and reads
file ``p`` back into slot ``p``. Unreplicated layouts keep exactly that (DeepSpeed's own layout, loadable by DeepSpeed
alone). In a replicated layout (``placement.layout.ExpertLayout.replicas``) the copies of an expert are identical
(``c2r.parallel.replicas.ReplicaGradSum``), so the checkpoint holds each logical expert once, in the file of its home
slot (``ExpertLayout.logical_to_physical``): a replica slot's file is not written, and reading a replica slot reads its
expert's home file (:func:`stored_slot`). :class:`OneFilePerExpert` does this around DeepSpeed's own save and load by
wrapping the engine's checkpoint engine (DeepSpeed's pluggable save/load interface, through which every expert file
passes); the offline readers (``c2r-place apply`` and ``reshard``, ``c2r-export-hf``) call :func:`stored_slot`.
Checkpoints written before this, with a file per replica slot, still load: those files are simply not read.

Optimizer state is stored per copy. Each rank's optimizer file (a ZeRO-1/2 partition file per rank, or under ZeRO 0 an
``expp_rank_<p>`` file per EP rank) holds the fp32 masters and Adam moments of all its slots, replicas included, and
DeepSpeed loads each rank's file as it is; storing a replica's rows once would mean cutting and re-assembling those
partitions on every save and load. The copies' optimizer rows are bit-identical (same summed gradient, same update),
which ``c2r-place apply`` checks for the fp32 masters against the one weight file (``OptimizerRemap._check_master``).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from placement.layout import ExpertLayout

EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_(mp_rank_\d+)_model_states\.pt")
KEY_SLOT = re.compile(r"(deepspeed_experts\.)(\d+)(\.)")  # the physical id inside an expert file's keys


def expert_file_name(layer: int, physical: int, mp: str = "mp_rank_00") -> str:
    return f"layer_{layer}_expert_{physical}_{mp}_model_states.pt"


def stored_slot(layout: ExpertLayout, physical: int) -> int:
    """The physical slot whose file holds slot ``physical``'s weights: its logical expert's home slot (itself when
    unreplicated)."""
    return int(layout.logical_to_physical[layout.physical_to_logical[physical]])


def rename_slot(state: dict, physical: int) -> dict:
    """An expert file's tensors with the physical id in their keys set to ``physical``."""
    return {KEY_SLOT.sub(lambda m: f"{m[1]}{physical}{m[3]}", key, count=1): value for key, value in state.items()}


def check_expert_files(tag_dir: str | Path, layouts: list[ExpertLayout]) -> None:
    """Refuse, in one line naming them, a checkpoint that lacks the weight file of a logical expert."""
    tag_dir = Path(tag_dir)
    missing = [
        f"layer {layer} expert {expert} ({expert_file_name(layer, int(home))})"
        for layer, layout in enumerate(layouts)
        for expert, home in enumerate(layout.logical_to_physical)
        if not (tag_dir / expert_file_name(layer, int(home))).exists()
    ]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"checkpoint {tag_dir} has no weights for {shown}: incomplete or not a c2r checkpoint")


class OneFilePerExpert(CheckpointEngine):
    """DeepSpeed's checkpoint engine ``inner``, except for the expert files of replica slots under ``layouts`` (one
    per MoE layer, in DeepSpeed's MoE layer order): ``save`` skips them, ``load`` reads the home copy's file instead
    (keys renamed to the slot asked for, as DeepSpeed then maps them to its local slot). Everything else passes
    through."""

    def __init__(self, inner: CheckpointEngine, layouts: list[ExpertLayout]):
        super().__init__()
        self.inner, self.layouts = inner, layouts
        self.name = getattr(inner, "name", None)

    def _home(self, path) -> tuple[int, str] | None:
        """(home slot, home file path) when ``path`` is the expert file of a replica slot; else None."""
        match = EXPERT_FILE.fullmatch(os.path.basename(path))
        if match is None or int(match[1]) >= len(self.layouts):
            return None
        layer, physical = int(match[1]), int(match[2])
        layout = self.layouts[layer]
        if physical >= layout.num_slots or (home := stored_slot(layout, physical)) == physical:
            return None
        return home, os.path.join(os.path.dirname(path), expert_file_name(layer, home, match[3]))

    def save(self, state_dict, path: str):
        if self._home(path) is None:
            return self.inner.save(state_dict, path)
        return None  # a replica: its home copy's file holds the same weights

    def load(self, path: str, map_location=None):
        home = self._home(path)
        if home is None:
            return self.inner.load(path, map_location=map_location)
        physical = int(EXPERT_FILE.fullmatch(os.path.basename(path))[2])
        return rename_slot(self.inner.load(home[1], map_location=map_location), physical)

    # the rest of DeepSpeed's CheckpointEngine interface, passed through
    def create(self, info):
        return self.inner.create(info)

    def commit(self, info):
        return self.inner.commit(info)

    def makedirs(self, path, exist_ok=False):
        return self.inner.makedirs(path, exist_ok=exist_ok)

    def is_data_parallel_writer(self, dp_rank):
        return self.inner.is_data_parallel_writer(dp_rank)

    def is_decoupled(self):
        return self.inner.is_decoupled()

    def set_commit_info(self, info):
        return self.inner.set_commit_info(info)

    def get_commit_info(self):
        return self.inner.get_commit_info()

    def cleanup(self):
        return self.inner.cleanup()

    def preserves_storage_sharing(self):
        return self.inner.preserves_storage_sharing()

    def __getattr__(self, name):  # engine-specific extras (e.g. a decoupled engine's own methods)
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


@contextlib.contextmanager
def one_file_per_expert(engine, layouts: list[ExpertLayout]):
    """Within the block, ``engine``'s checkpoint saves and loads store each logical expert once (module docstring).
    Without replicas the engine is left alone: DeepSpeed's own files, byte for byte."""
    if not any(layout.is_replicated for layout in layouts):
        yield
        return
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = OneFilePerExpert(inner, layouts)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner
