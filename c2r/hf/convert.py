"""Replace every MoE block of a Hugging Face model with an :class:`HFMoEBlock` that computes the same function.

The router's weights and each expert's three matrices are mapped into our layout (c2r/hf/weights.py); shared
experts stay the model's own modules. With expert parallelism (``ep_size`` > 1) a block keeps only its rank's
experts, so a model built on the meta device (c2r.hf.load) never materialises the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from c2r.experts import ExpertConfig
from c2r.hf.architectures import Architecture, architecture_for, find_blocks
from c2r.hf.block import HFMoEBlock
from c2r.hf.routers import block_router_config, init_from_hf_router
from c2r.hf.weights import load_hf_experts
from c2r.moe import MoEConfig, MoELayer
from c2r.routing import RouterConfig
from placement.layout import ExpertLayout


@dataclass
class HFConversion:
    """What a converted model remembers of its origin (``model.c2r_hf``): export and loading read it."""

    arch: Architecture
    config: Any  # the Hugging Face config
    ep_rank: int
    layouts: list[ExpertLayout]
    source_dir: Path | None = None
    load_stats: dict[str, int] = field(default_factory=dict)


def layouts_for(
    num_layers: int, num_experts: int, ep_size: int, expert_to_rank: list[int] | list[list[int]] | None
) -> list[ExpertLayout]:
    """One layout per MoE layer: contiguous by default; one ``expert_to_rank`` for all layers or one per layer."""
    if expert_to_rank is None:
        return [ExpertLayout.contiguous(num_experts, ep_size)] * num_layers
    per_layer = expert_to_rank if expert_to_rank and isinstance(expert_to_rank[0], list | tuple) else None
    if per_layer is not None and len(per_layer) != num_layers:
        raise ValueError(f"expert_to_rank has {len(per_layer)} layers but the model has {num_layers} MoE layers")
    layouts = [ExpertLayout(tuple(e2r), ep_size) for e2r in (per_layer or [expert_to_rank] * num_layers)]
    for layout in layouts:
        if layout.num_experts != num_experts:
            raise ValueError(f"expert_to_rank names {layout.num_experts} experts but the model has {num_experts}")
    return layouts


def _check_swiglu(arch: Architecture, config: Any) -> None:
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{arch.model_type}: hidden_act {act!r} is not supported (our experts are SiLU-gated GLUs)")


def convert_block(
    arch: Architecture,
    hf_block: nn.Module,
    layer_index: int,
    layout: ExpertLayout,
    ep_rank: int,
    *,
    router: RouterConfig | None = None,
    top_k: int | None = None,
    aux_loss_weight: float | None = None,
    experts: ExpertConfig | None = None,
    init_std: float = 0.02,
) -> HFMoEBlock:
    """One block. Weights are copied unless the Hugging Face block lives on the meta device (then the caller
    loads them)."""
    hf_router, hf_experts = getattr(hf_block, arch.router_attr), hf_block.experts
    num_experts, (_, two_ffn, hidden) = hf_experts.num_experts, hf_experts.gate_up_proj.shape
    if layout.num_experts != num_experts:
        raise ValueError(f"the expert layout is for {layout.num_experts} experts, {arch.block_class} has {num_experts}")
    if experts is not None and experts.activation != "swiglu":
        raise ValueError(
            f"{arch.model_type}: ExpertConfig(activation={experts.activation!r}) cannot hold its experts, which are "
            "SiLU-gated GLUs: use activation='swiglu'"
        )
    native = arch.native_router(hf_router)
    moe_config = MoEConfig(
        num_experts=num_experts,
        top_k=top_k or hf_router.top_k,
        ffn_hidden_size=two_ffn // 2,
        router=block_router_config(native, router, aux_loss_weight),
        experts=experts or ExpertConfig(activation="swiglu"),
    )
    local = layout.local_experts(ep_rank)
    moe = MoELayer(hidden, moe_config, init_std, layer_index, num_local_experts=len(local))
    nn.init.normal_(moe.experts.w1, std=init_std)
    nn.init.normal_(moe.experts.v1, std=init_std)
    if hf_experts.gate_up_proj.device.type != "meta":
        init_from_hf_router(moe.router, hf_router, native)
        load_hf_experts(moe.experts, hf_experts.gate_up_proj.detach(), hf_experts.down_proj.detach(), local)
        moe.router.to(hf_router.weight.dtype)
        moe.experts.to(hf_experts.gate_up_proj.dtype)
    shared = {name: getattr(hf_block, name) for name in arch.shared_attrs}
    jitter = float(getattr(hf_block, "jitter_noise", 0.0) or 0.0)
    return HFMoEBlock(arch, moe, layout, ep_rank, shared, native, hf_router.top_k, jitter)


def convert(
    model: nn.Module,
    router: RouterConfig | None = None,
    *,
    top_k: int | None = None,
    aux_loss_weight: float | None = None,
    experts: ExpertConfig | None = None,
    ep_rank: int = 0,
    ep_size: int = 1,
    expert_to_rank: list[int] | list[list[int]] | None = None,
) -> nn.Module:
    """Replace every MoE block of ``model`` (a transformers 5.x causal LM) in place; returns ``model``.

    ``router``: None keeps the model's own routing (same function); a :class:`RouterConfig` switches every block to
    that router, started from the pretrained gate. ``top_k`` overrides the model's k (AdaMoE raises it).
    ``aux_loss_weight``: our router's load-balancing coefficient (default: 0 for the native router, the config's
    for a switched one); the blocks expose the loss via :func:`c2r.hf.aux_loss`. ``ep_rank`` / ``ep_size`` /
    ``expert_to_rank``: keep only this rank's experts (see :func:`layouts_for`).
    """
    arch = architecture_for(getattr(model, "config", None), type(model).__name__)
    _check_swiglu(arch, model.config)
    blocks = find_blocks(model, arch)
    num_experts = blocks[0][1].experts.num_experts
    layouts = layouts_for(len(blocks), num_experts, ep_size, expert_to_rank)
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank ({ep_rank}) must be in 0..{ep_size - 1}")
    std = getattr(model.config, "initializer_range", 0.02)
    for index, (name, hf_block) in enumerate(blocks):
        block = convert_block(
            arch,
            hf_block,
            index,
            layouts[index],
            ep_rank,
            router=router,
            top_k=top_k,
            aux_loss_weight=aux_loss_weight,
            experts=experts,
            init_std=std,
        )
        model.set_submodule(name, block)
        _record_router_logits(block)
    model.c2r_hf = HFConversion(arch, model.config, ep_rank, layouts)
    return model


def _record_router_logits(block: HFMoEBlock) -> None:
    """Hook the logits tap the way transformers hooks its routers for ``output_router_logits`` (its recorder finds
    modules by class, so it would never find ours)."""
    if block.router_logits is None:
        return
    from transformers.utils.output_capturing import install_output_capuring_hook  # (sic: transformers' spelling)

    install_output_capuring_hook(block.router_logits, "router_logits", 0)
