"""Routing traces from Hugging Face ``transformers`` 5.x MoE models, and from the same models after DeepSpeed AutoEP.

What is hooked, and why there:

* Hugging Face blocks (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3 and every other model whose experts
  module follows the 5.x experts interface ``experts(hidden_states, top_k_index, top_k_weights)``): a forward
  *pre*-hook on ``<block>.experts``. Its arguments are the expert ids and combine weights the block computes with,
  straight from the model's own router (``<block>.gate``: softmax / sigmoid, ``num_experts_per_tok``,
  ``norm_topk_prob``, DeepSeek's group-limited top-k and score-correction bias, ``routed_scaling_factor``). Nothing
  is re-derived, so the trace cannot drift from the model when a router rule changes, and it also covers blocks
  whose gate is a plain ``nn.Linear`` with the top-k done in the block.
* DeepSpeed AutoEP (``AutoEPMoELayer``): a forward hook on ``<layer>.router`` (``TokenChoiceTopKRouter``), whose
  output ``(top_scores, selected_experts, num_tokens_per_expert)`` is what the layer dispatches. Ids are global
  expert ids, seen before any all-to-all, so each rank records the tokens it owns.

Layer indices count MoE blocks only, in the order ``model.named_modules()`` meets them (depth order for Hugging Face
decoder stacks); dense layers (DeepSeek's ``first_k_dense_replace``, Qwen2-MoE's ``mlp_only_layers``) are skipped.

Not handled: transformers 4.x blocks (experts as an ``nn.ModuleList``, the top-k inside the block's forward); such a
model raises the "no MoE layers" ValueError. Under activation checkpointing the recompute calls the hooks again, so
record with checkpointing off (``trace_hf_model`` runs under ``torch.no_grad``, where nothing is recomputed).

Shape legend: T tokens, K slots, E experts, H hidden.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from profiling.trace import RoutingTraceRecorder, TraceConfig

ROUTER_CHILD_NAMES = ("gate", "router")
AUTOEP_LAYER_CLASS = "AutoEPMoELayer"


@dataclass(frozen=True)
class MoESite:
    """One MoE block found in a model, and the module whose call carries its routing decision."""

    layer_index: int
    block_name: str
    hook_name: str  # the module the hook goes on (``...experts`` or ``...router``)
    hook_module: nn.Module
    kind: str  # "hf" or "autoep"
    num_experts: int
    top_k: int
    router_class: str


@dataclass
class HookHandles:
    """What :func:`attach_hf_routing_hooks` attached; ``remove()`` detaches all of it (also on leaving a ``with``)."""

    layers: list[tuple[int, str]]
    sites: list[MoESite]
    _handles: list[Any] = field(default_factory=list, repr=False)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> HookHandles:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


# ---------------------------------------------------------------------------------------------------------------------
# Finding the MoE blocks
# ---------------------------------------------------------------------------------------------------------------------


def _is_autoep_layer(module: nn.Module) -> bool:
    """By class name, so finding HF blocks never imports DeepSpeed (a multi-second import)."""
    cls = type(module)
    return cls.__name__ == AUTOEP_LAYER_CLASS and cls.__module__.startswith("deepspeed.")


def _router_child(block: nn.Module) -> nn.Module | None:
    for name in ROUTER_CHILD_NAMES:
        child = block._modules.get(name)
        if child is not None:
            return child
    return None


def _experts_takes_routing(experts: nn.Module) -> bool:
    """The 5.x experts interface: ``forward(hidden_states, top_k_index, top_k_weights)``, and ``num_experts``."""
    if not isinstance(getattr(experts, "num_experts", None), int):
        return False
    try:
        params = list(inspect.signature(experts.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3


def _hf_top_k(block: nn.Module, router: nn.Module | None, model_config: Any) -> int | None:
    """The router's own ``top_k`` first: it is the value the block's top-k uses; the config is a fallback."""
    candidates = (
        getattr(router, "top_k", None),
        getattr(block, "top_k", None),
        getattr(model_config, "num_experts_per_tok", None),
    )
    return next((k for k in candidates if isinstance(k, int)), None)


def _hf_site(index: int, name: str, block: nn.Module, model_config: Any) -> MoESite | None:
    experts = block._modules.get("experts")
    if experts is None or not _experts_takes_routing(experts):
        return None
    router = _router_child(block)
    top_k = _hf_top_k(block, router, model_config)
    if top_k is None:
        return None
    return MoESite(
        layer_index=index,
        block_name=name,
        hook_name=f"{name}.experts" if name else "experts",
        hook_module=experts,
        kind="hf",
        num_experts=experts.num_experts,
        top_k=top_k,
        router_class=type(router).__name__ if router is not None else type(block).__name__,
    )


def _autoep_site(index: int, name: str, layer: nn.Module) -> MoESite:
    router = layer.router
    return MoESite(
        layer_index=index,
        block_name=name,
        hook_name=f"{name}.router" if name else "router",
        hook_module=router,
        kind="autoep",
        num_experts=int(layer.num_experts),
        top_k=int(layer.top_k),
        router_class=type(router).__name__,
    )


def find_moe_sites(model: nn.Module) -> list[MoESite]:
    """Every MoE block of ``model`` in depth order; a ValueError naming the model when there is none."""
    model_config = getattr(model, "config", None)
    sites: list[MoESite] = []
    claimed: list[str] = []  # blocks already taken: their submodules are not blocks of their own
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in claimed):
            continue
        site = (
            _autoep_site(len(sites), name, module)
            if _is_autoep_layer(module)
            else _hf_site(len(sites), name, module, model_config)
        )
        if site is not None:
            sites.append(site)
            claimed.append(name)
    if not sites:
        raise ValueError(
            f"{type(model).__name__}: no MoE layers found. Looked for DeepSpeed {AUTOEP_LAYER_CLASS} modules and for "
            "Hugging Face transformers 5.x MoE blocks (a module with an 'experts' child that has an int "
            "'num_experts' and forward(hidden_states, top_k_index, top_k_weights), plus a top_k on its "
            f"{' or '.join(repr(n) for n in ROUTER_CHILD_NAMES)} child, the block or config.num_experts_per_tok)."
        )
    return sites


def hf_moe_shape(model: nn.Module) -> dict[str, int]:
    """``dict(num_layers, num_experts, top_k)`` for building a :class:`RoutingTraceRecorder` for ``model``."""
    return _trace_shape(model, find_moe_sites(model))


def _trace_shape(model: nn.Module, sites: list[MoESite]) -> dict[str, int]:
    """One (E, K) for the whole trace: the recorder's header and counters have a single shape."""
    shapes = {(s.num_experts, s.top_k) for s in sites}
    if len(shapes) != 1:
        detail = ", ".join(f"{s.block_name}: E={s.num_experts} K={s.top_k}" for s in sites)
        raise ValueError(
            f"{type(model).__name__}: MoE layers differ in experts/top_k ({detail}); a routing trace "
            "needs one (num_experts, top_k)"
        )
    ((num_experts, top_k),) = shapes
    return {"num_layers": len(sites), "num_experts": num_experts, "top_k": top_k}


# ---------------------------------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------------------------------


def normalize_expert_ids(expert_ids: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor:
    """[T, K] int64 with -1 for every slot that names no expert.

    Hugging Face's own expert parallelism marks a slot routed to another rank's expert with the sentinel
    ``num_experts`` (its experts skip that one-hot class); anything outside [0, E) is such a slot.
    """
    ids_TK = expert_ids.reshape(-1, top_k).long()
    return torch.where((ids_TK >= 0) & (ids_TK < num_experts), ids_TK, torch.full_like(ids_TK, -1))


def _check_routing(site: MoESite, expert_ids: Any, weights: Any) -> None:
    if not torch.is_tensor(expert_ids) or expert_ids.is_floating_point() or expert_ids.is_complex():
        raise RuntimeError(
            f"{site.hook_name}: expected integer expert ids, got "
            f"{getattr(expert_ids, 'dtype', type(expert_ids).__name__)}; this block does not follow "
            "the experts(hidden_states, top_k_index, top_k_weights) interface"
        )
    if expert_ids.shape[-1] != site.top_k:
        raise RuntimeError(
            f"{site.hook_name}: routed {expert_ids.shape[-1]} slots per token, the model says top_k={site.top_k}"
        )
    if weights is not None and (not torch.is_tensor(weights) or weights.numel() != expert_ids.numel()):
        raise RuntimeError(
            f"{site.hook_name}: combine weights do not match the expert ids' shape {tuple(expert_ids.shape)}"
        )


def _record(recorder: RoutingTraceRecorder, site: MoESite, expert_ids: torch.Tensor, weights: Any) -> None:
    _check_routing(site, expert_ids, weights)
    ids_TK = normalize_expert_ids(expert_ids, site.num_experts, site.top_k)
    weights_TK = weights.reshape(ids_TK.shape) if weights is not None else None
    recorder.record(site.layer_index, ids_TK, weights_TK)


def _experts_argument_names(experts: nn.Module) -> tuple[str, str]:
    """Names of the ids and weights parameters, for blocks that pass them by keyword."""
    params = [
        p
        for p in inspect.signature(experts.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return params[1].name, params[2].name


def _hook_hf_experts(site: MoESite, recorder: RoutingTraceRecorder):
    ids_name, weights_name = _experts_argument_names(site.hook_module)

    def on_experts_call(module, args, kwargs):
        expert_ids = args[1] if len(args) > 1 else kwargs.get(ids_name)
        weights = args[2] if len(args) > 2 else kwargs.get(weights_name)
        _record(recorder, site, expert_ids, weights)

    return site.hook_module.register_forward_pre_hook(on_experts_call, with_kwargs=True)


def _hook_autoep_router(site: MoESite, recorder: RoutingTraceRecorder):
    def on_router_output(module, args, output):
        top_scores, selected_experts = output[0], output[1]
        _record(recorder, site, selected_experts, top_scores)

    return site.hook_module.register_forward_hook(on_router_output)


def attach_hf_routing_hooks(model: nn.Module, recorder: RoutingTraceRecorder) -> HookHandles:
    """Record every forward of every MoE block of ``model`` into ``recorder`` (see the module docstring)."""
    sites = find_moe_sites(model)
    if len(sites) != recorder.num_layers:
        raise ValueError(
            f"{type(model).__name__} has {len(sites)} MoE layers, the recorder was built for "
            f"{recorder.num_layers} (use hf_moe_shape(model))"
        )
    for site in sites:
        if site.num_experts > recorder.num_experts:
            raise ValueError(
                f"{site.block_name} has {site.num_experts} experts, the recorder was built for {recorder.num_experts}"
            )
    handles = HookHandles(layers=[(s.layer_index, s.hook_name) for s in sites], sites=sites)
    for site in sites:
        hook = _hook_autoep_router if site.kind == "autoep" else _hook_hf_experts
        handles._handles.append(hook(site, recorder))
    return handles


# ---------------------------------------------------------------------------------------------------------------------
# One call: shape, recorder, hooks, batches
# ---------------------------------------------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _batch_kwargs(batch: torch.Tensor | Mapping[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    """A tensor is ``input_ids``; a mapping (``input_ids``, ``attention_mask``, ...) is passed as keywords."""
    if torch.is_tensor(batch):
        return {"input_ids": batch.to(device)}
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def trace_hf_model(
    model: nn.Module,
    out_dir: str | Path,
    batches: Iterable[torch.Tensor | Mapping[str, Any]],
    config: TraceConfig | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    source: str | None = None,
) -> RoutingTraceRecorder:
    """Run ``batches`` through ``model`` (eval mode, no grad) and write their routing trace to ``out_dir``.

    Each batch is one trace step. Padding tokens are routed like any other token and are recorded too. The
    model's train/eval mode is restored afterwards; the recorder is closed (and returned) even when a batch fails,
    so what was seen is on disk.
    """
    sites = find_moe_sites(model)
    shape = _trace_shape(model, sites)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    recorder = RoutingTraceRecorder(
        out_dir,
        **shape,
        source=source or f"hf:{type(model).__name__}",
        router=f"{sites[0].kind}:{sites[0].router_class}",
        rank=rank,
        world_size=world_size,
        config=config,
        extra_header={
            "model_class": type(model).__name__,
            "model_type": model_type,
            "moe_modules": [s.hook_name for s in sites],
        },
    )
    device, was_training = _model_device(model), model.training
    model.eval()
    try:
        with attach_hf_routing_hooks(model, recorder), torch.no_grad():
            for step, batch in enumerate(batches):
                recorder.step = step
                model(**_batch_kwargs(batch, device))
    finally:
        model.train(was_training)
        recorder.close()
    return recorder
