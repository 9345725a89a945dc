"""What a c2r model hands ``profiling/`` (which never imports c2r): its MoE layers, their shape, router, dispatch
mode and placements, read from the model as built."""

from __future__ import annotations

import torch
from torch import nn

from c2r.moe import MoELayer
from c2r.parallel import model_layouts
from profiling.session import ProfiledModel

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def profiled_model(model: nn.Module) -> ProfiledModel:
    """Call after the model is made expert parallel: the placements and the dispatch mode are the dispatchers'."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError("profiling needs at least one MoE layer in the model")
    modes = sorted({layer.dispatcher.mode for layer in layers if layer.dispatcher is not None})
    if len(modes) > 1:
        raise ValueError(f"the MoE layers dispatch in different modes {modes}; profile.json records one")
    moe = layers[0].config
    return ProfiledModel(
        layers=layers,
        num_experts=moe.num_experts,
        top_k=moe.top_k,
        hidden_size=layers[0].hidden_size,
        ffn_hidden_size=moe.ffn_hidden_size,
        expert_matrices=3 if layers[0].experts.is_glu else 2,
        router=moe.router.kind,
        dispatch_mode=modes[0] if modes else None,
        expert_to_rank=model_layouts(model),
        # the dispatcher sends activations in the layer's dtype (the engine casts the model for bf16/fp16)
        dtype=DTYPE_NAMES.get(next(layers[0].parameters()).dtype),
    )
