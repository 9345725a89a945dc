"""Turn a single-device model into an expert-parallel one from the outside.

Every rank builds the same full model (same seed), then keeps only its own experts and routes the rest of the
tokens through the all-to-all dispatcher. The model code stays single-device math.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from c2r.experts import ExpertWeights
from c2r.moe import MoELayer
from c2r.parallel.dispatch import (
    DISPATCH_MODES,
    NO_OBSERVER,
    DispatchObserver,
    PerExpertDispatcher,
    PerRankDispatcher,
)
from c2r.parallel.nodes import make_node_groups, resolve_ranks_per_node
from c2r.parallel.overlap import OverlappedPerExpertDispatcher, OverlappedPerRankDispatcher
from c2r.parallel.per_node import PerNodeDispatcher
from c2r.routing import Router
from placement.layout import ExpertLayout


def build_dispatcher(
    mode: str,
    layout: ExpertLayout,
    group=None,
    observer: DispatchObserver = NO_OBSERVER,
    ranks_per_node: int | None = None,
    node_groups=None,
    overlap_chunks: int = 1,
    copy_choice: str = "rule",
) -> PerExpertDispatcher | PerRankDispatcher | PerNodeDispatcher:
    """``observer``: who times the exchanges and receives each forward's :class:`DispatchMeta` (default: nobody).

    ``ranks_per_node``: W (None: the launcher's local world size, else one node); per-node dispatch exchanges over
    ``node_groups`` (a :class:`~c2r.parallel.nodes.NodeGroups`; made here if None, but make them once per model).
    ``overlap_chunks``: > 1 runs per-expert or per-rank dispatch in that many chunks of the local tokens whose exchanges
    overlap the experts' compute (``overlap.py``); 1, the default, is the plain path. ``copy_choice``: how a slot of a
    replicated expert picks its copy, ``rule`` or ``balanced`` (``replicas.py``)."""
    ranks_per_node = resolve_ranks_per_node(ranks_per_node, layout.num_ranks)
    check_overlap_chunks(overlap_chunks, mode)
    if overlap_chunks > 1:
        chunked = {"per-expert": OverlappedPerExpertDispatcher, "per-rank": OverlappedPerRankDispatcher}[mode]
        return chunked(layout, group, observer, ranks_per_node, copy_choice, overlap_chunks=overlap_chunks)
    if mode == "per-expert":
        return PerExpertDispatcher(layout, group, observer, ranks_per_node, copy_choice)
    if mode == "per-rank":
        return PerRankDispatcher(layout, group, observer, ranks_per_node, copy_choice)
    if mode == "per-node":
        return PerNodeDispatcher(layout, group, observer, ranks_per_node, node_groups, copy_choice)
    raise ValueError(f"dispatch mode {mode!r} is not one of {list(DISPATCH_MODES)}")


def check_overlap_chunks(overlap_chunks: int, mode: str, prefix: str = "") -> None:
    """One line naming the values: chunks must be a positive int; per-node dispatch has no chunked form.
    ``prefix``: how the caller's config spells the key's section (``train.``)."""
    if isinstance(overlap_chunks, bool) or not isinstance(overlap_chunks, int) or overlap_chunks < 1:
        raise ValueError(f"{prefix}overlap_chunks ({overlap_chunks!r}) must be an integer >= 1 (1: no overlap)")
    if overlap_chunks > 1 and mode not in ("per-expert", "per-rank"):
        raise ValueError(
            f"{prefix}overlap_chunks ({overlap_chunks}) works with dispatch per-expert or per-rank, not {mode!r}; use 1"
        )


def local_expert_weights(full: ExpertWeights, experts: list[int]) -> ExpertWeights:
    """A new :class:`ExpertWeights` holding ``experts`` (logical ids) of ``full``, in that order."""
    local = ExpertWeights(len(experts), full.hidden_size, full.ffn_hidden_size, full.activation)
    F = full.ffn_hidden_size
    rows = torch.cat([torch.arange(e * F, (e + 1) * F) for e in experts])
    with torch.no_grad():
        for name in ("w1", "v1", "w2"):
            src = getattr(full, name)
            if src is not None:
                getattr(local, name).data = src.detach()[rows].clone()
    return local.to(device=full.w1.device, dtype=full.w1.dtype)


def shard_experts(
    model: nn.Module,
    layout: ExpertLayout | list[ExpertLayout] | None = None,
    group=None,
    mode: str = "per-expert",
    observers: list[DispatchObserver] | None = None,
    ranks_per_node: int | None = None,
    overlap_chunks: int = 1,
    copy_choice: str = "rule",
) -> list[MoELayer]:
    """Make every :class:`MoELayer` in ``model`` expert parallel over ``group`` (default: the world).

    ``layout``: one for every layer, one per MoE layer (a placement plan), or None for the contiguous layout. A
    replicated layout gives each rank its X slots, replicas included, each copied from the full model (so copies start
    identical; the dispatcher keeps them so, ``replicas.py``).
    ``mode``: ``per-expert``, ``per-rank`` or ``per-node`` dispatch. ``observers``: one per MoE layer (e.g. the
    communication profiler's), given to that layer's dispatcher; default none. ``ranks_per_node``: the EP ranks of one
    node (default: the launcher's local world size, else one node); per-node dispatch exchanges within and across
    nodes, every mode counts inter- and intra-node copies by it. ``copy_choice``: ``rule`` or ``balanced``, for
    replicated layouts (``replicas.py``). Returns the converted layers.
    """
    ep_size = dist.get_world_size(group)
    ranks_per_node = resolve_ranks_per_node(ranks_per_node, ep_size)
    # Per-node dispatch's process groups: made once (a collective), shared by every layer.
    node_groups = make_node_groups(ranks_per_node, group) if mode == "per-node" else None
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if isinstance(layout, list) and len(layout) != len(layers):
        raise ValueError(f"the placement has {len(layout)} layers but the model has {len(layers)} MoE layers")
    if observers is not None and len(observers) != len(layers):
        raise ValueError(f"{len(observers)} dispatch observers given but the model has {len(layers)} MoE layers")
    for index, layer in enumerate(layers):
        num_experts = layer.config.num_experts
        layer_layout = layout[index] if isinstance(layout, list) else layout
        layer_layout = layer_layout or ExpertLayout.contiguous(num_experts, ep_size)
        if layer_layout.num_experts != num_experts:
            raise ValueError(
                f"the expert layout is for {layer_layout.num_experts} experts but MoE layer {index} has {num_experts}"
            )
        observer = observers[index] if observers else NO_OBSERVER
        dispatcher = build_dispatcher(
            mode,
            layer_layout,
            group,
            observer,
            ranks_per_node,
            node_groups,
            overlap_chunks=overlap_chunks,
            copy_choice=copy_choice,
        )
        layer.experts = local_expert_weights(layer.experts, layer_layout.local_experts(dispatcher.rank))
        layer.dispatcher = dispatcher
        if layer_layout.is_replicated and type(layer.router).set_expert_placement is not Router.set_expert_placement:
            # Group-limited routing keeps a token's experts on few ranks; with copies on several ranks "the rank of
            # an expert" has no single answer, so refuse rather than group by the home ranks silently.
            raise ValueError(
                f"router {layer.config.router.kind!r} groups experts by rank and cannot use a layout with replicated "
                f"experts (MoE layer {index}); use a plan without replicas, or another router"
            )
        layer.router.set_expert_placement(layer_layout.expert_to_rank, layer_layout.num_ranks)  # group-limited uses it
    return layers


def model_layouts(model: nn.Module) -> list[list[int] | None]:
    """Each MoE layer's layout in its saved form (`ExpertLayout.to_json`; None where the layer is not expert
    parallel): what the run config's ``expert_layouts`` and profile.json's ``expert_to_rank`` hold."""
    return [
        m.dispatcher.layout.to_json() if m.dispatcher is not None else None
        for m in model.modules()
        if isinstance(m, MoELayer)
    ]
