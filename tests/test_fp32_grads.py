"""bf16 ZeRO 1/2's float32 gradient partition built by one multi-tensor copy (c2r/deepspeed/fp32_grads.py): exactly
DeepSpeed's flatten-and-convert, on 2 expert-parallel ranks (the shared parameters' partitions padded on the last)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed


def test_flat_float32_is_the_concatenation_converted_and_zero_padded():
    from c2r.deepspeed.fp32_grads import flat_float32

    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 5, generator=generator).bfloat16(), torch.zeros(2).bfloat16(), torch.randn(7).bfloat16()]
    flat = flat_float32(tensors, 30)
    expected = torch.cat([t.reshape(-1).float() for t in tensors] + [torch.zeros(6)])
    assert flat.dtype == torch.float32 and torch.equal(flat, expected)


def grads_worker(rank, world, raws):
    """Per run: whether the one-pass copy was installed, how many partitions it built, the step losses and norms."""
    import c2r.deepspeed.fp32_grads as fp32_grads
    import c2r.train as train_module
    from c2r.config_utils import config_from_dict
    from c2r.train import RunConfig, train

    norms, built = [], []
    train_module.check_finite_step = lambda step, loss, norm, ckpt_dir, router_error=None: norms.append(norm)
    flat_float32 = fp32_grads.flat_float32
    fp32_grads.flat_float32 = lambda tensors, size: built.append(size) or flat_float32(tensors, size)
    results = []
    for raw in raws:
        raw = dict(raw)
        if raw.pop("deepspeeds_copy", False):
            fp32_grads.copy_grads_to_float32_in_one_pass = lambda engine: False  # build_engine imports it per call
        norms.clear(), built.clear()
        result = train(config_from_dict(RunConfig, raw))
        zero = result["engine"].optimizer
        installed = "copy_grads_to_float32" in zero._get_preflattened_grad_partition.__qualname__
        results.append((installed, len(built), list(norms), result["step_losses"]))
    return results


@pytest.mark.parametrize("stage", [1, 2])
def test_one_pass_copy_trains_exactly_like_deepspeeds_flatten_and_convert(tmp_path, stage):
    from tests.run_configs import zero_ep_run_config

    runs = [
        zero_ep_run_config(tmp_path, "one_pass", stage, bf16=True),
        zero_ep_run_config(tmp_path, "deepspeed", stage, bf16=True, deepspeeds_copy=True),
    ]
    for rank_results in run_distributed(grads_worker, 2, tmp_path / "spawn", runs):
        (ours, built, our_norms, our_losses), (own, own_built, own_norms, own_losses) = rank_results
        assert ours and not own
        assert built >= 4 and own_built == 0  # at least one partition a step went the new way
        assert our_norms == own_norms and our_losses == own_losses  # bit for bit
