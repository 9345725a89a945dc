"""Undo the optimizer step DeepSpeed takes while it builds a 16-bit optimizer without ZeRO.

DeepSpeed 0.19.8's ``FP16_UnfusedOptimizer`` (bf16, or fp16 without FusedAdam, ZeRO stage 0) and ``FP16_Optimizer``
(fp16 with FusedAdam) call ``initialize_optimizer_states`` from their constructors: one ``optimizer.step()`` with
all-zero gradients, to create the optimizer state. For Adam that step counts: the first real step runs as the
second (its bias correction makes the first update about 0.73x what it should be, and every early step is off), and
AdamW's decoupled weight decay has already shrunk the fp32 master weights once, at the base learning rate. A review
measured it: a ZeRO 0 bf16 run's step losses leave the fp32 and ZeRO 1/2 runs' from the second step (5.4531 against
5.4453), which docs/status.md had noted without a cause (a ZeRO 0 bf16 run 20 steps later at 3.68 against 3.32).

The fix, right after ``deepspeed.initialize``: forget the optimizer state (torch's AdamW and DeepSpeed's FusedAdam
create it again on the first real step, with step 0) and copy the 16-bit weights, which the dummy step left alone and
from which the masters were made, back into the fp32 masters. A resumed run then loads its saved state over this.
"""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def undo_the_init_step(engine: Any) -> bool:
    """Reset a ZeRO 0 16-bit engine's optimizer to before DeepSpeed's state-creating step (module docstring); False
    where the engine's optimizer takes no such step (ZeRO 1/2, fp32, DeepSpeed's BF16_Optimizer)."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    optimizer = engine.optimizer
    if isinstance(optimizer, FP16_UnfusedOptimizer):
        pairs = [
            (master, weight)
            for masters, weights in zip(optimizer.fp32_groups, optimizer.fp16_groups)
            for master, weight in zip(masters, weights)
        ]
    elif isinstance(optimizer, FP16_Optimizer):
        pairs = list(zip(optimizer.fp32_groups_flat, optimizer.fp16_groups_flat))
    else:
        return False
    inner = optimizer.optimizer
    inner.state.clear()
    for group in inner.param_groups:
        group.pop("step", None)  # FusedAdam counts steps per group
    for master, weight in pairs:
        master.copy_(weight)
    return True
