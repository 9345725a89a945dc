"""Back to Hugging Face: a checkpoint that ``transformers`` loads with the original architecture.

The converted model's tensors are renamed to the Hugging Face model's (routers: ``<block>.<router>.weight``;
experts: ``gate_up_proj`` / ``down_proj`` in logical expert order, gathered from every rank's model whatever the
placement), loaded into the original architecture built on the meta device, and written by its own
``save_pretrained`` (so the on-disk format is transformers' own). Tokenizer files of the source directory are
copied along.

Only routers the architecture can express export: the model's own routing. A switched router (c2r, adamoe, remoe,
adak, ...) is a ValueError naming it.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from torch import nn

from c2r.hf.block import HFMoEBlock, converted_blocks
from c2r.hf.routers import describe, same_routing
from c2r.hf.weights import hf_expert_tensors

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def check_exportable(model: nn.Module) -> None:
    """A ValueError naming the first block whose router the original architecture cannot express."""
    model_type = model.c2r_hf.arch.model_type
    for index, (name, block) in enumerate(converted_blocks(model)):
        router = block.layer.config.router
        hf_top_k = block.native_top_k
        if not same_routing(router, block.native_router) or block.layer.config.top_k != hf_top_k:
            raise ValueError(
                f"cannot export to {model_type}: MoE layer {index} ({name}) uses the {router.kind!r} router "
                f"({describe(router)}, top_k={block.layer.config.top_k}); {model_type} can only express its own "
                f"routing, {describe(block.native_router)} with top_k={hf_top_k}"
            )
        bias = getattr(block.router, "selection_bias_E", None)
        if not block.arch.router_bias and bias is not None and bool(bias.any()):
            raise ValueError(
                f"cannot export to {model_type}: MoE layer {index} ({name}) has a non-zero selection bias, which "
                f"{model_type} has no tensor for (train with group_limited.bias_update_rate=0)"
            )


def _gather_experts(name: str, blocks: list[HFMoEBlock]) -> dict[str, torch.Tensor]:
    """One block's experts in logical order, from the blocks of every rank."""
    first = blocks[0]
    stacks: dict[str, list[torch.Tensor | None]] = {n: [None] * first.layout.num_experts for n in ("w1", "v1", "w2")}
    for block in blocks:
        for weight, stack in stacks.items():
            local_XFD = block.layer.experts.stacked(weight).detach()
            for slot, expert in enumerate(block.local_experts):
                stack[expert] = local_XFD[slot]
    missing = [e for e, t in enumerate(stacks["w1"]) if t is None]
    if missing:
        raise ValueError(
            f"{name}: experts {missing} are on no model given; export needs the models of all "
            f"{first.layout.num_ranks} expert-parallel ranks"
        )
    gate_up, down = hf_expert_tensors(*(torch.stack(stacks[n]) for n in ("w1", "v1", "w2")))
    return {f"{name}.experts.gate_up_proj": gate_up, f"{name}.experts.down_proj": down}


def hf_state_dict(models: list[nn.Module]) -> dict[str, torch.Tensor]:
    """The Hugging Face (in-memory) state dict of converted model(s): one model, or one per expert-parallel rank
    (identical but for their experts)."""
    ranks = [converted_blocks(m) for m in models]
    ours = tuple(f"{name}.{child}." for name, _ in ranks[0] for child in ("moe", "router_logits"))
    state = {k: v.detach() for k, v in models[0].state_dict().items() if not k.startswith(ours)}
    for index, (name, block) in enumerate(ranks[0]):
        state.update({f"{name}.{k}": v for k, v in block.hf_router_state().items()})
        state.update(_gather_experts(name, [blocks[index][1] for blocks in ranks]))
    return state


def export(models: nn.Module | list[nn.Module], out_dir: str | Path, *, tokenizer_dir: str | Path | None = None):
    """Write a Hugging Face checkpoint of converted ``models`` (one, or every expert-parallel rank's) to
    ``out_dir``; tokenizer files come from ``tokenizer_dir`` (default: the directory the model was loaded from).
    Returns ``out_dir`` as a Path."""
    import transformers

    models = models if isinstance(models, list) else [models]
    if not all(hasattr(m, "c2r_hf") for m in models):
        raise ValueError("export needs models converted by c2r.hf.convert or c2r.hf.load")
    for model in models:
        check_exportable(model)
    info = models[0].c2r_hf
    state = hf_state_dict(models)
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(info.config)
    hf_model.load_state_dict(state, strict=True, assign=True)
    if getattr(models[0], "generation_config", None) is not None:  # the source's (stop tokens, sampling), not defaults
        hf_model.generation_config = copy.deepcopy(models[0].generation_config)
    out_dir = Path(out_dir)
    hf_model.save_pretrained(out_dir)
    source = Path(tokenizer_dir) if tokenizer_dir is not None else info.source_dir
    for name in TOKENIZER_FILES if source is not None else ():
        if (source / name).is_file():
            shutil.copy2(source / name, out_dir / name)
    return out_dir
