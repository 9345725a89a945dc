"""Variable-size all-to-all with autograd: the backward sends gradients back along the same routes."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits: list[int], input_splits: list[int], group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), input_splits, output_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group=None) -> torch.Tensor:
    """Rows ``x[sum(input_splits[:r]) : ...]`` go to rank r; rows from rank r arrive in block r of the output."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


def exchange_counts(send_counts_RL: torch.Tensor, group=None) -> torch.Tensor:
    """Row r of the input goes to rank r; row r of the output came from rank r. No gradient."""
    recv = torch.empty_like(send_counts_RL)
    dist.all_to_all_single(recv, send_counts_RL.contiguous(), group=group)
    return recv
