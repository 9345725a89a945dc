"""The tiny training run the multi-process tests share: 2 MoE layers of 8 experts, 32-token sequences."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def tiny_run_config(out_dir, steps: int = 20, profile: bool = False, **train_options: Any) -> dict[str, Any]:
    return {
        "model": {
            "block_size": 32,
            "n_layer": 2,
            "n_head": 2,
            "d_model": 32,
            "moe": {"num_experts": 8, "top_k": 2, "ffn_hidden_size": 32},
        },
        "train": {
            "steps": steps,
            "batch_size": 4,
            "eval_every": 10,
            "eval_batches": 2,
            "lr": 3e-3,
            "warmup_steps": 3,
            "out_dir": str(out_dir),
            **train_options,
        },
        "data": {"max_bytes": 200_000},
        "profile": {"enabled": profile},
    }


def zero_ep_run_config(tmp_path: Path, name: str, stage: int, bf16: bool, **extra: Any) -> dict[str, Any]:
    """4 steps on 2 expert-parallel ranks (per-rank dispatch) under DeepSpeed ZeRO ``stage``, clipped at 0.05 (it
    binds every step, so the norm sets every update): the runs the optimizer-step tests compare. ``extra``: top-level
    keys for the test's worker."""
    ds_config = tmp_path / f"ds_zero{stage}_{'bf16' if bf16 else 'fp32'}.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}}))
    config = tiny_run_config(
        tmp_path / name, steps=4, ep_size=2, dispatch="per-rank", deepspeed_config=str(ds_config), grad_clip=0.05
    )
    config["train"].update(save_last=False)
    return {**config, **extra}
