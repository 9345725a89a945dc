"""Replicated hot experts in the planner: which experts get a replica, and on which rank, for P physical slots.

What we chose, and why. The homes come from the plan without replicas (the co-activation-aware, load-capped
partition, E/R experts per rank); P - E replicas then fill exactly (P - E) / R extra slots on every rank:
0. where P >= 2E, every expert first gets a second copy: the experts of rank r all on the rank after r in a ring
   of ranks that alternates heavy and light ones. No expert is then single-copy, so rule 1 never fires and every
   pair splits evenly over its copies: each rank carries half of its own experts and half of its ring
   predecessor's, whose step-to-step drifts partly cancel, and a load-aware copy choice (c2r-train --copy-choice
   balanced) can move load around the ring in every batch. Why: filling P = 2E greedily piles the copies on the
   hot experts, and rule 1 pulls each copy's co-activated tokens onto its rank, so the held-out load ended further
   above the target the more slots there were; the ring held it (docs/placement.md, "Every expert twice"). Why one
   partner rank and not a rank's experts spread over several (1, 2, 4, ... ranks on, tried: fewer hops for the
   balanced choice): the homes gather co-activated experts, and with one partner a token that uses several of
   them still reaches at most two ranks; spread, it costs 2-5% more copies for the same balance (measured). The
   moves below may still give a light expert's partner slot to a third copy of a hot one: kept, because forbidding
   it raised the random-router OLMoE's held-out worst layer at 16 ranks from 1.037 to 1.062 under the balanced
   choice (the hot expert then has too few copies to spread over; measured 2026-12-02);
then one replica at a time, greedily:
1. the *target*: every rank's predicted load <= target x mean, loads predicted under the replica rule
   (`placement.replica_rule`, the rule the runtime dispatch applies);
2. while the busiest rank is above the target, the candidates are its heaviest experts (by load per copy): a
   replica of one of them is the only thing that takes load off that rank (homes do not move);
   once every rank is under the target, the candidates are the heaviest experts overall, and a replica is there to
   save token copies (rule 1: a replica on a rank the expert's co-activated experts live on serves those tokens at
   no extra copy) without breaking the target;
3. the candidate ranks for an expert are the ranks with a free slot that do not hold it: the few its tokens visit
   most (co-activation) and the few least loaded;
4. each (expert, rank) candidate is scored exactly: a copy of expert e changes the routing of the tokens that chose
   e and of no others, so the change in every rank's load and in the expected copies is computed on e's tokens only;
5. the pick: the lowest max(new busiest rank, target), and among those within 0.2% of mean load of it, the
   fewest added copies per token;
6. while the target is missed, one replica on the busiest rank is replaced by the greedy step's best pick
   (`refine`);
7. then, while it is still missed, slot moves over all P slots (`slot_step`), each keeping P/R slots per rank and
   at most one copy of an expert per rank: *swap* two slots on different ranks (homes included: a hot expert whose
   co-activated experts share its home keeps its load under rule 1 until its home moves), or *replace* a replica
   (of an expert with several copies) by a new copy of an expert on the busiest rank (what the greedy fill cannot
   do once the slots are full), or *reorder* an expert's copies: rule 1 sends a token to the first copy (home first)
   on a rank it visits, so moving the busiest rank's copy later in that order hands the tokens that also visit
   another copy's rank to that one (a sweep of small synthetic cases: never worse, and 1.025 instead of 1.042 for
   32 experts on 8 ranks). Candidates come from an estimate (each copy's own load,
   `placement.replica_rule.expected_expert_rank_load`); the best 24 swaps and replacements, and every reorder of the
   busiest rank's copies, are scored exactly on the experts' tokens; a move is made when it lowers the load above
   the target (summed over ranks).
Why greedy and not a joint optimisation: each step is exact and cheap (e's tokens only), P - E steps per layer fit
the DeepSeek-V3 scale budget (256 experts, 64 ranks, 64 replicas per layer), and the busiest rank is what an
expert-parallel step waits for, so lowering it one replica at a time is the direct route.
Steps 6-7 run only where the target is missed, so a layer the fill already balances costs nothing more. The moves
are local: the target is not always reached (docs/placement.md has the numbers).

Planning on a sample (``max_tokens``): the loads and copies are predicted on the planning sample.

Step views (as the load cap's, `placement.loadcap`): where the trace has several planning steps, the target holds on
each step's load too, the margin for the step-to-step drift of expert loads. A copy's load in step s is taken as its
pooled load times expert e's load in s over its pooled load (each expert's split between its copies as in the pooled
prediction); "busiest", the load above the target and the max are then each rank's worst view.

Shape legend: M distinct expert sets, K slots, E experts, R ranks, C most copies of one expert.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.sparse as sp

from placement.errors import PlacementError
from placement.inputs import LayerRouting, subsample
from placement.layout import ExpertLayout
from placement.loadcap import load_views
from placement.pool import map_layers
from placement.replica_rule import expected_expert_rank_load, expected_groups_hit, expected_rank_load, rule_one

_TIE = 0.002  # of mean rank load: loads this close count as equal, and copies decide
_EXPERT_CANDIDATES = 2
_EXHAUSTIVE = 256  # experts x ranks up to which every pair is scored
_RANK_CANDIDATES = 2  # of each kind (co-activated, least loaded)
_SWAP_CANDIDATES = 24  # slot swaps scored exactly per step, the best by the estimate


def parse_num_slots(text: str | int, num_experts: int, num_ranks: int) -> int:
    """``--replicas``: P physical slots, ``+N`` for E + N, or ``2E`` (any whole multiple of E: every expert twice
    is what the balanced copy choice levels best); P must be >= E, a multiple of the ranks, and at most E x R (one
    copy of each expert per rank). Errors name the values."""
    raw = str(text).strip()
    try:
        if raw.startswith("+"):
            num_slots = num_experts + int(raw[1:])
        elif raw[-1:] in ("E", "e"):
            num_slots = int(raw[:-1]) * num_experts
        else:
            num_slots = int(raw)
    except ValueError:
        raise PlacementError(
            f"--replicas takes P physical slots, +N extra slots or a multiple of the experts (2E); got {raw!r}"
        ) from None
    if num_slots < num_experts:
        raise PlacementError(f"--replicas {raw}: P ({num_slots}) must be >= experts ({num_experts})")
    if num_slots % num_ranks:
        raise PlacementError(f"--replicas {raw}: P ({num_slots}) must be a multiple of ranks ({num_ranks})")
    if num_slots > num_experts * num_ranks:
        raise PlacementError(
            f"--replicas {raw}: P ({num_slots}) must be <= experts x ranks ({num_experts} x {num_ranks}): at most "
            "one copy of an expert per rank"
        )
    return num_slots


class _Replicator:
    """One layer's greedy fill (module docstring): the copy table, free slots, predicted loads."""

    def __init__(
        self,
        routing: LayerRouting,
        layout: ExpertLayout,
        num_slots: int,
        target: float,
        step_scale_SE: np.ndarray | None = None,
    ):
        self.sets_MK, self.weight_M = routing.sets_MK, routing.weight_M.astype(np.float64)
        self.num_ranks, self.num_experts = layout.num_ranks, layout.num_experts
        self.table = np.full((self.num_experts, self.num_ranks), -1, dtype=np.int64)  # [E, R] copies, home first
        self.table[:, 0] = layout.expert_to_rank
        self.count_E = np.ones(self.num_experts, dtype=np.int64)
        extra = (num_slots - layout.num_slots) // self.num_ranks
        self.room_R = np.full(self.num_ranks, extra, dtype=np.int64)
        valid = self.sets_MK >= 0
        rows = np.broadcast_to(np.arange(len(self.sets_MK))[:, None], self.sets_MK.shape)[valid]
        by_expert = sp.csr_matrix(
            (np.ones(len(rows)), (self.sets_MK[valid], rows)), shape=(self.num_experts, len(self.sets_MK))
        )
        self.sets_of = np.split(by_expert.indices, by_expert.indptr[1:-1])  # per expert: the sets choosing it
        self.load_E = routing.expert_load_E
        self.scale_SE = np.zeros((0, self.num_experts)) if step_scale_SE is None else step_scale_SE
        self.load_R, _, self.step_SR = self._predict_sets(np.arange(len(self.sets_MK)), self._table())
        self.mean = float(self.load_R.sum()) / self.num_ranks
        self.limit = target * self.mean
        self.soft = (1 + (target - 1) / 2) * self.mean
        # small layers: every (expert, rank) pair is a candidate; large ones: the shortlist (module docstring)
        self.exhaustive = self.num_experts * self.num_ranks <= _EXHAUSTIVE
        if extra * self.num_ranks >= self.num_experts:  # P >= 2E: every expert twice first (module docstring)
            self.spread()

    def spread(self) -> None:
        """Step 0: every expert a second copy, rank r's experts all on the rank after r in a ring of ranks that
        alternates the heaviest and the lightest (by predicted load), so that every rank carries half of two ranks'
        experts (module docstring)."""
        by_load = np.argsort(-self.load_R, kind="stable")
        half = (self.num_ranks + 1) // 2
        order = np.empty(self.num_ranks, dtype=np.int64)
        order[0::2], order[1::2] = by_load[:half], by_load[half:][::-1]
        after = np.empty(self.num_ranks, dtype=np.int64)
        after[order] = np.roll(order, -1)
        self.table[:, 1] = after[self.table[:, 0]]
        self.count_E[:] = 2
        self.room_R -= np.bincount(self.table[:, 1], minlength=self.num_ranks)
        self.load_R, _, self.step_SR = self._predict_sets(np.arange(len(self.sets_MK)), self._table())

    def _table(self, extra: int = 0) -> np.ndarray:
        """The copy table cut to the most copies (+ ``extra`` columns for a trial copy)."""
        return self.table[:, : min(self.num_ranks, int(self.count_E.max()) + extra)]

    def _predict(self, e: int, table: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        """(every rank's load, summed copies, every rank's load in each step view) of expert e's tokens under
        ``table``: only they change route when e's copies change (module docstring, step 4)."""
        return self._predict_sets(self.sets_of[e], table)

    def _worst(self, load_R: np.ndarray | None = None, step_SR: np.ndarray | None = None) -> np.ndarray:
        """[R] each rank's load in its worst view (pooled, or a planning step's: module docstring, step views)."""
        load_R = self.load_R if load_R is None else load_R
        step_SR = self.step_SR if step_SR is None else step_SR
        return np.maximum(load_R, step_SR.max(axis=0)) if len(step_SR) else load_R

    def _candidate_ranks(self, e: int) -> list[int]:
        open_R = self.room_R > 0
        open_R[self.table[e, : self.count_E[e]]] = False
        if not open_R.any() or self.exhaustive:
            return [int(r) for r in np.flatnonzero(open_R)]
        sub = self.sets_of[e]
        visited_MR, *_ = rule_one(self.sets_MK[sub], self._table(), self.num_ranks)
        together_R = self.weight_M[sub] @ visited_MR  # e's tokens that visit each rank anyway
        open_ranks = np.flatnonzero(open_R)
        by_together = open_ranks[np.argsort(-together_R[open_ranks], kind="stable")][:_RANK_CANDIDATES]
        by_load = open_ranks[np.argsort(self.load_R[open_ranks], kind="stable")][:_RANK_CANDIDATES]
        by_room = open_ranks[np.argsort(-self.room_R[open_ranks], kind="stable")][:1]
        return sorted({int(r) for r in (*by_together, *by_load, *by_room)})

    def _candidate_experts(self) -> list[int]:
        per_copy = self.load_E / self.count_E
        worst_R = self._worst()
        busiest = int(np.argmax(worst_R))
        can_grow = self.count_E < self.num_ranks
        if worst_R[busiest] > self.limit:
            pool = np.flatnonzero(can_grow & (self.table == busiest).any(axis=1))
        else:
            pool = np.flatnonzero(can_grow)
        if self.exhaustive:
            return [int(e) for e in np.flatnonzero(can_grow)]
        heavy = pool[np.argsort(-per_copy[pool], kind="stable")][:_EXPERT_CANDIDATES]
        # the slots of the rank with the most room must be filled too: the lightest experts it lacks fill them at
        # the least load (without them, the last replicas land on one rank and pull load onto it)
        lacking = np.flatnonzero(~(self.table == int(np.argmax(self.room_R))).any(axis=1))
        light = lacking[np.argsort(per_copy[lacking], kind="stable")][:_EXPERT_CANDIDATES]
        return list(dict.fromkeys(int(e) for e in (*heavy, *light)))

    def _score(self, experts: list[int]) -> list[tuple]:
        # a replica that saves copies may raise the busiest rank only halfway to the limit: the last replicas must
        # still fit somewhere, and each one pulls load onto its rank (rule 1)
        top = float(self._worst().max())
        floor = self.limit if top > self.limit else max(top, self.soft)
        scored = []
        for e in experts:
            ranks = self._candidate_ranks(e)
            if not ranks:
                continue
            old_load, old_hits, old_steps = self._predict(e, self._table())
            for q in ranks:
                self.table[e, self.count_E[e]] = q  # the trial copy, taken back below
                load, hits, steps = self._predict(e, self._table(extra=1))
                self.table[e, self.count_E[e]] = -1
                d_load, d_steps = load - old_load, steps - old_steps
                worst_R = self._worst(self.load_R + d_load, self.step_SR + d_steps)
                excess = self._excess(self.load_R + d_load, self.step_SR + d_steps)
                scored.append((max(float(worst_R.max()), floor), excess, hits - old_hits, e, q, d_load, d_steps))
        return scored

    def _excess(self, load_R: np.ndarray | None = None, step_SR: np.ndarray | None = None) -> float:
        """Load above the limit, summed over ranks (0 when every rank is under it), each rank in its worst view
        (default: the current state): unlike the max alone, it also rewards a replica that relieves the
        second-busiest rank, the step a later replica builds on."""
        return float(np.maximum(self._worst(load_R, step_SR) - self.limit, 0.0).sum())

    def step(self) -> None:
        """Add the best replica (module docstring, step 5)."""
        scored = self._score(self._candidate_experts())
        if not scored:  # no candidate fits a free slot: any expert the ranks with room lack
            scored = self._score([int(e) for e in np.flatnonzero(self.count_E < self.num_ranks)])
        best_max = min(s[0] for s in scored)
        near = [s for s in scored if s[0] <= best_max + _TIE * self.mean]
        _, _, _, e, q, d_load, d_steps = min(near, key=lambda s: (s[1], s[2]))
        self.table[e, self.count_E[e]] = q
        self.count_E[e] += 1
        self.room_R[q] -= 1
        self.load_R += d_load
        self.step_SR += d_steps

    def _remove(self, e: int, q: int) -> None:
        """Take the replica of e off rank q (never the home: c > 0), keeping the other copies' order."""
        before, _, before_steps = self._predict(e, self._table())
        n = int(self.count_E[e])
        copies = [r for r in self.table[e, :n] if r != q]
        self.table[e, :n] = [*copies, -1]
        self.count_E[e] -= 1
        self.room_R[q] += 1
        after, _, after_steps = self._predict(e, self._table())
        self.load_R += after - before
        self.step_SR += after_steps - before_steps

    def _state(self) -> tuple:
        return self.table.copy(), self.count_E.copy(), self.room_R.copy(), self.load_R.copy(), self.step_SR.copy()

    def _restore(self, state: tuple) -> None:
        self.table, self.count_E, self.room_R, self.load_R, self.step_SR = (x.copy() for x in state)

    def refine(self, max_rounds: int) -> None:
        """While the limit is missed: replace one replica on the busiest rank by the best replica the greedy
        step then picks (anywhere), where that lowers the excess load (module docstring, step 6)."""
        for _ in range(max_rounds):
            excess = self._excess()
            if excess <= 0:
                return
            busiest = int(np.argmax(self._worst()))
            holders = np.flatnonzero((self.table[:, 1:] == busiest).any(axis=1))
            start, best = self._state(), None
            for e in holders:
                self._remove(int(e), busiest)
                self.step()
                if self._excess() < excess - 1e-9 and (best is None or self._excess(best[3], best[4]) > self._excess()):
                    best = self._state()
                self._restore(start)
            if best is None:
                return
            self._restore(best)

    def _predict_sets(self, sub: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        """`_predict` for the sets ``sub`` (the tokens of the two experts a swap moves). The step views: each
        expert's load on each rank, scaled by that expert's load in each planning step (module docstring)."""
        sets, weight = self.sets_MK[sub], self.weight_M[sub]
        route = rule_one(sets, table, self.num_ranks)
        hits = float(expected_groups_hit(sets, table, self.num_ranks, route=route) @ weight)
        if not len(self.scale_SE):
            return expected_rank_load(sets, weight, table, self.num_ranks, route), hits, np.zeros((0, self.num_ranks))
        share_ER = expected_expert_rank_load(sets, weight, table, self.num_ranks, route)
        return share_ER.sum(axis=0), hits, self.scale_SE @ share_ER

    def _slot_moves(self) -> list[tuple[str, int, int, int, int]]:
        """Moves that take load off the busiest rank p and keep every rank's slot count: of the swaps and the
        replacements the best `_SWAP_CANDIDATES` of each kind by an estimate from each copy's own load
        (`expected_expert_rank_load`; the exact score, `slot_step`, also counts the tokens whose rule-1 choice
        changes), and every reorder of p's copies:
        ("swap", e, p, f, q): e's copy on p and f's copy on q trade ranks (homes included), where e has no copy on q
        and f none on p;
        ("replace", e, p, g, q): a copy of g (one of several) on q gives its slot to a new copy of e (e on p, not
        on q): the move the greedy fill cannot make once the slots are full;
        ("order", e, p, e, j): e's copy on p moves to position j (> its own) of e's copy order."""
        table = self._table()
        share_ER = expected_expert_rank_load(self.sets_MK, self.weight_M, table, self.num_ranks)
        holds_ER = np.zeros((self.num_experts, self.num_ranks), dtype=bool)
        on = table >= 0
        holds_ER[np.broadcast_to(np.arange(self.num_experts)[:, None], table.shape)[on], table[on]] = True
        p = int(np.argmax(self._worst()))
        e_A = np.flatnonzero(holds_ER[:, p])
        moves = []
        # swaps: e leaves p for q, f arrives on p from q
        f_B, q_B = np.nonzero(holds_ER & ~holds_ER[:, [p]])
        leave_AB, arrive_AB = share_ER[e_A, p][:, None], share_ER[f_B, q_B][None, :]
        est = np.maximum(self.load_R[p] - leave_AB + arrive_AB, self.load_R[q_B][None, :] - arrive_AB + leave_AB)
        moves += self._best_moves("swap", est, ~holds_ER[e_A][:, q_B], e_A, p, f_B, q_B)
        # replacements: a new copy of e on q takes about 1 / (copies + 1) of e's load, off p among others
        g_B, q_B = np.nonzero(holds_ER & (self.count_E > 1)[:, None])
        keep = q_B != p
        g_B, q_B = g_B[keep], q_B[keep]
        per_copy_A = (share_ER[e_A].sum(axis=1) / (self.count_E[e_A] + 1))[:, None]
        new_p = self.load_R[p] - np.minimum(per_copy_A, share_ER[e_A, p][:, None])
        est = np.maximum(new_p, self.load_R[q_B][None, :] - share_ER[g_B, q_B][None, :] + per_copy_A)
        ok = ~holds_ER[e_A][:, q_B] & (e_A[:, None] != g_B[None, :]) & (self.count_E[e_A] < self.num_ranks)[:, None]
        moves += self._best_moves("replace", est, ok, e_A, p, g_B, q_B)
        # reorders: e's copy on p later in e's copy order, so that rule 1 sends fewer of e's tokens there (a token
        # that visits p and an earlier-placed copy's rank then goes to that one); scored exactly, at most one per
        # (expert, position) of the few experts that hold p
        for e in e_A[self.count_E[e_A] > 1]:
            n = int(self.count_E[e])
            at = int(np.flatnonzero(table[e, :n] == p)[0])
            moves += [("order", int(e), p, int(e), j) for j in range(at + 1, n)]
        return moves

    def _best_moves(self, kind, est_AB, ok_AB, e_A, p, f_B, q_B) -> list[tuple[str, int, int, int, int]]:
        ok = ok_AB & (est_AB < self.load_R[p] - 1e-9 * self.mean)
        flat = np.flatnonzero(ok.ravel())
        flat = flat[np.argsort(est_AB.ravel()[flat], kind="stable")[:_SWAP_CANDIDATES]]
        a, b = np.divmod(flat, len(f_B))
        return [(kind, int(e_A[i]), p, int(f_B[j]), int(q_B[j])) for i, j in zip(a, b)]

    def _make(self, kind: str, e: int, p: int, f: int, q: int) -> tuple:
        """Make a `_slot_moves` move; returns what `_undo` needs."""
        saved = (e, f, self.table[e].copy(), self.table[f].copy(), int(self.count_E[e]), int(self.count_E[f]))
        if kind == "order":  # e's copy on p moves to position q of e's copy order (f is e)
            n = int(self.count_E[e])
            row = [r for r in self.table[e, :n] if r != p]
            row.insert(q, p)
            self.table[e, :n] = row
        elif kind == "swap":  # each copy keeps its place in its expert's copy order
            self.table[e, : self.count_E[e]][self.table[e, : self.count_E[e]] == p] = q
            self.table[f, : self.count_E[f]][self.table[f, : self.count_E[f]] == q] = p
        else:  # f's copy on q goes (the next copy becomes home if it was the home); e's new copy comes last
            n = int(self.count_E[f])
            self.table[f, :n] = [*(r for r in self.table[f, :n] if r != q), -1]
            self.count_E[f] -= 1
            self.table[e, self.count_E[e]] = q
            self.count_E[e] += 1
        return saved

    def _undo(self, saved: tuple) -> None:
        e, f, row_e, row_f, count_e, count_f = saved
        self.table[e], self.table[f] = row_e, row_f
        self.count_E[e], self.count_E[f] = count_e, count_f

    def slot_step(self) -> bool:
        """The best `_slot_moves` move, scored exactly on the two experts' tokens, by the load above the limit,
        then the max load, then the added copies; made (True) where it lowers the load above the limit."""
        excess, best = self._excess(), None
        for move in self._slot_moves():
            _, e, _, f, _ = move
            sub = np.union1d(self.sets_of[e], self.sets_of[f])
            old_load, old_hits, old_steps = self._predict_sets(sub, self._table())
            saved = self._make(*move)
            load, hits, steps = self._predict_sets(sub, self._table())
            self._undo(saved)
            new_R, new_SR = self.load_R + load - old_load, self.step_SR + steps - old_steps
            key = (self._excess(new_R, new_SR), float(self._worst(new_R, new_SR).max()), hits - old_hits)
            if key[0] < excess - 1e-9 * self.mean and (best is None or key < best[0]):
                best = (key, move, load - old_load, steps - old_steps)
        if best is None:
            return False
        self._make(*best[1])
        self.load_R += best[2]
        self.step_SR += best[3]
        return True

    def layout(self, base: ExpertLayout) -> ExpertLayout:
        """The copy table as a layout (homes may have moved: the table's first column)."""
        rows = self.table.tolist()
        return ExpertLayout(
            [row[0] for row in rows], base.num_ranks, [tuple(row[1:n]) for row, n in zip(rows, self.count_E)]
        )


def replicate_layer(
    routing: LayerRouting,
    layout: ExpertLayout,
    num_slots: int,
    target: float,
    step_load_SE: np.ndarray | None = None,
    load_E: np.ndarray | None = None,
) -> ExpertLayout:
    """``layout`` (no replicas) with P - E replicas added (module docstring); loads and copies predicted on
    ``routing``; ``step_load_SE``: each planning step's expert load (the step views; ``load_E``: the pooled expert
    load of those steps, default the routing's)."""
    layout.require_unreplicated("adding replicas to a plan")
    if routing.pairwise:
        raise PlacementError("--replicas needs per-token routing (--traces): co-activation counts cannot predict it")
    parse_num_slots(num_slots, layout.num_experts, layout.num_ranks)  # the CLI's checks, for callers of this function
    if num_slots == layout.num_experts:
        return layout
    state = _Replicator(routing, layout, num_slots, target, _step_scale(routing, step_load_SE, load_E))
    while state.room_R.sum():
        state.step()
    state.refine(max_rounds=num_slots - layout.num_experts)
    for _ in range(num_slots):  # a bound; each swap lowers the load above the limit
        if state._excess() <= 0 or not state.slot_step():
            break
    return state.layout(layout)


def _step_scale(routing: LayerRouting, step_load_SE: np.ndarray | None, load_E: np.ndarray | None) -> np.ndarray | None:
    """[S, E]: each step's load of expert e over its pooled load (steps scaled to the pooled total, as
    `placement.loadcap.load_views`), 0 for an expert with no load: a copy's load in step s is its pooled load times
    this (its split between copies taken as the pooled one)."""
    if step_load_SE is None:
        return None
    pooled = np.asarray(routing.expert_load_E if load_E is None else load_E, dtype=np.float64)
    views = load_views(pooled, step_load_SE)[1:]
    return np.divide(views, pooled, out=np.zeros_like(views), where=pooled > 0)


def replicate_layouts(
    routings: list[LayerRouting],
    layouts: list[ExpertLayout],
    num_slots: int,
    target: float,
    max_tokens: int | None = None,
    seed: int = 0,
    progress: bool = False,
    jobs: int = 1,
    per_step: bool = True,
) -> list[ExpertLayout]:
    """`replicate_layer` on every layer, each on a seeded sample of at most ``max_tokens`` planning tokens;
    ``jobs``: layers in parallel (`placement.pool`; the same layouts as one process); ``per_step``: the target
    holds on each planning step's load too, where the trace has several (module docstring, step views)."""
    task = functools.partial(
        _replicate_sample, num_slots=num_slots, target=target, max_tokens=max_tokens, seed=seed, per_step=per_step
    )
    args = list(zip(routings, layouts))
    return map_layers(task, args, jobs, progress, f"replicas ({num_slots} slots)")


def _replicate_sample(
    routing: LayerRouting,
    layout: ExpertLayout,
    *,
    num_slots: int,
    target: float,
    max_tokens: int | None,
    seed: int,
    per_step: bool = True,
) -> ExpertLayout:
    """One layer of `replicate_layouts` (a module-level function: a worker process runs it)."""
    steps = routing.step_load_SE if per_step else None
    sample = subsample(routing, max_tokens, seed)
    return replicate_layer(sample, layout, num_slots, target, steps, routing.expert_load_E)
