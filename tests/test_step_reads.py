"""c2r/step_reads.py: each step's numbers are read one step late, in order, and carry the routers' NaN/Inf counts."""

import math

import torch
from torch import nn

from c2r.routing.base import Router
from c2r.routing.finite import FiniteLogitsCheck
from c2r.step_reads import StepReader


class _CheckedRouter(Router):
    """Stands in for a router whose NaN/Inf check has counted ``bad`` tokens (as a GPU forward leaves it)."""

    def __init__(self, layer: int, bad: int | None):
        super().__init__()
        self.check = FiniteLogitsCheck(layer)
        self.check.bad_count = None if bad is None else torch.tensor(bad)

    def logits_check(self):
        return self.check


def _model(*bad):
    return nn.ModuleList(_CheckedRouter(layer, count) for layer, count in enumerate(bad))


def test_numbers_come_one_step_late_in_order_and_all_at_a_deciding_boundary():
    reader = StepReader(_model(None, 0), torch.device("cpu"))
    reader.queue(1, [torch.tensor(2.0), torch.tensor(4.0)], torch.tensor(0.5), [0.0, 0.0, 1.0])
    assert reader.read(wait_newest=False) == []  # step 1's copy may be in flight: read at the next boundary
    reader.queue(2, [torch.tensor(1.0)], None, [1.0, 0.0, 0.0])
    (first,) = reader.read(wait_newest=False)
    assert (first.step, first.loss, first.grad_norm, first.flags, first.router_error) == (1, 3.0, 0.5, [0, 0, 1], None)
    reader.queue(3, [torch.tensor(float("nan"))], 7.0, [0.0, 0.0, 0.0])  # a host float norm (ZeRO 0)
    second, third = reader.read(wait_newest=True)  # an evaluation or a save reads its own step too
    assert (second.step, second.loss, second.grad_norm, second.flags) == (2, 1.0, None, [1, 0, 0])
    assert third.step == 3 and math.isnan(third.loss) and third.grad_norm == 7.0
    assert reader.read(wait_newest=True) == []


def test_a_router_that_counted_bad_logits_is_named_with_the_step():
    reader = StepReader(_model(0, 3), torch.device("cpu"))
    reader.queue(5, [torch.tensor(2.5)], torch.tensor(0.1), [0.0])
    (numbers,) = reader.read(wait_newest=True)
    assert "router logits of MoE layer 1 contain NaN/Inf for 3 tokens" in str(numbers.router_error)
    assert numbers.loss == 2.5 and numbers.step == 5
