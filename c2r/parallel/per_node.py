"""``per-node`` dispatch: per-rank dispatch across nodes, each token crossing the network once per destination node.

With the EP group's R ranks grouped into N nodes of W ranks (``nodes.py``; EP rank r is local index r % W of node
r // W), a token on rank (n, w) goes
1. over the network, once per node m holding any of its experts, to rank (m, w), the same local index there (the
   ``inter`` group; m = n is a local copy), carrying its slots' node-local expert ids and weights;
2. within node m, once per rank holding any of its experts there, from (m, w) to that rank (the ``intra`` group),
   carrying that rank's local expert slots and weights: per-rank dispatch, with the node's ranks as the EP group.
The destination computes each copy's experts and sums their weighted outputs (one reply per copy); the forwarding
rank (m, w) sums the replies of each token before it crosses back, and the source sums one reply per node. Rows over
the network per token = its distinct destination nodes (HierMoE's and DeepEP's internode route).

Every count both stages need travels in one small all-to-all over the whole EP group before stage 1, so a forward
has one host sync, the same as the other modes (the source knows the whole route: where each token goes on every
node, and what the forwarding ranks will send on). Exchanges per forward: that count exchange, then two per stage
(tokens, and their slots + weights packed in one float32 tensor); the combine has one per stage.

Shape letters: the package legend (c2r/__init__.py), and here N nodes of W ranks; a 1 or 2 suffix on C and Q names
the stage (C1 rows this rank sends over the network, Q1 it receives and forwards, C2 it forwards within its node,
Q2 it receives to compute).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from c2r.experts.slot_rows import SlotOrder, count_keys, expand_rows, sort_slots, sum_slots
from c2r.parallel.all_to_all import all_to_all
from c2r.parallel.dispatch import (
    NO_OBSERVER,
    DispatchMeta,
    DispatchObserver,
    ReceivedCopies,
    _Dispatcher,
    column_sums,
    compute_copies,
    copy_bytes,
    ranks_hit,
)
from c2r.parallel.nodes import NodeGroups, make_node_groups
from c2r.routing import RoutingResult
from placement.layout import ExpertLayout


@dataclass(frozen=True)
class NodeRoute:
    """What the combine needs to send the replies back the way the copies came: each stage's splits (rows per rank
    of that stage's group) and which rows of the stage before each sent row copies."""

    send1: list[int]  # stage 1 (inter group, by node): rows sent, received
    recv1: list[int]
    sent1: SlotOrder  # (token, node) pairs by node
    send2: list[int]  # stage 2 (intra group, by local index)
    recv2: list[int]
    sent2: SlotOrder  # (received stage-1 copy, local rank) pairs by local rank


def _slots_for(dest_C, key_ZK, valid_ZK, row_C, id_ZK, weight_ZK, id_offset_C, id_divisor):
    """[C, 2K] float32: for each copy going to ``dest_C``, its row's slots whose key is that destination, as
    ``(id - offset) % divisor`` (-1 for other destinations' slots and empty ones), then their weights (0 there)."""
    chosen_CK = (key_ZK[row_C] == dest_C.unsqueeze(1)) & valid_ZK[row_C]
    id_CK = torch.where(chosen_CK, (id_ZK[row_C] - id_offset_C.unsqueeze(1)) % id_divisor, -1)
    weight_CK = torch.where(chosen_CK, weight_ZK[row_C], 0.0)
    return torch.cat([id_CK.float(), weight_CK.float()], 1)  # ids are exact in float32 below 2**24


class PerNodeDispatcher(_Dispatcher):
    mode = "per-node"

    def __init__(
        self,
        layout: ExpertLayout,
        group=None,
        observer: DispatchObserver = NO_OBSERVER,
        ranks_per_node: int | None = None,
        node_groups: NodeGroups | None = None,
        copy_choice: str = "rule",
    ):
        super().__init__(layout, group, observer, ranks_per_node or layout.num_ranks, copy_choice)
        self.nodes = node_groups or make_node_groups(self.ranks_per_node, group)
        if self.nodes.ranks_per_node != self.ranks_per_node:
            raise ValueError(
                f"the node groups have {self.nodes.ranks_per_node} ranks per node, not {self.ranks_per_node}"
            )
        self.node, self.local = divmod(self.rank, self.ranks_per_node)

    def __call__(self, x_TD, routing: RoutingResult, backend, experts) -> torch.Tensor:
        experts = self.replica_grads(experts)
        received, route, meta = self.dispatch(x_TD, routing)
        y_Q2D = compute_copies(received, backend, experts)
        self.observer.on_dispatch(meta)
        return self.combine(y_Q2D, route)

    def _count_route(self, physical_TK, valid_TK, hits_TR, hits_TN) -> torch.Tensor:
        """[R, 2 + W + X]: what this rank's tokens bring to each EP rank d = (m, v), one row per d:
        col 0: stage-1 copies d receives from this rank (only d with this rank's local index: the forwarder on m);
        cols 1..W: for that forwarder, the stage-2 copies it will send to each local rank of m;
        col W + 1: stage-2 copies that reach d (from this rank's tokens, via the forwarder on m);
        cols W + 2..: (token, expert) pairs d computes, per local expert."""
        R, X, W = self.layout.num_ranks, self.layout.experts_per_rank, self.ranks_per_node
        copies_R = hits_TR.sum(0)
        forwarder_R = torch.arange(R, device=hits_TR.device) % W == self.local
        stage1_R = torch.where(forwarder_R, hits_TN.sum(0).repeat_interleave(W), 0)
        fan_RW = torch.where(forwarder_R.unsqueeze(1), copies_R.view(-1, W).repeat_interleave(W, 0), 0)
        pairs_RX = count_keys(physical_TK, valid_TK, R * X).view(R, X)
        return torch.cat([stage1_R.unsqueeze(1), fan_RW, copies_R.unsqueeze(1), pairs_RX], 1)

    def dispatch(self, x_TD: torch.Tensor, routing: RoutingResult) -> tuple[ReceivedCopies, NodeRoute, DispatchMeta]:
        R, X, W, N = self.layout.num_ranks, self.layout.experts_per_rank, self.ranks_per_node, self.nodes.num_nodes
        T, K = routing.expert_ids_TK.shape
        device = x_TD.device
        rank_TK, physical_TK = self._physical(routing)
        hits_TR = ranks_hit(rank_TK, routing.valid_TK, R)
        hits_TN = hits_TR.view(T, N, W).any(2)
        # 1. Every count of both stages in one exchange over the EP group (the forward's one host sync); the stage-1
        #    (token, node) copies sorted by node meanwhile.
        sorted1 = sort_slots(torch.arange(N, device=device).expand(T, N), hits_TN, N)
        recv_counts_RN, send_host, recv_host = self._exchange_counts(
            self._count_route(physical_TK, routing.valid_TK, hits_TR, hits_TN)
        )
        from_forwarders = [recv_host[n * W + self.local] for n in range(N)]  # rows from (n, my local index)
        send1 = [send_host[m * W + self.local][0] for m in range(N)]
        recv1 = [row[0] for row in from_forwarders]
        send2 = [sum(row[1 + v] for row in from_forwarders) for v in range(W)]
        recv2 = [sum(recv_host[n * W + w][W + 1] for n in range(N)) for w in range(W)]
        num_pairs = sum(sum(row[W + 2 :]) for row in recv_host)
        # 2. Stage 1, over the network: one copy per (token, destination node) to the same local index there, with
        #    the token's slots on that node as node-local physical ids (local rank * X + local slot).
        sent1 = SlotOrder.first(sorted1, hits_TN, sum(send1))
        token_C1, node_C1 = sent1.row_P, sent1.flat_P % N
        node_TK = rank_TK // W
        meta_C1K2 = _slots_for(
            node_C1, node_TK, routing.valid_TK, token_C1, physical_TK, routing.weights_TK, node_C1 * W * X, W * X
        )
        inter = self.nodes.inter
        x_Q1D = all_to_all(expand_rows(x_TD, sent1), recv1, send1, inter, self.observer, "dispatch_inter")
        meta_Q1K2 = all_to_all(meta_C1K2, recv1, send1, inter, self.observer, "dispatch_inter_meta")
        # 3. Stage 2, within the node: the forwarder sends each received copy once to each local rank it needs.
        id_Q1K = meta_Q1K2[:, :K].long()
        valid_Q1K = id_Q1K >= 0
        local_Q1K = torch.where(valid_Q1K, id_Q1K // X, 0)
        hits_Q1W = ranks_hit(local_Q1K, valid_Q1K, W)
        sorted2 = sort_slots(torch.arange(W, device=device).expand(len(id_Q1K), W), hits_Q1W, W)
        sent2 = SlotOrder.first(sorted2, hits_Q1W, sum(send2))
        copy_C2, dest_C2 = sent2.row_P, sent2.flat_P % W
        meta_C2K2 = _slots_for(
            dest_C2, local_Q1K, valid_Q1K, copy_C2, id_Q1K, meta_Q1K2[:, K:], torch.zeros_like(dest_C2), X
        )
        intra = self.nodes.intra
        x_Q2D = all_to_all(expand_rows(x_Q1D, sent2), recv2, send2, intra, self.observer, "dispatch_intra")
        meta_Q2K2 = all_to_all(meta_C2K2, recv2, send2, intra, self.observer, "dispatch_intra_meta")
        # 4. The received copies' valid slots, by local expert; their number came with the counts.
        slot_Q2K = meta_Q2K2[:, :K].long()
        valid_Q2K = slot_Q2K >= 0
        pairs = SlotOrder.first(sort_slots(slot_Q2K, valid_Q2K, X), valid_Q2K, num_pairs)
        host_X = column_sums(recv_host, range(W + 2, W + 2 + X))
        received = ReceivedCopies(x_Q2D, meta_Q2K2[:, K:], pairs, recv_counts_RN[:, W + 2 :].sum(0), host_X)
        route = NodeRoute(send1, recv1, sent1, send2, recv2, sent2)
        return received, route, self._meta(route, x_TD, routing, rank_TK, received, token_C1)

    def _meta(self, route: NodeRoute, x_TD, routing, rank_TK, received, token_C1) -> DispatchMeta:
        """Both stages' rows as one row count per EP rank (stage 1 goes to the ranks with this local index, stage 2
        to this node's ranks; a rank's rows to itself are local copies), for the profiler's rank x rank view."""
        R, W = self.layout.num_ranks, self.ranks_per_node
        send_R, recv_R = [0] * R, [0] * R
        for node, (sent, got) in enumerate(zip(route.send1, route.recv1)):
            send_R[node * W + self.local] += sent
            recv_R[node * W + self.local] += got
        for local, (sent, got) in enumerate(zip(route.send2, route.recv2)):
            send_R[self.node * W + local] += sent
            recv_R[self.node * W + local] += got
        return DispatchMeta(
            self.mode,
            self.rank,
            send_R,
            recv_R,
            tokens_per_local_expert_X=received.tokens_per_local_expert_X,
            token_idx_C=token_C1,
            dest_rank_TK=rank_TK,
            valid_TK=routing.valid_TK,
            bytes_per_row=copy_bytes(x_TD, routing.expert_ids_TK.shape[1]),  # its slots travel with it, both stages
            ranks_per_node=W,
        )

    def combine(self, y_Q2D: torch.Tensor, route: NodeRoute) -> torch.Tensor:
        # 1. Replies back to the forwarders, which sum each token's replies from their node before the network hop;
        # 2. back over the network, and the source sums one reply per destination node.
        y_C2D = all_to_all(y_Q2D, route.send2, route.recv2, self.nodes.intra, self.observer, "combine_intra")
        y_Q1D = sum_slots(y_C2D, route.sent2)
        y_C1D = all_to_all(y_Q1D, route.send1, route.recv1, self.nodes.inter, self.observer, "combine_inter")
        return sum_slots(y_C1D, route.sent1)
