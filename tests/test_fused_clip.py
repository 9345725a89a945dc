"""ZeRO 1/2's clip pass folded into the fused AdamW kernel (c2r/deepspeed/fused_clip.py): the same steps as
DeepSpeed's own pass. On CPU ranks, with torch's fused AdamW for CPU (c2r-train uses it on GPUs)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed


def clip_worker(rank, world, stage, clip, fold):
    import deepspeed

    from c2r.deepspeed.fused_clip import fold_clip_into_fused_adamw

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": False},
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    folded = fold_clip_into_fused_adamw(engine) if fold else False
    scales, norms = [], []
    generator = torch.Generator().manual_seed(1 + rank)
    for _ in range(4):
        x = torch.randn(8, 16, generator=generator) * 10  # large gradients: a clip of 0.05 binds every step
        loss = engine(x).square().mean()
        engine.backward(loss)
        engine.step()
        scale = getattr(engine.optimizer.optimizer, "grad_scale", None)
        scales.append(None if scale is None else float(scale))
        norms.append(float(engine.get_global_grad_norm()))
    params = [p.detach().clone() for p in engine.module.parameters()]
    return folded, scales, norms, params


def test_clip_folded_into_fused_adamw_steps_like_deepspeeds_pass(tmp_path):
    # ZeRO 2 on 2 ranks (ZeRO 1 runs the same DeepSpeedZeroOptimizer.step)
    (folded, scales, norms, params), (own, own_scales, own_norms, own_params) = [
        run_distributed(clip_worker, 2, tmp_path / name, 2, 0.05, fold)[0]
        for name, fold in (("folded", True), ("deepspeed", False))
    ]
    assert folded and not own
    assert all(s is not None and s > 1 for s in scales)  # the kernel got the clip coefficient every step
    assert own_scales == [None] * 4  # DeepSpeed's own pass leaves no scale on the optimizer
    assert norms == pytest.approx(own_norms, rel=1e-5)
    assert scales == pytest.approx([n / 0.05 for n in norms], rel=1e-4)  # max(1, (norm + 1e-6) / clip)
    for p, q in zip(params, own_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_no_clip_gives_the_kernel_no_scale(tmp_path):
    folded, scales, _, _ = run_distributed(clip_worker, 1, tmp_path / "r", 2, 0.0, True)[0]
    assert folded and scales == [None] * 4
