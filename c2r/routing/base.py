"""What every router is: an ``nn.Module`` mapping ``x_TD`` to a :class:`RoutingResult`, plus four optional hooks.

Callers call the hooks on every router; a router that has nothing to do keeps the no-op default. That is why they
are declared here rather than found with ``hasattr``: a hook a caller relies on is part of the contract, and a typo
in an override's name would otherwise be skipped silently.

- :meth:`Router.update_after_step` (classmethod): state that changes once per optimizer step, over all of a class's
  instances at once (ReMoE's lambda, the group-limited bias, AdaMoE's step count); called by
  :func:`c2r.routing.after_optimizer_step` on every rank.
- :meth:`Router.set_expert_placement`: the layer's expert-parallel placement, told to routers that group experts by
  rank (group-limited); called when a layer is sharded or a DeepSpeed gate learns its expert-parallel group.
- :meth:`Router.logits_check`: the router's NaN/Inf check of its logits, read by the trainer with each step's loss
  (c2r/step_reads.py; on a GPU the check runs without waiting for the device, so it may report only then).
- :meth:`Router.init_from_pretrained`: converting the weights of a trained router of another kind (AdaMoE seeds its
  null experts); called after loading a checkpoint's weights with ``--init-from``.

Shape legend: the package legend (``c2r/__init__.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from c2r.routing.finite import FiniteLogitsCheck


class Router(nn.Module):
    """Base class of every router; subclasses implement ``forward(x_TD) -> RoutingResult`` and override the hooks
    they need."""

    @classmethod
    def update_after_step(cls, routers: list[Router], group=None) -> dict[str, float]:
        """Update ``routers`` (every instance of ``cls`` in the model) after an optimizer step; sum statistics over
        ``group`` where they must agree on every rank. Returns statistics to log (none by default)."""
        return {}

    def set_expert_placement(self, expert_to_rank: Sequence[int], num_ranks: int) -> None:
        """The layer's experts now live on ``expert_to_rank`` over ``num_ranks`` ranks. Routing that does not depend
        on where experts live ignores it."""

    def logits_check(self) -> FiniteLogitsCheck | None:
        """This router's NaN/Inf check of its logits (c2r/routing/finite.py), read by
        c2r-train with each step's loss (c2r/step_reads.py): on a GPU the check runs without
        waiting for the device, so what it finds may surface only there. None: nothing to check."""
        return None

    def init_from_pretrained(self, saved_router: dict) -> None:
        """The weights just loaded come from a router configured as ``saved_router`` (a saved ``RouterConfig``
        dict); convert what differs. Routers whose parameters all load as they are do nothing."""
