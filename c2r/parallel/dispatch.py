"""Expert-parallel dispatch: send each (token, expert) pair to the rank that holds the expert, and back.

Mode ``per-expert`` (the baseline every system uses): one token copy per routed expert. The dispatcher is split
into ``dispatch`` and ``combine`` that share a frozen :class:`DispatchMeta`, so a ``per-rank`` mode (one copy per
destination rank) can replace the steps without touching the layer.

Shape legend: T local tokens, D hidden, E experts, R ranks in the EP group, L = E / R local experts,
S sent rows (valid (token, slot) pairs), Q received rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from c2r.experts.permute import ExpertOrder, combine, sort_by_expert
from c2r.parallel.all_to_all import all_to_all, exchange_counts
from c2r.parallel.layout import ExpertLayout
from c2r.routing import RoutingResult


@dataclass(frozen=True)
class DispatchMeta:
    """What ``combine`` needs to undo ``dispatch``, plus the counts the profiler and tests read."""

    order: ExpertOrder  # sent rows, sorted by physical expert id (destination rank, then local slot)
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank
    regroup_Q: torch.Tensor  # received rows (by source rank, then slot) -> rows sorted by local slot
    tokens_per_local_expert_L: torch.Tensor
    recv_counts_RL: torch.Tensor  # rows received from rank r for local slot l


class ExpertParallelDispatcher:
    def __init__(self, layout: ExpertLayout, group=None):
        self.layout = layout
        self.group = group
        world = dist.get_world_size(group)
        if world != layout.num_ranks:
            raise ValueError(f"the expert layout is for {layout.num_ranks} ranks but the EP group has {world}")
        self.rank = dist.get_rank(group)
        self.timer = None  # set by the communication profiler to time each exchange

    def dispatch(self, x_TD: torch.Tensor, routing: RoutingResult) -> tuple[torch.Tensor, DispatchMeta]:
        R, L = self.layout.num_ranks, self.layout.experts_per_rank
        # 1. Sort valid pairs by physical expert id: rows for rank 0 first, each rank's block by local slot.
        physical_TK = self.layout.logical_to_physical.to(routing.expert_ids_TK.device)[routing.expert_ids_TK]
        order = sort_by_expert(dataclasses.replace(routing, expert_ids_TK=physical_TK), R * L)
        # 2. Tell every rank how many rows of each of its experts to expect.
        send_counts_RL = order.tokens_per_expert_E.view(R, L)
        recv_counts_RL = exchange_counts(send_counts_RL, self.group)
        # NOTE: host sync; all-to-all split sizes must be Python ints.
        send_splits = send_counts_RL.sum(1).tolist()
        recv_splits = recv_counts_RL.sum(1).tolist()
        # 3. Exchange the token copies.
        x_QD = all_to_all(x_TD[order.token_idx_S], recv_splits, send_splits, self.group, self.timer, "dispatch")
        # 4. Received rows come grouped by source rank; the grouped GEMM wants them grouped by local expert.
        slot_Q = torch.arange(L, device=x_QD.device).repeat(R).repeat_interleave(recv_counts_RL.flatten())
        regroup_Q = torch.argsort(slot_Q, stable=True)
        meta = DispatchMeta(order, send_splits, recv_splits, regroup_Q, recv_counts_RL.sum(0), recv_counts_RL)
        return x_QD[regroup_Q], meta

    def combine(self, y_QD: torch.Tensor, meta: DispatchMeta, num_tokens: int) -> torch.Tensor:
        # 1. Back to source-rank order, 2. return the rows, 3. weighted sum per token on the token's own rank.
        y_by_source = torch.empty_like(y_QD).index_copy(0, meta.regroup_Q, y_QD)
        y_SD = all_to_all(y_by_source, meta.send_splits, meta.recv_splits, self.group, self.timer, "combine")
        return combine(y_SD, meta.order, num_tokens)
