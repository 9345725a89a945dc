"""The tiny training run the multi-process tests share: 2 MoE layers of 8 experts, 32-token sequences."""

from __future__ import annotations

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
