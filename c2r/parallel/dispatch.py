"""Expert-parallel dispatch: send tokens to the ranks that hold their experts, compute, and send the results back.

Two modes, same result (DESIGN.md, "Dispatch"):
- ``per-expert`` (the baseline every system uses): one token copy per routed (token, expert) pair; the destination
  runs the expert and returns one row per pair; the source sums them with the combine weights.
- ``per-rank`` (Occult's idea): one copy per (token, destination rank), carrying which of that rank's experts the
  token chose and their weights; the destination expands the copy to its local experts, sums their weighted outputs
  itself, and returns one row per copy. Copies sent = sum over tokens of the distinct destination ranks (lambda).

Each dispatcher is called as ``dispatcher(x_TD, routing, backend, experts) -> out_TD``. What it sent is reported in
its :class:`DispatchMeta`, handed to the :class:`DispatchObserver` it was built with (the profiler, a test); nothing
is read off the dispatcher afterwards.

Shape letters follow the package legend (c2r/__init__.py): T tokens on this rank, D hidden, K slots, E experts,
R ranks in the EP group, X = E / R experts per rank, C rows this rank sends, Q rows it receives.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import torch
import torch.distributed as dist

from c2r.experts.permute import ExpertOrder, combine, sort_by_expert
from c2r.parallel.all_to_all import ExchangeTimer, all_to_all, exchange_counts
from c2r.routing import RoutingResult, count_tokens_per_expert
from placement.layout import ExpertLayout

DISPATCH_MODES = ("per-expert", "per-rank")


def ranks_hit(rank_TK: torch.Tensor, valid_TK: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """[T, R] bool: which ranks each token's valid slots go to (a row's sum is the token's lambda)."""
    hits_TR = torch.zeros(rank_TK.shape[0], num_ranks, dtype=torch.int64, device=rank_TK.device)
    hits_TR.scatter_add_(1, rank_TK, valid_TK.long())  # add, not scatter: several slots may hit one rank
    return hits_TR > 0


@dataclass(frozen=True)
class DispatchMeta:
    """What ``combine`` needs to undo ``dispatch``, and the counts of what this rank sent.

    The splits are host ints (the all-to-all needs them anyway); every other count is a device tensor, computed on
    first read, so a dispatch that nobody observes pays nothing for them and reading them needs no host sync.
    """

    mode: str
    ep_rank: int  # this rank's position in the EP group
    send_splits: list[int]  # rows (token copies) sent to each rank, this rank included; sums to C
    recv_splits: list[int]  # rows received from each rank; sums to Q
    tokens_per_local_expert_X: torch.Tensor  # (token, expert) pairs this rank computes, per local expert
    token_idx_C: torch.Tensor  # source token of each sent row
    dest_rank_TK: torch.Tensor  # rank holding each slot's expert (meaningless where the slot is empty)
    valid_TK: torch.Tensor
    bytes_per_row: int  # one sent row: D * element size
    order: ExpertOrder | None = None  # per-expert: sent rows sorted by physical expert id (with weights)
    regroup_Q: torch.Tensor | None = None  # per-expert: received rows (by source rank) -> sorted by local slot

    @property
    def num_tokens(self) -> int:
        return self.valid_TK.shape[0]

    @cached_property
    def valid_slots(self) -> torch.Tensor:
        """() int64: routed (token, expert) pairs; what per-expert dispatch sends."""
        return self.valid_TK.sum()

    @cached_property
    def ranks_hit_TR(self) -> torch.Tensor:
        return ranks_hit(self.dest_rank_TK, self.valid_TK, len(self.send_splits))

    @cached_property
    def distinct_ranks(self) -> torch.Tensor:
        """() int64: sum over tokens of lambda, the distinct ranks its experts live on; what per-rank sends."""
        return self.ranks_hit_TR.sum()

    @cached_property
    def remote_ranks(self) -> torch.Tensor:
        """() int64: the same, not counting the token's own rank (copies that cross the network)."""
        return self.distinct_ranks - self.ranks_hit_TR[:, self.ep_rank].sum()


class DispatchObserver(ExchangeTimer, Protocol):
    """Watches one dispatcher: times each exchange (``start`` / ``stop``, forward and backward) and receives each
    forward's :class:`DispatchMeta`.

    One collaborator given at construction, rather than a timer and a callback: the profiler needs both for the same
    layer, and nothing has to be assigned onto the dispatcher from outside later.
    """

    def on_dispatch(self, meta: DispatchMeta) -> None: ...


class NoObserver:
    """The default: nobody is watching, nothing is recorded."""

    def start(self, name: str) -> None:
        return None

    def stop(self, handle: None) -> None:
        pass

    def on_dispatch(self, meta: DispatchMeta) -> None:
        pass


NO_OBSERVER = NoObserver()


class _Dispatcher:
    mode = ""

    def __init__(self, layout: ExpertLayout, group=None, observer: DispatchObserver = NO_OBSERVER):
        self.layout = layout
        self.group = group
        world = dist.get_world_size(group)
        if world != layout.num_ranks:
            raise ValueError(f"the expert layout is for {layout.num_ranks} ranks but the EP group has {world}")
        self.rank = dist.get_rank(group)
        self.observer = observer
        self.expert_to_rank_E = torch.tensor(layout.expert_to_rank)
        self._physical_E = torch.tensor(layout.logical_to_physical)  # layouts are numpy: placement needs no torch
        self._local_slot_E = self._physical_E % layout.experts_per_rank

    def _exchange_splits(self, send_counts_RX: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
        recv_counts_RX = exchange_counts(send_counts_RX, self.group)
        # NOTE: host sync; all-to-all split sizes must be Python ints.
        return recv_counts_RX, send_counts_RX.sum(1).tolist(), recv_counts_RX.sum(1).tolist()

    def _send(self, x: torch.Tensor, meta_splits: tuple[list[int], list[int]], name: str) -> torch.Tensor:
        send_splits, recv_splits = meta_splits
        return all_to_all(x, recv_splits, send_splits, self.group, self.observer, name)


class PerExpertDispatcher(_Dispatcher):
    mode = "per-expert"

    def __call__(self, x_TD, routing: RoutingResult, backend, experts) -> torch.Tensor:
        x_QD, meta = self.dispatch(x_TD, routing)
        y_QD = backend.grouped_mlp(x_QD, meta.tokens_per_local_expert_X, experts)
        self.observer.on_dispatch(meta)
        return self.combine(y_QD, meta, x_TD.shape[0])

    def dispatch(self, x_TD: torch.Tensor, routing: RoutingResult) -> tuple[torch.Tensor, DispatchMeta]:
        R, X = self.layout.num_ranks, self.layout.experts_per_rank
        # 1. Sort valid pairs by physical expert id: rows for rank 0 first, each rank's block by local slot.
        physical_TK = self._physical_E.to(routing.expert_ids_TK.device)[routing.expert_ids_TK]
        order = sort_by_expert(dataclasses.replace(routing, expert_ids_TK=physical_TK), R * X)
        # 2. Tell every rank how many rows of each of its experts to expect.
        recv_counts_RX, send_splits, recv_splits = self._exchange_splits(order.tokens_per_expert_E.view(R, X))
        # 3. Exchange the token copies.
        x_QD = self._send(x_TD[order.token_idx_P], (send_splits, recv_splits), "dispatch")
        # 4. Received rows come grouped by source rank; the grouped GEMM wants them grouped by local expert.
        slot_Q = torch.arange(X, device=x_QD.device).repeat(R).repeat_interleave(recv_counts_RX.flatten())
        regroup_Q = torch.argsort(slot_Q, stable=True)
        meta = DispatchMeta(
            self.mode,
            self.rank,
            send_splits,
            recv_splits,
            tokens_per_local_expert_X=recv_counts_RX.sum(0),
            token_idx_C=order.token_idx_P,
            dest_rank_TK=physical_TK // X,  # physical id = rank * X + local slot
            valid_TK=routing.valid_TK,
            bytes_per_row=x_TD.shape[1] * x_TD.element_size(),
            order=order,
            regroup_Q=regroup_Q,
        )
        return x_QD[regroup_Q], meta

    def combine(self, y_QD: torch.Tensor, meta: DispatchMeta, num_tokens: int) -> torch.Tensor:
        # 1. Back to source-rank order, 2. return the rows, 3. weighted sum per token on the token's own rank.
        y_by_source = torch.empty_like(y_QD).index_copy(0, meta.regroup_Q, y_QD)
        y_CD = self._send(y_by_source, (meta.recv_splits, meta.send_splits), "combine")
        return combine(y_CD, meta.order, num_tokens)


class PerRankDispatcher(_Dispatcher):
    mode = "per-rank"

    def __call__(self, x_TD, routing: RoutingResult, backend, experts) -> torch.Tensor:
        x_QD, local_routing, meta = self.dispatch(x_TD, routing)
        # The destination runs the ordinary single-device path on its copies: expand, compute, weighted sum.
        y_QD = backend(x_QD, local_routing, experts)
        if y_QD.shape[0] == 0:
            # Keep the (empty) output attached to the received tensors, so this rank still joins the backward
            # all-to-alls that its peers start.
            y_QD = y_QD + (x_QD.sum() + local_routing.weights_TK.sum()) * 0
        self.observer.on_dispatch(meta)
        return self.combine(y_QD, meta, x_TD.shape[0])

    def dispatch(self, x_TD: torch.Tensor, routing: RoutingResult):
        R, X = self.layout.num_ranks, self.layout.experts_per_rank
        device = routing.expert_ids_TK.device
        rank_TK = self.expert_to_rank_E.to(device)[routing.expert_ids_TK]
        # 1. One copy per (token, destination rank), grouped by destination.
        dest_C, token_C = ranks_hit(rank_TK, routing.valid_TK, R).t().nonzero(as_tuple=True)
        # 2. Each copy carries the local slots and weights of the experts the token chose on that rank.
        chosen_CK = (rank_TK[token_C] == dest_C.unsqueeze(1)) & routing.valid_TK[token_C]
        slot_CK = torch.where(chosen_CK, self._local_slot_E.to(device)[routing.expert_ids_TK[token_C]], -1)
        weight_CK = torch.where(chosen_CK, routing.weights_TK[token_C], torch.zeros_like(routing.weights_TK[token_C]))
        _, send_splits, recv_splits = self._exchange_splits(torch.bincount(dest_C, minlength=R).view(R, 1))
        # 3. Exchange copies, slots and weights (weights carry gradients back to the router).
        splits = (send_splits, recv_splits)
        x_QD = self._send(x_TD[token_C], splits, "dispatch")
        slot_QK = self._send(slot_CK, splits, "dispatch_meta")
        weight_QK = self._send(weight_CK, splits, "dispatch_meta")
        valid_QK = slot_QK >= 0
        local_routing = RoutingResult(
            expert_ids_TK=slot_QK.clamp(min=0),
            weights_TK=weight_QK,
            valid_TK=valid_QK,
            aux_loss=weight_QK.new_zeros(()),
            tokens_per_expert_E=count_tokens_per_expert(slot_QK.clamp(min=0), valid_QK, X),
        )
        meta = DispatchMeta(
            self.mode,
            self.rank,
            send_splits,
            recv_splits,
            tokens_per_local_expert_X=local_routing.tokens_per_expert_E,
            token_idx_C=token_C,
            dest_rank_TK=rank_TK,
            valid_TK=routing.valid_TK,
            bytes_per_row=x_TD.shape[1] * x_TD.element_size(),
        )
        return x_QD, local_routing, meta

    def combine(self, y_QD: torch.Tensor, meta: DispatchMeta, num_tokens: int) -> torch.Tensor:
        # One reply per copy, already weighted and summed over that rank's experts: the source just adds them up.
        y_CD = self._send(y_QD, (meta.recv_splits, meta.send_splits), "combine")
        return y_CD.new_zeros(num_tokens, y_CD.shape[1]).index_add(0, meta.token_idx_C, y_CD)


def build_dispatcher(
    mode: str, layout: ExpertLayout, group=None, observer: DispatchObserver = NO_OBSERVER
) -> _Dispatcher:
    """``observer``: who times the exchanges and receives each forward's :class:`DispatchMeta` (default: nobody)."""
    if mode == "per-expert":
        return PerExpertDispatcher(layout, group, observer)
    if mode == "per-rank":
        return PerRankDispatcher(layout, group, observer)
    raise ValueError(f"dispatch mode {mode!r} is not one of {list(DISPATCH_MODES)}")
