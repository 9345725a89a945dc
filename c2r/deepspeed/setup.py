"""Bringing a c2r model up under DeepSpeed: process groups, expert sharding, optimizer groups, the JSON config."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups
from torch import nn

from c2r.deepspeed.moe_layer import DeepSpeedMoELayer, expert_group_name
from c2r.moe import MoELayer
from c2r.parallel import DispatchObserver, shard_experts
from c2r.parallel.ports import free_port
from placement.layout import ExpertLayout, require_divides

log = logging.getLogger("c2r.deepspeed.setup")

CONFIG_DIR = Path(__file__).resolve().parents[2] / "deepspeed_configs"
LAUNCHER_ENV = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the job the launcher started (deepspeed, torchrun, mpirun via mpi4py, srun), or start a one-process job."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if not dist.is_initialized() and not any(v in os.environ for v in LAUNCHER_ENV):
        # Plain `c2r-train` without a launcher: a world of one.
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())),
        )
    if not use_cuda:
        warn_if_op_build_is_locked()
    # Also when torch.distributed is already up: DeepSpeed's own comm layer must be told about it.
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=True, verbose=False)
    release_shm_buffer()
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", rank)))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return DistInfo(rank, world, local_rank, torch.device("cuda", local_rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", world)))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))  # don't oversubscribe the cores
    return DistInfo(rank, world, local_rank, torch.device("cpu"))


SHM_OP = "deepspeed_shm_comm"  # the C++ op DeepSpeed's CPU accelerator builds at its first run on a machine
STALE_LOCK_S = 300  # its build takes about a minute here; a lock older than this is one a killed run left


def warn_if_op_build_is_locked() -> None:
    """Say so where DeepSpeed's CPU op build is locked by a run that died: torch's extension builder takes a lock
    file in the op's build folder and waits, without a word and for ever, while one exists, and a run killed
    during the build (the first run on a machine, when a new user may well press Ctrl-C) leaves it. Once per
    machine (local rank 0), before DeepSpeed starts the build."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return
    try:  # torch's own rule for the folder (TORCH_EXTENSIONS_DIR, else the user's cache); a private name
        from torch.utils.cpp_extension import _get_build_directory
    except ImportError:
        return
    lock = Path(_get_build_directory(SHM_OP, verbose=False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:  # no lock: nothing waits
        return
    if age > STALE_LOCK_S:
        log.warning(
            "DeepSpeed's CPU op build is locked by %s, left %.0f minutes ago (a run killed while building it leaves "
            "this file), and this run will wait on it; if no other run is building the op now, delete the file",
            lock,
            age / 60,
        )


# DeepSpeed's CPU accelerator names its per-rank shared-memory all-reduce buffer
# /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> (ops/csrc/cpu/comm/shm.cpp).
SHM_BUFFER_NAME = "deepspeed_allreduce_buffer"


def shm_buffer_path(rank: int) -> Path:
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"{SHM_BUFFER_NAME}_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_buffer() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer name once every rank has mapped the buffers.

    DeepSpeed maps one 66 MiB buffer per rank on a CPU job whose ranks are all local (``LOCAL_SIZE`` equal to the
    world size, its own condition) and never unlinks it, so every CPU job left its buffers in /dev/shm until the
    machine ran out of it (21 GB after one test suite). Every rank opens all the others' buffers inside
    ``deepspeed.init_distributed``, so after a barrier the names are no longer needed; the mappings stay valid until
    the processes exit, which then frees the memory, also after a crash. Call it on every rank (it may hold a
    barrier) right after ``deepspeed.init_distributed``; a no-op where DeepSpeed made no buffer (GPU accelerators,
    ranks on several machines)."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu" or not dist.is_initialized():
        return
    if os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):
        return
    dist.barrier()
    shm_buffer_path(dist.get_rank()).unlink(missing_ok=True)


def ensure_expert_groups(ep_size: int):
    """Create DeepSpeed's expert-parallel and expert-data-parallel groups for ``ep_size`` (once); return this
    rank's expert-parallel group. EP groups are contiguous ranks ([0, 1], [2, 3], ... for ep 2)."""
    world = dist.get_world_size()
    require_divides(ep_size, "ep_size", world, "the world size")
    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name)


def make_expert_parallel(
    model: nn.Module,
    ep_size: int,
    mode: str = "per-expert",
    layouts: list[ExpertLayout] | None = None,
    observers: list[DispatchObserver] | None = None,
    gpus_per_node: int | None = None,
    overlap_chunks: int = 1,
    copy_choice: str = "rule",
) -> list[DeepSpeedMoELayer]:
    """Shard every MoE layer's experts over ``ep_size`` ranks and wrap it as a DeepSpeed MoE module.

    ``mode``: ``per-expert``, ``per-rank`` or ``per-node`` dispatch (``gpus_per_node``: ranks per node, default the
    launcher's local world size); ``layouts``: one :class:`ExpertLayout` per MoE layer (a
    placement plan), default contiguous; ``observers``: one per MoE layer for its dispatcher (the communication
    profiler's), default none; ``overlap_chunks``: > 1 overlaps exchanges and expert compute in that many token chunks
    (c2r/parallel/overlap.py); ``copy_choice``: how a slot of a replicated expert picks its copy, ``rule`` or
    ``balanced`` (c2r/parallel/replicas.py). Call after building the model (same seed on every rank) and before
    building the optimizer.
    """
    for index, layer in enumerate(m for m in model.modules() if isinstance(m, MoELayer)):
        if not (layouts and layouts[index].is_replicated):  # replicated: the layout checks that its slots divide
            require_divides(ep_size, "ep_size", layer.config.num_experts, "num_experts")
    group = ensure_expert_groups(ep_size)
    if ep_size > 1:
        shard_experts(
            model,
            layouts,
            group=group,
            mode=mode,
            observers=observers,
            ranks_per_node=gpus_per_node,
            overlap_chunks=overlap_chunks,
            copy_choice=copy_choice,
        )
    return wrap_moe_layers(model, ep_size)


def wrap_moe_layers(model: nn.Module, ep_size: int) -> list[DeepSpeedMoELayer]:
    """Put every :class:`MoELayer` of ``model`` (experts already this rank's share) inside a DeepSpeed MoE module, in
    place: its expert parameters tagged for the expert-data-parallel group, its checkpoint keys per expert."""
    wrapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoELayer):
                wrapped.append(DeepSpeedMoELayer(child, ep_size))
                setattr(parent, name, wrapped[-1])
    return wrapped


def width_lr_scale(lr_base_width: int, width: int) -> float:
    """The hidden matrices' learning-rate factor of ``train.lr_base_width``: ``min(1, lr_base_width / width)``, 1 when
    off (0)."""
    return 1.0 if lr_base_width == 0 else min(1.0, lr_base_width / width)


def optimizer_param_groups(
    model: nn.Module, weight_decay: float, hidden_lr: float | None = None, max_group_size: int = 178956971
) -> list[dict[str, Any]]:
    """Decay for matrices, none for norms and biases; expert parameters split into their own groups (DeepSpeed's
    ZeRO and bf16 optimizers require this), at most ``max_group_size`` elements each (DeepSpeed's default).

    ``hidden_lr``: a learning rate of its own for the hidden matrices (every matrix but an embedding table: attention,
    MLPs, experts, routers, an untied output head), the width scaling of ``lr_base_width`` (c2r/run_setup.py); None
    keeps them in the decay group at the optimizer's rate.

    Empty groups are left out: DeepSpeed drops them itself inside ``initialize``, after an LR scheduler built on
    the optimizer counted them (its ``zip(..., strict=True)`` then fails at the first step). DeepSpeed's own split
    makes one whenever a single expert parameter is larger than ``max_group_size`` (Qwen3-30B-A3B's 128 x 768 x
    2048 w1 of one layer is 201M elements)."""
    embedding_tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, hidden, no_decay = [], [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2:
            no_decay.append(param)
        elif hidden_lr is not None and id(param) not in embedding_tables:
            hidden.append(param)
        else:
            decay.append(param)
    param_groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    if hidden:
        param_groups.append({"name": "hidden", "params": hidden, "weight_decay": weight_decay, "lr": hidden_lr})
    groups = split_params_into_different_moe_groups_for_optimizer(param_groups, max_group_size)
    return [group for group in groups if group["params"]]


def load_deepspeed_config(
    path: str | None, use_cuda: bool, micro_batch: int, grad_clip: float, grad_accum: int = 1
) -> dict[str, Any]:
    """Read the user's DeepSpeed JSON (default: ours for the device); our batch size, gradient accumulation and
    clipping fill it in."""
    if path is None:
        default = CONFIG_DIR / ("gpu_bf16_zero2.json" if use_cuda else "cpu_zero2.json")
        if not default.exists():
            raise FileNotFoundError(
                f"default DeepSpeed config {default} not found (installed without the "
                "repository?); pass --deepspeed-config PATH"
            )
        path = str(default)
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"DeepSpeed config {path!r} does not exist") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"DeepSpeed config {path!r} is not valid JSON: {error}") from None
    config.pop("_comment", None)
    config["train_micro_batch_size_per_gpu"] = micro_batch
    # One home for the micro-batches per step: c2r-train's loop runs them (train.grad_accum); a different count in
    # the JSON would have DeepSpeed step the optimizer at other micro-batches than the loop and its schedule count.
    if config.get("gradient_accumulation_steps", grad_accum) != grad_accum:
        raise ValueError(
            f"{path}: gradient_accumulation_steps is {config['gradient_accumulation_steps']} but train.grad_accum is "
            f"{grad_accum}; remove it from the JSON and use --grad-accum {config['gradient_accumulation_steps']}"
        )
    config["gradient_accumulation_steps"] = grad_accum
    config.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    config.setdefault("gradient_clipping", grad_clip)
    bf16, zero = config.get("bf16") or {}, config.get("zero_optimization") or {}
    if zero.get("stage", 0) not in (0, 1, 2):
        # DeepSpeed asserts deep inside deepspeed.initialize: its MoE layers (ours) do not run under ZeRO 3.
        raise ValueError(
            f"{path}: zero_optimization.stage is {zero['stage']!r}; DeepSpeed's MoE runs under ZeRO stage 0, 1 or 2 "
            "(experts are sharded by expert parallelism: --ep-size)"
        )
    if bf16.get("enabled") and zero.get("stage", 0) in (1, 2) and zero.get("compute_grad_norm", True):
        # DeepSpeed's bf16 overflow check costs 8 kernel launches per parameter per step (5% of the step on the ~1B
        # model of docs/gpu_runs.md) and skips a non-finite step silently; c2r-train's check_finite_step reads the
        # gradient norm ZeRO 1/2 compute anyway and stops the run instead.
        bf16.setdefault("check_grad_overflow", False)
    config.setdefault("steps_per_print", 10**9)  # our progress bar does the printing
    # DeepSpeed's throughput timer (on by default) synchronizes the device at the start of every forward and the end
    # of every step, for a samples/s log that steps_per_print silences; c2r-train times its steps itself.
    timers = config.setdefault("timers", {})
    if isinstance(timers, dict) and timers.get("throughput") is None:
        timers["throughput"] = {"enabled": False}
    if "optimizer" in config:
        raise ValueError(
            f"{path}: remove the 'optimizer' section; c2r-train passes its own AdamW with DeepSpeed's "
            "MoE parameter groups"
        )
    return config


def replicated_layers(model: nn.Module) -> list[int]:
    """Indices of the MoE layers of ``model`` whose expert-parallel layout has replicated experts."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    return [i for i, m in enumerate(layers) if m.dispatcher is not None and m.dispatcher.layout.is_replicated]


def warn_if_copy_choice_is_idle(model: nn.Module, copy_choice: str) -> None:
    """Say once (rank 0) when ``copy_choice`` is ``balanced`` but no MoE layer has replicated experts: it then changes
    nothing (a plan made with ``c2r-place plan --replicas 2E`` gives every expert a copy to balance with)."""
    idle = copy_choice == "balanced" and not replicated_layers(model)
    if idle and (not dist.is_initialized() or dist.get_rank() == 0):
        log.warning(
            "copy_choice 'balanced' has nothing to balance: no MoE layer has replicated experts (train with a plan "
            "made by `c2r-place plan --replicas 2E`, docs/placement.md)"
        )


def warn_if_clipping_counts_replicas(model: nn.Module, ds_config: dict[str, Any], optimizer: str) -> None:
    """Say once (rank 0) when DeepSpeed's gradient clipping is on in a run with replicated experts whose norm neither
    ``replica_norm.count_replicas_once`` (ZeRO 1/2, with or without CPU offload) nor
    ``zero0_norm.clip_by_whole_model_norm`` (ZeRO 0) corrects (``optimizer``, the engine's optimizer class, is
    another: DeepSpeed's ``BF16_Optimizer`` for bf16 ZeRO 1 with fp32 gradient accumulation): there DeepSpeed's global
    norm counts each copy, so the clip coefficient can differ from the unreplicated model's (docs/design.md, "Gradient
    clipping with replicated experts"); the copies stay identical either way."""
    clip = float(ds_config.get("gradient_clipping") or 0.0)
    replicated = replicated_layers(model)
    if clip > 0 and replicated and (not dist.is_initialized() or dist.get_rank() == 0):
        log.warning(
            "gradient clipping (%g) with replicated experts (MoE layers %s): DeepSpeed's %s counts each copy of a "
            "replicated expert in its global gradient norm, so where the clip binds the steps can differ from the "
            "unreplicated model's (ZeRO 0/1/2's optimizers count it once; --set train.grad_clip=0 makes the runs "
            "equal)",
            clip,
            replicated,
            optimizer,
        )
