"""Gradient clipping by the whole model's norm under ZeRO stage 0, where DeepSpeed's own norm is not the model's.

DeepSpeed 0.19.8 runs a bf16 (or fp16, without FusedAdam) model without ZeRO through ``FP16_UnfusedOptimizer``,
whose ``step`` takes the clipping norm over the non-expert gradients only
(``split_params_grads_into_shared_and_expert_params``, expert half dropped), then scales every gradient, the
experts' too, by the coefficient that norm gives. The bound is then on the non-expert part of the gradient, not the
whole, and the norm the run reports leaves the experts out (with replicas it would also count each copy). On the ~1B
model of docs/gpu_runs.md correcting it left the run as it was (the same losses to 3 decimals at step 20): under Adam,
a clip coefficient off by a nearly constant factor barely moves the update. It is the norm users read and compare
across ZeRO stages, and it matters where the experts' share of the gradient changes from step to step.

In fp32 (``engine.clip_fp32_gradients`` -> ``runtime/utils.py`` ``clip_grad_norm_``) each rank takes the norm of its
own parameters (the shared ones plus its own experts) and the ranks *average* those norms: mean over r of
sqrt(S + E_r), not sqrt(S + sum E_r), so with expert parallelism the bound depends on how experts are spread, and a
replicated expert counts per copy.

The fix, for both: the engine's bf16/fp16 optimizer gets an ``unscale_and_clip_grads`` (an fp32 engine a
``clip_fp32_gradients``) that first computes the norm DeepSpeed should have: over the gradients it is about to step
with (the fp32 master copies, or the fp32 parameters), the shared ones once (after the data-parallel all-reduce they
are equal on every rank), each expert group's summed over its expert-parallel group (each rank holds other experts), a
replicated expert once (each copy weighted 1/m, as `replica_norm` does under ZeRO 1/2). It records that norm as the
step's global norm (what ``engine.get_global_grad_norm()`` and c2r's finite-step check read) and clips by it
(bf16/fp16 through DeepSpeed's own code). DeepSpeed's skip on a non-finite norm still looks at its own (shared-only)
norm; a non-finite expert gradient makes ours non-finite and c2r-train stops before anything saves that step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from c2r.deepspeed.replica_norm import replica_surplus_factors, slot_surplus


def whole_model_squared_norm(pairs: list[tuple[torch.Tensor, torch.Tensor]], factors: dict) -> torch.Tensor:
    """Sum of squared gradient elements of the whole model, each parameter counted once over the ranks.

    ``pairs``: (fp32 master parameter holding the gradient, the model's parameter it stands for); ``factors``:
    `replica_norm.replica_surplus_factors` of the model (the replica slots to count 1/m)."""
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import groups

    device = pairs[0][0].device
    shared = torch.zeros((), dtype=torch.float32, device=device)
    experts: dict[str, torch.Tensor] = {}
    for master, param in pairs:
        grad = master.grad
        if grad is None:
            continue
        squared = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        if not is_moe_param(param):
            shared += squared
            continue
        if id(param) in factors:
            num_slots, slots = factors[id(param)]
            squared = squared - slot_surplus(grad.reshape(-1), 0, grad.numel() // num_slots, slots)
        name = param.group_name
        experts[name] = experts.get(name, torch.zeros_like(shared)) + squared
    for name, squared in experts.items():
        if dist.is_initialized():
            dist.all_reduce(squared, group=groups._get_expert_parallel_group(name))
        shared = shared + squared
    return shared


def clip_by_whole_model_norm(engine: Any) -> bool:
    """Make a ZeRO 0 engine clip by the whole model's norm (module docstring); False where the engine runs ZeRO 1/2,
    or its model has no expert parameters (DeepSpeed's norm is then the model's)."""
    return _patch_unfused_optimizer(engine) or _patch_fp32_clipping(engine)


def _model_has_experts(params) -> bool:
    from deepspeed.moe.utils import is_moe_param

    return any(is_moe_param(param) for param in params)


def _patch_unfused_optimizer(engine: Any) -> bool:
    """bf16/fp16 without ZeRO: ``FP16_UnfusedOptimizer.unscale_and_clip_grads`` gets the whole model's norm."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    optimizer = engine.optimizer
    if not isinstance(optimizer, FP16_UnfusedOptimizer):
        return False
    pairs = [
        (master, param)
        for masters, params in zip(optimizer.fp32_groups, optimizer.fp16_groups)
        for master, param in zip(masters, params)
    ]
    if not _model_has_experts(param for _, param in pairs):
        return False
    factors = replica_surplus_factors(engine.module)
    deepspeeds_clip = optimizer.unscale_and_clip_grads

    def unscale_and_clip_grads(total_norm, apply_scale=True):
        # DeepSpeed's total_norm is the shared-only norm of the scaled gradients; ours is of the same gradients.
        norm = whole_model_squared_norm(pairs, factors).sqrt()
        optimizer._global_grad_norm = norm
        return deepspeeds_clip(norm, apply_scale)

    optimizer.unscale_and_clip_grads = unscale_and_clip_grads
    return True


def _patch_fp32_clipping(engine: Any) -> bool:
    """fp32 without ZeRO: the engine's ``clip_fp32_gradients`` clips by the whole model's norm."""
    if engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled():
        return False
    params = [param for param in engine.module.parameters() if param.requires_grad]
    if not _model_has_experts(params):
        return False
    factors = replica_surplus_factors(engine.module)
    pairs = [(param, param) for param in params]
    max_norm = float(engine.gradient_clipping())

    def clip_fp32_gradients():
        norm = whole_model_squared_norm(pairs, factors).sqrt()
        coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # DeepSpeed's clip_grad_norm_ formula
        for param in params:
            if param.grad is not None:
                param.grad.mul_(coefficient)
        engine.optimizer._global_grad_norm = norm  # the engine takes it from its optimizer after the step

    engine.clip_fp32_gradients = clip_fp32_gradients
    return True
