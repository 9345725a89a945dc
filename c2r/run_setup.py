"""The run setup ``c2r-train`` and ``c2r-adak`` share: the run config and its command line, the distributed job, the
DeepSpeed engine, the batch samplers, the metrics log and the progress bar.

A run config is one typed dataclass per section (``model``, ``train``, ``data``, ``profile``; ``c2r-adak`` adds
``adak``), each validated on construction. A tool resolves it from layers, each later one winning:
1. the tool's base: nothing for ``c2r-train``; the source checkpoint's run for ``c2r-adak``;
2. the tool's own defaults where they differ from the dataclasses' (``c2r-adak``'s are the Ada-K paper's);
3. ``--config FILE`` (a saved run's ``c2r_config.json`` loads as it is, but for its records and its own
   ``train.resume`` / ``train.overwrite``: how that run started says nothing about the next one);
4. the shorthand flags (``--steps 7`` is ``--set train.steps=7``), then ``--set key=value``, in order.
Every checkpoint saves the resolved config (``run_config_record``); ``--print-config`` prints it and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import sys
import time
import typing
import warnings
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from c2r.config_utils import config_from_dict, require_choice, require_positive
from c2r.data import BatchSampler, Corpus, DataConfig
from c2r.hf.training import HFConfig
from c2r.model import ModelConfig, MoEGPT
from c2r.parallel import DISPATCH_MODES, DispatchObserver, model_layouts, resolve_ranks_per_node
from c2r.parallel.expert_parallel import check_overlap_chunks
from placement.copy_choice import COPY_CHOICES
from placement.layout import require_divides
from profiling.cli_errors import OneLineParser
from profiling.files import atomic_write_text
from profiling.session import ProfileConfig

# Written next to the settings by ``run_config_record`` and checked on resume; derived from the settings (the
# placement plan or the contiguous default), so a saved config loads without them. ``c2r-place apply`` adds the plan
# it applied and what became of the optimizer state: records too, not settings.
RECORDED_KEYS = ("expert_layouts", "world_size", "placement_plan", "optimizer_state")
# Seed offsets of the batch streams: every rank draws its own batches; validation batches are the same for every
# tool, so their losses compare.
RANK_SEED_STRIDE = 7919
VAL_SEED_OFFSET = 104729
BATCH_SAMPLERS = ("global", "per-rank")


@dataclass
class TrainConfig:
    """Optimisation and parallelism. ``batch_size`` is per rank (DeepSpeed's micro batch)."""

    steps: int = 300  # optimizer steps
    batch_size: int = 16  # sequences per rank per micro-batch
    # micro-batches per optimizer step (gradient accumulation): a step sees batch_size x grad_accum sequences per
    # rank, at the memory of one micro-batch; the optimizer's fixed cost per step is shared by more tokens
    grad_accum: int = 1
    lr: float = 2e-3
    # Width scaling (muP-style, for Adam): hidden matrices learn at lr * min(1, lr_base_width / d_model), so lr is
    # the rate of a model lr_base_width wide and wider models do not take steps that outgrow their weights (at
    # d_model 2048, lr 2e-3 unscaled collapses every token onto the same experts: docs/gpu_runs.md). 0: off.
    lr_base_width: int = 128
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100  # steps between periodic checkpoints (0: none); the last step and a stop signal also save
    save_every_minutes: float = 30.0  # also save once this long has passed since the last save (0: never)
    keep_checkpoints: int = 3  # the newest N step checkpoints stay, older ones are deleted (0: keep all)
    save_last: bool = True  # the last step saves a checkpoint (benchmarks/hf_train_bench.py turns it off)
    resume: bool = False
    overwrite: bool = False  # replace the run already in out_dir (its checkpoints, metrics and profile)
    init_from: str | None = None  # start from another run's weights (fresh optimizer, step 0), e.g. to switch router
    seed: int = 0
    device: str = "auto"
    ep_size: int = 1
    dispatch: str = "per-expert"  # or "per-rank": one token copy per destination rank (c2r/parallel/dispatch.py)
    # ranks per node, for per-node dispatch and the inter-/intra-node counts (None: the launcher's local world size,
    # else all ranks one node); set it to group CPU ranks into virtual nodes
    gpus_per_node: int | None = None
    # > 1: each MoE layer's per-expert or per-rank dispatch runs in that many token chunks whose exchanges overlap the
    # expert compute (c2r/parallel/overlap.py); 1 = off, the default until a GPU measurement shows where it wins
    overlap_chunks: int = 1
    # how a slot of a replicated expert (a plan made with --replicas) picks its copy: "rule" (a rank the token visits,
    # else an even split) or "balanced" (shares that level the ranks' loads for each batch; c2r/parallel/replicas.py)
    copy_choice: str = "rule"
    placement_plan: str | None = None  # c2r-place plan JSON: which experts live on which EP rank, per MoE layer
    deepspeed_config: str | None = None  # default: deepspeed_configs/cpu_zero2.json or gpu_bf16_zero2.json
    out_dir: str = "runs/demo"
    # "global": one global batch per step sliced per rank (the same at any world size); "per-rank": a seed per rank
    batch_sampler: str = "global"

    def __post_init__(self) -> None:
        require_positive(
            steps=self.steps,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            lr=self.lr,
            eval_every=self.eval_every,
            eval_batches=self.eval_batches,
            ep_size=self.ep_size,
        )
        require_choice("dispatch", self.dispatch, DISPATCH_MODES)
        check_overlap_chunks(self.overlap_chunks, self.dispatch, "train.")
        require_choice("train.copy_choice", self.copy_choice, COPY_CHOICES)
        if self.gpus_per_node is not None:
            require_positive(gpus_per_node=self.gpus_per_node)
        for name in ("save_every", "save_every_minutes", "keep_checkpoints", "lr_base_width"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 0 (0 turns it off)")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run in out_dir, or replace it")
        require_choice("batch_sampler", self.batch_sampler, BATCH_SAMPLERS)
        if self.grad_accum > 1 and self.batch_sampler != "global":
            raise ValueError(
                f"train.grad_accum ({self.grad_accum}) needs the global batch sampler, not {self.batch_sampler!r}"
            )
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"train.device {self.device!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    hf: HFConfig = field(default_factory=HFConfig)  # --hf-model: a Hugging Face MoE model instead of our GPT

    def __post_init__(self) -> None:
        require_divides(self.train.ep_size, "ep_size", self.model.moe.num_experts, "num_experts")
        if self.train.gpus_per_node is not None and self.train.ep_size > 1:
            resolve_ranks_per_node(self.train.gpus_per_node, self.train.ep_size)  # raises naming both numbers
        if self.hf.model_dir is not None and self.train.overlap_chunks > 1:
            raise ValueError(
                f"train.overlap_chunks ({self.train.overlap_chunks}) is not supported with --hf-model yet; use 1"
            )


# ---------------------------------------------------------------------------------------------------------------
# The config as plain dicts: overrides, layers, the saved record.


def apply_override(config: dict[str, Any], assignment: str) -> None:
    """``a.b.c=value`` sets config["a"]["b"]["c"]; value is parsed as JSON, else kept as a string."""
    key, sep, raw = assignment.partition("=")
    if not sep:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    *parents, leaf = key.strip().split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {key}: {part!r} is not a config section")
    try:
        node[leaf] = json.loads(raw)
    except json.JSONDecodeError:
        node[leaf] = raw


def merge(base: dict[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``layer`` laid over it, section by section (a value that is not a section replaces)."""
    merged = copy.deepcopy(base)
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train.lr": 1e-3}`` -> ``{"train": {"lr": 1e-3}}`` (the inverse of `flatten`)."""
    settings: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = settings
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return settings


def dataclass_defaults(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every field's default by dotted key, sections included (a field without a default is left out)."""
    defaults, hints = {}, typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            defaults.update(dataclass_defaults(hints[f.name], f"{key}."))
        elif f.default is not dataclasses.MISSING:
            defaults[key] = f.default
    return defaults


def run_config_record(config: Any, model: nn.Module) -> dict[str, Any]:
    """What a checkpoint saves as its run config: every section, the expert layouts the model was built with, and the
    world size (the global batch is ``batch_size`` times it; ``c2r-place reshard`` changes it)."""
    return {**dataclasses.asdict(config), "expert_layouts": model_layouts(model), "world_size": dist.get_world_size()}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The settings of a JSON config file, or of a saved run's ``c2r_config.json`` (its recorded keys left out)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        settings = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"config file {str(path)!r} is not JSON ({error})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"config file {str(path)!r} holds a {type(settings).__name__}, expected a JSON object")
    if any(key in settings for key in RECORDED_KEYS) and isinstance(settings.get("train"), dict):
        # a saved run's config: whether that run resumed or replaced another says nothing about the next one (a
        # saved "overwrite": true would refuse the --resume that `c2r-place apply` and `reshard` print)
        settings["train"] = {k: v for k, v in settings["train"].items() if k not in ("resume", "overwrite")}
    return {key: value for key, value in settings.items() if key not in RECORDED_KEYS}


# ---------------------------------------------------------------------------------------------------------------
# The command line: --config, shorthand flags, --set, --print-config.


@dataclass(frozen=True)
class Shorthand:
    """A flag that stands for ``--set KEY=VALUE``; a ``switch`` takes no value and sets KEY to true."""

    flag: str
    key: str
    help: str
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    switch: bool = False
    aliases: tuple[str, ...] = ()  # other spellings of the flag (DeepSpeed's own ``--deepspeed_config``)


@dataclass(frozen=True)
class ConfigCli:
    """One tool's command line and how it resolves its run config (the layers of the module docstring).

    Attributes:
        config_cls: the run config dataclass (``RunConfig`` or a subclass with more sections).
        shorthands: the tool's flags, each one config key.
        defaults: the tool's defaults, where they differ from the dataclasses'.
        base: the layer under ``defaults``, computed from the user's settings (``c2r-adak`` reads its source
            checkpoint there); it supplies the ``inherited`` sections, whose defaults are therefore not the
            dataclasses'.
    """

    prog: str
    description: str
    config_cls: type
    shorthands: tuple[Shorthand, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    base: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    inherited: tuple[str, ...] = ()

    def parser(self) -> argparse.ArgumentParser:
        parser = LauncherParser(
            prog=self.prog, description=self.description, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        sections = "/".join(f.name for f in dataclasses.fields(self.config_cls))
        parser.add_argument(
            "--config", help=f"JSON with sections {sections}, e.g. a saved run's c2r_config.json (see --print-config)"
        )
        for s in self.shorthands:
            if s.switch:
                parser.add_argument(
                    s.flag, *s.aliases, dest=s.key, action="store_true", help=f"{s.help} ({s.key}=true)"
                )
            else:
                metavar = None if s.choices else s.metavar or s.flag.lstrip("-").upper().replace("-", "_")
                parser.add_argument(
                    s.flag, *s.aliases, dest=s.key, type=s.type, choices=s.choices, metavar=metavar, help=self._help(s)
                )
        parser.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override any config field, e.g. --set model.moe.num_experts=16 (repeatable; after the flags)",
        )
        parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
        parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by the launcher
        return parser

    def _help(self, s: Shorthand) -> str:
        shown = flatten(self.defaults)
        if s.key.split(".")[0] not in self.inherited:
            shown = {**dataclass_defaults(self.config_cls), **shown}
        default = shown.get(s.key)
        if default is None:
            return f"{s.help} ({s.key})"
        return f"{s.help} ({s.key}, default {default})"

    def parse(self, argv: list[str] | None = None) -> argparse.Namespace:
        return self.parser().parse_args(argv)

    def user_settings(self, args: argparse.Namespace) -> dict[str, Any]:
        """The user's layers: ``--config``, then the shorthand flags, then ``--set``."""
        settings = load_config_file(args.config) if args.config else {}
        for s in self.shorthands:
            value = getattr(args, s.key)
            if value is not None and value is not False:  # not `in (None, False)`: 0 == False, and 0 is a value
                apply_override(settings, f"{s.key}={json.dumps(value)}")
        for assignment in args.set or []:
            apply_override(settings, assignment)
        return settings

    def config(self, args: argparse.Namespace) -> Any:
        user = self.user_settings(args)
        base = self.base(user) if self.base else {}
        return config_from_dict(self.config_cls, merge(merge(base, self.defaults), user))

    def resolve(self, argv: list[str]) -> Any:
        """The run config of a command line (``--print-config`` is ignored)."""
        return self.config(self.parse(argv))

    def main(self, argv: list[str] | None, run: Callable[[Any], str | None]) -> int:
        """Parse, resolve (or print) the config, ``run`` it. Bad input (our errors: ValueError, its subclass
        PlacementError, FileNotFoundError, with messages naming the values) exits with code 2 and one line, printed
        once for the job (``report_error``); anything else is a bug and keeps its traceback. ``C2R_TRACEBACK=1`` in the
        environment keeps the traceback of every error (a ValueError from deep inside a library is one line too)."""
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
        )
        args = self.parse(argv)
        # What libraries print while the config resolves (DeepSpeed logs to stdout on import, and c2r-adak reads its
        # source checkpoint through c2r.deepspeed) goes to stderr: --print-config's stdout is the JSON alone.
        printing = contextlib.redirect_stdout(sys.stderr) if args.print_config else contextlib.nullcontext()
        try:
            with printing:
                config = self.config(args)
        except (ValueError, TypeError, FileNotFoundError) as error:
            if os.environ.get("C2R_TRACEBACK"):
                raise
            return report_error(f"{self.prog}: bad config: {error}")
        if args.print_config:
            print(json.dumps(dataclasses.asdict(config), indent=2))
            return 0
        try:
            check_machine(config)
            summary = run(config)
        # FloatingPointError: a diverged run; OSError: the machine (a full disk, a read-only --out)
        except (ValueError, OSError, FloatingPointError) as error:
            if os.environ.get("C2R_TRACEBACK"):
                raise
            return report_error(f"{self.prog}: {error}")
        if dist.get_rank() == 0 and summary:
            print(summary)
        dist.destroy_process_group()
        return 0


def launcher_rank() -> int:
    """This process's rank as its launcher set it (deepspeed/torchrun, mpirun, SLURM); 0 without a launcher. Read
    from the environment, so it is known before (and without) torch.distributed."""
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


# How long a rank other than 0 waits before printing its error line. Every rank runs the same checks on the same
# input, so rank 0's line speaks for the job: rank 0 exits at once with code 2, the launcher (deepspeed, torchrun,
# mpirun) then stops the other ranks, which are still waiting and never print. A rank that fails alone (a file
# missing on its node) is not stopped and prints its line, with its rank, after the wait.
OTHER_RANK_ERROR_DELAY_S = 5.0


def report_error(line: str) -> int:
    """Print ``line`` to stderr once for the whole job (see ``OTHER_RANK_ERROR_DELAY_S``); the exit code, 2."""
    rank = launcher_rank()
    if rank != 0:
        time.sleep(OTHER_RANK_ERROR_DELAY_S)
        line = f"{line} (rank {rank})"
    print(line, file=sys.stderr, flush=True)
    return 2


class LauncherParser(OneLineParser):
    """A command line error printed once for the job, as ``report_error`` prints."""

    def report(self, line: str) -> None:
        report_error(line)


def check_machine(config: RunConfig) -> None:
    """Refuse, before any process group or model exists, settings this machine cannot run: a CUDA device or the
    MegaBlocks backend without a GPU (or without MegaBlocks installed)."""
    from c2r.experts.megablocks_backend import megablocks_unavailable_reason

    device = config.train.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device}: no CUDA GPU is visible (torch.cuda.is_available() is False); use --device cpu or auto"
        )
    if config.model.moe.experts.backend == "megablocks":
        if device == "cpu":
            raise ValueError("--backend megablocks needs CUDA tensors and --device is cpu; use --backend auto or torch")
        reason = megablocks_unavailable_reason()
        if reason:
            raise ValueError(f"--backend megablocks: {reason}; use --backend auto or torch")


# ---------------------------------------------------------------------------------------------------------------
# The job and the engine.


# DeepSpeed's ZeRO-2 gathers its partitions with torch.distributed.all_gather_into_tensor, which torch deprecates:
# every rank would print the warning and a stack line, about a call that is not ours.
DEPRECATED_ALL_GATHER = r"`torch\.distributed\.all_gather_into_tensor` is deprecated"


def start_run(config: RunConfig):
    """Join the job the launcher started (or start a one-process one); returns this rank's ``DistInfo``."""
    from c2r.deepspeed import init_distributed

    warnings.filterwarnings("ignore", message=DEPRECATED_ALL_GATHER, category=FutureWarning)
    info = init_distributed(config.train.device)
    require_divides(config.train.ep_size, "ep_size", info.world_size, "the world size")
    return info


def global_mean(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


@dataclass(frozen=True)
class TrainOnly:
    """Train only some modules of an otherwise frozen model (``c2r-adak``: the Ada-K allocators).

    ``select`` picks them from the built model; they stay float32 and get one AdamW parameter group named ``name``
    (AdamW's default betas, constant learning rate).
    """

    name: str
    select: Callable[[nn.Module], list[nn.Module]]


def build_engine(
    config: RunConfig,
    device: torch.device,
    train_only: TrainOnly | None = None,
    observers: list[DispatchObserver] | None = None,
):
    """The model on ``device`` under DeepSpeed, experts sharded over ``ep_size`` ranks; every parameter trains
    (AdamW, warm-up and cosine decay) unless ``train_only`` says which modules do."""
    import deepspeed

    from c2r.deepspeed import load_deepspeed_config, make_expert_parallel
    from c2r.deepspeed.fp32_grads import copy_grads_to_float32_in_one_pass
    from c2r.deepspeed.fp32_norm import read_grad_norm_in_float32
    from c2r.deepspeed.fused_clip import fold_clip_into_fused_adamw
    from c2r.deepspeed.one_rank_groups import skip_one_rank_group_work
    from c2r.deepspeed.replica_norm import count_replicas_once
    from c2r.deepspeed.setup import warn_if_clipping_counts_replicas, warn_if_copy_choice_is_idle
    from c2r.deepspeed.zero0_init import undo_the_init_step
    from c2r.deepspeed.zero0_norm import clip_by_whole_model_norm

    tc = config.train
    ds_config = load_deepspeed_config(
        tc.deepspeed_config, device.type == "cuda", tc.batch_size, tc.grad_clip, tc.grad_accum
    )
    torch.manual_seed(tc.seed)  # the same initial model on every rank; each then keeps its own experts
    if config.hf.model_dir is not None:
        from c2r.hf.training import build_model

        model = build_model(config, tc.dispatch, plan_layouts(config), observers)
    else:
        model = MoEGPT(config.model)
        make_expert_parallel(
            model,
            tc.ep_size,
            tc.dispatch,
            plan_layouts(config),
            observers,
            tc.gpus_per_node,
            tc.overlap_chunks,
            tc.copy_choice,
        )
    warn_if_copy_choice_is_idle(model, tc.copy_choice)
    if train_only is None:
        optimizer, scheduler = optimize_everything(model, device, tc)
    else:
        ds_config, optimizer = optimize_only(model, device, tc, ds_config, train_only)
        scheduler = None
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    undo_the_init_step(engine)  # ZeRO 0 16-bit: DeepSpeed's constructor took an Adam step with zero gradients
    # The clipping norm: ZeRO 0 gets the whole model's (DeepSpeed's leaves the experts out in bf16/fp16 and averages
    # the ranks' norms in fp32), a replicated expert counted once; ZeRO 1/2 (CPU offload too) get a replicated
    # expert counted once; another optimizer (DeepSpeed's BF16_Optimizer) with replicas warns.
    read_grad_norm_in_float32(engine)  # ZeRO 1/2: no float64 copy of every gradient for the norm
    if not clip_by_whole_model_norm(engine) and not count_replicas_once(engine):
        warn_if_clipping_counts_replicas(model, ds_config, type(engine.optimizer).__name__)
    fold_clip_into_fused_adamw(engine)  # ZeRO 1/2 with the fused AdamW (GPUs): no separate clip pass
    copy_grads_to_float32_in_one_pass(engine)  # bf16 ZeRO 1/2: a vectorised copy to the fp32 gradient partition
    skip_one_rank_group_work(engine)  # ZeRO 1/2: no division by 1 or norm all-reduce over a one-rank group
    return engine


def model_width(model: nn.Module) -> int:
    """The residual stream's width: the embedding dimension of the model's (first) token embedding."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return module.embedding_dim
    raise ValueError("the model has no nn.Embedding to read its width from; set train.lr_base_width=0")


def hidden_lr_scale(model: nn.Module, tc: TrainConfig) -> float:
    """The factor of this model's hidden matrices' learning rate (``width_lr_scale`` at its width)."""
    from c2r.deepspeed.setup import width_lr_scale

    return width_lr_scale(tc.lr_base_width, model_width(model))


def optimize_everything(model: nn.Module, device: torch.device, tc: TrainConfig):
    """AdamW over every parameter (experts in their own groups, as DeepSpeed's MoE needs), with ``lr_at``; hidden
    matrices of a model wider than ``lr_base_width`` at a proportionally lower rate."""
    from c2r.deepspeed import optimizer_param_groups

    model.to(device)
    scale = hidden_lr_scale(model, tc)
    groups = optimizer_param_groups(model, tc.weight_decay, hidden_lr=tc.lr * scale if scale < 1.0 else None)
    # On a GPU the fused kernel: one launch for all tensors instead of a few per tensor group (the optimizer step
    # of a 3B-parameter fine-grained MoE is a large part of its training step). Not on CPUs: torch's CPU kernel made
    # the 100-step demo 52% slower (63.6 vs 41.8 s, 2 ranks, 2026-12-01); tests/test_fused_clip.py covers the path
    # that only the fused kernel takes (ZeRO's clip scale handed to it).
    optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.95), fused=device.type == "cuda")

    def scheduler(final_optimizer):
        # A callable: DeepSpeed builds it on the optimizer as it finally is (it may drop or regroup param groups).
        # LambdaLR scales each group's own initial rate, so the hidden group keeps its factor along the schedule.
        return torch.optim.lr_scheduler.LambdaLR(final_optimizer, lambda step: lr_at(step, tc) / tc.lr)

    return optimizer, scheduler


def optimize_only(
    model: nn.Module, device: torch.device, tc: TrainConfig, ds_config: dict[str, Any], train_only: TrainOnly
) -> tuple[dict[str, Any], torch.optim.Optimizer]:
    """Freeze everything but ``train_only``'s modules before the optimizer is built (frozen parameters get no
    gradient, no optimizer state and no all-reduce); returns the DeepSpeed config to run with and the optimizer."""
    ds_config, dtype = frozen_model_deepspeed_config(ds_config)
    trained = train_only.select(model)
    model.requires_grad_(False)
    model.to(device=device, dtype=dtype)
    for module in trained:
        module.float().requires_grad_(True)
    params = [p for module in trained for p in module.parameters()]
    group = {"name": train_only.name, "params": params, "weight_decay": tc.weight_decay}
    return ds_config, torch.optim.AdamW([group], lr=tc.lr)


def frozen_model_deepspeed_config(ds_config: dict[str, Any]) -> tuple[dict[str, Any], torch.dtype]:
    """The user's DeepSpeed config, run at ZeRO stage 0 without DeepSpeed's mixed-precision optimizer; and the
    dtype the frozen model runs in (bf16/fp16 when the config enables it).

    Only a few modules train (``c2r-adak``: a few thousand parameters): ZeRO has nothing worth sharding, and
    DeepSpeed 0.19.8's ZeRO-1/2 and bf16 optimizers refuse an MoE model whose expert parameters are all frozen
    ("None of the param groups are marked as MoE"). So: a plain float32 AdamW over the trained modules (DeepSpeed
    all-reduces their gradients over every rank), the frozen rest cast to the 16-bit dtype by us.
    """
    dtype = torch.float32
    if ds_config.get("bf16", {}).get("enabled"):
        dtype = torch.bfloat16
    elif ds_config.get("fp16", {}).get("enabled"):
        dtype = torch.float16
    ds_config["zero_optimization"] = {"stage": 0}
    ds_config["bf16"] = {"enabled": False}
    ds_config["fp16"] = {"enabled": False}
    return ds_config, dtype


def plan_layouts(config: RunConfig):
    """The placement plan's per-layer expert layouts, checked against the model; None for contiguous."""
    if config.train.placement_plan is None:
        return None
    from placement.plan import load_plan

    return load_plan(
        config.train.placement_plan,
        num_layers=num_moe_layers(config),
        num_experts=config.model.moe.num_experts,
        num_ranks=config.train.ep_size,
    ).layouts


def num_moe_layers(config: RunConfig) -> int:
    """MoE layers of the model the run trains: our GPT's, or the Hugging Face model's (``--hf-model``)."""
    if config.hf.model_dir is None:
        return config.model.num_moe_layers
    from c2r.hf.training import model_shape

    return model_shape(config.hf.model_dir).num_moe_layers


def corpus_tokenizer(config: RunConfig):
    """The tokenizer of the run's text: bytes for our GPT, the model's own with ``--hf-model``."""
    from c2r.data import ByteTokenizer, HFTokenizer
    from c2r.hf.training import model_shape

    if config.hf.model_dir is None:
        return ByteTokenizer()
    return HFTokenizer(config.hf.model_dir, vocab_size=model_shape(config.hf.model_dir).vocab_size)


# ---------------------------------------------------------------------------------------------------------------
# Batches, the metrics log, the progress bar.


def batch_samplers(
    corpus: Corpus, config: RunConfig, rank: int, world_size: int, stream: int = 0
) -> tuple[BatchSampler, BatchSampler]:
    """This rank's training and validation batches. ``stream`` picks another sequence of training batches (c2r-adak
    trains on other batches than the model saw); validation batches depend only on the seed and the world.

    ``train.batch_sampler`` "global" (default): each step is one global batch, sliced per rank, the same at any world
    size for the same global batch (what resharding needs). "per-rank": each rank draws from its own seed, the
    stream of runs saved before the global sampler (``--resume`` such a run with it to replay its batches)."""
    tc, block = config.train, config.model.block_size
    check_splits_fit(corpus, config.data.val_every, block)
    if tc.batch_sampler == "per-rank":
        rank_seed = tc.seed + RANK_SEED_STRIDE * rank
        train = BatchSampler(corpus.train, block, tc.batch_size, seed=rank_seed + stream)
        val = BatchSampler(corpus.val, block, tc.batch_size, seed=rank_seed + VAL_SEED_OFFSET)
        return train, val
    slice_of = {"rank": rank, "world_size": world_size}
    train = BatchSampler(
        corpus.train, block, tc.batch_size, seed=tc.seed + stream, micro_batches=tc.grad_accum, **slice_of
    )
    val = BatchSampler(corpus.val, block, tc.batch_size, seed=tc.seed + VAL_SEED_OFFSET, **slice_of)
    return train, val


def check_same_corpus(corpus: Corpus) -> None:
    """Every rank slices one global batch out of its own copy of the text: refuse, in one line, ranks whose copy
    differs from rank 0's (another Python's standard library on another node, --data files that differ between
    nodes). A CRC of the tokens, gathered once at the start."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    digest = (len(corpus.train), len(corpus.val), zlib.crc32(corpus.train.tobytes()), zlib.crc32(corpus.val.tobytes()))
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    other = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if other:
        (train, val, *_), (train0, val0, *_) = digests[other[0]], digests[0]
        raise ValueError(
            f"ranks {other} loaded another text than rank 0 from {corpus.source} (rank {other[0]}: {train} training "
            f"and {val} validation tokens, rank 0: {train0} and {val0}, or the same counts of other tokens): every "
            "node needs the same data (the same Python for the embedded corpus, the same --data files)"
        )


def check_splits_fit(corpus: Corpus, val_every: int, block_size: int) -> None:
    """Refuse, naming the split, the text and what would fix it, a split too short for one window of the model."""
    for split, tokens in (("training", corpus.train), ("validation", corpus.val)):
        if len(tokens) > block_size + 1:
            continue
        if split == "validation":
            held = (
                f"every data.val_every-th ({val_every}) of its {corpus.num_documents} documents"
                if corpus.num_documents >= 2 * val_every
                else f"the last 1/{val_every} (data.val_every) of its text, as it has under {2 * val_every} documents"
            )
            how = f"validation holds out {held}: give more text, or lower data.val_every or model.block_size"
        else:
            how = "give more text or lower model.block_size"
        raise ValueError(
            f"the {split} split of {corpus.source} has {len(tokens)} tokens, too few for one window of "
            f"model.block_size {block_size} + 1; {how}"
        )


def tokens_per_step(config: RunConfig, world_size: int) -> int:
    """Tokens one optimizer step trains on over all ranks: sequences per micro-batch x micro-batches x length x
    ranks (what ``batch_samplers`` draws)."""
    tc = config.train
    return tc.batch_size * tc.grad_accum * config.model.block_size * world_size


def plural(count: int, noun: str) -> str:
    """``count`` and ``noun`` for a log line: 1 rank, 2 ranks."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def progress_bar(steps: range, desc: str, enabled: bool) -> tqdm:
    """A bar for ``steps`` on rank 0 (``enabled``), counting from ``steps.start`` (a resumed run) to ``steps.stop``.
    Call ``bar.update()`` as each step ends (a bar iterated over the steps counts them only when it draws: the lines
    ``tqdm.write`` redraws it under, and a log file's, would show a stale count such as 0/40), set its postfix with
    ``refresh=False`` (it draws at its own interval) and close it."""
    return tqdm(
        desc=desc,
        unit="step",
        disable=not enabled,
        initial=steps.start,
        total=steps.stop,
        mininterval=0.1 if sys.stderr.isatty() else 5.0,  # keep logs of non-interactive runs short
    )


class MetricsLog:
    """A JSON-lines metrics file and its terminal lines (``format_record``), written by rank 0 only.
    ``resumed_at``: the step a resumed run starts from: the file keeps its records up to that step and the run
    appends (the records of later steps came from steps the run now repeats: kept, every evaluation would be
    there twice); None: a new file."""

    def __init__(
        self, path: Path, resumed_at: int | None, enabled: bool, format_record: Callable[[dict[str, Any]], str]
    ):
        self.path, self.resumed_at, self.enabled, self.file = path, resumed_at, enabled, None
        self.format_record = format_record

    def __enter__(self) -> MetricsLog:
        if self.enabled:
            if self.resumed_at is not None and self.path.is_file():
                atomic_write_text(self.path, "".join(_records_through(self.path, self.resumed_at)))
            mode = "w" if self.resumed_at is None else "a"
            self.file = open(self.path, mode)  # noqa: SIM115 (closed in __exit__)
        return self

    def write(self, record: dict[str, Any]) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            tqdm.write(self.format_record(record))

    def __exit__(self, *exc) -> None:
        if self.file:
            self.file.close()


def _records_through(path: Path, step: int) -> list[str]:
    """The lines of a metrics file whose record is of ``step`` or before (a line cut short by a crash is dropped)."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or record["step"] <= step:
            kept.append(line + "\n")
    return kept
