"""What the trainer does with every router once a step: update the state that changes once per optimizer step, kept
identical on every rank, and read the routers' NaN/Inf checks (c2r/routing/finite.py).

Every router class's :meth:`~c2r.routing.base.Router.update_after_step` classmethod gets all of its instances in
the model at once (ReMoE's lambda is shared by all layers), once per optimizer step. Statistics it needs from other
ranks (loads, sparsity) are summed with :func:`all_reduce_sum` over ``group`` (default: the whole job, since every
rank holds a replica of every router).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from c2r.host_syncs import host_copy, wait_for
from c2r.routing.base import Router
from c2r.routing.finite import FiniteLogitsCheck, nonfinite_logits_error


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


def router_checks(model: nn.Module) -> list[FiniteLogitsCheck]:
    """The NaN/Inf checks of every router in ``model`` that has one (c2r/routing/finite.py), in module order."""
    return [c for m in model.modules() if isinstance(m, Router) and (c := m.logits_check()) is not None]


def bad_logit_counts(checks: list[FiniteLogitsCheck], device: torch.device) -> torch.Tensor:
    """[len(checks)] int64 on ``device``: each check's bad tokens so far on this rank (0 before its first counted
    forward; a CPU router counts only where a trainer reads it, ``read_by_trainer``, and raises at once otherwise)."""
    zero = torch.zeros((), dtype=torch.int64, device=device)
    return torch.stack([zero if c.bad_count is None else c.bad_count.to(device) for c in checks])


def first_router_error(
    checks: list[FiniteLogitsCheck], counts: list[int], all_ranks: bool = False
) -> FloatingPointError | None:
    """The error of the first check whose host count (``counts``, from :func:`bad_logit_counts`; summed over the
    ranks where ``all_ranks``) is not 0, or None."""
    for check, count in zip(checks, counts):
        if count > 0:
            return nonfinite_logits_error(int(count), None, check.layer_index, all_ranks=all_ranks)
    return None


def router_logits_error(model: nn.Module) -> FloatingPointError | None:
    """The error of the first router in ``model`` whose logits were NaN/Inf so far on this rank, or None: the
    newest counts of every router in one copy and one wait (c2r-train reads them over all ranks with each step's
    loss instead, c2r/step_reads.py; on the CPU the routers have raised already)."""
    checks = [c for c in router_checks(model) if c.bad_count is not None]
    if not checks:
        return None
    host, landed = host_copy(bad_logit_counts(checks, checks[0].bad_count.device))
    wait_for(landed, "the routers' NaN/Inf check")  # NOTE: host sync
    return first_router_error(checks, host.tolist())


def raise_if_router_logits_were_not_finite(model: nn.Module) -> None:
    """Raise :func:`router_logits_error` where there is one (c2r-adak before it saves)."""
    if (error := router_logits_error(model)) is not None:
        raise error
