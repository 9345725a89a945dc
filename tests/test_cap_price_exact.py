"""benchmarks/cap_price_exact.py: its exact dynamic program equals enumerating every balanced placement (with and
without a load cap, and where no placement meets the cap), and the planner's capped plans are never below it."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from cap_price_exact import exact_capped, judge, planner  # noqa: E402

from placement.inputs import routing_from_expert_ids  # noqa: E402
from placement.methods import balanced_labelings  # noqa: E402
from placement.synthetic import synthetic_expert_ids  # noqa: E402


@pytest.mark.parametrize("E,R,K", [(8, 2, 4), (8, 4, 3), (12, 3, 4), (12, 4, 3)])
def test_the_dynamic_program_equals_enumeration(E, R, K):
    routing = routing_from_expert_ids(synthetic_expert_ids(3000, E, K, num_clusters=R, zipf=0.8, seed=1), E)
    candidates = balanced_labelings(E, R)
    judged = np.array([judge(routing, labels, R) for labels in candidates])  # [Q, (copies, load)]
    for cap in (None, 1.25, 1.10, 1.05):
        feasible = np.ones(len(candidates), bool) if cap is None else judged[:, 1] <= cap + 1e-9
        copies, labels = exact_capped(routing, R, cap)
        if not feasible.any():
            assert copies == np.inf and labels is None
            continue
        assert copies == pytest.approx(judged[feasible, 0].min())
        assert np.bincount(labels, minlength=R).tolist() == [E // R] * R
        assert judge(routing, labels, R)[0] == pytest.approx(copies)
        assert cap is None or judge(routing, labels, R)[1] <= cap + 1e-9


def test_the_planner_under_the_cap_is_never_below_the_optimum_and_meets_the_cap():
    for seed in range(3):
        routing = routing_from_expert_ids(synthetic_expert_ids(4000, 16, 4, num_clusters=4, zipf=0.6, seed=seed), 16)
        best, _ = exact_capped(routing, 4, 1.10)
        copies, load = judge(routing, planner(routing, 4, 1.10), 4)
        assert load <= 1.10 + 1e-9
        assert best - 1e-9 <= copies <= 1.05 * best
