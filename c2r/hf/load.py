"""Load a Hugging Face MoE model from a local directory, converted, holding only this rank's experts.

1. The config builds the Hugging Face model on the meta device (nothing allocated).
2. :func:`c2r.hf.convert` swaps its MoE blocks for ours, each allocating only this rank's experts.
3. What is still on the meta device (attention, norms, embeddings, shared experts) gets real storage; rotary
   tables and other non-persistent buffers are recomputed.
4. Weights stream from the safetensors shards: non-expert tensors whole, expert tensors one local expert at a time
   (other ranks' experts are never read). Without weights (a config alone) the model is randomly initialised, each
   expert from its own seed, so its values do not depend on the placement.

Nothing is downloaded: ``model_dir`` must be a local directory.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from c2r.experts import ExpertConfig
from c2r.hf.architectures import Architecture, architecture_for
from c2r.hf.block import HFMoEBlock, converted_blocks
from c2r.hf.checkpoint import SafetensorsCheckpoint
from c2r.hf.convert import convert
from c2r.hf.weights import set_expert
from c2r.routing import RouterConfig


def load(
    model_dir: str | Path,
    *,
    ep_rank: int = 0,
    ep_size: int = 1,
    expert_to_rank: list[int] | list[list[int]] | None = None,
    router: RouterConfig | None = None,
    top_k: int | None = None,
    aux_loss_weight: float | None = None,
    experts: ExpertConfig | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> nn.Module:
    """The converted causal LM of ``model_dir`` (config.json + safetensors, or config.json alone), in eval mode.
    Options as :func:`c2r.hf.convert`; ``seed`` for random initialisation. ``model.c2r_hf.load_stats`` counts the
    expert matrices and elements read."""
    import transformers

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json (c2r.hf.load reads local directories only)")
    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    arch = architecture_for(config, str(model_dir))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    convert(
        model,
        router,
        top_k=top_k,
        aux_loss_weight=aux_loss_weight,
        experts=experts,
        ep_rank=ep_rank,
        ep_size=ep_size,
        expert_to_rank=expert_to_rank,
    )
    fp32_router = f"{arch.router_attr}.weight" in (getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    for _, block in converted_blocks(model):
        block.layer.to(dtype)
        if fp32_router:  # as transformers keeps it (DeepSeek-V2/V3, GLM-4.5 MoE, ...): a bf16 gate picks other experts
            block.layer.router.float()
    _init_non_persistent_buffers(model, materialize(model))
    with SafetensorsCheckpoint(model_dir) as checkpoint:
        if checkpoint.files:
            load_weights(model, arch, checkpoint)
        else:
            random_init(model, seed)
        model.c2r_hf.load_stats = dict(checkpoint.stats)
    for _, block in converted_blocks(model):
        # A no-op for most routers; AdaMoE's null experts start from the loaded gate.
        block.router.init_from_pretrained({"kind": block.native_router.kind})
    model.c2r_hf.source_dir = model_dir
    if (model_dir / "generation_config.json").is_file():  # from_config gave the defaults (stop tokens, sampling)
        model.generation_config = transformers.GenerationConfig.from_pretrained(model_dir, local_files_only=True)
    return model.eval()


def materialize(model: nn.Module) -> list[nn.Module]:
    """Give every meta parameter and buffer real (uninitialised) CPU storage, keeping tied parameters tied;
    returns the modules whose non-persistent buffers were on the meta device."""
    made: dict[int, torch.Tensor] = {}

    def real(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            empty = torch.empty_like(t, device="cpu")
            made[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
        return made[id(t)]

    needs_buffers = []
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.is_meta:
                module._parameters[name] = real(param)
        meta_buffers = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        for name in meta_buffers:
            module._buffers[name] = real(module._buffers[name])
        if set(meta_buffers) & module._non_persistent_buffers_set:
            needs_buffers.append(module)
    return needs_buffers


@torch.no_grad()
def _init_non_persistent_buffers(model: nn.Module, modules: list[nn.Module]) -> None:
    """Rotary tables and the like are not in checkpoints: the model's own initialiser recomputes them (before the
    weights are loaded, so it cannot overwrite any)."""
    for module in modules:
        model._init_weights(module)


def _expert_keys(block: HFMoEBlock, prefix: str, arch: Architecture, checkpoint: SafetensorsCheckpoint):
    """("per_expert", {expert: [gate, up, down keys]}) or ("fused", [gate_up key, down key]) as found on disk."""
    disk_prefixes = dict.fromkeys([arch.to_disk(prefix + "."), prefix + "."])
    for disk in disk_prefixes:
        per_expert = {
            e: [f"{disk}experts.{e}.{name}.weight" for name in arch.disk_expert_names]
            for e in range(block.layout.num_experts)
        }
        if all(key in checkpoint for keys in per_expert.values() for key in keys):
            return "per_expert", per_expert
        for names in dict.fromkeys([arch.disk_fused_names, ("experts.gate_up_proj", "experts.down_proj")]):
            fused = [disk + name for name in names]
            if all(key in checkpoint for key in fused):
                return "fused", fused
    raise ValueError(
        f"{checkpoint.model_dir}: no expert tensors for MoE block {prefix!r} (looked for "
        f"{next(iter(disk_prefixes))}experts.<e>.{arch.disk_expert_names[0]}.weight and fused "
        f"{arch.disk_fused_names[0]})"
    )


def _load_experts(block: HFMoEBlock, prefix: str, arch: Architecture, checkpoint: SafetensorsCheckpoint) -> set[str]:
    """Read this rank's experts of one block; return every expert key of the block (theirs included)."""
    kind, keys = _expert_keys(block, prefix, arch, checkpoint)
    F = block.layer.experts.ffn_hidden_size
    for slot, expert in enumerate(block.local_experts):
        if kind == "per_expert":
            gate_FD, up_FD, down_DF = (checkpoint.get_expert(key) for key in keys[expert])
        else:
            gate_up_XD = checkpoint.get_expert(keys[0], expert)
            gate_FD, up_FD, down_DF = gate_up_XD[:F], gate_up_XD[F:], checkpoint.get_expert(keys[1], expert)
        set_expert(block.layer.experts, slot, gate_FD, up_FD, down_DF)
    return {k for ks in keys.values() for k in ks} if kind == "per_expert" else set(keys)


@torch.no_grad()
def load_weights(model: nn.Module, arch: Architecture, checkpoint: SafetensorsCheckpoint) -> None:
    """Stream ``checkpoint`` into ``model`` (converted, materialised); errors name missing and unexpected keys."""
    blocks = converted_blocks(model)
    expert_keys: set[str] = set()
    for prefix, block in blocks:
        expert_keys |= _load_experts(block, prefix, arch, checkpoint)
    state = model.state_dict(keep_vars=True)
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    loaded, unexpected = set(), []
    for disk_key in checkpoint.files:
        if disk_key in expert_keys:
            continue
        key = arch.from_disk(disk_key)
        owner = next(((p, b) for p, b in blocks if key.startswith(p + ".")), None)
        if owner is not None and owner[1].load_hf_router_tensor(key[len(owner[0]) + 1 :], checkpoint.get(disk_key)):
            loaded.add(key)
        elif key in state:
            state[key].copy_(checkpoint.get(disk_key))
            loaded.add(key)
        elif not any(p.search(disk_key) for p in ignore):
            unexpected.append(disk_key)
    loaded_ids = {id(state[k]) for k in loaded if k in state}
    ours = tuple(f"{p}.moe." for p, _ in blocks)
    missing = [k for k, t in state.items() if not k.startswith(ours) and id(t) not in loaded_ids]
    missing += [f"{p}.{arch.router_attr}.weight" for p, _ in blocks if f"{p}.{arch.router_attr}.weight" not in loaded]
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint.model_dir} does not fit {type(model).__name__}: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )


@torch.no_grad()
def random_init(model: nn.Module, seed: int) -> None:
    """The model's own initialiser for its modules (one global seed, identical on every rank); each expert from a
    seed of its own (``seed``, layer, logical id), so a rank's experts equal the single-rank model's."""
    torch.manual_seed(seed)
    ours = {id(m) for _, block in converted_blocks(model) for m in block.layer.modules()}
    for module in model.modules():
        if id(module) not in ours:
            model._init_weights(module)
    std = getattr(model.config, "initializer_range", 0.02)
    for layer, (_, block) in enumerate(converted_blocks(model)):
        block.router.gate.weight.normal_(0.0, std)
        experts = block.layer.experts
        for slot, expert in enumerate(block.local_experts):
            generator = torch.Generator().manual_seed(hash((seed, layer, expert)) % 2**63)
            rows = slice(slot * experts.ffn_hidden_size, (slot + 1) * experts.ffn_hidden_size)
            for weight in (experts.w1, experts.v1, experts.w2):
                weight[rows] = torch.randn(weight[rows].shape, generator=generator) * std
