"""Overlapped expert-parallel dispatch: the local tokens in chunks, so that exchanges run while experts compute.

``overlap_chunks`` > 1 (``build_dispatcher``, ``train.overlap_chunks``) splits a layer's T local tokens into that
many contiguous chunks (the first T mod chunks one token longer, as ``torch.tensor_split``) and runs them as a
pipeline, in the ``per-expert`` and ``per-rank`` modes (docs/design.md, "Overlap"):

    launch dispatch 0
    for chunk c: launch dispatch c+1 | land dispatch c, compute c's experts, launch combine c | land combine c-1

Forward: while chunk c's experts compute, chunk c+1's token copies (and, per-rank, their slots + weights) are in
flight to their ranks and chunk c-1's replies are on their way back. The exchanges are asynchronous collectives
(``all_to_all_single(..., async_op=True)``: gloo runs them on its own threads; NCCL on its own stream, which waits
for the compute stream only at launch), so the compute of chunk c does not wait for them.

Backward: each exchange is two autograd nodes, ``_Launch`` (made when the exchange starts) and ``_Land`` (when its
result is first needed). ``_Land``'s backward launches the reverse exchange of the gradient and returns at once;
``_Launch``'s backward waits for it. Autograd runs ready nodes latest-made first (one ready queue per device, ordered
by sequence number), so the backward replays the forward's interleaving in reverse: the reverse combine of chunk c-1
is launched before chunk c's expert backward runs, and chunk c+1's reverse dispatch is in flight during it. So in
backward too, each chunk's expert gradients (the two grouped GEMMs' backward, the larger half of the work) overlap
the gradient exchanges of its neighbours; what does not overlap is the first reverse combine and the last reverse
dispatch, as in the forward. Every rank builds the same graph (the same code path whatever its row counts), so every
rank starts the collectives in the same order, forward and backward.

Unchanged from the plain modes: the result (the same rows computed, summed in the same per-token order, up to float
reordering inside a grouped GEMM), the copy rule for replicated experts (decided once over all T tokens, so every
slot goes to the same copy as without chunks), and one host sync per forward: every chunk's counts travel in the one
small count exchange ((R, chunks, columns) instead of (R, columns)) and reach the host in one copy; a backend that
wants its group sizes on the host (MegaBlocks' grouped_gemm) gets each chunk's from there (``host_counts``), so it
adds no sync.

The observer still sees one :class:`~c2r.parallel.dispatch.DispatchMeta` per forward (all chunks together: the same
splits and counts as without chunks; ``token_idx_C`` chunk after chunk). Its timer times the exposed part of each
exchange only, the wait when a result is needed (on a GPU: how long the compute stream stalls for it), under the
plain modes' names; an exchange that finished behind compute costs ~0 there.

Shape letters: the package legend (c2r/__init__.py). The chunk dimension and the count columns of one destination
rank (X expert counts, per-rank one more: the copies) get no letter (the legend's C and N are rows sent and nodes):
their tensors carry shape comments instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
from c2r.parallel.dispatch import (
    DispatchMeta,
    PerExpertDispatcher,
    PerRankDispatcher,
    ReceivedCopies,
    column_sums,
    compute_copies,
    copy_bytes,
    ranks_hit,
)
from c2r.routing import RoutingResult


def chunk_bounds(num_tokens: int, num_chunks: int) -> list[int]:
    """num_chunks + 1 token offsets: chunk c is ``[bounds[c], bounds[c + 1])``; the first T mod num_chunks chunks are
    one longer. A chunk may be empty (more chunks than tokens): it still takes part in every exchange, with zero
    rows."""
    base, extra = divmod(num_tokens, num_chunks)
    bounds = [0]
    for c in range(num_chunks):
        bounds.append(bounds[-1] + base + (c < extra))
    return bounds


class InFlight:
    """One variable-size all-to-all: launched without waiting, landed when its result is needed; the same for its
    gradient in backward (the routes reversed)."""

    def __init__(self, output_splits: list[int], input_splits: list[int], group, timer, name: str):
        self.splits, self.group, self.timer, self.name = (output_splits, input_splits), group, timer, name
        self.work = self.grad_work = self.grad_in = self._sending = None

    def _start(self, x: torch.Tensor, output_splits: list[int], input_splits: list[int]):
        out, x = x.new_empty((sum(output_splits), *x.shape[1:])), x.contiguous()
        self._sending = x  # alive until the exchange lands (a contiguous copy has no other owner)
        work = dist.all_to_all_single(out, x, output_splits, input_splits, group=self.group, async_op=True)
        return out, work

    def _wait(self, work, name: str) -> None:
        # Only the wait is timed: the part of the exchange that compute did not hide.
        handle = self.timer.start(name)
        work.wait()
        self.timer.stop(handle)

    def launch(self, x: torch.Tensor) -> torch.Tensor:
        out, self.work = self._start(x, *self.splits)
        return out

    def land(self) -> None:
        self._wait(self.work, self.name)
        self.work = self._sending = None

    def launch_backward(self, grad_out: torch.Tensor) -> None:
        output_splits, input_splits = self.splits
        self.grad_in, self.grad_work = self._start(grad_out, input_splits, output_splits)

    def land_backward(self) -> torch.Tensor:
        self._wait(self.grad_work, self.name + "_backward")
        grad_in, self.grad_in, self.grad_work, self._sending = self.grad_in, None, None, None
        return grad_in


class _Launch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, flight: InFlight):
        ctx.flight = flight
        return flight.launch(x)  # not yet filled: only _Land's output may be read

    @staticmethod
    def backward(ctx, _grad_ignored: torch.Tensor):
        # _Land's backward already launched the reverse exchange; by now other chunks' work has run beside it.
        return ctx.flight.land_backward(), None


class _Land(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: torch.Tensor, flight: InFlight):
        ctx.flight = flight
        flight.land()
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.flight.launch_backward(grad)
        # A stand-in gradient for _Launch's output (it returns the landed one instead), so that _Launch runs.
        return grad, None


def launch(x: torch.Tensor, output_splits, input_splits, group, timer, name: str) -> tuple[torch.Tensor, InFlight]:
    """Start ``all_to_all(x)`` (routes as in ``all_to_all.all_to_all``); pass both to :func:`land` for its result."""
    flight = InFlight(output_splits, input_splits, group, timer, name)
    return _Launch.apply(x, flight), flight


def land(started: tuple[torch.Tensor, InFlight]) -> torch.Tensor:
    return _Land.apply(*started)


def run_pipeline(
    num_chunks: int,
    send: Callable[[int], object],
    compute: Callable[[int, object], object],
    finish: Callable[[int, object], torch.Tensor],
) -> list[torch.Tensor]:
    """The schedule of the module docstring. ``send(c)`` launches chunk c's dispatch; ``compute(c, sent)`` lands it,
    runs the experts and launches the combine; ``finish(c, replies)`` lands the combine: chunk c's output."""
    in_flight = {0: send(0)}
    replies, outs = {}, []
    for c in range(num_chunks):
        if c + 1 < num_chunks:
            in_flight[c + 1] = send(c + 1)  # 1. the next chunk's tokens travel while ...
        replies[c] = compute(c, in_flight.pop(c))  # 2. ... this chunk's experts compute, and ...
        if c > 0:
            outs.append(finish(c - 1, replies.pop(c - 1)))  # 3. ... the previous chunk's replies come back
    outs.append(finish(num_chunks - 1, replies.pop(num_chunks - 1)))
    return outs


@dataclass(frozen=True)
class ChunkRoute:
    """One chunk's exchanges: its tokens ``[begin, end)``, rows sent to / received from each rank, the sent rows'
    order (as ``DispatchMeta.sent``), and the host counts of what it receives per (source rank, column)."""

    begin: int
    end: int
    send_splits: list[int]
    recv_splits: list[int]
    sent: SlotOrder
    recv_counts: torch.Tensor  # (R, columns) on the device: what it receives from each rank
    host_counts: list[int]  # pairs it receives per local expert slot, summed over ranks, on the host


class _Overlapped:
    """What both chunked modes share: the chunks, the one count exchange, the pipeline and the merged metadata."""

    def __init__(self, *args, overlap_chunks: int, **kwargs):
        super().__init__(*args, **kwargs)
        if overlap_chunks < 1:
            raise ValueError(f"overlap_chunks ({overlap_chunks}) must be >= 1")
        self.overlap_chunks = overlap_chunks

    def _chunk_counts(self, counts_of: Callable[[int, int], torch.Tensor], bounds: list[int]):
        """(recv_counts, send_host, recv_host), each (R, chunks, columns), on the device and as host lists:
        ``counts_of(begin, end)`` is one chunk's (R, columns) send counts; all chunks' travel in one exchange and
        reach the host in one copy."""
        send_counts = torch.stack([counts_of(a, b) for a, b in zip(bounds, bounds[1:])], 1)  # (R, chunks, columns)
        return self._exchange_counts(send_counts)  # NOTE: the forward's one host sync

    def _meta(self, x_TD, routing, routes: list[ChunkRoute], dest_rank_TK, tokens_per_local_expert_X) -> DispatchMeta:
        """All chunks as one dispatch: the same splits and counts as the plain mode's."""
        return DispatchMeta(
            self.mode,
            self.rank,
            [sum(s) for s in zip(*(r.send_splits for r in routes))],
            [sum(s) for s in zip(*(r.recv_splits for r in routes))],
            tokens_per_local_expert_X=tokens_per_local_expert_X,
            token_idx_C=torch.cat([r.sent.row_P + r.begin for r in routes]),
            dest_rank_TK=dest_rank_TK,
            valid_TK=routing.valid_TK,
            # per-rank copies carry their slots and weights (PerRankDispatcher's bytes_per_row)
            bytes_per_row=copy_bytes(x_TD, routing.expert_ids_TK.shape[1] if self.mode == "per-rank" else 0),
            ranks_per_node=self.ranks_per_node,
        )

    def _launch(self, x, splits_out, splits_in, name):
        return launch(x, splits_out, splits_in, self.group, self.observer, name)


class OverlappedPerExpertDispatcher(_Overlapped, PerExpertDispatcher):
    """``per-expert`` dispatch in ``overlap_chunks`` chunks (module docstring)."""

    def __call__(self, x_TD, routing: RoutingResult, backend, experts) -> torch.Tensor:
        experts = self.replica_grads(experts)
        R, X = self.layout.num_ranks, self.layout.experts_per_rank
        _, physical_TK = self._physical(routing)  # over all T tokens: the same copies as without chunks
        valid_TK = routing.valid_TK

        # 1. Per chunk: the pairs per physical expert, and their order (queued before the one host sync).
        def counts_of(a, b):
            return count_keys(physical_TK[a:b], valid_TK[a:b], R * X).view(R, X)

        bounds = chunk_bounds(routing.num_tokens, self.overlap_chunks)
        spans = list(zip(bounds, bounds[1:]))
        sorted_flat = [sort_slots(physical_TK[a:b], valid_TK[a:b], R * X) for a, b in spans]
        recv_counts, send_host, recv_host = self._chunk_counts(counts_of, bounds)  # (R, chunks, X)
        routes = []
        for c, (a, b) in enumerate(spans):
            send, recv = [sum(row[c]) for row in send_host], [sum(row[c]) for row in recv_host]
            sent = SlotOrder.first(sorted_flat[c], valid_TK[a:b], sum(send))
            host = column_sums([row[c] for row in recv_host], range(X))
            routes.append(ChunkRoute(a, b, send, recv, sent, recv_counts[:, c], host))
        self.observer.on_dispatch(self._meta(x_TD, routing, routes, physical_TK // X, recv_counts.sum((0, 1))))

        # 2. The pipeline: tokens out, experts, replies back, chunk by chunk. Chunks are split off, not sliced: the
        #    backward then joins their gradients in one cat instead of adding a zero-filled [T, D] per chunk.
        sizes = [b - a for a, b in spans]
        x_chunks, weight_chunks = x_TD.split(sizes), routing.weights_TK.split(sizes)

        def send(c):
            route = routes[c]
            return self._launch(expand_rows(x_chunks[c], route.sent), route.recv_splits, route.send_splits, "dispatch")

        def compute(c, started):
            route = routes[c]
            x_QD = land(started)
            regroup_Q = None
            if R > 1 and X > 1:  # by source rank -> by local expert, as in PerExpertDispatcher.dispatch
                slot_Q = torch.arange(X, device=x_QD.device).repeat(R)
                slot_Q = slot_Q.repeat_interleave(route.recv_counts.flatten(), output_size=sum(route.recv_splits))
                regroup_Q = torch.argsort(slot_Q, stable=True)
                ungroup_Q = inverse_permutation(regroup_Q)
                x_QD = permute_rows(x_QD, regroup_Q, ungroup_Q)
            y_QD = backend.grouped_mlp(x_QD, route.recv_counts.sum(0), experts, route.host_counts)
            if regroup_Q is not None:
                y_QD = permute_rows(y_QD, ungroup_Q, regroup_Q)
            return self._launch(y_QD, route.send_splits, route.recv_splits, "combine")

        def finish(c, started):
            return sum_slots(land(started), routes[c].sent, weight_chunks[c])

        return torch.cat(run_pipeline(len(routes), send, compute, finish))


class OverlappedPerRankDispatcher(_Overlapped, PerRankDispatcher):
    """``per-rank`` dispatch in ``overlap_chunks`` chunks (module docstring)."""

    def __call__(self, x_TD, routing: RoutingResult, backend, experts) -> torch.Tensor:
        experts = self.replica_grads(experts)
        R, X = self.layout.num_ranks, self.layout.experts_per_rank
        K = routing.expert_ids_TK.shape[1]
        rank_TK, physical_TK = self._physical(routing)  # over all T tokens: the same copies as without chunks
        valid_TK = routing.valid_TK
        hits_TR = ranks_hit(rank_TK, valid_TK, R)

        # 1. Per chunk and destination rank: the pairs of each of its experts, and the copies (one per token hitting
        #    it); all chunks' counts in one exchange and one host copy.
        def counts_of(a, b):
            pairs_RX = count_keys(physical_TK[a:b], valid_TK[a:b], R * X).view(R, X)
            return torch.cat([pairs_RX, hits_TR[a:b].sum(0, keepdim=True).t()], 1)

        bounds = chunk_bounds(routing.num_tokens, self.overlap_chunks)
        spans = list(zip(bounds, bounds[1:]))
        ranks_R = torch.arange(R, device=x_TD.device)
        sorted_flat = [sort_slots(ranks_R.expand(b - a, R), hits_TR[a:b], R) for a, b in spans]
        recv_counts, send_host, recv_host = self._chunk_counts(counts_of, bounds)  # (R, chunks, X + 1)
        routes, num_pairs = [], []
        for c, (a, b) in enumerate(spans):
            send = [row[c][X] for row in send_host]
            sent = SlotOrder.first(sorted_flat[c], hits_TR[a:b], sum(send))
            host = column_sums([row[c] for row in recv_host], range(X))
            routes.append(ChunkRoute(a, b, send, [row[c][X] for row in recv_host], sent, recv_counts[:, c], host))
            num_pairs.append(sum(sum(row[c][:X]) for row in recv_host))
        self.observer.on_dispatch(self._meta(x_TD, routing, routes, rank_TK, recv_counts[:, :, :X].sum((0, 1))))

        # 2. The pipeline. Each copy carries its token's slots on the destination and their weights (one float32
        #    tensor beside the tokens, as in PerRankDispatcher.dispatch).
        x_chunks = x_TD.split([b - a for a, b in spans])  # split, not sliced: see the per-expert dispatcher

        def send(c):
            route = routes[c]
            token_C, dest_C = route.sent.row_P + route.begin, route.sent.flat_P % R
            chosen_CK = (rank_TK[token_C] == dest_C.unsqueeze(1)) & valid_TK[token_C]
            slot_CK = torch.where(chosen_CK, physical_TK[token_C] % X, -1)
            weight_CK = torch.where(chosen_CK, routing.weights_TK[token_C], 0.0)
            meta_CK2 = torch.cat([slot_CK.float(), weight_CK.float()], 1)
            splits = (route.recv_splits, route.send_splits)
            x_CD = expand_rows(x_chunks[c], route.sent)
            return self._launch(x_CD, *splits, "dispatch"), self._launch(meta_CK2, *splits, "dispatch_meta")

        def compute(c, started):
            route = routes[c]
            x_QD, meta_QK2 = land(started[0]), land(started[1])
            slot_QK = meta_QK2[:, :K].long()
            valid_QK = slot_QK >= 0
            pairs = SlotOrder.first(sort_slots(slot_QK, valid_QK, X), valid_QK, num_pairs[c])
            received = ReceivedCopies(x_QD, meta_QK2[:, K:], pairs, route.recv_counts[:, :X].sum(0), route.host_counts)
            y_QD = compute_copies(received, backend, experts)
            return self._launch(y_QD, route.send_splits, route.recv_splits, "combine")

        def finish(c, started):
            sent = routes[c].sent
            y_CD = land(started)
            return sum_slots(y_CD, sent)

        return torch.cat(run_pipeline(len(routes), send, compute, finish))
