"""DeepSpeed glue: our MoE layer as a ``deepspeed.moe.layer.MoE``, process groups, optimizer groups, checkpoints."""

from c2r.deepspeed.moe_layer import DeepSpeedMoELayer, expert_group_name
from c2r.deepspeed.setup import (
    DistInfo,
    ensure_expert_groups,
    init_distributed,
    load_deepspeed_config,
    make_expert_parallel,
    optimizer_param_groups,
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
]
