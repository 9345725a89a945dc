"""``c2r-place apply``: a plan's layouts onto a c2r-train checkpoint, without changing the model.

Without replicas on either side, experts only move between the ranks' files (`c2r.deepspeed.move_experts`).
Creating or removing replicas changes how many slots a rank holds, hence the size of its experts' optimizer
partitions: those are rebuilt the way ``c2r-place reshard`` does (`c2r.deepspeed.reshard`), at the same world size and
ep_size. This module sits above both, so neither imports the other's caller.
"""

from __future__ import annotations

import json
from pathlib import Path

from c2r.deepspeed.checkpoint import CONFIG_FILE, latest_tag, recorded_layouts
from c2r.deepspeed.move_experts import REMAPPED, check_layouts_fit, check_out_dir, move_experts
from c2r.deepspeed.reshard import reshard, saved_world_size
from placement.layout import ExpertLayout


def apply_plan(
    layouts: list[ExpertLayout],
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    tag: str | None = None,
    plan_path: str | None = None,
) -> Path:
    """Write ``out_dir/<tag>``: the checkpoint with its experts placed by ``layouts`` (one per MoE layer), weights
    and optimizer state moved, copied or dropped with the replicas (module docstring)."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    tag = tag or latest_tag(checkpoint_dir)
    src = checkpoint_dir / tag if tag else None
    if src is not None and (src / CONFIG_FILE).exists():
        run_config = json.loads((src / CONFIG_FILE).read_text())
        old = recorded_layouts(run_config)
        if any(layout.is_replicated for layout in [*old, *layouts]):
            check_out_dir(out_dir, checkpoint_dir, src)
            new = check_layouts_fit(layouts, run_config, len(old))
            world = saved_world_size(src)
            return reshard(
                checkpoint_dir, out_dir, world, old[0].num_ranks, new, tag, plan_path, "c2r-place apply", REMAPPED
            )
    return move_experts(layouts, checkpoint_dir, out_dir, tag, plan_path)
