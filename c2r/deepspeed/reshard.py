"""Resharding a ``c2r-train`` DeepSpeed checkpoint to another number of ranks (world size) and expert-parallel size,
under the same or a new placement, weights and optimizer state included (``c2r-place reshard``).

DeepSpeed's universal checkpoints do not support MoE, and its ZeRO loader re-partitions the dense optimizer state for
another data-parallel size only in its elastic mode, which indexes the expert groups' files with the *new* world's
ranks (wrong as soon as the world size changes). So the new checkpoint is written as DeepSpeed itself would have
written it at the new size, and loads with the ordinary ``--resume``:

* Expert files are named by physical id (``layer_<l>_expert_<ep_rank * E/R + slot>``): each is renamed from its
  physical id under the old layout to the one under the new layout, as ``c2r-place apply`` does
  (``move_experts``). There are E files per layer at any ep_size, replicated or not (a replicated expert's weights
  are stored once, under its home slot: ``c2r.deepspeed.expert_files``).
* ZeRO-1/2 (``zero_pp_rank_<r>_mp_rank_00_optim_states.pt``, one per rank). A param group is one flat buffer of its
  parameters in group order, padded at the end to a multiple of ``2 * dp`` and cut into ``dp`` equal partitions
  (DeepSpeed 0.19.8 ``stage_1_and_2.py``: ``nccl_start_alignment_factor`` 2, no per-parameter alignment). Dense
  groups are partitioned over all ranks; an expert group over its EP rank's expert-data-parallel ranks
  (``p, p + R, p + 2R, ...``), and its flat buffer stacks that EP rank's experts. Resharding rebuilds each group's
  whole flat buffer from the old partitions (the fp32 master and every Adam moment), moves the expert rows to their
  new ranks (``move_rows``), and cuts the buffers again for the new sizes: new partitions, paddings,
  ``param_slice_mappings`` and expert group names (``ep_size_<R>``). Files are written in DeepSpeed's rigid format.
* No ZeRO (``expp_rank_<p>_mp_rank_00_optim_states.pt``, one per EP rank): the whole torch optimizer (or DeepSpeed's
  unfused 16-bit wrapper) of EP rank ``p``; dense state is the same in every file, the expert parameters' state is
  moved row by row to the new EP ranks' files.
* ``mp_rank_00_model_states.pt`` records the data-parallel size DeepSpeed reads the ZeRO files by, the expert
  parameters' shapes and (stage 0) rank 0's optimizer: all rewritten for the new size.

Before anything moves, the fp32 masters are checked against the expert weight files (as ``c2r-place apply`` does);
an optimizer layout this module does not know (an elastic ZeRO checkpoint, DeepSpeed's BF16_Optimizer or fused fp16
optimizer, per-parameter alignment padding) is dropped and flagged in ``c2r_config.json``, and ``--resume`` then
loads the weights with fresh Adam moments. The new run config keeps the global batch: ``train.batch_size`` becomes
the old global batch over the new world size (the batch sampler draws one global batch per step and gives each rank
its slice: ``c2r.data.BatchSampler``). tests/test_reshard.py checks that resumed runs follow uninterrupted ones.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from c2r.deepspeed.checkpoint import CONFIG_FILE, LATEST, latest_tag, recorded_layouts
from c2r.deepspeed.expert_files import check_expert_files
from c2r.deepspeed.moe_layer import expert_group_name
from c2r.deepspeed.move_experts import (
    BASE_STATE,
    EXPP_FILE,
    FP32_PARTITIONS,
    MODEL_FILE,
    OPTIMIZER_FILE,
    SLICES,
    ZERO_FILE,
    OptimizerRemap,
    UnsupportedOptimizerState,
    _copy_one,
    begin_checkpoint,
    check_out_dir,
    load_zero_states,
    publish_checkpoint,
)
from placement.layout import ExpertLayout, require_divides

log = logging.getLogger("c2r.deepspeed.reshard")

RESHARDED = "resharded by c2r-place reshard"
ALIGNMENT = 2  # DeepSpeed ZeRO-1/2's nccl_start_alignment_factor: a flat group is padded to a multiple of 2 * dp
GROUP_PADDINGS, PARAM_PADDINGS, PARTITION_COUNT = "group_paddings", "param_alignment_paddings", "partition_count"


def saved_world_size(tag_dir: Path) -> int:
    """The number of ranks a checkpoint was saved from (DeepSpeed records its data-parallel size)."""
    state = torch.load(tag_dir / MODEL_FILE, map_location="cpu", weights_only=False, mmap=True)
    return int(state["dp_world_size"])


def reshard(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    world_size: int,
    ep_size: int,
    layouts: list[ExpertLayout] | None = None,
    tag: str | None = None,
    plan_path: str | None = None,
    tool: str = "c2r-place reshard",
    done: str = RESHARDED,
) -> Path:
    """Write ``out_dir/<tag>``: ``checkpoint_dir/<tag>`` for ``world_size`` ranks with experts over ``ep_size`` of
    them, placed by ``layouts`` (one per MoE layer, e.g. a plan's; default contiguous), its weights and optimizer
    state moved (module docstring). ``plan_path`` is recorded in the new run config. Replicated layouts (old or new)
    work too: each new slot gets its expert's home copy, so resharding to contiguous layouts collapses replicas.
    ``tool`` / ``done``: who is writing (``c2r-place apply`` uses this path when replicas change the slots per
    rank) and what the run config's ``optimizer_state`` then says."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    tag = tag or latest_tag(checkpoint_dir)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint in {str(checkpoint_dir)!r} (no '{LATEST}' file; pass --tag)")
    src = checkpoint_dir / tag
    check_out_dir(out_dir, checkpoint_dir, src)
    if not (src / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{src} has no {CONFIG_FILE}: not a c2r-train checkpoint")
    run_config = json.loads((src / CONFIG_FILE).read_text())
    old = recorded_layouts(run_config)
    num_experts = run_config["model"]["moe"]["num_experts"]
    require_divides(ep_size, "ep_size", world_size, "the world size")
    new = new_layouts(layouts, len(old), num_experts, ep_size)
    if not any(layout.is_replicated for layout in new):
        require_divides(ep_size, "ep_size", num_experts, "num_experts")
    require_same_slots(old, "the checkpoint's expert_layouts")
    require_same_slots(new, "the plan")
    check_expert_files(src, old)
    old_world = saved_world_size(src)
    dst, tmp = begin_checkpoint(out_dir, tag)
    files = sorted(src.iterdir())
    optimizer_files = [p for p in files if OPTIMIZER_FILE.fullmatch(p.name)]
    for path in tqdm(files, desc="resharding", unit="file"):
        if path not in optimizer_files and path.name not in (CONFIG_FILE, MODEL_FILE):
            _copy_one(path, tmp, old, new)
    model_state = torch.load(src / MODEL_FILE, map_location="cpu", weights_only=False)
    try:
        if str(run_config.get("optimizer_state", "")).startswith("dropped"):
            raise UnsupportedOptimizerState("the source checkpoint's optimizer state was already dropped")
        resharder = OptimizerReshard(src, tmp, old, new, old_world, world_size)
        rank0_optimizer = resharder.run(optimizer_files)
        run_config["optimizer_state"] = done
    except UnsupportedOptimizerState as why:
        for path in optimizer_files:
            (tmp / path.name).unlink(missing_ok=True)
        rank0_optimizer = None
        run_config["optimizer_state"] = (
            f"dropped by {tool}: {why}; --resume loads the weights with fresh optimizer moments"
        )
        log.warning("optimizer state not carried over: %s", why)
    torch.save(resized_model_state(model_state, world_size, old[0], new[0], rank0_optimizer), tmp / MODEL_FILE)
    (tmp / CONFIG_FILE).write_text(json.dumps(resized_run_config(run_config, old_world, world_size, new, plan_path)))
    return publish_checkpoint(tmp, dst)


def require_same_slots(layouts: list[ExpertLayout], what: str) -> None:
    """The optimizer files stack every MoE layer's experts alike: one number of slots per rank for all layers."""
    slots = [layout.experts_per_rank for layout in layouts]
    if len(set(slots)) > 1:
        raise ValueError(
            f"{what} give the MoE layers different numbers of expert slots per rank ({slots}); checkpoints can only "
            "be moved between layouts with the same number of slots per rank in every layer (same --replicas)"
        )


def new_layouts(
    layouts: list[ExpertLayout] | None, num_layers: int, num_experts: int, ep_size: int
) -> list[ExpertLayout]:
    """``layouts`` when they fit the checkpoint's model at ``ep_size``, contiguous ones when None; else an error."""
    if layouts is None:
        return [ExpertLayout.contiguous(num_experts, ep_size)] * num_layers
    checks = {
        "num_layers": (len(layouts), num_layers),
        "num_experts": (layouts[0].num_experts, num_experts),
        "num_ranks": (layouts[0].num_ranks, ep_size),
    }
    wrong = [f"{k}={mine} in the plan, {theirs} wanted" for k, (mine, theirs) in checks.items() if mine != theirs]
    if wrong:
        raise ValueError("the plan does not fit the resharded checkpoint: " + "; ".join(wrong))
    return layouts


def resized_run_config(
    run_config: dict[str, Any], old_world: int, world_size: int, layouts: list[ExpertLayout], plan_path: str | None
) -> dict[str, Any]:
    """The run config of the new checkpoint: its ep_size, placement, world size and per-rank batch (the same global
    batch, when it splits evenly over the new ranks)."""
    config = copy.deepcopy(run_config)
    train = config["train"]
    global_batch = train["batch_size"] * old_world
    if global_batch % world_size:
        log.warning(
            "the global batch (%d = %d per rank x %d ranks) does not split over %d ranks; keeping %d per rank",
            global_batch,
            train["batch_size"],
            old_world,
            world_size,
            train["batch_size"],
        )
    else:
        train["batch_size"] = global_batch // world_size
    train["ep_size"] = layouts[0].num_ranks
    config["world_size"] = world_size
    config["expert_layouts"] = [layout.to_json() for layout in layouts]
    config["placement_plan"] = plan_path
    train["placement_plan"] = plan_path  # the setting too: a resume with --config must not bring back the old plan
    return config


def resized_model_state(
    state: dict[str, Any], world_size: int, old: ExpertLayout, new: ExpertLayout, rank0_optimizer: dict | None
) -> dict[str, Any]:
    """``mp_rank_00_model_states.pt`` for the new size: the data-parallel size DeepSpeed finds the ZeRO files by, the
    expert parameters' stacked shapes (``param_shapes``), rank 0's optimizer (stage 0)."""
    state = dict(state)
    state["dp_world_size"] = world_size
    shapes = []
    for group in state.get("param_shapes") or []:
        resized = type(group)()
        for name, shape in group.items():
            if ".deepspeed_moe.experts." in name:  # stacked [E/R * F, D]
                shape = torch.Size((shape[0] // old.experts_per_rank * new.experts_per_rank, *shape[1:]))
            resized[name] = shape
        shapes.append(resized)
    state["param_shapes"] = shapes
    if state.get("optimizer") is not None:
        state["optimizer"] = rank0_optimizer
    return state


class OptimizerReshard(OptimizerRemap):
    """Writes the optimizer files of ``src`` (saved from ``old_world`` ranks under the ``old`` layouts) into ``dst``
    for ``new_world`` ranks under the ``new`` layouts (module docstring). Sources are read copy-on-write; an
    :class:`UnsupportedOptimizerState` raised on the way leaves the source untouched."""

    def __init__(self, src: Path, dst: Path, old: list[ExpertLayout], new: list[ExpertLayout], old_world, new_world):
        super().__init__(src, dst, old, new)
        self.old_world, self.new_world, self.new_ep = old_world, new_world, new[0].num_ranks

    @torch.no_grad()  # the saved fp32 partitions are leaves that require grad
    def run(self, optimizer_files: list[Path]) -> dict[str, Any] | None:
        """Write the new optimizer files; return rank 0's optimizer state for the model states file (stage 0)."""
        if not optimizer_files:
            raise UnsupportedOptimizerState("the checkpoint has no optimizer files")
        names = [p.name for p in optimizer_files]
        zero = [ZERO_FILE.fullmatch(n) for n in names]
        expp = [EXPP_FILE.fullmatch(n) for n in names]
        if all(zero) and all(m[1] is None and m[3] == "00" for m in zero):
            return self._zero(sorted(optimizer_files, key=lambda p: int(ZERO_FILE.fullmatch(p.name)[2])))
        if all(expp) and all(m[2] == "00" for m in expp):
            return self._stage0(sorted(optimizer_files, key=lambda p: int(EXPP_FILE.fullmatch(p.name)[1])))
        raise UnsupportedOptimizerState(
            f"optimizer files of a layout reshard does not know (e.g. DeepSpeed's BF16_Optimizer): {', '.join(names)}"
        )

    def _group_name(self, name: str) -> str:
        return name.replace(expert_group_name(self.ep), expert_group_name(self.new_ep))

    # -- ZeRO-1/2 -------------------------------------------------------------------------------------------------

    def _zero(self, paths: list[Path]) -> None:
        if [int(ZERO_FILE.fullmatch(p.name)[2]) for p in paths] != list(range(self.old_world)):
            raise UnsupportedOptimizerState(
                f"{len(paths)} ZeRO partition files for a checkpoint saved from {self.old_world} ranks"
            )
        files, sds = load_zero_states(paths)
        for path, sd in zip(paths, sds):
            if not isinstance(sd[BASE_STATE], dict):
                raise UnsupportedOptimizerState(f"{path.name} is an elastic ZeRO checkpoint")
            if any(any(paddings) for paddings in sd.get(PARAM_PADDINGS, [])):
                raise UnsupportedOptimizerState(f"{path.name} pads parameters for alignment (parameter_alignment)")
        new_sds = [self._new_zero_state(sds[0]) for _ in range(self.new_world)]
        for group, param_group in enumerate(sds[0][BASE_STATE]["param_groups"]):
            if param_group.get("moe"):
                flats, order = self._expert_flats(sds, group, paths)
            else:
                order = self._group_order(sds, range(self.old_world), group)
                flats = [self._flat(sds, range(self.old_world), group, order, paths)]
            scalars = {
                key: value
                for key, value in sds[0][BASE_STATE]["state"].get(group, {}).items()
                if not torch.is_tensor(value) or value.dim() == 0
            }
            self._cut(new_sds, group, flats, order, scalars)
        for rank, sd in enumerate(new_sds):
            torch.save(
                {**files[0], "optimizer_state_dict": sd}, self.dst / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            )
        return None

    def _new_zero_state(self, template: dict[str, Any]) -> dict[str, Any]:
        """A new rank's ZeRO state: the template's global state (loss scaler, clipping, stage), per-group lists to
        fill, and the param groups with the new expert group names."""
        groups = len(template[FP32_PARTITIONS])
        param_groups = [dict(g) for g in template[BASE_STATE]["param_groups"]]
        for g in param_groups:
            g["name"] = self._group_name(g["name"])
        return {
            **template,
            BASE_STATE: {"state": {}, "param_groups": param_groups},
            FP32_PARTITIONS: [None] * groups,
            GROUP_PADDINGS: [0] * groups,
            PARTITION_COUNT: [0] * groups,
            SLICES: [None] * groups,
        }

    @staticmethod
    def _group_order(sds: list[dict], ranks: range, group: int) -> list[tuple[str, int]]:
        """The group's parameters in flat order, with their sizes, from the fragments of the partitions ``ranks``."""
        numel: dict[str, int] = {}
        for r in ranks:
            for name, address in sds[r][SLICES][group].items():
                numel[name] = numel.get(name, 0) + address.numel
        return list(numel.items())

    def _flat(self, sds, ranks: range, group: int, order, paths) -> dict[str, torch.Tensor]:
        """The group's whole flat buffer, without padding, per state key ("fp32": the master), from the partitions
        ``ranks`` (in partition order)."""
        buffers = [self._zero_buffers(sds[r], group, paths[r].name) for r in ranks]
        if len({tuple(sorted(b)) for b in buffers}) != 1:
            raise UnsupportedOptimizerState(f"param group {group} holds different state keys on different ranks")
        flat = {key: torch.cat([b[key][: b["fp32"].numel()] for b in buffers]) for key in buffers[0]}
        total = sum(n for _, n in order)
        if flat["fp32"].numel() != total:
            raise UnsupportedOptimizerState(
                f"param group {group}: {flat['fp32'].numel()} elements in the partitions, its parameters have {total}"
            )
        return flat

    def _expert_flats(self, sds, group: int, paths) -> tuple[list[dict[str, torch.Tensor]], list[tuple[str, int]]]:
        """An expert group's flat buffers of the new EP ranks, and its parameter order with the new sizes."""
        order = self._group_order(sds, range(0, self.old_world, self.ep), group)
        unknown = [name for name, _ in order if name not in self.by_name]
        if unknown:
            raise UnsupportedOptimizerState(f"param group {group} mixes expert and other parameters: {unknown}")
        per_ep = [self._flat(sds, range(p, self.old_world, self.ep), group, order, paths) for p in range(self.ep)]
        moved: dict[str, list[list[torch.Tensor]]] = {key: [[] for _ in range(self.new_ep)] for key in per_ep[0]}
        for key in per_ep[0]:
            pieces = [flat[key].split([n for _, n in order]) for flat in per_ep]
            for index, (name, _) in enumerate(order):
                full = [pieces[p][index] for p in range(self.ep)]
                if key == "fp32":
                    for p in range(self.ep):
                        self._check_master(self.by_name[name], p, full[p], f"the ZeRO partitions of EP rank {p}")
                for q, value in enumerate(self._move(self.by_name[name], full)):
                    moved[key][q].append(value.reshape(-1))
        flats = [{key: torch.cat(moved[key][q]) for key in moved} for q in range(self.new_ep)]
        scale = self.new[0].experts_per_rank, self.local
        return flats, [(name, n // scale[1] * scale[0]) for name, n in order]

    def _cut(self, new_sds, group: int, flats, order, scalars: dict[str, Any]) -> None:
        """Partition the group's flat buffers for the new ranks, as DeepSpeed does: padded at the end to a multiple
        of ``2 * dp``, cut into ``dp`` equal parts. ``flats``: one (a dense group, over all ranks) or one per new EP
        rank (an expert group, over that EP rank's expert-data-parallel ranks)."""
        from deepspeed.utils.tensor_fragment import fragment_address

        ep = len(flats)
        dp = self.new_world // ep
        total = sum(n for _, n in order)
        size = -(-total // (ALIGNMENT * dp)) * ALIGNMENT
        for rank, sd in enumerate(new_sds):
            flat, start = flats[rank % ep], (rank // ep) * size
            real = max(0, min(size, total - start))
            sd[FP32_PARTITIONS][group] = flat["fp32"][start : start + real].clone()  # saved without padding
            state = dict(scalars)
            for key, value in flat.items():
                if key != "fp32":
                    state[key] = torch.zeros(size, dtype=value.dtype)  # saved with padding (rigid format)
                    state[key][:real] = value[start : start + real]
            sd[BASE_STATE]["state"][group] = state
            sd[GROUP_PADDINGS][group], sd[PARTITION_COUNT][group] = size - real, dp
            mappings, offset = {}, 0
            for name, numel in order:
                low, high = max(offset, start), min(offset + numel, start + size)
                if high > low:
                    mappings[name] = fragment_address(numel=high - low, start=low - start)
                offset += numel
            sd[SLICES][group] = mappings

    # -- no ZeRO --------------------------------------------------------------------------------------------------

    def _stage0(self, paths: list[Path]) -> dict[str, Any]:
        if [int(EXPP_FILE.fullmatch(p.name)[1]) for p in paths] != list(range(self.ep)):
            raise UnsupportedOptimizerState(
                f"expected one expp_rank file per EP rank 0..{self.ep - 1}, found {', '.join(p.name for p in paths)}"
            )
        files = [torch.load(p, map_location="cpu", weights_only=False) for p in paths]
        entries = [self._stage0_entries(f.get("optimizer"), path.name) for f, path in zip(files, paths)]
        out = [copy.deepcopy(files[0]) for _ in range(self.new_ep)]  # dense state: the same on every EP rank
        out_entries = [self._stage0_entries(f["optimizer"], "the copy") for f in out]
        for index, param in enumerate(self.params):
            keys = set(entries[0][index])
            if any(set(e[index]) != keys for e in entries):
                raise UnsupportedOptimizerState(f"{param.name} has different optimizer state keys on different ranks")
            for key in sorted(keys):
                full = [container[slot] for container, slot in (e[index][key] for e in entries)]
                if key == "fp32":
                    for p in range(self.ep):
                        self._check_master(param, p, full[p], paths[p].name)
                for q, value in enumerate(self._move(param, full)):
                    container, slot = out_entries[q][index][key]
                    container[slot] = value
        for q, f in enumerate(out):
            optimizer = f["optimizer"]
            for group in optimizer.get("optimizer_state_dict", optimizer)["param_groups"]:
                group["name"] = self._group_name(group["name"])
            torch.save(f, self.dst / f"expp_rank_{q}_mp_rank_00_optim_states.pt")
        return out[0]["optimizer"]

    def _stage0_entries(self, optimizer: Any, where: str) -> list[dict[str, tuple[Any, Any]]]:
        """Per expert parameter (model order): where each of its per-element optimizer tensors sits, by state key,
        as (container, index); "fp32" for a separate master copy (the same walk as ``_stage0_tensors``)."""
        tensors = self._stage0_tensors(optimizer, where)  # validates the layout
        torch_state = optimizer.get("optimizer_state_dict", optimizer)
        masters = optimizer.get("fp32_groups")
        found = []
        for group_index, group in enumerate(torch_state["param_groups"]):
            if not group.get("moe"):
                continue
            for position, param_id in enumerate(group["params"]):
                slots = {key: (torch_state["state"][param_id], key) for key in tensors[len(found)] if key != "fp32"}
                if masters is not None:
                    slots["fp32"] = (masters[group_index], position)
                found.append(slots)
        return found
