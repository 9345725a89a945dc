"""Work over one-rank process groups skipped (c2r/deepspeed/one_rank_groups.py, and the norm's all-reduce in
fp32_norm.py): the same losses and gradient norms as DeepSpeed's own code, bit for bit, with fewer all-reduces. On 2
expert-parallel ranks every expert group is one rank (its norm all-reduce goes); on one rank the data-parallel group
is one rank too (its division by 1 goes as well)."""

from __future__ import annotations

import pytest

from tests.distributed import run_distributed


def one_rank_worker(rank, world, raws):
    """Per run: the step norms and losses, and the all-reduces DeepSpeed's comm made."""
    import deepspeed.comm

    import c2r.deepspeed.one_rank_groups as one_rank_groups
    import c2r.train as train_module
    from c2r.config_utils import config_from_dict
    from c2r.train import RunConfig, train

    norms, calls = [], {"all_reduce": 0}
    train_module.check_finite_step = lambda step, loss, norm, ckpt_dir, router_error=None: norms.append(norm)
    all_reduce, is_one_rank = deepspeed.comm.all_reduce, one_rank_groups.is_one_rank

    def counted_all_reduce(*args, **kwargs):
        calls["all_reduce"] += 1
        return all_reduce(*args, **kwargs)

    deepspeed.comm.all_reduce = counted_all_reduce
    results = []
    for raw in raws:
        raw = dict(raw)
        # DeepSpeed's own behaviour: no group counts as one rank (every skip goes by this guard)
        one_rank_groups.is_one_rank = (lambda group: False) if raw.pop("deepspeeds_own", False) else is_one_rank
        norms.clear()
        calls["all_reduce"] = 0
        result = train(config_from_dict(RunConfig, raw))
        results.append((list(norms), result["step_losses"], calls["all_reduce"]))
    one_rank_groups.is_one_rank = is_one_rank
    return results


@pytest.mark.parametrize(("world", "stage", "bf16"), [(2, 1, True), (1, 2, False)])
def test_skipping_one_rank_group_work_changes_no_value(tmp_path, world, stage, bf16):
    from tests.run_configs import zero_ep_run_config

    runs = [
        zero_ep_run_config(tmp_path, "skipped", stage, bf16),
        zero_ep_run_config(tmp_path, "deepspeed", stage, bf16, deepspeeds_own=True),
    ]
    for run in runs:
        run["train"]["ep_size"] = world
    results = run_distributed(one_rank_worker, world, tmp_path / "spawn", runs)
    for (our_norms, our_losses, our_calls), (own_norms, own_losses, own_calls) in results:
        assert len(our_norms) == 4 and our_norms == own_norms  # bit for bit
        assert our_losses == own_losses
        assert our_calls < own_calls, (our_calls, own_calls)
