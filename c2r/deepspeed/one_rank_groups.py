"""Work DeepSpeed's ZeRO 1/2 does over process groups of one rank, skipped where it cannot change a value.

Two kinds, both in DeepSpeed 0.19.8's ``DeepSpeedZeroOptimizer``, both common in expert-parallel training:
- It divides every reduced gradient bucket by the data-parallel world size (``gradient_average``), also when that
  size is 1: a ``div_`` by 1.0 over every gradient, 3.1 ms of device time a step for the ~1B model on one H200
  (docs/gpu_runs.md, the 8k kernel profile).
- ``_average_expert_grad_norms`` all-reduces each expert group's gradient norm over that group's expert-data-parallel
  ranks, one collective per group, also when the group is one rank: with as many experts' shards as ranks (ep_size
  equal to the world size, the usual expert-parallel setup) every expert group is one rank. 24 of the 51 all-reduces
  a step of that model, ~85 us of host time each.

Dividing by 1 and all-reducing over one rank leave every value as it is, so skipping them changes nothing
(tests/test_one_rank_groups.py: losses and norms bit for bit DeepSpeed's, ZeRO 1 and 2, one rank and 2 EP ranks).
A group counts as one rank only when it is a group of size 1: ``None`` means the whole world to DeepSpeed's
collectives (its ``pg_utils.is_parallel`` says False for it, so it is not the guard here).
"""

from __future__ import annotations

from typing import Any


def is_one_rank(group) -> bool:
    """Whether a collective over ``group`` (a process group; None is the whole world) involves one rank only."""
    from deepspeed import comm as dist

    return dist.get_world_size(group=group) == 1


def skip_one_rank_group_work(engine: Any) -> bool:
    """Make the engine's ZeRO 1/2 optimizer skip the divisions and norm all-reduces over one-rank groups (module
    docstring); False where the engine runs another optimizer."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    zero = engine.optimizer
    if not isinstance(zero, DeepSpeedZeroOptimizer):
        return False
    one_rank = is_one_rank(zero.dp_process_group) and zero.sequence_parallel_size == 1
    if one_rank and zero.gradient_predivide_factor == 1.0:
        zero.gradient_average = False  # every division it guards is by 1.0 here (a predivide factor would round)
    if not getattr(zero, "has_moe_layers", False):  # DeepSpeed averages expert norms only then
        return True
    deepspeeds_average = zero._average_expert_grad_norms
    # DeepSpeed's own loop, told that an expert group of one rank is not one: its norm stays as it is
    averaged = [m and not is_one_rank(g) for m, g in zip(zero.is_moe_param_group, zero.real_dp_process_group)]

    def average_expert_grad_norms(norm_groups):
        moe_groups, zero.is_moe_param_group = zero.is_moe_param_group, averaged
        try:
            deepspeeds_average(norm_groups)
        finally:
            zero.is_moe_param_group = moe_groups

    zero._average_expert_grad_norms = average_expert_grad_norms
    return True
