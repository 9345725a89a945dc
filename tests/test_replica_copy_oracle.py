"""benchmarks/replica_copy_oracle.py: its per-step oracle sends every pair to a copy of its own expert, loses none,
and never ends a step busier than the dispatchers' rule; the script prints its table on a small recorded trace."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from placement.copy_choice import choose_copy_ranks
from placement.layout import ExpertLayout
from placement.synthetic import synthetic_expert_ids
from profiling.trace import RoutingTraceRecorder, TraceConfig

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "replica_copy_oracle.py"


def load_script():
    spec = importlib.util.spec_from_file_location("replica_copy_oracle", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_oracle_keeps_every_pair_and_is_never_busier_than_the_rule():
    oracle = load_script().oracle_copy_ranks
    rng = np.random.default_rng(0)
    # 8 experts on 4 ranks, 3 slots each: hot expert 0 on every rank, expert 5 on two
    layout = ExpertLayout.from_json([[0, 1, 2, 3], 0, 1, 1, 2, [2, 3], 3, 0], 4, num_experts=8)
    p = np.array([6, 1, 1, 1, 1, 2, 1, 1], dtype=float)
    for _ in range(5):
        ids = np.stack([rng.choice(8, 3, replace=False, p=p / p.sum()) for _ in range(400)])
        ids[rng.random(ids.shape) < 0.1] = -1
        dest = oracle(ids, layout)
        valid = ids >= 0
        assert (dest[~valid] == -1).all() and (dest[valid] >= 0).all()  # dropless: every valid pair has a rank
        copies = layout.ranks_of_experts
        assert all(dest[t, k] in copies[ids[t, k]] for t, k in zip(*np.nonzero(valid)))
        rule = choose_copy_ranks(ids, layout)
        assert np.bincount(dest[valid], minlength=4).max() <= np.bincount(rule[valid], minlength=4).max()


def test_the_script_prints_rule_balanced_and_oracle_rows(tmp_path):
    recorder = RoutingTraceRecorder(
        tmp_path, num_layers=1, num_experts=16, top_k=4, source="test", config=TraceConfig()
    )
    for step in range(5):
        recorder.step = step
        ids = synthetic_expert_ids(400, 16, 4, num_clusters=4, zipf=1.2, seed=step, structure_seed=0)
        recorder.record(0, torch.from_numpy(ids.astype(np.int64)))
    recorder.close()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--ranks", "4", "--slots", "24"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| 24 |")]
    assert [r[1].strip() for r in rows] == ["rule", "balanced", "oracle"]
    rule_step, balanced_step, oracle_step = (float(r[4]) for r in rows)
    assert oracle_step <= min(rule_step, balanced_step) + 1e-9
