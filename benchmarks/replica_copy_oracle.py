"""How far a run-time, load-aware copy choice takes a replicated plan: per held-out step, the rank loads under the
dispatchers' copy choices (`rule`, `balanced`) against the best any per-step choice of copies could do (a linear
program).

For each trace, ranks and P: the homes are `c2r-place plan --max-load 1.02`, the replicas `--replicas P` (as
benchmarks/placement_load.py plans them, on the first 80% of steps). Then, for every held-out step (the whole step
as one batch):
- rule: the copy each slot takes under the dispatchers' rule (`placement.copy_choice`, numpy twin of
  `c2r.parallel.replicas.CopyChooser`): rule 1 (a copy on a rank the token visits), else the round robin; the step's
  tokens split over the ranks as data parallelism splits a batch, each rank choosing for its own;
- balanced: ``copy_choice="balanced"`` the same way (every rank with the step's counts, as its all-reduce gives);
- oracle: copies chosen knowing the step's loads. A linear program over how many of each replicated expert's pairs
  go to each of its copies: first the lowest busiest-rank load, then, under it, the most pairs on ranks their tokens
  visit anyway (fewer token copies; the program counts a token once per copy rank it visits, so this second stage
  is an estimate); tokens are then assigned to those counts, visiting tokens first. Single-copy
  experts cannot move. It is a bound for any per-step rule (a real one must decide on the device, fast), not a rule.
Prints a markdown table: copies per token and rank load max/mean pooled over the held-out steps, and the worst step.

    python benchmarks/replica_copy_oracle.py TRACE_DIR --ranks 16 --slots 96 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import linprog

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from placement.inputs import holdout_cutoff, load_trace_input  # noqa: E402
from placement.layout import ExpertLayout  # noqa: E402
from placement.methods import plan_placement  # noqa: E402
from placement.pool import usable_cpus  # noqa: E402
from placement.replica_rule import copy_ranks  # noqa: E402
from placement.replicate import replicate_layouts  # noqa: E402
from placement.simulate import slot_ranks, source_ranks  # noqa: E402
from profiling.reader import read_traces  # noqa: E402

PLAN_CAP = 1.02  # benchmarks/placement_load.py's REPLICA_PLAN_CAP
MAX_TOKENS = 20000


def distinct_ranks(ids_AK: np.ndarray, dest_AK: np.ndarray) -> np.ndarray:
    """[A] distinct destination ranks of each token (its copies)."""
    d = np.sort(np.where(ids_AK >= 0, dest_AK, -1), axis=1)
    return ((d[:, 1:] != d[:, :-1]) & (d[:, 1:] >= 0)).sum(axis=1) + (d[:, 0] >= 0)


def oracle_copy_ranks(ids_AK: np.ndarray, layout: ExpertLayout) -> np.ndarray:
    """[A, K] the rank of each slot under the best per-step copy choice (module docstring)."""
    R = layout.num_ranks
    ranks_EC = copy_ranks(layout)
    copies_E = (ranks_EC >= 0).sum(axis=1)
    valid = ids_AK >= 0
    expert = np.maximum(ids_AK, 0)
    single = valid & (copies_E[expert] == 1)
    fixed_R = np.bincount(ranks_EC[expert[single], 0], minlength=R).astype(np.float64)
    visited_AR = np.zeros((len(ids_AK), R), dtype=bool)
    visited_AR[np.nonzero(single)[0], ranks_EC[expert[single], 0]] = True
    replicated = [e for e in range(layout.num_experts) if copies_E[e] > 1]
    cells = [(e, c) for e in replicated for c in range(copies_E[e])]  # one variable per copy
    dest = np.where(single, ranks_EC[expert, 0], -1)
    if not cells:
        return dest
    pairs = {e: np.nonzero(ids_AK == e) for e in replicated}
    visiting = np.array([visited_AR[pairs[e][0], ranks_EC[e, c]].sum() for e, c in cells], dtype=np.float64)
    n = len(cells)
    on_rank = np.zeros((R, n))
    of_expert = np.zeros((len(replicated), n))
    for i, (e, c) in enumerate(cells):
        on_rank[ranks_EC[e, c], i] = 1
        of_expert[replicated.index(e), i] = 1
    demand = np.array([len(pairs[e][0]) for e in replicated], dtype=np.float64)
    # 1. the lowest busiest rank: min lam, fixed + on_rank x <= lam
    a_ub = np.hstack([on_rank, -np.ones((R, 1))])
    a_eq = np.hstack([of_expert, np.zeros((len(replicated), 1))])
    cost = np.zeros(n + 1)
    cost[-1] = 1
    first = linprog(cost, A_ub=a_ub, b_ub=-fixed_R, A_eq=a_eq, b_eq=demand, method="highs")
    level = first.x[-1] * (1 + 1e-9) + 1e-6
    # 2. under it, the most pairs on visited ranks: max sum y, y <= x, y <= visiting
    a_ub = np.vstack([np.hstack([on_rank, np.zeros((R, n))]), np.hstack([-np.eye(n), np.eye(n)])])
    b_ub = np.concatenate([level - fixed_R, np.zeros(n)])
    bounds = [(0, None)] * n + [(0, v) for v in visiting]
    second = linprog(
        np.concatenate([np.zeros(n), -np.ones(n)]),
        A_ub=a_ub, b_ub=b_ub, A_eq=np.hstack([of_expert, np.zeros_like(of_expert)]), b_eq=demand,
        bounds=bounds, method="highs",
    )  # fmt: skip
    share = second.x[:n]
    for e in replicated:
        mine = [i for i, (f, _) in enumerate(cells) if f == e]
        quota = np.floor(share[mine] + 1e-9).astype(np.int64)
        while quota.sum() < len(pairs[e][0]):  # whole pairs: the largest remainders round up
            quota[np.argmax(share[mine] - quota)] += 1
        rows, slots = pairs[e]
        open_ = np.ones(len(rows), dtype=bool)
        for c in range(len(mine)):  # tokens that visit the copy's rank first
            take = np.flatnonzero(open_ & visited_AR[rows, ranks_EC[e, c]])[: quota[c]]
            dest[rows[take], slots[take]] = ranks_EC[e, c]
            open_[take] = False
            quota[c] -= len(take)
        rest = np.flatnonzero(open_)
        bounds_c = np.concatenate([[0], np.cumsum(quota)])
        for c in range(len(mine)):
            take = rest[bounds_c[c] : bounds_c[c + 1]]
            dest[rows[take], slots[take]] = ranks_EC[e, c]
    return dest


def judge(trace_dir: Path, ranks: int, slots: list[int]) -> list[dict]:
    inp = load_trace_input(trace_dir, holdout=0.2, progress=False)
    homes = plan_placement(inp.plan_routings, ranks, max_tokens=MAX_TOKENS, progress=False, max_load=PLAN_CAP)
    traces = read_traces(Path(inp.info["path"]), progress=False)
    steps = [traces.steps[layer] for layer in range(traces.num_layers)]
    cutoff = holdout_cutoff(steps, 0.2)
    rows = []
    for num_slots in slots:
        layouts = replicate_layouts(inp.plan_routings, homes, num_slots, PLAN_CAP, MAX_TOKENS, jobs=usable_cpus())
        choices = {
            "rule": lambda ids, lay: slot_ranks(ids, lay, source_ranks(len(ids), ranks)),
            "balanced": lambda ids, lay: slot_ranks(ids, lay, source_ranks(len(ids), ranks), "balanced"),
            "oracle": oracle_copy_ranks,
        }
        for name, choose in choices.items():
            pooled, worst_step, copies = [], [], []
            for layer, layout in enumerate(layouts):
                ids, step_of = traces.expert_ids[layer].astype(np.int64), steps[layer]
                load_R, step_max, tokens = np.zeros(ranks), [], []
                for step in np.unique(step_of[step_of >= cutoff]):
                    step_ids = ids[step_of == step]
                    dest = choose(step_ids, layout)
                    step_load = np.bincount(dest[step_ids >= 0], minlength=ranks)
                    load_R += step_load
                    step_max.append(step_load.max() / step_load.mean())
                    tokens.append(distinct_ranks(step_ids, dest))
                pooled.append(load_R.max() / load_R.mean())
                worst_step.append(max(step_max))
                copies.append(np.concatenate(tokens).mean())
            rows.append(
                {"slots": num_slots, "choice": name, "copies": float(np.mean(copies)), "pooled": pooled,
                 "worst_step": worst_step}
            )  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("trace_dir", type=Path, help="a routing trace directory (profiler output, several steps)")
    p.add_argument("--ranks", type=int, default=16, help="expert-parallel ranks (default 16)")
    p.add_argument("--slots", type=int, nargs="+", required=True, help="physical slots P to plan (--replicas P)")
    args = p.parse_args()
    print(f"{args.trace_dir}, {args.ranks} ranks (held out: the last 20% of steps)\n")
    print("| P | copy choice | copies/token | load max/mean pooled, per layer | worst step, per layer |")
    print("| --- | --- | --- | --- | --- |")
    for r in judge(args.trace_dir, args.ranks, args.slots):
        pooled = " ".join(f"{x:.3f}" for x in r["pooled"])
        steps = " ".join(f"{x:.3f}" for x in r["worst_step"])
        print(f"| {r['slots']} | {r['choice']} | {r['copies']:.3f} | {pooled} | {steps} |")


if __name__ == "__main__":
    main()
