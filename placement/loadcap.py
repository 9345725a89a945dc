"""A load cap on a balanced placement: every rank's token load (token-expert pairs) <= cap x mean, still exactly
E/R experts per rank, at the smallest KM1 (copies per token) we can find.

What we chose, and why. Two parts. (a) Where the placement is one rank level (one node, or one GPU per node) and
the method is Mt-KaHyPar, the partition itself carries the cap: `placement.methods.partition_kahypar_capped` gives
each expert the weight "big constant + load", so one part-weight bound holds both exact E/R slots and the load cap.
Mt-KaHyPar balances only one weight per node, and this folds both constraints into it. Where it finds no feasible
partition (a hot expert, or two levels of nodes and GPUs, whose levels do not see rank load), the unit-weight
partition is the start. (b) Either way, a refinement that only ever *swaps* two experts between ranks -- slot counts
stay exact by construction -- enforces the cap and then lowers the cost under it:

1. repair: while the busiest rank is above the limit, swap one of its experts with a lighter expert elsewhere,
   among the swaps that bring both ranks under the limit the one that adds the least cost; where none does, the
   swap that lowers the max load most (so an infeasible layer ends at a max load no single swap can lower).
   Every swap lowers the busiest rank and leaves the other below the old max, so the loop ends.
2. descent: best-improvement swaps on the cost that keep every rank under the limit (or, where the limit was not
   met, under the max load the repair reached), until none helps or ``max_rounds``.

The cap on unseen tokens (``step_load_SE``, `c2r-place plan --per-step-cap`, the default). Expert loads drift from
step to step, so a plan that meets the cap exactly on the pooled planning load lands above it on later steps about
half the time. The margin is measured on the planning tokens themselves: each recorded planning step is one sample
of what an unseen step looks like, so the cap is held on the steps' loads (at most `STEP_VIEWS` of them, evenly
spaced; scaled to the pooled total: one limit for every *view*) as well as on the pooled load. Repair first meets
the pooled cap alone, then every view without raising the pooled load above what it reached; where the steps cannot
all meet the cap (a noisy trace, small steps), it ends at the lowest worst-step load its swaps find, and the pooled
cap still holds. A step is what every rank waits on in training, so this is also the load that sets the step time.
Never tuned on held-out tokens.

Cost = rank KM1 + (c - 1) x node KM1 (c = the inter-node cost with several nodes; 1, i.e. rank KM1 alone,
otherwise): the Steiner-tree objective of `placement.methods`, so a repair prefers swaps inside a node.

Exact swap gains for all E^2 pairs at once, from the part counts cnt[m, p] (how many experts of set m part p
holds), the set-expert incidence I[m, e] and the set weights w[m] (tokens). Moving expert a from part p to q
changes KM1 by  move[a, q] = sum_{m ni a} w_m ([cnt[m, q] = 0] - [cnt[m, p] = 1]);  a swap of a (on p) with b (on
q) by  move[a, q] + move[b, p] + both[a, b],  both[a, b] = sum_{m ni a, b} w_m ([cnt[m, p] = 1] + [cnt[m, q] = 1])
(a set holding both keeps its parts; the move terms counted it twice). The move terms for all pairs are two sparse
products; ``both`` >= 0, so they bound every swap's gain from below, and a branch and bound adds ``both`` (a sorted
intersection) only for the few swaps whose bound beats the best exact gain found so far.

A layer whose heaviest expert, with the lightest others that share its rank, is above the limit cannot meet it
without replication (`needs_replication`); the cap is not always reachable below that bound either (swaps are local).

Shape legend: M distinct expert sets, E experts, P parts (ranks or nodes), R ranks, S planning steps, V load views
(the pooled load and each step's).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from placement.inputs import LayerRouting
from placement.objective import km1_batch

DEFAULT_MAX_LOAD = 1.10  # c2r-place plan's and simulate's default cap on rank load max/mean


def max_load_arg(text: str) -> float | None:
    """--max-load: a cap >= 1.0 on rank load max/mean, or none."""
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 1.0 or 'none'; got {text!r}") from None
    if not value >= 1.0:
        raise argparse.ArgumentTypeError(f"the cap is max/mean rank load, so it must be >= 1.0; got {value}")
    return value


_EPS = 1e-9


def load_limit(load_E: np.ndarray, num_ranks: int, cap: float) -> float:
    """cap x mean rank load."""
    return cap * float(np.sum(load_E)) / num_ranks


def min_max_load(load_E: np.ndarray, num_ranks: int) -> float:
    """A lower bound on max/mean rank load without replication: the rank holding the heaviest expert also holds
    E/R - 1 others, at least the lightest ones."""
    load = np.sort(np.asarray(load_E, dtype=np.float64))
    mean = float(load.sum()) / num_ranks
    if not mean:
        return 1.0
    per_rank = len(load) // num_ranks
    return max(1.0, float(load[-1] + load[: per_rank - 1].sum()) / mean)


def needs_replication(load_E: np.ndarray, num_ranks: int, cap: float) -> bool:
    """No placement without replicas meets the cap (`min_max_load` is above it): the heaviest expert is too hot."""
    return min_max_load(load_E, num_ranks) > cap * (1 + _EPS)


@dataclass
class CapResult:
    """``labels`` [E]: the capped placement; ``max_load``: its max/mean rank load (on the load it was given);
    ``met``: at or under the cap; ``swaps``: repair + descent swaps made; ``cost``: the cost the swaps lowered
    (rank KM1 + (c - 1) node KM1) of ``labels`` on the routing it was measured on."""

    labels: np.ndarray
    max_load: float
    met: bool
    needs_replication: bool
    swaps: int
    cost: float


class _PartCounts:
    """cnt[m, p] for one labelling, kept current under swaps, and the KM1 swap gains from it."""

    def __init__(self, incidence_ME: sp.csr_matrix, weight_M: np.ndarray, labels_E: np.ndarray, num_parts: int):
        self.incidence = incidence_ME
        self.sets_of = incidence_ME.T.tocsr()  # row e: the sets holding expert e
        self.weight_M = weight_M
        self.cnt_MP = np.asarray(incidence_ME @ np.eye(num_parts, dtype=np.float64)[labels_E])
        w = weight_M[:, None]
        self.empty_EP = self.sets_of @ (w * (self.cnt_MP == 0))  # sum_{m ni a} w [cnt[m, q] = 0]
        self.alone_EP = self.sets_of @ (w * (self.cnt_MP == 1))  # sum_{m ni a} w [cnt[m, q] = 1]

    def move_gains(self, labels_E: np.ndarray) -> np.ndarray:
        """[E, E]: move[a, label b] + move[b, label a], the swap gain without the sets holding both a and b (those
        only add: ``both`` >= 0, so this is a lower bound on the swap gain)."""
        move_EP = self.empty_EP - self.alone_EP[np.arange(len(labels_E)), labels_E][:, None]
        return move_EP[:, labels_E] + move_EP[:, labels_E].T

    def both(self, a: int, b: int, p: int, q: int) -> float:
        """sum over sets holding a and b of w ([cnt[m, p] = 1] + [cnt[m, q] = 1])."""
        sets_of = self.sets_of
        m = np.intersect1d(
            sets_of.indices[sets_of.indptr[a] : sets_of.indptr[a + 1]],
            sets_of.indices[sets_of.indptr[b] : sets_of.indptr[b + 1]],
            assume_unique=True,
        )
        alone = (self.cnt_MP[m, p] == 1).astype(np.float64) + (self.cnt_MP[m, q] == 1)
        return float(self.weight_M[m] @ alone)

    def swap(self, a: int, b: int, p: int, q: int) -> None:
        """Expert a moves p -> q and b moves q -> p: only the sets holding a or b change, in columns p and q, so
        the sums over them are patched there (not recomputed: that would cost a full sparse product per swap)."""
        sets_of = self.sets_of
        m = np.union1d(
            sets_of.indices[sets_of.indptr[a] : sets_of.indptr[a + 1]],
            sets_of.indices[sets_of.indptr[b] : sets_of.indptr[b + 1]],
        )
        cols = [p, q]
        old = self.cnt_MP[np.ix_(m, cols)]
        sub = self.incidence[m]  # [m, E]
        arrive_m = sub[:, b].toarray().ravel() - sub[:, a].toarray().ravel()  # on p: b arrives, a leaves
        new = old + arrive_m[:, None] * np.array([1.0, -1.0])
        self.cnt_MP[np.ix_(m, cols)] = new
        w = self.weight_M[m][:, None]
        sub_T = sub.T.tocsr()
        self.empty_EP[:, cols] += sub_T @ (w * ((new == 0).astype(np.float64) - (old == 0)))
        self.alone_EP[:, cols] += sub_T @ (w * ((new == 1).astype(np.float64) - (old == 1)))


class _Cost:
    """Rank KM1 + (c - 1) x node KM1 swap gains for one layer."""

    def __init__(self, routing: LayerRouting, labels_E: np.ndarray, num_ranks: int, gpus_per_node: int, c: int):
        keep = routing.set_size_M >= 2
        sets = routing.sets_MK[keep]
        valid = sets >= 0
        rows = np.broadcast_to(np.arange(len(sets))[:, None], sets.shape)[valid]
        incidence = sp.csr_matrix(
            (np.ones(len(rows)), (rows, sets[valid])), shape=(len(sets), routing.num_experts), dtype=np.float64
        )
        weight = routing.weight_M[keep].astype(np.float64)
        self.gpus_per_node, self.node_weight = gpus_per_node, c - 1
        self.ranks = _PartCounts(incidence, weight, labels_E, num_ranks)
        self.nodes = None
        if self.node_weight and 1 < num_ranks // gpus_per_node < num_ranks:
            self.nodes = _PartCounts(incidence, weight, labels_E // gpus_per_node, num_ranks // gpus_per_node)

    def lower_gains(self, labels_E: np.ndarray) -> np.ndarray:
        """[E, E] lower bounds on the swap gains (`_PartCounts.move_gains`)."""
        out = self.ranks.move_gains(labels_E)
        if self.nodes is not None:
            node_E = labels_E // self.gpus_per_node
            out += self.node_weight * np.where(node_E[:, None] != node_E[None, :], self.nodes.move_gains(node_E), 0.0)
        return out

    def exact_gain(self, labels_E: np.ndarray, lower_EE: np.ndarray, a: int, b: int) -> float:
        p, q = int(labels_E[a]), int(labels_E[b])
        out = lower_EE[a, b] + self.ranks.both(a, b, p, q)
        g = self.gpus_per_node
        if self.nodes is not None and p // g != q // g:
            out += self.node_weight * self.nodes.both(a, b, p // g, q // g)
        return float(out)

    def best(self, labels_E: np.ndarray, allowed_EE: np.ndarray, below: float = np.inf) -> tuple[int, int] | None:
        """The allowed swap of least exact gain (< ``below``): branch and bound over the lower bounds, so only the
        few candidates whose bound beats the best exact gain so far are evaluated exactly."""
        lower = self.lower_gains(labels_E)
        score = np.where(allowed_EE, lower, np.inf).ravel()
        head = min(64, len(score))
        order = np.argpartition(score, head - 1)[:head]  # usually enough; the full sort only when it is not
        order = order[np.argsort(score[order], kind="stable")]
        best, best_gain = None, below
        for _ in range(2):  # the head first, then (rarely) everything
            for flat in order:
                if score[flat] >= best_gain:
                    return best
                a, b = divmod(int(flat), len(labels_E))
                gain = self.exact_gain(labels_E, lower, a, b)
                if gain < best_gain:
                    best, best_gain = (a, b), gain
            order = np.argsort(score, kind="stable")
        return best

    def swap(self, labels_E: np.ndarray, a: int, b: int) -> None:
        p, q = int(labels_E[a]), int(labels_E[b])
        self.ranks.swap(a, b, p, q)
        if self.nodes is not None and p // self.gpus_per_node != q // self.gpus_per_node:
            self.nodes.swap(a, b, p // self.gpus_per_node, q // self.gpus_per_node)
        labels_E[a], labels_E[b] = q, p


def _repair_step(
    cost: _Cost, labels, load_VE, rank_load_VR, limit, pooled_bound: float = np.inf
) -> tuple[int, int] | None:
    """The swap that lowers the busiest rank (module docstring, step 1), or None when no swap lowers it. With several
    load views (view 0 the pooled load, then each planning step's, `cap_load`), "busiest" is the rank at the highest
    load in any view, a swap must bring that rank, in every view, below it, and the pooled view must stay at or under
    ``pooled_bound``."""
    _, p = np.unravel_index(int(np.argmax(rank_load_VR)), rank_load_VR.shape)
    top = float(rank_load_VR.max())
    on_p = np.flatnonzero(labels == p)
    moved = load_VE[:, on_p, None] - load_VE[:, None, :]  # [V, a on p, b]: load leaving p for b's rank
    new_p = (rank_load_VR[:, p, None, None] - moved).max(axis=0)
    new_q = (rank_load_VR[:, labels][:, None, :] + moved).max(axis=0)
    valid = (labels[None, :] != p) & (new_p < top - _EPS) & (new_q < top - _EPS)
    if pooled_bound < np.inf:
        valid &= rank_load_VR[0, p] - moved[0] <= pooled_bound + _EPS
        valid &= rank_load_VR[0, labels][None, :] + moved[0] <= pooled_bound + _EPS
    if not valid.any():
        return None
    full = np.zeros((len(labels), len(labels)), dtype=bool)
    under = valid & (new_q <= limit)
    if under.any():
        full[on_p] = under
        return cost.best(labels, full)
    worst = np.where(valid, np.maximum(new_q, new_p), np.inf)
    full[on_p] = worst <= worst.min() + _EPS
    return cost.best(labels, full)  # the largest relief; the cheapest among equals


def _descent_step(cost: _Cost, labels, load_VE, rank_load_VR, bound_V) -> tuple[int, int] | None:
    """The best improving swap that keeps both ranks under ``bound_V[v]`` in every load view v (module docstring,
    step 2)."""
    ok = labels[:, None] != labels[None, :]
    here = rank_load_VR[:, labels]  # [V, E]: the load of each expert's rank
    for v in range(len(load_VE)):  # one view at a time: [E, E] temporaries, not [V, E, E]
        moved = load_VE[v][:, None] - load_VE[v][None, :]  # leaves a's rank, arrives on b's
        ok &= here[v][:, None] - moved <= bound_V[v] + _EPS
        ok &= here[v][None, :] + moved <= bound_V[v] + _EPS
    return cost.best(labels, ok, below=-1e-6)


# At most this many planning steps are held to the cap (evenly spaced). The worst of S steps lies further out as S
# grows: with all 32 steps of a 40-batch trace the 1.10 plans of the trained OLMoE landed at 1.05-1.07 held out for
# +8% / +17% copies (8 / 16 ranks), with 8 of them at 1.09-1.12 for +5.8% / +10.3% (docs/placement.md). Eight keeps
# the margin about the worst step in nine, whatever the trace's length, and bounds the planner's work.
STEP_VIEWS = 8


def load_views(load_E: np.ndarray, step_load_SE: np.ndarray | None) -> np.ndarray:
    """[V, E]: the pooled load, then the load of each planning step (at most `STEP_VIEWS`, evenly spaced) scaled to
    the pooled total (a step is one sample of what an unseen step looks like; scaled, one limit holds for every
    view). Steps with no load are left out."""
    views = [np.asarray(load_E, dtype=np.float64)]
    total = float(views[0].sum())
    steps = np.asarray(step_load_SE if step_load_SE is not None else np.zeros((0, len(load_E))), np.float64)
    steps = steps[steps.sum(axis=1) > 0]
    if len(steps) > STEP_VIEWS:
        steps = steps[np.linspace(0, len(steps) - 1, STEP_VIEWS).round().astype(int)]
    views += [row * (total / row.sum()) for row in steps]
    return np.stack(views)


def cap_load(
    routing: LayerRouting,
    labels_E: np.ndarray,
    num_ranks: int,
    cap: float,
    load_E: np.ndarray | None = None,
    gpus_per_node: int | None = None,
    inter_node_cost: int = 1,
    max_rounds: int | None = None,
    step_load_SE: np.ndarray | None = None,
) -> CapResult:
    """Swap experts until every rank's load is <= cap x mean (module docstring). ``routing``: the sets the cost is
    measured on (a planning sample); ``load_E``: the expert load the cap applies to (default the routing's: pass the
    load of every planning token when ``routing`` is a sample); ``gpus_per_node`` / ``inter_node_cost``: the
    node term of the cost (default none); ``max_rounds``: descent swaps at most (default E); ``step_load_SE``: the
    expert load of each planning step: the cap must then hold on every step too (`load_views`), the margin for the
    step-to-step drift of expert loads, measured on the planning tokens themselves. ``max_load`` in the result is the
    worst view's."""
    labels = np.asarray(labels_E, dtype=np.int64).copy()
    load_E = np.asarray(routing.expert_load_E if load_E is None else load_E, dtype=np.float64)
    load_VE = load_views(load_E, step_load_SE)
    limit = load_limit(load_E, num_ranks, cap)
    mean = float(load_E.sum()) / num_ranks
    rank_load = np.stack([np.bincount(labels, weights=row, minlength=num_ranks) for row in load_VE])  # [V, R]
    cost = _Cost(routing, labels, num_ranks, gpus_per_node or num_ranks, inter_node_cost)
    swaps = 0
    # repair the pooled load (view 0) alone, then every view without raising the pooled load above what that reached
    # (where the steps cannot all meet the cap, the pooled cap still holds)
    pooled_bound = np.inf
    for views in sorted({1, len(load_VE)}):
        for _ in range(4 * len(labels) * max(1, len(labels) // num_ranks)):  # a bound; the loop ends on its own
            if rank_load[:views].max() <= limit * (1 + _EPS):
                break
            step = _repair_step(cost, labels, load_VE[:views], rank_load[:views], limit, pooled_bound)
            if step is None:
                break
            swaps += _apply(cost, labels, load_VE, rank_load, *step)
        pooled_bound = max(limit, float(rank_load[0].max()))
    bound_V = np.full(len(load_VE), max(limit, float(rank_load[1:].max(initial=0.0))))  # steps: the max reached
    bound_V[0] = pooled_bound
    for _ in range(len(labels) if max_rounds is None else max_rounds):
        step = _descent_step(cost, labels, load_VE, rank_load, bound_V)
        if step is None:
            break
        swaps += _apply(cost, labels, load_VE, rank_load, *step)
    max_load = float(rank_load.max()) / mean if mean else 1.0
    met = bool(rank_load.max() <= limit * (1 + _EPS))
    G = gpus_per_node or num_ranks
    total = km1_batch(routing, labels[None])[0] + (inter_node_cost - 1) * km1_batch(routing, labels[None] // G)[0]
    return CapResult(labels, max_load, met, needs_replication(load_E, num_ranks, cap), swaps, float(total))


def _apply(cost: _Cost, labels: np.ndarray, load_VE: np.ndarray, rank_load_VR: np.ndarray, a: int, b: int) -> int:
    p, q = int(labels[a]), int(labels[b])
    rank_load_VR[:, p] += load_VE[:, b] - load_VE[:, a]
    rank_load_VR[:, q] += load_VE[:, a] - load_VE[:, b]
    cost.swap(labels, a, b)
    return 1
