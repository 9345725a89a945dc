"""Router state that changes once per optimizer step, kept identical on every rank.

Every router class's :meth:`~c2r.routing.base.Router.update_after_step` classmethod gets all of its instances in
the model at once (ReMoE's lambda is shared by all layers), once per optimizer step. Statistics it needs from other
ranks (loads, sparsity) are summed with :func:`all_reduce_sum` over ``group`` (default: the whole job, since every
rank holds a replica of every router).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from c2r.routing.base import Router


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` over ``group`` in place (a no-op without torch.distributed); returns it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, group=group)
    return tensor


def after_optimizer_step(model: nn.Module, group=None) -> dict[str, float]:
    """Update every stateful router in ``model``; return the statistics they report (e.g. ReMoE's lambda)."""
    by_class: dict[type, list[nn.Module]] = {}
    for module in model.modules():
        if isinstance(module, Router):
            by_class.setdefault(type(module), []).append(module)
    stats: dict[str, float] = {}
    for cls, routers in by_class.items():
        stats.update(cls.update_after_step(routers, group))
    return stats
