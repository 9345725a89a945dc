"""Gradient clipping that counts a replicated expert once, under DeepSpeed ZeRO 1/2.

With replicas (c2r/parallel/replicas.py) an expert with m copies has m physical slots holding the same summed
gradient g. DeepSpeed's global norm (``DeepSpeedZeroOptimizer.scaled_global_norm``: each rank's squared gradient
elements over its own partitions, summed over the data-parallel group) therefore counts ||g||^2 m times, and the clip
coefficient can differ from the unreplicated model's (docs/design.md, "Gradient clipping with replicated experts").
Its one opt-out, ``ds_pipe_replicated``, marks whole parameters; our replica slots are rows of one stacked parameter.

So the engine's ZeRO optimizer gets a ``scaled_global_norm`` that subtracts the surplus: every rank adds, over the
gradient elements of its partitions that lie in a replica slot, (1 - 1/m) g^2, all-reduces that over the same group
DeepSpeed sums over, and the norm becomes sqrt(norm^2 - surplus): each copy counts 1/m, the expert once. It reads
the same partition lists DeepSpeed's own norm reads (``averaged_gradients``, ``params_in_partition``,
``first_offset``); an invalid norm (DeepSpeed's +inf or -1) passes through unchanged. Under CPU offload DeepSpeed
sums per-parameter norms it took on the device while copying each gradient to the host; by the step the partition's
float32 gradients are all in the host buffer (``single_partition_of_fp32_groups[i].grad``, at the places
``grad_position`` records), and the surplus is read from there. ZeRO 0 gets the whole norm from `zero0_norm`
(replicas once there too).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from c2r.moe import MoELayer


def replica_surplus_factors(model: nn.Module) -> dict[int, tuple[int, list[tuple[int, float]]]]:
    """``id(param)`` -> (local slots X, [(slot, 1 - 1/m)] for the slots holding an expert with m > 1 copies), for
    every stacked expert matrix of a replicated MoE layer on this rank."""
    factors = {}
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        dispatcher = layer.dispatcher
        if dispatcher is None or not dispatcher.layout.is_replicated:
            continue
        layout = dispatcher.layout
        copies = [len(r) for r in layout.ranks_of_experts]
        local = layout.local_experts(dispatcher.rank)  # the rank within the EP group
        slots = [(x, 1.0 - 1.0 / copies[e]) for x, e in enumerate(local) if copies[e] > 1]
        for name in ("w1", "v1", "w2"):
            param = getattr(layer.experts, name, None)
            if param is not None and slots:
                factors[id(param)] = (len(local), slots)
    return factors


def slot_surplus(flat: torch.Tensor, start: int, slot_size: int, slots: list[tuple[int, float]]) -> torch.Tensor:
    """Sum of (1 - 1/m) g^2 over the replica slots' elements in ``flat``, the gradient elements ``start`` ..
    ``start + len(flat) - 1`` of a stacked expert matrix whose slots are ``slot_size`` elements each."""
    surplus = torch.zeros((), dtype=torch.float32, device=flat.device)
    for slot, factor in slots:
        low, high = max(slot * slot_size, start), min((slot + 1) * slot_size, start + flat.numel())
        if low < high:
            surplus += factor * torch.linalg.vector_norm(flat[low - start : high - start], dtype=torch.float32).square()
    return surplus


def replica_surplus(optimizer: Any, factors: dict[int, tuple[int, list[tuple[int, float]]]]) -> torch.Tensor:
    """This rank's sum of (1 - 1/m) g^2 over the gradient elements of its partitions that lie in replica slots."""
    if optimizer.cpu_offload:
        return offloaded_replica_surplus(optimizer, factors)
    surplus = torch.zeros((), dtype=torch.float32, device=optimizer.device)
    for i, params in enumerate(optimizer.params_in_partition):
        # As DeepSpeed's own norm pairs them: padding tensors are marked and skipped, then grads align with params.
        grads = (g for g in optimizer.averaged_gradients[i] if not getattr(g, "_zero_padding", False))
        for j, (grad, param) in enumerate(zip(grads, params)):
            if id(param) not in factors:
                continue
            num_slots, slots = factors[id(param)]
            start = optimizer.first_offset[i] if j == 0 else 0  # the partition's first element within the param
            surplus += slot_surplus(grad.reshape(-1), start, param.numel() // num_slots, slots).to(surplus.device)
    return surplus


def offloaded_replica_surplus(optimizer: Any, factors: dict[int, tuple[int, list[tuple[int, float]]]]) -> torch.Tensor:
    """`replica_surplus` under CPU offload: read from the host's float32 gradient partition (module docstring), a
    host tensor."""
    surplus = torch.zeros((), dtype=torch.float32)
    for i, params in enumerate(optimizer.params_in_partition):
        host_grads = optimizer.single_partition_of_fp32_groups[i].grad.view(-1)
        for param in params:
            if id(param) not in factors:
                continue
            num_slots, slots = factors[id(param)]
            # DeepSpeed's record: the partition holds param elements [start, start + n) at host_grads[dest:dest + n]
            _, start, dest, n = optimizer.grad_position[optimizer.get_param_id(param)]
            surplus += slot_surplus(host_grads[dest : dest + n], start, param.numel() // num_slots, slots)
    return surplus


def count_replicas_once(engine: Any) -> bool:
    """Make the engine's ZeRO 1/2 global gradient norm (on the device or under CPU offload) count each replicated
    expert once; False where the run has no replicas or is not ZeRO 1/2 (ZeRO 0: `zero0_norm`)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    optimizer = engine.optimizer
    factors = replica_surplus_factors(engine.module)
    if not factors or not isinstance(optimizer, DeepSpeedZeroOptimizer):
        return False
    deepspeeds_norm = optimizer.scaled_global_norm

    def scaled_global_norm(norm_type=2):
        norm = deepspeeds_norm(norm_type)
        # on the accelerator for the all-reduce: under CPU offload the surplus is a host tensor, which an NCCL group
        # refuses (DeepSpeed moves its own offload norms the same way)
        surplus = replica_surplus(optimizer, factors).to(get_accelerator().current_device_name())
        dist.all_reduce(surplus, group=optimizer.dp_process_group)
        surplus = surplus.to(norm.device)
        valid = torch.isfinite(norm) & (norm >= 0)
        return torch.where(valid, (norm.float().square() - surplus).clamp_min(0).sqrt().to(norm.dtype), norm)

    optimizer.scaled_global_norm = scaled_global_norm
    return True
