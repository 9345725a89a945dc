"""c2r/deepspeed/zero0_init.py: a ZeRO 0 bf16 run's optimizer starts at step 0 with the initial weights, so it
trains as ZeRO 2 bf16 does (DeepSpeed's constructor had taken one AdamW step with zero gradients: the first real
update 0.73x its size, and the weights decayed once)."""

import json

import torch

from c2r.config_utils import config_from_dict
from c2r.train import RunConfig, train
from tests.distributed import run_distributed
from tests.run_configs import tiny_run_config


def losses_and_adam_steps(rank, world, out_dir, stage):
    ds = out_dir / f"ds{stage}.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": stage}, "bf16": {"enabled": True}}))
    raw = tiny_run_config(out_dir / f"run{stage}", steps=3, eval_every=3, deepspeed_config=str(ds), save_last=False)
    raw["model"]["moe"]["router"] = {"aux_loss_weight": 0.0}
    result = train(config_from_dict(RunConfig, raw))
    inner = result["engine"].optimizer.optimizer
    steps = {float(state["step"]) for state in inner.state.values() if "step" in state}
    return result["step_losses"], steps


def test_zero0_bf16_trains_as_zero2_bf16(tmp_path):
    (zero0,) = run_distributed(losses_and_adam_steps, 1, tmp_path / "a", tmp_path, 0)
    (zero2,) = run_distributed(losses_and_adam_steps, 1, tmp_path / "b", tmp_path, 2)
    assert zero0[1] == {3.0}  # three real steps, none before them
    # bf16 rounding apart (1e-3), the same losses; with the init step the second one was 0.008 higher, the third 0.024
    torch.testing.assert_close(torch.tensor(zero0[0]), torch.tensor(zero2[0]), rtol=0, atol=2e-3)
