"""Expert-parallel dispatch: send tokens to the ranks that hold their experts, compute, and send the results back.

Three modes, same result (docs/design.md, "Dispatch"):
- ``per-expert`` (the baseline every system uses): one token copy per routed (token, expert) pair; the destination
  runs the expert and returns one row per pair; the source sums them with the combine weights.
- ``per-rank`` (Occult's idea): one copy per (token, destination rank), carrying which of that rank's experts the
  token chose and their weights; the destination expands the copy to its local experts, sums their weighted outputs
  itself, and returns one row per copy. Copies sent = sum over tokens of the distinct destination ranks (lambda).
- ``per-node`` (``per_node.py``): per-rank across nodes: one copy per (token, destination node) over the network,
  then per rank within that node.

Both are lean: only valid (token, expert) pairs are sent, computed and returned (no K-slot padding; on a GPU the
weighted sums back to rows read only the valid slots, ``slot_rows.sum_slots``); every move between token order and
expert order is a gather through a precomputed order and its inverse (``slot_rows.py``), so neither direction uses
atomic adds; all counts travel in one small all-to-all and reach the host in one copy, the only host sync of a
dispatch (a backend may add one: MegaBlocks' grouped_gemm wants its group sizes on the host).

Each dispatcher is called as ``dispatcher(x_TD, routing, backend, experts) -> out_TD``. What it sent is reported in
its :class:`DispatchMeta`, handed to the :class:`DispatchObserver` it was built with (the profiler, a test); nothing
is read off the dispatcher afterwards.

Shape letters follow the package legend (c2r/__init__.py): T tokens on this rank, D hidden, K slots, E experts,
R ranks in the EP group, X expert slots per rank (E / R; more with replicated experts, whose copy each slot uses
``replicas.py`` decides), C rows this rank sends, Q rows it receives, and P valid (copy, slot) pairs at a per-rank
destination in local-expert order (as in ``slot_rows.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import torch
import torch.distributed as dist

from c2r.experts.slot_rows import (
    SlotOrder,
    count_keys,
    expand_rows,
    inverse_permutation,
    permute_rows,
    sort_slots,
    sum_slots,
)
from c2r.parallel.all_to_all import ExchangeTimer, all_to_all, exchange_counts
from c2r.parallel.replicas import CopyChooser, ReplicaGradSum
from c2r.routing import RoutingResult
from placement.layout import ExpertLayout

DISPATCH_MODES = ("per-expert", "per-rank", "per-node")


def column_sums(rows: list[list[int]], columns) -> list[int]:
    """Host counts summed over the source ranks (``rows``, one per rank) for each of ``columns``."""
    return [sum(row[c] for row in rows) for c in columns]


def ranks_hit(rank_TK: torch.Tensor, valid_TK: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """[T, R] bool: which ranks each token's valid slots go to (a row's sum is the token's lambda)."""
    hits_TR = torch.zeros(rank_TK.shape[0], num_ranks, dtype=torch.int64, device=rank_TK.device)
    hits_TR.scatter_add_(1, rank_TK, valid_TK.long())  # add, not scatter: several slots may hit one rank
    return hits_TR > 0


def copy_bytes(x_TD: torch.Tensor, routing_slots: int = 0) -> int:
    """Bytes one sent copy takes: its row of ``x_TD``, and ``routing_slots`` (K where a copy carries its slots) x
    a float32 slot id and weight beside it (per-rank and per-node dispatch)."""
    return x_TD.shape[1] * x_TD.element_size() + 2 * routing_slots * 4


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
    token_idx_C: torch.Tensor  # source token of each sent row (per-node: of each row sent over the network only)
    dest_rank_TK: torch.Tensor  # rank holding each slot's expert (meaningless where the slot is empty)
    valid_TK: torch.Tensor
    # one sent copy: its D-wide row (D x element size) plus, per-rank and per-node, the [2K] float32 slots and weights
    # that travel beside it (per-expert sends none: its weights stay on the source)
    bytes_per_row: int
    # How sent rows map to the tokens' slots: per-expert, (token, routing slot) pairs by physical expert id;
    # per-rank, (token, destination rank) pairs by rank. The combine sums each token's rows through it.
    sent: SlotOrder | None = None
    weights_TK: torch.Tensor | None = None  # per-expert: the combine weights, applied on the source
    regroup_Q: torch.Tensor | None = None  # per-expert: received rows (by source rank) -> sorted by local slot
    ungroup_Q: torch.Tensor | None = None  # per-expert: its inverse (sorted by local slot -> by source rank)
    # W, ranks per node (EP rank r sits on node r // W); None: the whole EP group is one node. Only the node counts
    # below read it, in every mode: per-rank dispatch on two nodes sends inter-node copies too.
    ranks_per_node: int | None = None
    # per-expert: ``tokens_per_local_expert_X`` on the host, so the backend needs no host sync of its own
    local_counts_host: list[int] | None = None

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

    @property
    def node_size(self) -> int:
        return self.ranks_per_node or len(self.send_splits)

    @cached_property
    def nodes_hit_TN(self) -> torch.Tensor:
        T, R, W = self.num_tokens, len(self.send_splits), self.node_size
        return self.ranks_hit_TR.view(T, R // W, W).any(2)

    @cached_property
    def distinct_nodes(self) -> torch.Tensor:
        """() int64: sum over tokens of the distinct nodes its experts live on; what per-node sends over stage 1."""
        return self.nodes_hit_TN.sum()

    @cached_property
    def remote_nodes(self) -> torch.Tensor:
        """() int64: the same, not counting the token's own node (what per-node dispatch sends over the network)."""
        return self.distinct_nodes - self.nodes_hit_TN[:, self.ep_rank // self.node_size].sum()

    @property
    def inter_node_copies(self) -> int:
        """Rows this rank sent to ranks of other nodes (host int, from the splits)."""
        node = self.ep_rank // self.node_size
        return sum(n for r, n in enumerate(self.send_splits) if r // self.node_size != node)

    @property
    def intra_node_copies(self) -> int:
        """Rows this rank sent to other ranks of its own node."""
        node = self.ep_rank // self.node_size
        own = sum(n for r, n in enumerate(self.send_splits) if r // self.node_size == node)
        return own - self.send_splits[self.ep_rank]


@dataclass(frozen=True)
class ReceivedCopies:
    """Per-rank destination: the received copies and their valid (copy, local expert) pairs in local-expert order."""

    x_QD: torch.Tensor
    weight_QK: torch.Tensor  # combine weights (0 where a slot holds none of this rank's experts); carry gradients
    pairs: SlotOrder  # (copy, slot) pairs by local expert slot
    tokens_per_local_expert_X: torch.Tensor
    host_counts_X: list[int] | None = None  # the same counts on the host (they came with the count exchange)


def compute_copies(received: ReceivedCopies, backend, experts) -> torch.Tensor:
    """[Q, D]: one reply per received copy, its local experts' weighted outputs summed (per-rank destinations)."""
    # Only the valid (copy, local expert) pairs are computed, in one grouped GEMM over rows sorted by local expert.
    x_PD = expand_rows(received.x_QD, received.pairs)
    y_PD = backend.grouped_mlp(x_PD, received.tokens_per_local_expert_X, experts, received.host_counts_X)
    y_QD = sum_slots(y_PD, received.pairs, received.weight_QK)
    if y_QD.shape[0] == 0:
        # Keep the (empty) output attached to the received tensors, so this rank still joins the backward
        # all-to-alls that its peers start.
        y_QD = y_QD + (received.x_QD.sum() + received.weight_QK.sum()) * 0
    return y_QD


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

    def __init__(
        self,
        layout: ExpertLayout,
        group=None,
        observer: DispatchObserver = NO_OBSERVER,
        ranks_per_node: int | None = None,
        copy_choice: str = "rule",
    ):
        self.layout = layout
        self.ranks_per_node = ranks_per_node  # for the counts only (DispatchMeta.inter_node_copies and co.)
        self.group = group
        world = dist.get_world_size(group)
        if world != layout.num_ranks:
            raise ValueError(f"the expert layout is for {layout.num_ranks} ranks but the EP group has {world}")
        self.rank = dist.get_rank(group)
        self.observer = observer
        # Replicated experts (replicas.py): which copy each slot uses, and the gradient sum over the copies.
        self.copies = CopyChooser(layout, copy_choice, group)
        self.replica_grads = ReplicaGradSum(layout, self.rank, group)

    def _physical(self, routing: RoutingResult) -> tuple[torch.Tensor, torch.Tensor]:
        """(rank_TK, physical_TK): the rank and physical slot (rank * X + local slot) each (token, slot) goes to."""
        physical_TK = self.copies.physical(routing.expert_ids_TK, routing.valid_TK)
        return physical_TK // self.layout.experts_per_rank, physical_TK

    def _exchange_counts(self, send_counts_RN: torch.Tensor) -> tuple[torch.Tensor, list[list[int]], list[list[int]]]:
        """Row r of ``send_counts_RN`` goes to rank r. Returns the received counts (device) and both on the host."""
        recv_counts_RN = exchange_counts(send_counts_RN, self.group)
        # NOTE: host sync, the only one of a dispatch: split sizes and pair counts must be Python ints.
        send_host, recv_host = torch.stack([send_counts_RN, recv_counts_RN]).tolist()
        return recv_counts_RN, send_host, recv_host

    def _send(self, x: torch.Tensor, meta_splits: tuple[list[int], list[int]], name: str) -> torch.Tensor:
        send_splits, recv_splits = meta_splits
        return all_to_all(x, recv_splits, send_splits, self.group, self.observer, name)


class PerExpertDispatcher(_Dispatcher):
    mode = "per-expert"

    def __call__(self, x_TD, routing: RoutingResult, backend, experts) -> torch.Tensor:
        experts = self.replica_grads(experts)
        x_QD, meta = self.dispatch(x_TD, routing)
        y_QD = backend.grouped_mlp(x_QD, meta.tokens_per_local_expert_X, experts, meta.local_counts_host)
        self.observer.on_dispatch(meta)
        return self.combine(y_QD, meta)

    def dispatch(self, x_TD: torch.Tensor, routing: RoutingResult) -> tuple[torch.Tensor, DispatchMeta]:
        R, X = self.layout.num_ranks, self.layout.experts_per_rank
        _, physical_TK = self._physical(routing)  # physical id = rank * X + local slot
        # 1. Count the pairs per physical expert, and sort them by it: rows for rank 0 first, each rank's block by
        #    local slot. The sort is queued before the counts' host copy, so the GPU runs it during the sync.
        send_counts_RX = count_keys(physical_TK, routing.valid_TK, R * X).view(R, X)
        sorted_flat = sort_slots(physical_TK, routing.valid_TK, R * X)
        # 2. Tell every rank how many rows of each of its experts to expect.
        recv_counts_RX, send_host, recv_host = self._exchange_counts(send_counts_RX)
        send_splits, recv_splits = [sum(row) for row in send_host], [sum(row) for row in recv_host]
        sent = SlotOrder.first(sorted_flat, routing.valid_TK, sum(send_splits))
        # 3. Exchange the token copies (only valid pairs; the gather's backward sums each token's slots).
        x_QD = self._send(expand_rows(x_TD, sent), (send_splits, recv_splits), "dispatch")
        # 4. Received rows come grouped by source rank; the grouped GEMM wants them grouped by local expert (already
        #    so with one source rank or one expert per rank).
        regroup_Q = ungroup_Q = None
        if R > 1 and X > 1:
            slot_Q = torch.arange(X, device=x_QD.device).repeat(R)
            slot_Q = slot_Q.repeat_interleave(recv_counts_RX.flatten(), output_size=sum(recv_splits))  # no sync
            regroup_Q = torch.argsort(slot_Q, stable=True)
            ungroup_Q = inverse_permutation(regroup_Q)
            x_QD = permute_rows(x_QD, regroup_Q, ungroup_Q)
        meta = DispatchMeta(
            self.mode,
            self.rank,
            send_splits,
            recv_splits,
            tokens_per_local_expert_X=recv_counts_RX.sum(0),
            token_idx_C=sent.row_P,
            dest_rank_TK=physical_TK // X,
            valid_TK=routing.valid_TK,
            bytes_per_row=copy_bytes(x_TD),
            sent=sent,
            weights_TK=routing.weights_TK,
            regroup_Q=regroup_Q,
            ungroup_Q=ungroup_Q,
            ranks_per_node=self.ranks_per_node,
            local_counts_host=column_sums(recv_host, range(X)),
        )
        return x_QD, meta

    def combine(self, y_QD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        # 1. Back to source-rank order, 2. return the rows, 3. weighted sum of each token's K slots on its own rank.
        if meta.regroup_Q is not None:
            y_QD = permute_rows(y_QD, meta.ungroup_Q, meta.regroup_Q)
        y_CD = self._send(y_QD, (meta.recv_splits, meta.send_splits), "combine")
        return sum_slots(y_CD, meta.sent, meta.weights_TK)


class PerRankDispatcher(_Dispatcher):
    mode = "per-rank"

    def __call__(self, x_TD, routing: RoutingResult, backend, experts) -> torch.Tensor:
        experts = self.replica_grads(experts)
        received, meta = self.dispatch(x_TD, routing)
        y_QD = compute_copies(received, backend, experts)
        self.observer.on_dispatch(meta)
        return self.combine(y_QD, meta)

    def dispatch(self, x_TD: torch.Tensor, routing: RoutingResult) -> tuple[ReceivedCopies, DispatchMeta]:
        R, X = self.layout.num_ranks, self.layout.experts_per_rank
        T, K = routing.expert_ids_TK.shape
        rank_TK, physical_TK = self._physical(routing)
        hits_TR = ranks_hit(rank_TK, routing.valid_TK, R)
        # 1. Count, per destination rank, the pairs of each of its experts and the copies (one per token it hits);
        #    sort the (token, rank) copies by rank. One small exchange and one host copy carry every count.
        send_counts_RN = torch.cat(
            [count_keys(physical_TK, routing.valid_TK, R * X).view(R, X), hits_TR.sum(0, keepdim=True).t()], 1
        )
        sorted_flat = sort_slots(torch.arange(R, device=x_TD.device).expand(T, R), hits_TR, R)
        recv_counts_RN, send_host, recv_host = self._exchange_counts(send_counts_RN)
        send_splits, recv_splits = [row[X] for row in send_host], [row[X] for row in recv_host]
        sent = SlotOrder.first(sorted_flat, hits_TR, sum(send_splits))
        token_C, dest_C = sent.row_P, sent.flat_P % R
        # 2. Each copy carries its token's local slots on that rank (-1: another rank's expert, or an empty slot) and
        #    their weights, packed in one float32 tensor (slot ids are exact there) that travels beside the tokens.
        chosen_CK = (rank_TK[token_C] == dest_C.unsqueeze(1)) & routing.valid_TK[token_C]
        slot_CK = torch.where(chosen_CK, physical_TK[token_C] % X, -1)
        weight_CK = torch.where(chosen_CK, routing.weights_TK[token_C], 0.0)
        meta_CK2 = torch.cat([slot_CK.float(), weight_CK.float()], 1)
        # 3. Exchange copies and their metadata (the weights carry gradients back to the router).
        splits = (send_splits, recv_splits)
        x_QD = self._send(expand_rows(x_TD, sent), splits, "dispatch")
        meta_QK2 = self._send(meta_CK2, splits, "dispatch_meta")
        # 4. The received copies' valid slots, by local expert; their number came with the counts.
        slot_QK = meta_QK2[:, :K].long()
        valid_QK = slot_QK >= 0
        num_pairs = sum(sum(row[:X]) for row in recv_host)
        pairs = SlotOrder.first(sort_slots(slot_QK, valid_QK, X), valid_QK, num_pairs)
        received = ReceivedCopies(
            x_QD, meta_QK2[:, K:], pairs, recv_counts_RN[:, :X].sum(0), column_sums(recv_host, range(X))
        )
        meta = DispatchMeta(
            self.mode,
            self.rank,
            send_splits,
            recv_splits,
            tokens_per_local_expert_X=received.tokens_per_local_expert_X,
            token_idx_C=token_C,
            dest_rank_TK=rank_TK,
            valid_TK=routing.valid_TK,
            bytes_per_row=copy_bytes(x_TD, K),
            sent=sent,
            ranks_per_node=self.ranks_per_node,
        )
        return received, meta

    def combine(self, y_QD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        # One reply per copy, already weighted and summed over that rank's experts: the source adds up each token's
        # replies (at most R, gathered through the copy order).
        y_CD = self._send(y_QD, (meta.recv_splits, meta.send_splits), "combine")
        return sum_slots(y_CD, meta.sent)
