"""ZeRO 1/2's gradient clipping folded into torch's fused AdamW step.

DeepSpeed's ZeRO 1/2 step (``DeepSpeedZeroOptimizer.step``, 0.19.8) clips each parameter group's fp32 gradient
partition with a separate pass, ``unscale_and_clip_grads``: ``grad.mul_(1 / combined_scale)``, a read and a write of
every fp32 gradient (~7 ms a step for the ~1B model's 3.6B parameters on an H200, 27 launches), right before the
optimizer reads the same gradients again. torch's fused Adam/AdamW kernel divides the gradients by a device scalar
as it reads them (``grad_scale``, the attribute ``torch.amp.GradScaler`` sets on an optimizer; the kernel writes the
divided gradient back, so the gradient ends as DeepSpeed's pass leaves it). So where the engine's inner optimizer is
a fused torch Adam/AdamW, ``unscale_and_clip_grads`` computes DeepSpeed's combined scale (clip coefficient times loss
scale) and hands it to the kernel instead of making its own pass.

Only bf16 or fp32 ZeRO 1/2 without CPU offload (fp16's dynamic loss scale, DeepSpeed's own GradScaler path and CPU
Adam keep DeepSpeed's code). A non-finite norm gives a non-finite scale either way; c2r-train's finite-step check
stops the run before that step is saved.
"""

from __future__ import annotations

from typing import Any

import torch


def combined_scale(total_norm, clip_grad: float, loss_scale: float) -> torch.Tensor | None:
    """DeepSpeed's ``unscale_and_clip_grads`` factor (the gradients are divided by it), as a float32 scalar tensor:
    the loss scale times the clip coefficient ``max(1, (norm / loss_scale + 1e-6) / clip_grad)``; None where it
    leaves the gradients alone."""
    if clip_grad == 0.0:
        return None if loss_scale == 1.0 else torch.tensor(float(loss_scale))
    norm = torch.as_tensor(total_norm, dtype=torch.float32).reshape(())
    return torch.clamp((norm / loss_scale + 1e-6) / clip_grad, min=1.0) * loss_scale


def fold_clip_into_fused_adamw(engine: Any) -> bool:
    """Make the engine's ZeRO 1/2 optimizer pass its clip scale to the fused AdamW kernel (module docstring); False
    where that does not apply and DeepSpeed's own pass stays."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    zero = engine.optimizer
    if not isinstance(zero, DeepSpeedZeroOptimizer) or zero.cpu_offload or engine.fp16_enabled():
        return False
    if getattr(zero, "torch_autocast_gradscaler", None) is not None or getattr(zero, "zenflow", False):
        return False
    inner = zero.optimizer
    if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW) or not inner.defaults.get("fused"):
        return False

    def unscale_and_clip_grads(grad_groups_flat, total_norm):
        scale = combined_scale(total_norm, zero.clip_grad, zero.loss_scale)
        # the kernel reads it on the gradients' device
        inner.grad_scale = None if scale is None else scale.to(grad_groups_flat[0].device)

    zero.unscale_and_clip_grads = unscale_and_clip_grads
    return True
