"""Streaming reads from a Hugging Face safetensors checkpoint (one file, or shards with an index json).

Tensors are read one at a time (``safe_open``); expert tensors one expert at a time (``get_tensor`` of a per-expert
key, ``get_slice`` of a fused one), so a rank never holds experts it does not own. ``stats`` counts what was read.
"""

from __future__ import annotations

import json
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("pytorch_model*.bin", "pytorch_model*.bin.index.json", "*.pth", "*.pt")  # torch.save'd weights


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """key -> shard file; empty when the directory holds no safetensors weights (a config alone)."""
    index = model_dir / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: model_dir / name for key, name in weight_map.items()}
    files: dict[str, Path] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            files.update(dict.fromkeys(f.keys(), path))
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in model_dir.glob(pattern))
    if not files and pickled:
        # without this check a directory of .bin weights would look like a config alone: a random model
        named = ", ".join(pickled[:3]) + (" ..." if len(pickled) > 3 else "")
        raise ValueError(
            f"{model_dir} holds weights as {named}, not safetensors; "
            "c2r reads safetensors only: save them once with transformers "
            "(AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir))"
        )
    return files


class SafetensorsCheckpoint:
    """Open shards lazily; ``get`` / ``get_expert`` read one tensor (or one expert's rows of a fused tensor)."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.files = checkpoint_files(self.model_dir)
        self.stats: Counter[str] = Counter()
        self._stack = ExitStack()
        self._open: dict[Path, object] = {}

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc_info) -> None:
        self._stack.close()

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def _handle(self, key: str):
        path = self.files[key]
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._open[path]

    def get(self, key: str) -> torch.Tensor:
        self.stats["tensors_read"] += 1
        return self._handle(key).get_tensor(key)

    def get_expert(self, key: str, expert: int | None = None) -> torch.Tensor:
        """A per-expert tensor (``expert`` None) or row ``expert`` of a fused [E, ...] tensor; counted as one
        expert matrix materialised."""
        tensor = self._handle(key).get_tensor(key) if expert is None else self._handle(key).get_slice(key)[expert]
        self.stats["expert_matrices_read"] += 1
        self.stats["expert_elements_read"] += tensor.numel()
        return tensor
