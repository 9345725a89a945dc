"""DeepSpeed checkpoints that survive a crash mid-save, and refuse to load into a different model.

``engine.save_checkpoint`` writes the model, optimizer and per-expert files under ``<dir>/<tag>/``. We write the
``latest`` pointer ourselves, atomically and only after every rank has finished and flushed its files to the disk, so a
crash mid-save (a power loss too) leaves ``latest`` on the previous complete checkpoint. Each tag also gets
``c2r_config.json`` (our run config), which ``resume`` compares with the model it is asked to load into. With replicated
experts each logical expert's weights are saved once (``c2r.deepspeed.expert_files``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from c2r.config_utils import config_from_dict
from c2r.data import EMBEDDED_MAX_BYTES, DataConfig
from c2r.deepspeed.expert_files import check_expert_files, one_file_per_expert
from c2r.deepspeed.setup import width_lr_scale
from c2r.model import ModelConfig
from c2r.routing import Router
from placement.layout import ExpertLayout
from profiling.files import atomic_write_text, fsync_tree

log = logging.getLogger("c2r.deepspeed.checkpoint")

LATEST = "latest"
CONFIG_FILE = "c2r_config.json"
# Model settings that change parameter shapes or expert identity: a checkpoint only loads if these match.
SHAPE_KEYS = (
    "vocab_size", "block_size", "n_layer", "n_head", "d_model", "moe_every", "dense_ffn_hidden_size", "tie_embeddings",
)  # fmt: skip
SHAPE_DEFAULTS = {"tie_embeddings": True}
MOE_SHAPE_KEYS = ("num_experts", "ffn_hidden_size")


def save_checkpoint(engine, ckpt_dir: str | Path, step: int, run_config: dict[str, Any]) -> str:
    ckpt_dir = Path(ckpt_dir)
    tag = f"step{step}"
    try:
        with one_file_per_expert(engine, replicated_layouts(run_config)):
            engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
        fsync_tree(ckpt_dir / tag)  # on the disk, not only in the page cache, before latest may name it
    except (OSError, RuntimeError) as error:  # a full disk: torch's writer says "enforce fail ... unexpected pos"
        free = shutil.disk_usage(ckpt_dir).free / 2**20 if ckpt_dir.exists() else float("nan")
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(
            f"could not save checkpoint {tag} in {ckpt_dir} ({first_line}; {free:.0f} MiB free there); "
            f"latest still names {latest_tag(ckpt_dir)}, which --resume continues from"
        ) from error
    dist.barrier()  # every rank's files are on the disk before anyone points at them
    if dist.get_rank() == 0:
        atomic_write_text(ckpt_dir / tag / CONFIG_FILE, json.dumps(run_config, indent=2))
        atomic_write_text(ckpt_dir / LATEST, tag)
    dist.barrier()
    return tag


def tag_step(tag: str | None) -> int | None:
    """The step of a ``step<N>`` tag (`save_checkpoint`'s), None for any other tag."""
    match = re.fullmatch(r"step(\d+)", tag or "")
    return int(match.group(1)) if match else None


def prune_checkpoints(ckpt_dir: str | Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` step checkpoints up to ``latest`` (0: keep all); returns the deleted tags.
    Newer ones than ``latest`` are a crashed save's leftovers, which the next save of that step overwrites."""
    latest = tag_step(latest_tag(ckpt_dir))
    if keep <= 0 or latest is None:
        return []
    steps = sorted(
        tag_step(path.name) for path in Path(ckpt_dir).iterdir() if path.is_dir() and tag_step(path.name) is not None
    )
    old = [step for step in steps if step <= latest][:-keep]
    for step in old:
        shutil.rmtree(Path(ckpt_dir) / f"step{step}", ignore_errors=True)
    return [f"step{step}" for step in old]


def latest_tag(ckpt_dir: str | Path) -> str | None:
    latest = Path(ckpt_dir) / LATEST
    return latest.read_text().strip() if latest.exists() else None


def _differences(saved: dict[str, Any], here: dict[str, Any], keys) -> list[str]:
    """``key=saved in the checkpoint, here here`` for each of ``keys`` whose values differ."""
    return [f"{k}={saved.get(k)} in the checkpoint, {here.get(k)} here" for k in keys if saved.get(k) != here.get(k)]


def check_compatible(saved_model: dict[str, Any], model: dict[str, Any], where: str) -> None:
    saved_model = {**SHAPE_DEFAULTS, **saved_model}  # checkpoints from before a key was saved
    diffs = _differences(saved_model, model, SHAPE_KEYS)
    diffs += _differences(saved_model.get("moe", {}), model.get("moe", {}), MOE_SHAPE_KEYS)
    saved_moe, moe = saved_model.get("moe", {}), model.get("moe", {})
    saved_act, act = saved_moe.get("experts", {}).get("activation"), moe.get("experts", {}).get("activation")
    if saved_act != act:
        diffs.append(f"activation={saved_act} in the checkpoint, {act} here")
    saved_router, router = saved_moe.get("router", {}), moe.get("router", {})
    if saved_router.get("kind") == router.get("kind") == "adak":  # the allocator's shape; 0: all experts
        saved_k = saved_router.get("adak", {}).get("max_k") or saved_moe.get("num_experts")
        k = router.get("adak", {}).get("max_k") or moe.get("num_experts")
        if saved_k != k:
            diffs.append(f"adak max_k={saved_k} in the checkpoint, {k} here (--set model.moe.router.adak.max_k)")
    if diffs:
        raise ValueError(f"checkpoint {where} does not fit this model: " + "; ".join(diffs))


def router_state_settings(model: dict[str, Any]) -> dict[str, Any]:
    """The router settings that decide which tensors a router saves (a resume must match them; --init-from may
    switch routers): its kind, whether a batch-balance bias is kept, AdaMoE's null experts."""
    router = model.get("moe", {}).get("router", {})
    kind = router.get("kind", "topk")
    balanced = router.get("balance", "none") in ("batch", "auto")  # Ada-K keeps its source top-k router's bias
    settings = {"router": kind, "batch balance": kind in ("topk", "adak") and balanced}
    if kind == "adamoe":
        settings["adamoe.num_null_experts"] = router.get("adamoe", {}).get("num_null_experts")
    return settings


def check_same_router(saved_model: dict[str, Any], model: dict[str, Any], where: str) -> None:
    saved, here = router_state_settings(saved_model), router_state_settings(model)
    diffs = _differences(saved, here, {**saved, **here})
    if diffs:
        raise ValueError(
            f"checkpoint {where} was trained with another router: " + "; ".join(diffs) + " (--resume continues the "
            "same model; start a run from its weights under another router with --init-from)"
        )


def resume(engine, ckpt_dir: str | Path, run_config: dict[str, Any]) -> int:
    """Load the latest complete checkpoint into ``engine``; return the step it was taken at."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint to resume in {str(ckpt_dir)!r} (no '{LATEST}' file)")
    config_path = Path(ckpt_dir) / tag / CONFIG_FILE
    saved = json.loads(config_path.read_text())
    check_compatible(saved["model"], run_config["model"], str(Path(ckpt_dir) / tag))
    check_same_router(saved["model"], run_config["model"], str(Path(ckpt_dir) / tag))
    check_same_size(saved, run_config, Path(ckpt_dir), tag)
    check_same_placement(saved, run_config, tag)
    check_same_width_scaling(saved, run_config, tag)
    layouts = recorded_layouts(saved)
    check_expert_files(Path(ckpt_dir) / tag, layouts)
    with one_file_per_expert(engine, layouts):
        if str(saved.get("optimizer_state", "")).startswith("dropped"):
            # c2r-place apply moved experts between ranks: weights only, fresh optimizer moments, same schedule.
            _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_only=True)
            if client_state is not None and engine.lr_scheduler is not None:
                engine.lr_scheduler.last_epoch = int(client_state["step"]) - 1
                engine.lr_scheduler.step()
        else:
            _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {Path(ckpt_dir) / tag}")
    return int(client_state["step"])


def check_same_width_scaling(saved: dict[str, Any], run_config: dict[str, Any], tag: str) -> None:
    """Refuse to resume under another learning-rate width scaling where it changes the optimizer's parameter groups
    (a model wider than the base has its hidden matrices in a group of their own). Runs saved before
    ``train.lr_base_width`` existed trained unscaled (0)."""
    saved_base = saved["train"].get("lr_base_width", 0)
    base = run_config["train"].get("lr_base_width", 0)
    width = None if (run_config.get("hf") or {}).get("model_dir") else run_config["model"].get("d_model")

    def scaled(value: int) -> bool:  # an unknown width (a Hugging Face model): any base may scale it
        return value > 0 and (width is None or width_lr_scale(value, width) < 1.0)

    if saved_base != base and (scaled(saved_base) or scaled(base)):
        raise ValueError(
            f"checkpoint {tag} was trained with train.lr_base_width={saved_base}, this run has {base}: the learning "
            f"rate of its hidden matrices would change; resume with --set train.lr_base_width={saved_base}"
        )


def check_same_size(saved: dict[str, Any], run_config: dict[str, Any], ckpt_dir: Path, tag: str) -> None:
    """Refuse a checkpoint of another ep_size, or with ZeRO partitions of another world size (``c2r-place reshard``
    converts it); say when the global batch or the batch sampler differs from the saved run's (resuming still works,
    but no longer replays the uninterrupted run's batches)."""
    world = dist.get_world_size()
    saved_ep, ep = saved["train"].get("ep_size"), run_config["train"].get("ep_size")
    zero_files = len(list((ckpt_dir / tag).glob("*zero_pp_rank_*_optim_states.pt")))
    saved_world = saved.get("world_size") or zero_files or None
    if saved_ep != ep or (zero_files and zero_files != world):
        raise ValueError(
            f"checkpoint {tag} was saved with ep_size={saved_ep} on {_ranks(saved_world)}, this run has "
            f"ep_size={ep} on {_ranks(world)}; convert it first: c2r-place reshard --checkpoint {ckpt_dir} "
            f"--world-size {world} --ep-size {ep} --out NEW_RUN/checkpoints"
        )
    if dist.get_rank() != 0:
        return
    # sequences per rank per step: micro-batch x micro-batches (runs saved before grad_accum existed had one)
    batch = run_config["train"]["batch_size"] * run_config["train"].get("grad_accum", 1)
    saved_batch = saved["train"]["batch_size"] * saved["train"].get("grad_accum", 1)
    if saved_world and saved_world * saved_batch != world * batch:
        log.warning(
            "the global batch changes on resume: %d (%d per rank x %d ranks) in checkpoint %s, %d (%d x %d) here",
            saved_world * saved_batch,
            saved_batch,
            saved_world,
            tag,
            world * batch,
            batch,
            world,
        )
    saved_sampler = saved["train"].get("batch_sampler", "per-rank")  # runs saved before it existed drew per rank
    if saved_sampler != run_config["train"].get("batch_sampler"):
        log.warning(
            "checkpoint %s was trained with the %s batch sampler, this run uses %s: other batches than an "
            "uninterrupted run (--set train.batch_sampler=%s replays them)",
            tag,
            saved_sampler,
            run_config["train"].get("batch_sampler"),
            saved_sampler,
        )
    # The data and the seed decide the batches (and the validation set): resuming under others still trains, but
    # neither the batches nor the validation losses then continue the saved run's.
    saved_data, data = batch_source(saved), batch_source(run_config)
    changed = _differences(saved_data, data, list(data))
    if changed:
        log.warning(
            "resuming checkpoint %s with other data or seed (%s): other batches and another validation set than "
            "an uninterrupted run",
            tag,
            "; ".join(changed),
        )


def batch_source(run_config: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide a run's batches besides their sizes: the seed and the data (the embedded corpus's
    default cap as the number it stands for: runs saved before it was None recorded 8000000)."""
    data = {**dataclasses.asdict(DataConfig()), **run_config.get("data", {})}
    if data["path"] is None and data["max_bytes"] is None:
        data["max_bytes"] = EMBEDDED_MAX_BYTES
    return {"train.seed": run_config["train"].get("seed"), **{f"data.{k}": v for k, v in data.items()}}


def _ranks(count: int | None) -> str:
    return "an unrecorded number of ranks" if not count else f"{count} rank{'' if count == 1 else 's'}"


def recorded_layouts(run_config: dict[str, Any]) -> list[ExpertLayout]:
    """Each MoE layer's expert layout as a run config records it (contiguous where it records none: a layer without
    expert parallelism, or a run saved before layouts were recorded)."""
    num_layers = config_from_dict(ModelConfig, run_config["model"]).num_moe_layers
    num_experts, ep_size = run_config["model"]["moe"]["num_experts"], run_config["train"]["ep_size"]
    contiguous = ExpertLayout.contiguous(num_experts, ep_size)
    saved = run_config.get("expert_layouts") or [None] * num_layers
    return [
        contiguous if layout is None else ExpertLayout.from_json(layout, ep_size, num_experts, f"expert_layouts[{i}]")
        for i, layout in enumerate(saved)
    ]


def replicated_layouts(run_config: dict[str, Any]) -> list[ExpertLayout]:
    """The run's layouts when one of them holds replicas (always recorded then: a replicated expert's entry is a list
    of ranks); else none, and the checkpoint is DeepSpeed's own."""
    saved = run_config.get("expert_layouts") or []
    if not any(isinstance(entry, list) for layout in saved if layout for entry in layout):
        return []
    return recorded_layouts(run_config)


def check_same_placement(saved: dict[str, Any], run_config: dict[str, Any], tag: str) -> None:
    """Expert files are named by physical slot: loading them under another placement would swap experts. Compared
    slot by slot, so a contiguous checkpoint also starts a run of another ep_size (``--init-from``); ``resume``
    checks ep_size itself, and at equal ep_size the slot order fixes the layout."""
    order = [layout.physical_to_logical.tolist() for layout in recorded_layouts(saved)]
    if order != [layout.physical_to_logical.tolist() for layout in recorded_layouts(run_config)]:
        raise ValueError(
            f"checkpoint {tag} places experts differently from this run (its plan: {plan_name(saved)}; this run's: "
            f"{plan_name(run_config)}); train with the same --plan, or move the experts with c2r-place apply"
        )


def plan_name(run_config: dict[str, Any]) -> str:
    """The placement plan a run config names (``c2r-place apply`` and ``reshard`` record theirs at the top level,
    c2r-train in ``train``), or "the contiguous placement"."""
    plan = run_config.get("placement_plan") or run_config.get("train", {}).get("placement_plan")
    return plan or "the contiguous placement"


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """``(checkpoint dir, tag)`` from a checkpoint dir (its ``latest``), a tag dir, or a run dir (``checkpoints/``)."""
    path = Path(path)
    for ckpt_dir in (path, path / "checkpoints"):
        tag = latest_tag(ckpt_dir)
        if tag is not None:
            return ckpt_dir, tag
    if (path / CONFIG_FILE).exists():
        return path.parent, path.name
    raise FileNotFoundError(f"{str(path)!r} is not a c2r-train checkpoint (no '{LATEST}' and no {CONFIG_FILE})")


@contextlib.contextmanager
def frozen_params_marked_trainable(model):
    """Load a checkpoint into a partly frozen model (c2r-adak freezes all but the allocators). DeepSpeed 0.19.8
    copies frozen parameters from the checkpoint's ``frozen_param_fragments``, which a run without frozen parameters
    saves empty (KeyError on the first frozen name); they are in the module state dict it loads anyway, so hide the
    freezing meanwhile."""
    frozen = [param for param in model.parameters() if not param.requires_grad]
    for param in frozen:
        param.requires_grad_(True)
    try:
        yield
    finally:
        for param in frozen:
            param.requires_grad_(False)


def init_from_checkpoint(engine, path: str | Path, run_config: dict[str, Any]) -> dict[str, Any]:
    """Start a run from another run's weights (fresh optimizer, step 0), e.g. to switch a trained top-k model to
    another router. Parameters the checkpoint lacks (a new router's null gate or allocator) keep their fresh values;
    routers with ``init_from_pretrained(saved_router_config)`` then convert themselves (AdaMoE copies its null
    logits' rows from the trained gate). Returns the checkpoint's run config."""
    ckpt_dir, tag = resolve_checkpoint(path)
    saved = json.loads((ckpt_dir / tag / CONFIG_FILE).read_text())
    check_compatible(saved["model"], run_config["model"], str(ckpt_dir / tag))
    check_same_placement(saved, run_config, str(ckpt_dir / tag))
    layouts = recorded_layouts(saved)
    check_expert_files(ckpt_dir / tag, layouts)
    with frozen_params_marked_trainable(engine.module), one_file_per_expert(engine, layouts):
        loaded, _ = engine.load_checkpoint(
            str(ckpt_dir),
            tag=tag,
            load_module_strict=False,
            load_optimizer_states=False,
            load_lr_scheduler_states=False,
            load_module_only=True,
        )
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    saved_router = saved["model"]["moe"]["router"]
    for module in engine.module.modules():
        if isinstance(module, Router):
            module.init_from_pretrained(saved_router)
    return saved
