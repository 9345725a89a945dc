"""DeepSpeed glue: our MoE layer as a ``deepspeed.moe.layer.MoE``, our routers as its gates, process groups, optimizer
groups, checkpoints."""

from c2r.deepspeed.gates import RouterGate, use_router
from c2r.deepspeed.moe_layer import DeepSpeedMoELayer, expert_group_name
from c2r.deepspeed.setup import (
    DistInfo,
    ensure_expert_groups,
    init_distributed,
    load_deepspeed_config,
    make_expert_parallel,
    optimizer_param_groups,
    wrap_moe_layers,
)

__all__ = [
    "DeepSpeedMoELayer",
    "DistInfo",
    "ensure_expert_groups",
    "expert_group_name",
    "init_distributed",
    "load_deepspeed_config",
    "make_expert_parallel",
    "optimizer_param_groups",
    "RouterGate",
    "use_router",
    "wrap_moe_layers",
]
