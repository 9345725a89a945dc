"""ZeRO 1/2's float32 gradient partition made from the bf16 gradients by one multi-tensor copy.

Before its optimizer step DeepSpeed's ZeRO 1/2 (``DeepSpeedZeroOptimizer.step``, 0.19.8) flattens each parameter
group's bf16 gradient partition (a concatenation, unless the group holds one tensor) and converts it to float32 with
``.to()``. torch runs that conversion as an unrolled, unvectorised kernel: ~2.1 TB/s on an H200, 9.9 ms a step for
the ~1B model's 3.2B parameters, where ``torch._foreach_copy_`` into float32 views of one new buffer reads and writes
the same bytes at ~3.3 TB/s and needs no concatenation first (docs/gpu_runs.md has both measurements).

DeepSpeed asks ``_get_preflattened_grad_partition(i)`` for a ready flat partition before it flattens; the engine's
optimizer gets one that returns the float32 partition built that way (DeepSpeed's ``.to()`` of a float32 tensor is
then the tensor itself): the group's gradient tensors in DeepSpeed's order, padding tensors included, zeros after
them up to the partition size on the last rank as DeepSpeed's aligned flatten pads. The values are exactly
DeepSpeed's (a bf16 -> float32 conversion is exact). Anything else (a partition DeepSpeed already keeps flat, sizes
that do not add up, fp32 or fp16 training, CPU offload) goes DeepSpeed's own way.
"""

from __future__ import annotations

from typing import Any

import torch


def flat_float32(tensors: list[torch.Tensor], size: int) -> torch.Tensor:
    """``tensors`` flattened one after another into a new float32 tensor of ``size`` elements, zeros after them."""
    out = torch.empty(size, dtype=torch.float32, device=tensors[0].device)
    filled = sum(t.numel() for t in tensors)
    torch._foreach_copy_(list(out[:filled].split([t.numel() for t in tensors])), [t.reshape(-1) for t in tensors])
    out[filled:].zero_()
    return out


def copy_grads_to_float32_in_one_pass(engine: Any) -> bool:
    """Make the engine's bf16 ZeRO 1/2 optimizer build its float32 gradient partitions with one multi-tensor copy
    (module docstring); False where DeepSpeed's own flatten-and-convert stays."""
    from deepspeed import comm as dist
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    zero = engine.optimizer
    if not isinstance(zero, DeepSpeedZeroOptimizer) or zero.cpu_offload or not engine.bfloat16_enabled():
        return False
    if not hasattr(zero, "_get_preflattened_grad_partition"):  # another DeepSpeed than the one this reads
        return False
    deepspeeds = zero._get_preflattened_grad_partition

    def get_preflattened_grad_partition(i):
        flat = deepspeeds(i)
        grads = zero.averaged_gradients[i]
        if flat is not None or not isinstance(grads, list) or not grads:
            return flat
        if zero.single_partition_of_fp32_groups[i].dtype != torch.float32:
            return None
        size, filled = int(zero.partition_size[i]), sum(g.numel() for g in grads)
        group = zero.real_dp_process_group[i]
        last = dist.get_rank(group=group) == dist.get_world_size(group=group) - 1
        if filled > size or (filled < size and not last):  # not DeepSpeed's layout: its own path and its checks
            return None
        return flat_float32(grads, size)

    zero._get_preflattened_grad_partition = get_preflattened_grad_partition
    return True
