"""``c2r-train --hf-model DIR``: a converted Hugging Face MoE model as the model of a c2r run.

The run config's ``hf`` section names the model directory. Of the ``model`` section the run then uses only what
applies to any model: ``block_size`` (the sequence length), ``moe.top_k`` and ``moe.num_experts`` (filled in from
the Hugging Face config by :func:`base_settings`; ``top_k`` may be raised, e.g. for AdaMoE), ``moe.router``
(``topk``, the default, keeps the model's own routing, DeepSeek's sigmoid/groups/scale included; any other kind
switches every block to that router, started from the pretrained gate) and ``moe.experts`` (the backend).

Under DeepSpeed the model is built the way our own GPT is made expert parallel (c2r/deepspeed/setup.py), except
that the experts are never materialised beyond this rank's share: :func:`c2r.hf.load` reads only this rank's experts,
:func:`c2r.hf.attach_expert_parallel` gives the blocks their dispatchers, and
:func:`c2r.deepspeed.wrap_moe_layers` puts each block's MoE layer inside DeepSpeed's MoE module (expert parameter
tags, per-expert checkpoint files) as it does for the GPT's layers.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from c2r.hf.block import aux_loss, routing_results
from c2r.model import ModelOutput
from c2r.moe import MoEConfig
from c2r.routing import RouterConfig


@dataclass
class HFConfig:
    """The ``hf`` section. ``model_dir``: a local Hugging Face model directory (config.json, safetensors shards or
    none for a random initialisation, tokenizer files); None trains our own GPT."""

    model_dir: str | None = None


@dataclass(frozen=True)
class HFModelShape:
    """What a run needs to know of a Hugging Face MoE model before building it."""

    model_type: str
    num_moe_layers: int
    num_experts: int
    top_k: int
    vocab_size: int


@functools.cache
def model_shape(model_dir: str) -> HFModelShape:
    """Read from the model built on the meta device (no memory), so every architecture's naming is handled once, by
    c2r.hf's architecture table."""
    import transformers

    from c2r.hf.architectures import architecture_for, find_blocks

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--hf-model {model_dir!r} has no config.json (a local model directory is needed)")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    arch = architecture_for(config, model_dir)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    blocks = find_blocks(model, arch)
    first = blocks[0][1]
    return HFModelShape(
        model_type=arch.model_type,
        num_moe_layers=len(blocks),
        num_experts=first.experts.num_experts,
        top_k=getattr(first, arch.router_attr).top_k,
        vocab_size=config.vocab_size,
    )


def base_settings(user: dict[str, Any]) -> dict[str, Any]:
    """The config layer under the user's (``ConfigCli.base``): with ``hf.model_dir``, the model's expert count and
    k, so that placement plans, checkpoints and logs see the real model, and no width scaling of the learning rate."""
    model_dir = (user.get("hf") or {}).get("model_dir")
    if model_dir is None:
        return {}
    shape = model_shape(str(model_dir))
    return {
        "model": {"moe": {"num_experts": shape.num_experts, "top_k": shape.top_k}},
        # A pretrained model's learning rate is chosen for its own width: no width scaling unless asked for.
        "train": {"lr_base_width": 0},
    }


def switched_router(moe: MoEConfig) -> RouterConfig | None:
    """None (the model's own routing) for the default kind ``topk``; the configured router otherwise."""
    return None if moe.router.kind == "topk" else moe.router


class HFCausalLM(nn.Module):
    """A converted Hugging Face causal LM with the interface of our GPT: ``(input ids, targets) -> ModelOutput``.
    The loss is the LM loss plus our routers' aux loss; Hugging Face's own router loss is never computed (no
    ``labels``, no ``output_router_logits``), so it is not counted twice."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, idx_BS: torch.Tensor, targets_BS: torch.Tensor | None = None) -> ModelOutput:
        logits = self.hf(input_ids=idx_BS, use_cache=False).logits  # (B, S, V)
        routings = routing_results(self.hf)
        aux = aux_loss(self.hf).float()
        lm_loss = loss = None
        if targets_BS is not None:
            lm_loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets_BS.reshape(-1))
            loss = lm_loss + aux
        return ModelOutput(logits, loss, lm_loss, aux, routings)


def build_model(config: Any, mode: str, layouts, observers) -> HFCausalLM:
    """This rank's share of ``config.hf.model_dir`` (a ``RunConfig``), expert parallel over ``train.ep_size`` ranks
    in dispatch ``mode`` with ``layouts`` (a plan's, or None: contiguous) and ``observers`` (the profiler's, or
    None), its MoE layers inside DeepSpeed MoE modules. Call between ``init_distributed`` and the optimizer."""
    import torch.distributed as dist

    from c2r.deepspeed import ensure_expert_groups, wrap_moe_layers
    from c2r.hf.block import attach_expert_parallel
    from c2r.hf.load import load

    model_dir, moe, tc = config.hf.model_dir, config.model.moe, config.train
    shape = model_shape(model_dir)
    if moe.num_experts != shape.num_experts:
        raise ValueError(
            f"model.moe.num_experts ({moe.num_experts}) differs from the {shape.num_experts} experts of {model_dir}"
        )
    for layout in layouts or []:  # the Hugging Face loader places one copy per expert: refuse, never drop, replicas
        layout.require_unreplicated("c2r-train --hf-model")
    group = ensure_expert_groups(tc.ep_size)
    model = load(
        model_dir,
        ep_rank=dist.get_rank(group),
        ep_size=tc.ep_size,
        expert_to_rank=None if layouts is None else [list(layout.expert_to_rank) for layout in layouts],
        router=switched_router(moe),
        top_k=moe.top_k,
        aux_loss_weight=moe.router.aux_loss_weight,
        experts=dataclasses.replace(moe.experts, activation="swiglu"),
        seed=tc.seed,
    ).train()
    if tc.ep_size > 1:
        attach_expert_parallel(model, group, mode, observers, tc.gpus_per_node)
    wrap_moe_layers(model, tc.ep_size)
    return HFCausalLM(model)
