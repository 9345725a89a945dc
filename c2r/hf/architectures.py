"""The Hugging Face MoE architectures we convert: where each keeps its router, experts and shared experts, how its
router scores, and how its checkpoint names expert tensors on disk. Read from transformers 5.x's modeling files
(``transformers/models/<arch>/modeling_<arch>.py``) and from what ``save_pretrained`` writes.

Every 5.x block here has ``<block>.<router_attr>`` (a ``...TopKRouter`` with ``weight`` [E, D]) and
``<block>.experts`` (``gate_up_proj`` [E, 2F, D]: gate rows then up rows; ``down_proj`` [E, D, F]; SiLU), and
returns only the hidden states.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from c2r.routing import RouterConfig
from c2r.routing.config import GroupLimitedConfig, ScoredConfig


@dataclass(frozen=True)
class Architecture:
    """One Hugging Face MoE family.

    Attributes:
        model_type: ``config.model_type``.
        block_class: class name of its MoE block (dense layers of the same model are left alone).
        router_attr: the block's router child.
        native_router: the router config that reproduces the model's routing, from its router module.
        shared_attrs: shared-expert children kept as they are (Qwen2-MoE's ``shared_expert`` with its sigmoid
            ``shared_expert_gate``; DeepSeek's ``shared_experts``).
        shared_gate_attr: a [1, D] linear whose sigmoid scales the shared expert (Qwen2-MoE).
        router_bias: the router has DeepSeek-V3's ``e_score_correction_bias`` (our selection bias).
        disk_renames: (on-disk, in-memory) key fragments of the checkpoint format ``save_pretrained`` writes.
        disk_expert_names: per-expert checkpoints: ``<block>.experts.<e>.<name>.weight`` of the gate [F, D], up
            [F, D] and down [D, F] matrices.
        disk_fused_names: fused checkpoints: the [E, 2F, D] and [E, D, F] tensors under ``<block>.``.
    """

    model_type: str
    block_class: str
    router_attr: str
    native_router: Callable[[nn.Module], RouterConfig]
    shared_attrs: tuple[str, ...] = ()
    shared_gate_attr: str | None = None
    router_bias: bool = False
    disk_renames: tuple[tuple[str, str], ...] = ()
    disk_expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    disk_fused_names: tuple[str, str] = ("experts.gate_up_proj", "experts.down_proj")

    def to_disk(self, key: str) -> str:
        for disk, memory in self.disk_renames:
            key = key.replace(memory, disk)
        return key

    def from_disk(self, key: str) -> str:
        for disk, memory in self.disk_renames:
            key = key.replace(disk, memory)
        return key


def softmax_topk(renormalize: Callable[[nn.Module], bool]) -> Callable[[nn.Module], RouterConfig]:
    """Mixtral, Qwen2/3-MoE, OLMoE, Granite-MoE: softmax over all experts, top-k, renormalised or not. Logits in
    the activations' dtype, as these models compute them."""

    def build(router: nn.Module) -> RouterConfig:
        return RouterConfig(kind="topk", renormalize=renormalize(router), logits_dtype="input", aux_loss_weight=0.0)

    return build


def deepseek_v3_router(router: nn.Module) -> RouterConfig:
    """Sigmoid scores; choose on scores + e_score_correction_bias within the best topk_group of n_group groups
    (a group scores its top-2 sum); weigh with the unbiased scores, renormalised (+1e-20), times the route scale."""
    return RouterConfig(
        kind="scored",
        renormalize=bool(router.norm_topk_prob),
        aux_loss_weight=0.0,
        group_limited=GroupLimitedConfig(max_groups=router.topk_group, num_groups=router.num_group),
        scored=ScoredConfig(
            score_function="sigmoid",
            routed_scaling_factor=float(router.routed_scaling_factor),
            group_score_top=2,
            norm_epsilon=1e-20,
        ),
    )


def deepseek_v2_router(router: nn.Module) -> RouterConfig:
    """Softmax, greedy top-k or group-limited greedy (groups ranked by their best expert), never renormalised,
    times the route scale."""
    if router.topk_method not in ("greedy", "group_limited_greedy"):
        raise ValueError(
            f"deepseek_v2: topk_method {router.topk_method!r} is not one of 'greedy', 'group_limited_greedy'"
        )
    grouped = router.topk_method == "group_limited_greedy"
    groups = GroupLimitedConfig(max_groups=router.topk_group, num_groups=router.num_group) if grouped else None
    return RouterConfig(
        kind="scored",
        renormalize=False,
        aux_loss_weight=0.0,
        group_limited=groups or GroupLimitedConfig(),
        scored=ScoredConfig(routed_scaling_factor=float(router.routed_scaling_factor), group_score_top=1),
    )


def _norm_topk_prob(router: nn.Module) -> bool:
    return bool(router.norm_topk_prob)


_QWEN_STYLE = dict(router_attr="gate", native_router=softmax_topk(_norm_topk_prob))

ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture(
            "mixtral",
            "MixtralSparseMoeBlock",
            "gate",
            softmax_topk(lambda router: True),
            disk_renames=((".block_sparse_moe.", ".mlp."),),
            disk_expert_names=("w1", "w3", "w2"),
        ),
        Architecture(
            "qwen2_moe",
            "Qwen2MoeSparseMoeBlock",
            shared_attrs=("shared_expert", "shared_expert_gate"),
            shared_gate_attr="shared_expert_gate",
            **_QWEN_STYLE,
        ),
        Architecture("qwen3_moe", "Qwen3MoeSparseMoeBlock", **_QWEN_STYLE),
        Architecture("olmoe", "OlmoeSparseMoeBlock", **_QWEN_STYLE),
        Architecture(
            "deepseek_v3",
            "DeepseekV3MoE",
            "gate",
            deepseek_v3_router,
            shared_attrs=("shared_experts",),
            router_bias=True,
        ),
        Architecture("deepseek_v2", "DeepseekV2Moe", "gate", deepseek_v2_router, shared_attrs=("shared_experts",)),
        Architecture(
            "granitemoe",
            "GraniteMoeMoE",
            "router",
            # softmax over the top-k logits == the top-k of the softmax, renormalised
            softmax_topk(lambda router: True),
            disk_renames=((".router.layer.weight", ".router.weight"),),
            disk_fused_names=("input_linear.weight", "output_linear.weight"),
        ),
    )
}


def architecture_for(config: Any, what: str) -> Architecture:
    """The table entry for a Hugging Face config; one clear error line naming the model type otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"{what} (model_type {model_type!r}) is not a supported Hugging Face MoE architecture; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def find_blocks(model: nn.Module, arch: Architecture) -> list[tuple[str, nn.Module]]:
    """(name, block) of every MoE block of ``model`` in depth order; an error when the model has none."""
    blocks = [(n, m) for n, m in model.named_modules() if type(m).__name__ == arch.block_class]
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} (model_type {arch.model_type!r}) has no {arch.block_class} MoE blocks "
            "(already converted, or a configuration without experts)"
        )
    return blocks
