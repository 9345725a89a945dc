"""Moving experts between the ranks' files of a DeepSpeed checkpoint written by ``c2r-train``, from the layouts it
was saved with to new ones (``c2r-place apply``: a plan's layouts), without changing the model.

Model weights. DeepSpeed names each expert file by the expert's *physical* slot
(``layer_<l>_expert_<ep_rank * E/R + slot>``) and loads file ``p`` into slot ``p`` of rank ``p // (E/R)``. Moving
logical expert ``e`` from one rank to another is therefore a rename of its file (and of the slot id inside the keys)
from its old physical id to its new one; the model computes exactly the same function afterwards. With replicated
experts on either side, every new slot of an expert gets its home copy (copies are identical), so replicas are created
and removed with their weights and optimizer state; since that changes the slots per rank, the expert optimizer
partitions are then rebuilt by ``c2r.deepspeed.reshard`` at the same world size and ep_size. A replicated checkpoint
holds one weight file per logical expert, its home slot's (``c2r.deepspeed.expert_files``): replica slots are read
from it, and a replicated new layout gets only its homes' files.

Optimizer state. Each rank stacks its experts' parameters (``w1``, ``v1``, ``w2``: ``[E/R * F, D]``, slot ``s`` owns
rows ``s*F .. (s+1)*F``), and so does every per-parameter optimizer tensor: the fp32 master copy and Adam's
``exp_avg`` / ``exp_avg_sq``. ``apply`` moves those rows with the expert, across the ranks' optimizer files, and
leaves everything else as it was (non-expert state, step counts, param-group hyperparameters, loss scaler, clipping).
Two layouts are remapped:

* ZeRO-1/2 (``[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt``: DeepSpeed's ZeRO optimizer in fp32, fp16 or
  bf16, and its ``BF16_Optimizer``). Each param group is one flat fp32 buffer partitioned over the group's data
  parallel ranks; an expert group is partitioned over the expert-data-parallel group of its EP rank (global ranks
  ``p, p + R, p + 2R, ...``: EP rank ``r % R``, partition ``r // R``). The file's ``param_slice_mappings`` give each
  parameter's fragment (start, numel) in that rank's partition; the stacked tensor of EP rank ``p`` is its fragments
  in partition order. The same fragments index the master partition and every moment of the partition's size.
* No ZeRO (stage 0): ``expp_rank_<p>_mp_rank_00_optim_states.pt``, EP rank ``p``'s whole optimizer: a torch
  optimizer's ``state_dict`` (fp32) or DeepSpeed's unfused fp16/bf16 wrapper (``fp32_groups`` masters plus the torch
  state); the expert groups (``moe: True``) list the expert parameters in model order. The copy of rank 0's
  optimizer in ``mp_rank_00_model_states.pt`` is replaced by the remapped one.

Before moving anything the fp32 masters found this way are checked against the expert weight files (equal, after a
cast to the weights' dtype), so a misread layout is refused rather than written. Anything else (DeepSpeed's fused
fp16 optimizer, model-parallel ranks, checkpoints without ``param_slice_mappings``) falls back to dropping the
optimizer files: ``c2r_config.json`` then says ``"optimizer_state": "dropped by c2r-place apply: <why>"`` and
``c2r-train --resume`` loads the weights only (fresh Adam moments, the same step and learning-rate schedule).

tests/test_placement_apply.py checks that the moved model computes the same function, and that training resumed
from a moved checkpoint under the new placement follows an uninterrupted run step by step (ZeRO 0, 1, 2; 2 and 4
ranks), with every expert's master weight and moments found at its new place (fp32 and bf16).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from c2r.deepspeed.checkpoint import CONFIG_FILE, LATEST, latest_tag, recorded_layouts
from c2r.deepspeed.expert_files import EXPERT_FILE, check_expert_files, expert_file_name, rename_slot, stored_slot
from placement.layout import ExpertLayout
from profiling.files import atomic_write_text, fsync_tree

log = logging.getLogger("c2r.deepspeed.move_experts")

OPTIMIZER_FILE = re.compile(r".*optim_states\.pt")
ZERO_FILE = re.compile(r"(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
EXPP_FILE = re.compile(r"expp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
MODEL_FILE = "mp_rank_00_model_states.pt"
PER_EXPERT_KEY = re.compile(r"(.*)\.deepspeed_experts\.\d+\.([^.]+)")
REMAPPED = "moved with the experts by c2r-place apply"
# deepspeed.checkpoint.constants
BASE_STATE, FP32_PARTITIONS, SLICES = "base_optimizer_state", "single_partition_of_fp32_groups", "param_slice_mappings"


class UnsupportedOptimizerState(Exception):
    """The optimizer files are in a layout ``apply`` does not remap; the message says which and why."""


@dataclass(frozen=True)
class ExpertParam:
    """One stacked expert parameter of one MoE layer: ``name`` as in the model (``...experts.w1``), per-expert
    ``shape`` ([F, D]) and dtype of the weights in the expert files."""

    layer: int
    name: str
    key: str  # the short name (w1, v1, w2)
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


def move_experts(
    layouts: list[ExpertLayout],
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    tag: str | None = None,
    plan_path: str | None = None,
) -> Path:
    """Write ``out_dir/<tag>``: ``checkpoint_dir/<tag>`` with every expert moved to its rank under ``layouts`` (one
    per MoE layer: the plan's), its weights and its optimizer state (module docstring). ``plan_path`` is recorded in
    the new run config, so a later load under another placement names the plan it came from."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    tag = tag or latest_tag(checkpoint_dir)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir} (no '{LATEST}' file; pass --tag)")
    src = checkpoint_dir / tag
    check_out_dir(out_dir, checkpoint_dir, src)
    if not (src / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{src} has no {CONFIG_FILE}: not a c2r-train checkpoint")
    run_config = json.loads((src / CONFIG_FILE).read_text())
    old = recorded_layouts(run_config)
    new = check_layouts_fit(layouts, run_config, len(old))
    check_expert_files(src, old)
    for layout in [*old, *new]:
        # replicas created or removed resize the optimizer partitions: c2r.deepspeed.apply_plan rebuilds them
        layout.require_unreplicated("move_experts (use c2r.deepspeed.apply_plan)")
    dst, tmp = begin_checkpoint(out_dir, tag)
    # A partial directory inside the source is what an older apply with --out inside it left behind: not ours to copy.
    files = sorted(p for p in src.iterdir() if not (p.is_dir() and p.name.endswith(".partial")))
    optimizer_files = [p for p in files if OPTIMIZER_FILE.fullmatch(p.name)]
    for path in tqdm(files, desc="applying plan", unit="file"):
        if path not in optimizer_files and path.name != CONFIG_FILE:
            _copy_one(path, tmp, old, new)
    try:
        if str(run_config.get("optimizer_state", "")).startswith("dropped"):
            raise UnsupportedOptimizerState("the source checkpoint's optimizer state was already dropped")
        OptimizerRemap(src, tmp, old, new).run(optimizer_files)
        run_config["optimizer_state"] = REMAPPED
    except UnsupportedOptimizerState as why:
        for path in optimizer_files:
            (tmp / path.name).unlink(missing_ok=True)
        run_config["optimizer_state"] = (
            f"dropped by c2r-place apply: {why}; --resume loads the weights with fresh optimizer moments"
        )
        log.warning("optimizer state not carried over: %s", why)
    run_config["expert_layouts"] = [layout.to_json() for layout in new]
    run_config["placement_plan"] = plan_path
    run_config["train"]["placement_plan"] = plan_path  # the setting too, for a resume with --config
    (tmp / CONFIG_FILE).write_text(json.dumps(run_config, indent=2))
    return publish_checkpoint(tmp, dst)


def check_out_dir(out_dir: Path, checkpoint_dir: Path, src: Path) -> None:
    """Refuse an ``--out`` that is the source checkpoint directory or lies inside the source checkpoint (the new
    checkpoint would be written into, or over, the one it is read from), or that holds another run's checkpoints
    (its ``latest`` would move to the new one: a resume of that run would go back to an older step)."""
    out, ckpt, source = out_dir.resolve(), checkpoint_dir.resolve(), src.resolve()
    if out in (ckpt, source) or source in out.parents:
        raise ValueError(
            f"--out {str(out_dir)!r} is the source checkpoint {str(checkpoint_dir)!r} or inside it; write the moved "
            "checkpoint to a new directory, e.g. RUN2/checkpoints"
        )
    if (out_dir / LATEST).is_file():
        raise ValueError(
            f"--out {str(out_dir)!r} holds another run's checkpoints (latest: {latest_tag(out_dir)}); write the moved "
            "checkpoint to a new directory, e.g. RUN2/checkpoints"
        )


def check_layouts_fit(layouts: list[ExpertLayout], run_config: dict[str, Any], num_layers: int) -> list[ExpertLayout]:
    """``layouts`` (the plan's) when they are for the checkpoint's model and ep_size; else an error naming both."""
    ep_size, num_experts = run_config["train"]["ep_size"], run_config["model"]["moe"]["num_experts"]
    shapes = {(layout.num_experts, layout.num_ranks) for layout in layouts}
    if len(shapes) != 1:
        raise ValueError(f"the plan's layers differ in shape (experts, ranks): {sorted(shapes)}")
    ((plan_experts, plan_ranks),) = shapes
    checks = {
        "num_layers": (len(layouts), num_layers),
        "num_experts": (plan_experts, num_experts),
        "num_ranks": (plan_ranks, ep_size),
    }
    wrong = [
        f"{k}={mine} in the plan, {theirs} in the checkpoint" for k, (mine, theirs) in checks.items() if mine != theirs
    ]
    if wrong:
        raise ValueError("the plan does not fit the checkpoint: " + "; ".join(wrong))
    return layouts


def _copy_one(path: Path, dst_dir: Path, old: list[ExpertLayout], new: list[ExpertLayout]) -> None:
    match = EXPERT_FILE.fullmatch(path.name)
    if match is None:
        shutil.copy2(path, dst_dir / path.name)
        return
    layer, old_slot, mp = int(match[1]), int(match[2]), match[3]
    if stored_slot(old[layer], old_slot) != old_slot:
        return  # a replica's file (older checkpoints wrote them): identical to its home copy's, which is moved
    expert = old[layer].physical_to_logical[old_slot]
    new_slot = int(new[layer].logical_to_physical[expert])  # its new home: the one file a replicated layout keeps
    state = torch.load(path, map_location="cpu", weights_only=False)
    torch.save(rename_slot(state, new_slot), dst_dir / expert_file_name(layer, new_slot, mp))


def begin_checkpoint(out_dir: Path, tag: str) -> tuple[Path, Path]:
    """The new checkpoint's directory and the (emptied) partial directory it is written in first; refuses to
    replace a checkpoint that exists."""
    dst = out_dir / tag
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; choose another --out")
    tmp = out_dir / f".{tag}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return dst, tmp


def publish_checkpoint(tmp: Path, dst: Path) -> Path:
    """Rename the finished partial directory into place (it appears whole or not at all), then point ``latest`` at
    it."""
    fsync_tree(tmp)  # the data on the disk before a name points at it (a power loss too)
    os.replace(tmp, dst)
    atomic_write_text(dst.parent / LATEST, dst.name)
    return dst


def move_rows(old: list[torch.Tensor], before: ExpertLayout, after: ExpertLayout) -> list[torch.Tensor]:
    """``old[p]``: EP rank ``p``'s stacked tensor of one layer (slot ``s`` = the ``s``-th of X equal row blocks, in
    any shape). Returns the tensors of the ranks under ``after``: every physical slot of ``after`` gets the block of
    its logical expert's home copy under ``before`` (replicas are identical; a new replica starts as the home copy,
    a removed one is dropped). The two may have different numbers of ranks and slots per rank (resharding:
    ``c2r.deepspeed.reshard``; replicas added or removed); each new tensor then stacks ``after``'s X blocks."""
    was_local, now_local = before.experts_per_rank, after.experts_per_rank
    blocks = [t.reshape(was_local, -1) for t in old]
    moved = [blocks[0].new_empty(now_local, blocks[0].shape[1]) for _ in range(after.num_ranks)]
    home = before.logical_to_physical.tolist()
    for now, expert in enumerate(after.physical_to_logical.tolist()):
        was = home[expert]
        moved[now // now_local][now % now_local] = blocks[was // was_local][was % was_local]
    shape = old[0].shape
    new_shape = (shape[0] // was_local * now_local, *shape[1:])
    return [m.reshape(new_shape) for m in moved]


def load_zero_states(paths: list[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ZeRO-1/2 partition files (read copy-on-write) and their optimizer states, where this module can read
    their flat buffers: by the parameters' order in ``param_slice_mappings``. ``round_robin_gradients`` orders a flat
    buffer otherwise (and by the run's data-parallel size): refused, so that the state is dropped, not scrambled."""
    files = [torch.load(p, map_location="cpu", weights_only=False, mmap=True) for p in paths]
    sds = [f.get("optimizer_state_dict", {}) for f in files]
    for path, file, sd in zip(paths, files, sds):
        missing = [k for k in (BASE_STATE, FP32_PARTITIONS, SLICES) if k not in sd]
        if missing:
            raise UnsupportedOptimizerState(f"{path.name} has no {', '.join(missing)}")
        if (file.get("ds_config") or {}).get("zero_optimization", {}).get("round_robin_gradients"):
            raise UnsupportedOptimizerState(
                f"{path.name} was saved with ZeRO's round_robin_gradients (its flat buffers are in round-robin order)"
            )
    return files, sds


class OptimizerRemap:
    """Moves each expert's rows in the optimizer files of ``src`` into ``dst`` (module docstring). The files are
    loaded copy-on-write (``mmap``), changed in memory and written at the end, so an
    :class:`UnsupportedOptimizerState` raised on the way leaves nothing behind and the source untouched."""

    def __init__(self, src: Path, dst: Path, old: list[ExpertLayout], new: list[ExpertLayout]):
        self.src, self.dst, self.old, self.new = src, dst, old, new
        self.ep = old[0].num_ranks
        self.local = old[0].experts_per_rank
        self.params = self._expert_params()
        self.by_name = {p.name: p for p in self.params}

    # -- what the expert files say ------------------------------------------------------------------------------

    def _expert_file(self, layer: int, physical: int) -> Path:
        """The file holding slot ``physical``'s weights under the old layout (a replica's: its home copy's)."""
        return self.src / expert_file_name(layer, stored_slot(self.old[layer], physical))

    def _expert_params(self) -> list[ExpertParam]:
        """The stacked expert parameters in model order (layer, then the order of the keys in its files)."""
        params = []
        for layer in range(len(self.old)):
            path = self._expert_file(layer, 0)
            if not path.exists():
                raise UnsupportedOptimizerState(f"no {path.name} (model-parallel or renamed expert files)")
            for key, value in torch.load(path, map_location="cpu", weights_only=False, mmap=True).items():
                match = PER_EXPERT_KEY.fullmatch(key)
                if match is None or not torch.is_tensor(value):
                    raise UnsupportedOptimizerState(f"unexpected key {key!r} in {path.name}")
                params.append(ExpertParam(layer, f"{match[1]}.{match[2]}", match[2], tuple(value.shape), value.dtype))
        return params

    def _weights(self, param: ExpertParam, ep_rank: int) -> torch.Tensor:
        """EP rank ``ep_rank``'s stacked weights of ``param`` under the old layout, from the expert files."""
        blocks = []
        for slot in range(self.local):
            path = self._expert_file(param.layer, ep_rank * self.local + slot)
            state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            by_key = {m[2]: v for k, v in state.items() if (m := PER_EXPERT_KEY.fullmatch(k))}
            if param.key not in by_key:
                raise UnsupportedOptimizerState(f"{path.name} has no {param.key}")
            blocks.append(by_key[param.key])
        return torch.cat(blocks)

    def _check_master(self, param: ExpertParam, ep_rank: int, master: torch.Tensor, where: str) -> None:
        weights = self._weights(param, ep_rank)
        if master.numel() != weights.numel() or not torch.equal(
            master.reshape(weights.shape).to(weights.dtype), weights
        ):
            raise UnsupportedOptimizerState(
                f"the fp32 master of {param.name} read from {where} does not match EP rank {ep_rank}'s expert files; "
                "the optimizer layout is not the one c2r-place apply knows"
            )

    def _move(self, param: ExpertParam, per_rank: list[torch.Tensor]) -> list[torch.Tensor]:
        for t in per_rank:
            if t.numel() != self.local * param.numel:
                raise UnsupportedOptimizerState(
                    f"{param.name}: {t.numel()} optimizer elements per rank, expected {self.local} experts x "
                    f"{param.numel}"
                )
        return move_rows(per_rank, self.old[param.layer], self.new[param.layer])

    # -- dispatch on the files present ---------------------------------------------------------------------------

    @torch.no_grad()  # the saved fp32 partitions are leaves that require grad
    def run(self, optimizer_files: list[Path]) -> None:
        if not optimizer_files:
            raise UnsupportedOptimizerState("the checkpoint has no optimizer files")
        names = [p.name for p in optimizer_files]
        zero = [ZERO_FILE.fullmatch(n) for n in names]
        expp = [EXPP_FILE.fullmatch(n) for n in names]
        if all(zero) and len({m[1] for m in zero}) == 1 and all(m[3] == "00" for m in zero):
            self._zero(sorted(optimizer_files, key=lambda p: int(ZERO_FILE.fullmatch(p.name)[2])))
        elif all(expp) and all(m[2] == "00" for m in expp):
            self._stage0(sorted(optimizer_files, key=lambda p: int(EXPP_FILE.fullmatch(p.name)[1])))
        else:
            raise UnsupportedOptimizerState(f"optimizer files of an unknown layout: {', '.join(names)}")

    # -- ZeRO-1/2 (and DeepSpeed's BF16_Optimizer) --------------------------------------------------------------

    def _zero(self, paths: list[Path]) -> None:
        world = len(paths)
        if [int(ZERO_FILE.fullmatch(p.name)[2]) for p in paths] != list(range(world)) or world % self.ep:
            raise UnsupportedOptimizerState(
                f"{world} ZeRO partition files for ep_size {self.ep}: expected ranks 0..N-1, N a multiple of ep_size"
            )
        edp = world // self.ep
        files, sds = load_zero_states(paths)
        for group in range(len(sds[0][FP32_PARTITIONS])):
            names = {name for sd in sds for name in sd[SLICES][group]}
            experts = names & self.by_name.keys()
            if not experts:
                continue
            if experts != names:
                raise UnsupportedOptimizerState(f"param group {group} mixes expert and other parameters")
            counts = {sd.get("partition_count", [edp] * (group + 1))[group] for sd in sds}
            if counts != {edp}:
                raise UnsupportedOptimizerState(
                    f"expert param group {group} is partitioned {counts} ways, expected {edp} (world {world} / ep "
                    f"{self.ep})"
                )
            buffers = [self._zero_buffers(sd, group, path.name) for sd, path in zip(sds, paths)]
            if len({tuple(sorted(b)) for b in buffers}) != 1:
                raise UnsupportedOptimizerState(f"param group {group} holds different state keys on different ranks")
            for name in sorted(experts):
                for key in buffers[0]:
                    # EP rank p's fragments, in partition order: global ranks p, p + ep, p + 2 ep, ...
                    fragments = [
                        [
                            (buffers[r][key][a.start : a.start + a.numel], a.numel)
                            for r in range(p, world, self.ep)
                            if (a := sds[r][SLICES][group].get(name)) is not None
                        ]
                        for p in range(self.ep)
                    ]
                    full = [torch.cat([view for view, _ in frags]) for frags in fragments]  # copies
                    if key == "fp32":
                        for p in range(self.ep):
                            self._check_master(self.by_name[name], p, full[p], f"the ZeRO partitions of EP rank {p}")
                    for frags, value in zip(fragments, self._move(self.by_name[name], full)):
                        for (view, _), part in zip(frags, value.split([n for _, n in frags])):
                            view.copy_(part)  # in memory only (copy-on-write map): files are written at the end
        for path, f in zip(paths, files):
            torch.save(f, self.dst / path.name)

    @staticmethod
    def _zero_buffers(sd: dict[str, Any], group: int, where: str) -> dict[str, torch.Tensor]:
        """This rank's flat tensors of ``group`` that are indexed like its fp32 partition: the partition itself
        ("fp32") and each optimizer moment (padded, in a rigid checkpoint, or not, in an elastic one)."""
        master = sd[FP32_PARTITIONS][group]
        base = sd[BASE_STATE]
        if isinstance(base, dict):  # the torch optimizer's state_dict: one flat parameter per group
            state = base["state"].get(base["param_groups"][group]["params"][0], {})
        else:  # elastic: one lean state dict per group
            state = base[group]
        buffers = {"fp32": master}
        for key, value in state.items():
            if not torch.is_tensor(value) or value.dim() == 0:
                continue  # step counts and other scalars are not per element
            if value.dim() != 1 or value.numel() < master.numel():
                raise UnsupportedOptimizerState(
                    f"{where}: optimizer state {key!r} of param group {group} has shape {tuple(value.shape)}, not "
                    f"that of the fp32 partition ({master.numel()})"
                )
            buffers[key] = value
        return buffers

    # -- no ZeRO --------------------------------------------------------------------------------------------------

    def _stage0(self, paths: list[Path]) -> None:
        if [int(EXPP_FILE.fullmatch(p.name)[1]) for p in paths] != list(range(self.ep)):
            raise UnsupportedOptimizerState(
                f"expected one expp_rank file per EP rank 0..{self.ep - 1}, found {', '.join(p.name for p in paths)}"
            )
        files = [torch.load(p, map_location="cpu", weights_only=False, mmap=True) for p in paths]
        per_rank = [self._stage0_tensors(f.get("optimizer"), path.name) for f, path in zip(files, paths)]
        for index, param in enumerate(self.params):
            keys = set(per_rank[0][index])
            if any(set(tensors[index]) != keys for tensors in per_rank):
                raise UnsupportedOptimizerState(f"{param.name} has different optimizer state keys on different ranks")
            for key in sorted(keys):
                full = [tensors[index][key] for tensors in per_rank]
                if key == "fp32":
                    for p in range(self.ep):
                        self._check_master(param, p, full[p], paths[p].name)
                for target, value in zip(full, self._move(param, full)):  # _move returns new tensors
                    target.copy_(value)
        for path, f in zip(paths, files):
            torch.save(f, self.dst / path.name)
        model_file = self.src / MODEL_FILE
        if model_file.exists():
            model_state = torch.load(model_file, map_location="cpu", weights_only=False)
            if model_state.get("optimizer") is not None:  # rank 0's optimizer (EP rank 0), unused when loading MoE
                model_state["optimizer"] = files[0]["optimizer"]
                torch.save(model_state, self.dst / MODEL_FILE)

    def _stage0_tensors(self, optimizer: Any, where: str) -> list[dict[str, torch.Tensor]]:
        """Per expert parameter (model order): its per-element optimizer tensors by state key, and "fp32" for a
        separate master copy."""
        if not isinstance(optimizer, dict):
            raise UnsupportedOptimizerState(f"{where} holds no optimizer state")
        masters = None
        if "state" in optimizer and "param_groups" in optimizer:
            torch_state = optimizer  # a torch optimizer: the parameters are their own masters
        elif "optimizer_state_dict" in optimizer and "fp32_groups" in optimizer:
            torch_state, masters = optimizer["optimizer_state_dict"], optimizer["fp32_groups"]  # unfused fp16/bf16
        else:
            raise UnsupportedOptimizerState(
                f"{where}: optimizer state with keys {sorted(optimizer)} (e.g. DeepSpeed's fused fp16 optimizer)"
            )
        found = []
        for group_index, group in enumerate(torch_state["param_groups"]):
            if not group.get("moe"):
                continue
            for position, param_id in enumerate(group["params"]):
                tensors = {
                    key: value
                    for key, value in torch_state["state"].get(param_id, {}).items()
                    if torch.is_tensor(value) and value.dim() > 0
                }
                if masters is not None:
                    tensors["fp32"] = masters[group_index][position]
                found.append(tensors)
        if len(found) != len(self.params):
            raise UnsupportedOptimizerState(
                f"{where}: {len(found)} parameters in the expert param groups, the expert files have {len(self.params)}"
            )
        return found
