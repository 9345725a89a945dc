"""Variable-size all-to-all with autograd: the backward sends gradients back along the same routes.

An optional ``timer`` (an :class:`ExchangeTimer`: ``start(name) -> handle`` and ``stop(handle)``; a dispatcher passes
its observer, e.g. the profiler's) times each exchange, forward and backward; without one there is no overhead.

Shape letters follow the package legend (c2r/__init__.py): R ranks in the group, X experts per rank.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist


class ExchangeTimer(Protocol):
    """Times one exchange: ``stop`` gets back what ``start`` returned."""

    def start(self, name: str) -> Any: ...

    def stop(self, handle: Any) -> None: ...


def _exchange(x, output_splits, input_splits, group, timer: ExchangeTimer | None, name: str):
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    handle = timer.start(name) if timer is not None else None
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    if timer is not None:
        timer.stop(handle)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits: list[int], input_splits: list[int], group, timer, name: str):
        ctx.splits, ctx.group, ctx.timer, ctx.name = (output_splits, input_splits), group, timer, name
        return _exchange(x, output_splits, input_splits, group, timer, name)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        grad_in = _exchange(grad, input_splits, output_splits, ctx.group, ctx.timer, ctx.name + "_backward")
        return grad_in, None, None, None, None, None


def all_to_all(
    x: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group=None,
    timer: ExchangeTimer | None = None,
    name: str = "all_to_all",
) -> torch.Tensor:
    """Rows ``x[sum(input_splits[:r]) : ...]`` go to rank r; rows from rank r arrive in block r of the output."""
    return _AllToAll.apply(x, output_splits, input_splits, group, timer, name)


def exchange_counts(send_counts_RX: torch.Tensor, group=None) -> torch.Tensor:
    """Row r of the input goes to rank r; row r of the output came from rank r. No gradient."""
    recv = torch.empty_like(send_counts_RX)
    dist.all_to_all_single(recv, send_counts_RX.contiguous(), group=group)
    return recv
