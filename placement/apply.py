"""Applying a placement plan to a DeepSpeed checkpoint written by ``c2r-train``, without changing the model.

DeepSpeed names each expert file by the expert's *physical* slot (``layer_<l>_expert_<ep_rank * E/R + slot>``) and
loads file ``p`` into slot ``p`` of rank ``p // (E/R)``. Moving logical expert ``e`` from one rank to another is
therefore a rename of its file (and of the slot id inside the keys) from its old physical id to its new one; the
model computes exactly the same function afterwards (tests/test_placement_apply.py checks outputs).

ZeRO's optimizer state is a flat partition of each rank's expert parameters in slot order, so moved experts would
silently inherit another expert's Adam moments. ``apply`` does not copy it: the new checkpoint says so in
``c2r_config.json`` and ``c2r-train --resume`` then loads the weights only (fresh moments, the same step and
learning-rate schedule). Remapping the moments is not implemented yet.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from c2r.deepspeed.checkpoint import CONFIG_FILE, LATEST, latest_tag, recorded_layouts
from c2r.parallel import ExpertLayout
from placement.plan import Plan

EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_(mp_rank_\d+)_model_states\.pt")
OPTIMIZER_FILE = re.compile(r".*optim_states\.pt")
KEY_SLOT = re.compile(r"(deepspeed_experts\.)(\d+)(\.)")


def apply_plan(
    plan: Plan,
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    tag: str | None = None,
    plan_path: str | None = None,
) -> Path:
    """Write ``out_dir/<tag>``: ``checkpoint_dir/<tag>`` with every expert moved to its rank under ``plan``."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    tag = tag or latest_tag(checkpoint_dir)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir} (no '{LATEST}' file; pass --tag)")
    src = checkpoint_dir / tag
    if not (src / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{src} has no {CONFIG_FILE}: not a c2r-train checkpoint")
    run_config = json.loads((src / CONFIG_FILE).read_text())
    old = recorded_layouts(run_config)
    new = plan_layouts_for(plan, run_config, len(old))
    dst = out_dir / tag
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; choose another --out")
    tmp = out_dir / f".{tag}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in tqdm(sorted(src.iterdir()), desc="applying plan", unit="file"):
        _copy_one(path, tmp, old, new)
    run_config["expert_layouts"] = [list(layout.expert_to_rank) for layout in new]
    run_config["placement_plan"] = plan_path
    run_config["optimizer_state"] = "dropped by c2r-place apply (ZeRO partitions are in slot order)"
    (tmp / CONFIG_FILE).write_text(json.dumps(run_config, indent=2))
    os.replace(tmp, dst)  # the new checkpoint appears whole or not at all
    latest = out_dir / LATEST
    latest.with_name(LATEST + ".tmp").write_text(tag)
    os.replace(latest.with_name(LATEST + ".tmp"), latest)
    return dst


def plan_layouts_for(plan: Plan, run_config: dict[str, Any], num_layers: int) -> list[ExpertLayout]:
    ep_size, num_experts = run_config["train"]["ep_size"], run_config["model"]["moe"]["num_experts"]
    checks = {
        "num_layers": (plan.num_layers, num_layers),
        "num_experts": (plan.num_experts, num_experts),
        "num_ranks": (plan.num_ranks, ep_size),
    }
    wrong = [
        f"{k}={mine} in the plan, {theirs} in the checkpoint" for k, (mine, theirs) in checks.items() if mine != theirs
    ]
    if wrong:
        raise ValueError("the plan does not fit the checkpoint: " + "; ".join(wrong))
    return [ExpertLayout(tuple(int(r) for r in row), ep_size) for row in plan.expert_to_rank]


def _copy_one(path: Path, dst_dir: Path, old: list[ExpertLayout], new: list[ExpertLayout]) -> None:
    match = EXPERT_FILE.fullmatch(path.name)
    if OPTIMIZER_FILE.fullmatch(path.name) or path.name == CONFIG_FILE:
        return
    if match is None:
        shutil.copy2(path, dst_dir / path.name)
        return
    layer, old_slot, mp = int(match[1]), int(match[2]), match[3]
    expert = old[layer].physical_to_logical[old_slot]
    new_slot = int(new[layer].logical_to_physical[expert])
    state = torch.load(path, map_location="cpu", weights_only=False)
    renamed = {KEY_SLOT.sub(lambda m: f"{m[1]}{new_slot}{m[3]}", key, count=1): value for key, value in state.items()}
    torch.save(renamed, dst_dir / f"layer_{layer}_expert_{new_slot}_{mp}_model_states.pt")
