"""Our dropless MoE layer as a DeepSpeed MoE citizen.

DeepSpeed recognises MoE only through ``isinstance(m, deepspeed.moe.layer.MoE)``: that is what puts expert parameters
in expert-data-parallel groups under ZeRO and writes one checkpoint file per expert. :class:`DeepSpeedMoELayer`
subclasses it without running its constructor (which would build DeepSpeed's own gate and experts) and holds our
:class:`~c2r.moe.MoELayer` as ``deepspeed_moe``, whose expert weights are saved under DeepSpeed's per-expert keys
``deepspeed_moe.experts.deepspeed_experts.<local id>.<w1|v1|w2>``.
"""

from __future__ import annotations

from deepspeed.moe.layer import MoE as _DeepSpeedMoE
from deepspeed.utils import groups
from torch import nn

from c2r.moe import MoELayer
from placement.layout import require_divides


def expert_group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"


class DeepSpeedMoELayer(_DeepSpeedMoE):
    def __init__(self, layer: MoELayer, ep_size: int):
        nn.Module.__init__(self)  # not MoE.__init__: it would build DeepSpeed's TopKGate and Experts
        num_experts = layer.config.num_experts
        layout = layer.dispatcher.layout if layer.dispatcher is not None else None
        if layout is None or not layout.is_replicated:
            require_divides(ep_size, "ep_size", num_experts, "num_experts")
        self.ep_size = ep_size
        self.num_experts = num_experts
        # The slots each rank holds: E / R, or P / R with replicated experts. DeepSpeed names the expert checkpoint
        # files by ep rank * this + local slot; a replicated expert is saved once, in its home slot's file
        # (c2r.deepspeed.expert_files; the run config's expert_layouts say which logical expert each slot holds).
        self.num_local_experts = layout.experts_per_rank if layout is not None else num_experts // ep_size
        self.expert_group_name = expert_group_name(ep_size)
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False
        self.deepspeed_moe = layer
        layer.experts.use_per_expert_state_dict()
        for param in layer.experts.parameters():
            # DeepSpeed's markers of an expert parameter: no all-reduce over the whole data-parallel group, only over
            # the expert-data-parallel group named here.
            param.allreduce = False
            param.group_name = self.expert_group_name

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        # deepspeed.initialize calls this. The groups were created and the experts sharded before the optimizer
        # was built (c2r.deepspeed.setup.make_expert_parallel); here we only check that nothing drifted.
        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            raise RuntimeError(
                f"expert-parallel group {self.expert_group_name} does not exist: call "
                "c2r.deepspeed.make_expert_parallel(model, ep_size) before deepspeed.initialize"
            )
        if self.deepspeed_moe.experts.num_experts != self.num_local_experts:
            raise RuntimeError(
                f"layer holds {self.deepspeed_moe.experts.num_experts} experts, expected "
                f"{self.num_local_experts} local experts for ep_size {self.ep_size}"
            )

    def forward(self, x, *args, **kwargs) -> tuple:  # type: ignore[override]
        out, routing = self.deepspeed_moe(x)
        return out, routing

    def extra_repr(self) -> str:
        return f"ep_size={self.ep_size}, num_experts={self.num_experts}, local={self.num_local_experts}"
