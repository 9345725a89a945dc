"""ZeRO 1/2's gradient norm read from the bf16 gradients with float32 accumulation, not through a float64 copy.

DeepSpeed's ZeRO 1/2 norm (``DeepSpeedZeroOptimizer.get_grad_norm_direct``, 0.19.8) converts every gradient of its
partitions to float64 (``g.to(get_norm_dtype())``: a new tensor per gradient) and then reduces it: per bf16 element
2 bytes read, 8 written and 8 read again. On one H200 with the ~1B model (3.2B parameters) that is 13.3 ms of copies
(torch's cast copy to float64 is an unrolled, unvectorised kernel) plus 6.3 ms of float64 reductions a step, about a
quarter of the optimizer step's device time (docs/gpu_runs.md). torch's own ``clip_grad_norm_`` reads the
gradients as they are and accumulates in float32 (``torch._foreach_norm``): one pass of 2 bytes per element.

So where the engine runs ZeRO 1/2 on the device's memory (no CPU offload) in bf16 or fp32, the optimizer's
``get_grad_norm_direct`` becomes that: per-gradient norms accumulated in float32 in one multi-tensor pass, combined in
DeepSpeed's norm dtype (float64 where the device has it) and then exactly DeepSpeed's own remainder (the same
gradients skipped: padding, pipeline-replicated and, off model-parallel rank 0, shared ones; the same all-reduces,
none over a one-rank group; a non-finite norm masked the same way). The sum of squares differs from DeepSpeed's by
float32 rounding (relative ~1e-7 per gradient; tests/test_fp32_norm.py compares the two on ranks). fp16 keeps
DeepSpeed's float64 norm: its gradients are loss-scaled, and a norm whose square passes float32's range must be seen
as an overflow the way DeepSpeed sees it. Other norm orders (inf) go to DeepSpeed's code.
"""

from __future__ import annotations

from typing import Any

import torch

from c2r.deepspeed import one_rank_groups


def norms_in_float32(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each gradient's 2-norm, read in its own dtype and accumulated in float32 (one multi-tensor pass per device and
    dtype, as ``torch.nn.utils.clip_grad_norm_`` groups them)."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, g in enumerate(grads):
        groups.setdefault((g.device, g.dtype), []).append(i)
    norms: list[torch.Tensor] = [None] * len(grads)  # type: ignore[list-item]
    for indices in groups.values():
        for i, norm in zip(indices, torch._foreach_norm([grads[i] for i in indices], 2, dtype=torch.float32)):
            norms[i] = norm
    return norms


def read_grad_norm_in_float32(engine: Any) -> bool:
    """Give the engine's ZeRO 1/2 optimizer the float32-accumulated norm (module docstring); False where DeepSpeed's
    own norm stays (ZeRO 0, CPU offload, fp16)."""
    from deepspeed import comm as dist
    from deepspeed.runtime.utils import is_model_parallel_parameter
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.runtime.zero.utils import get_norm_dtype

    zero = engine.optimizer
    if not isinstance(zero, DeepSpeedZeroOptimizer) or zero.cpu_offload or engine.fp16_enabled():
        return False
    deepspeeds_norm = zero.get_grad_norm_direct

    def get_grad_norm_direct(gradients, params, norm_type=2):
        if float(norm_type) != 2.0:
            return deepspeeds_norm(gradients, params, norm_type)
        # As DeepSpeed pairs them: padding tensors are marked and skipped, then gradients align with parameters.
        grads = (g for g in gradients if not getattr(g, "_zero_padding", False))
        counted = [
            g.detach()
            for g, p in zip(grads, params)
            if not getattr(p, "ds_pipe_replicated", False)
            and (is_model_parallel_parameter(p) or zero.model_parallel_rank == 0)
        ]
        if counted:
            norms = torch.stack([n.to(zero.device) for n in norms_in_float32(counted)])
            total = norms.to(get_norm_dtype()).square().sum().float()  # DeepSpeed combines in its norm dtype
        else:
            total = torch.zeros((), dtype=torch.float32, device=zero.device)
        if not one_rank_groups.is_one_rank(zero.dp_process_group):  # over one rank it would change nothing
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=zero.dp_process_group)
        zero._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
        total = total.sqrt()
        # DeepSpeed's mask_nan_or_inf_with_val_inplace, without its torch.tensor(-1.0, device=...): a host-to-device
        # copy, which torch follows with a stream sync, once per optimizer group (27 a step on the ~1B model).
        return total.masked_fill_(~torch.isfinite(total), -1.0)

    zero.get_grad_norm_direct = get_grad_norm_direct
    return True
