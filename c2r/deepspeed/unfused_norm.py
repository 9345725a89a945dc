"""Gradient clipping by the whole model's norm under DeepSpeed's unfused bf16/fp16 optimizer (ZeRO stage 0).

DeepSpeed 0.19.8 runs a bf16 (or fp16, without FusedAdam) model without ZeRO through ``FP16_UnfusedOptimizer``,
whose ``step`` takes the clipping norm over the non-expert gradients only
(``split_params_grads_into_shared_and_expert_params``, expert half dropped), then scales every gradient, the
experts' too, by the coefficient that norm gives. The bound is then on the non-expert part of the gradient, not the
whole, and the norm the run reports leaves the experts out (with replicas it would also count each copy). On the ~1B
model of docs/gpu_runs.md correcting it left the run as it was (the same losses to 3 decimals at step 20): under Adam,
a clip coefficient off by a nearly constant factor barely moves the update. It is the norm users read and compare
across ZeRO stages, and it matters where the experts' share of the gradient changes from step to step.

So the engine's optimizer gets an ``unscale_and_clip_grads`` that first computes the norm DeepSpeed should have: over
the fp32 gradients it has just copied (every parameter's), the shared ones once (after the data-parallel all-reduce
they are equal on every rank), each expert group's summed over its expert-parallel group (each rank holds other
experts), a replicated expert once (each copy weighted 1/m, as `replica_norm` does under ZeRO 1/2). It records that
norm as the step's global norm (what ``engine.get_global_grad_norm()`` and c2r's finite-step check read) and clips by
it through DeepSpeed's own code. DeepSpeed's skip on a non-finite norm still looks at its own (shared-only) norm; a
non-finite expert gradient makes ours non-finite and c2r-train stops before anything saves that step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from c2r.deepspeed.replica_norm import replica_surplus_factors


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
            rows = grad.reshape(num_slots, -1)
            for slot, factor in slots:
                squared = squared - factor * torch.linalg.vector_norm(rows[slot], dtype=torch.float32).square()
        name = param.group_name
        experts[name] = experts.get(name, torch.zeros_like(shared)) + squared
    for name, squared in experts.items():
        if dist.is_initialized():
            dist.all_reduce(squared, group=groups._get_expert_parallel_group(name))
        shared = shared + squared
    return shared


def clip_by_whole_model_norm(engine: Any) -> bool:
    """Make the engine's unfused bf16/fp16 optimizer clip by the whole model's norm (module docstring); False where
    the engine does not run that optimizer or the model has no expert parameters (nothing to correct)."""
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    optimizer = engine.optimizer
    if not isinstance(optimizer, FP16_UnfusedOptimizer):
        return False
    pairs = [
        (master, param)
        for masters, params in zip(optimizer.fp32_groups, optimizer.fp16_groups)
        for master, param in zip(masters, params)
    ]
    if not any(is_moe_param(param) for _, param in pairs):
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
