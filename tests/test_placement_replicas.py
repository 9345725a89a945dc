"""Replicated experts in the planner: the replica rule's predicted metrics against a per-token recount, the
replicated plan's invariants, plan files and `c2r-place evaluate` with replicas, and the --replicas errors."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from placement.errors import PlacementError
from placement.inputs import routing_from_expert_ids
from placement.layout import ExpertLayout
from placement.methods import plan_placement
from placement.objective import layer_metrics
from placement.plan import dumps, load_plan
from placement.replicate import parse_num_slots, replicate_layer
from placement.synthetic import synthetic_expert_ids
from profiling.trace import RoutingTraceRecorder, TraceConfig
from tests.test_placement_cli import run_cli


def recount(ids_TK: np.ndarray, layout: ExpertLayout, gpus_per_node: int = 1) -> tuple[float, np.ndarray]:
    """The rule applied token by token over the whole batch in flat order, written plainly (the reference):
    returns (mean distinct ranks per token, or nodes with ``gpus_per_node``, [R] pairs per rank)."""
    copies = layout.ranks_of_experts
    served = {e: 0 for e in range(layout.num_experts)}  # free pairs of e seen so far
    load = np.zeros(layout.num_ranks)
    distinct = []
    for token in ids_TK.tolist():
        slots = [e for e in token if e >= 0]
        visited = {copies[e][0] for e in slots if len(copies[e]) == 1}
        ranks = set()
        for e in slots:
            if len(copies[e]) == 1:
                rank = copies[e][0]
            else:
                on_visited = [r for r in copies[e] if r in visited]
                if on_visited:
                    rank = on_visited[0]
                else:
                    rank = copies[e][served[e] % len(copies[e])]
                    served[e] += 1
            ranks.add(rank // gpus_per_node)
            load[rank] += 1
        distinct.append(len(ranks))
    return float(np.mean(distinct)), load


# 4 experts on 2 ranks, 3 slots each: expert 0 (home 0) also on rank 1, expert 2 (home 1) also on rank 0.
LAYOUT = ExpertLayout((0, 0, 1, 1), 2, ((1,), (), (0,), ()))
# Worked example: [0, 1] visits rank 0 (expert 1), so expert 0 stays home: 1 rank. [0, 3] visits rank 1, so expert 0
# goes to its replica there: 1 rank. [2, 1]: expert 2's replica on rank 0. [0, -1] and [2, -1] are free pairs, split
# one each over the two copies (an even count, so the expectation is exact). [1, 3]: 2 ranks.
HAND_MADE = np.array([[0, 1], [0, 3], [2, 1], [2, 3], [0, -1], [0, -1], [2, -1], [2, -1], [1, 3], [3, -1]])


def test_replicated_metrics_equal_a_per_token_recount():
    copies, load = recount(HAND_MADE, LAYOUT)
    m = layer_metrics(routing_from_expert_ids(HAND_MADE, 4), LAYOUT)
    assert m["copies_per_token"] == pytest.approx(copies) == 1.1
    assert m["rank_load"] == load.tolist() == [7, 8]
    assert m["load_imbalance"] == pytest.approx(8 / 7.5)
    assert m["replicas"] == 2


def test_replicated_metrics_track_the_recount_on_random_routing():
    """Several free slots per token: the prediction takes them as independent (placement.replica_rule), the
    round robin does not, so the two agree closely but not exactly."""
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(8, 3, replace=False, p=np.arange(8, 0, -1) / 36) for _ in range(4000)])
    layout = ExpertLayout((0, 0, 1, 1, 2, 2, 3, 3), 4, ((1, 2), (3,), (), (0,), (), (), (), ()))
    copies, load = recount(ids, layout)
    m = layer_metrics(routing_from_expert_ids(ids, 8), layout)
    assert m["copies_per_token"] == pytest.approx(copies, rel=0.01)
    assert np.abs(np.array(m["rank_load"]) - load).max() <= 4  # within a pair per replicated copy on a rank
    unreplicated = ExpertLayout((0, 0, 1, 1, 2, 2, 3, 3), 4)
    plain = layer_metrics(routing_from_expert_ids(ids, 8), unreplicated)
    copies_plain, load_plain = recount(ids, unreplicated)
    assert plain["copies_per_token"] == pytest.approx(copies_plain) and plain["rank_load"] == load_plain.tolist()


def test_node_fanout_of_a_replicated_layout_equals_the_recount():
    """Nodes per token under the rule: 4 ranks (2 experts each + 1 replica slot) on 2 nodes. Expert 4 (home rank 2,
    node 1) has a replica on rank 1 (node 0): [4, 3] and [4, 5] meet a copy on a visited rank; [4, 1] and [4, 7] are
    free pairs that land on node 1, node 0, node 1, node 0 in turn, so each kind reaches 1.5 nodes on average,
    as the prediction counts it."""
    layout = ExpertLayout((0, 0, 1, 1, 2, 2, 3, 3), 4, ((3,), (), (2,), (), (1,), (), (0,), ()))
    ids = np.array([[4, 1], [4, 1], [4, 7], [4, 7], [4, 3], [4, 5], [4, -1], [4, -1], [1, 7]])
    nodes, load = recount(ids, layout, gpus_per_node=2)
    m = layer_metrics(routing_from_expert_ids(ids, 8), layout, num_nodes=2)
    assert m["node_fanout_per_token"] == pytest.approx(nodes) == pytest.approx((4 * 1.5 + 4 + 2) / 9)
    copies, _ = recount(ids, layout)
    assert m["copies_per_token"] == pytest.approx(copies) and m["rank_load"] == load.tolist()


def clustered(num_tokens=3000, num_experts=16, top_k=4, seed=0, zipf=1.5):
    return synthetic_expert_ids(num_tokens, num_experts, top_k, num_clusters=4, zipf=zipf, seed=seed, structure_seed=0)


@pytest.mark.parametrize("num_slots", [20, 24, 32])
def test_planned_replicas_keep_slots_even_and_meet_the_cap(num_slots):
    """P/R slots per rank, never two copies on one rank (ExpertLayout refuses both), and every rank at or under the
    cap on the planning tokens. With 32 slots (P = 2E: every expert twice, in a ring) the greedy fill alone had
    ended at 1.058 (each forced replica pulls load onto its rank)."""
    routing = routing_from_expert_ids(clustered(zipf=1.2), 16)
    base = plan_placement([routing], 4, max_load=1.05, progress=False)[0]
    assert layer_metrics(routing, base)["load_imbalance"] > 1.07  # the hottest expert: the cap needs replicas
    layout = replicate_layer(routing, base, num_slots, target=1.05)
    assert layout.num_slots == num_slots and layout.experts_per_rank == num_slots // 4
    assert all(len(x) == num_slots // 4 for x in layout.rank_to_experts)
    assert all(len(set(ranks)) == len(ranks) for ranks in layout.ranks_of_experts)
    load = layer_metrics(routing, layout)["load_imbalance"]
    assert load < layer_metrics(routing, base)["load_imbalance"]
    assert load <= 1.05 + 1e-9


def test_twice_the_slots_give_every_expert_a_second_copy_in_one_ring():
    """P = 2E: every expert gets a second copy, the experts of a rank all on the rank after it in one ring of every
    rank, heaviest next to lightest; no expert is single-copy, so every pair splits evenly and each rank's predicted
    load is the mean of its own and its ring predecessor's (and the round robin's recount is within a pair of it)."""
    ids = clustered(num_tokens=4000, num_experts=32, zipf=1.2)
    routing = routing_from_expert_ids(ids, 32)
    base = plan_placement([routing], 8, progress=False)[0]  # uncapped: rank loads far apart
    base_load = np.array(layer_metrics(routing, base)["rank_load"], dtype=float)
    layout = replicate_layer(routing, base, 64, target=2.0)  # a loose target: no move after the ring
    copies = layout.ranks_of_experts
    assert all(len(c) == 2 and c[0] == base.expert_to_rank[e] for e, c in enumerate(copies))
    after = {}
    for home, second in copies:
        assert after.setdefault(home, second) == second  # one successor per rank
    ring, rank = [0], after[0]
    while rank != 0:
        ring.append(rank)
        rank = after[rank]
    assert sorted(ring) == list(range(8))  # one cycle through every rank
    assert after[int(np.argmax(base_load))] == int(np.argmin(base_load))
    before = {second: home for home, second in after.items()}
    expected = [(base_load[r] + base_load[before[r]]) / 2 for r in range(8)]
    m = layer_metrics(routing, layout)
    assert m["rank_load"] == pytest.approx(expected, abs=0.5)  # the metric rounds to whole pairs
    assert max(m["rank_load"]) < base_load.max()
    _, load = recount(ids, layout)
    assert np.abs(load - expected).max() <= 8 * 0.5 + 1e-9  # a half pair per expert copy on a rank


def test_replicate_layer_refuses_impossible_slot_counts_in_one_line():
    """The library call checks what the CLI checks (ep_bench called it with more slots than one rank can hold and
    got ``min() arg is an empty sequence``)."""
    routing = routing_from_expert_ids(clustered(200), 16)
    one_rank = ExpertLayout.contiguous(16, 1)
    with pytest.raises(PlacementError, match=r"P \(18\) must be <= experts x ranks \(16 x 1\)"):
        replicate_layer(routing, one_rank, 18, target=1.05)
    with pytest.raises(PlacementError, match=r"P \(18\) must be a multiple of ranks \(4\)"):
        replicate_layer(routing, ExpertLayout.contiguous(16, 4), 18, target=1.05)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Profiler traces: 16 experts, top-4, clustered, skewed popularity, 6 steps of 500 tokens per layer."""
    run = tmp_path_factory.mktemp("run")
    recorder = RoutingTraceRecorder(
        run / "profile" / "traces", num_layers=2, num_experts=16, top_k=4, source="test", config=TraceConfig()
    )
    for step in range(6):
        recorder.step = step
        for layer in range(2):
            recorder.record(layer, torch.from_numpy(clustered(500, seed=10 * layer + step, zipf=1.2).astype(np.int64)))
    recorder.close()
    return run


def test_plan_with_replicas_round_trips_and_evaluates(run_dir, tmp_path, capsys):
    out = tmp_path / "plan.json"
    code, text, err = run_cli(
        capsys, "plan", "--traces", run_dir, "--ranks", 4, "--replicas", "+8", "--max-load", 1.05, "--out", out
    )
    assert code == 0, err
    assert "replicas: 24 slots (6 per rank, 8 replicas per layer)" in text
    assert "--copy-choice balanced" not in text  # + 8 slots: not every expert has a partner copy
    doc = json.loads(out.read_text())
    assert doc["version"] == 2 and doc["num_slots"] == 24 and doc["options"]["replicas"] == 24
    plan = load_plan(out, num_layers=2, num_experts=16, num_ranks=4)
    for layer, layout in zip(doc["layers"], plan.layouts):
        assert layout.num_slots == 24 and layout.to_json() == layer["expert_to_rank"]
        assert layer["rank_to_experts"] == layout.rank_to_experts
        assert layer["predicted"]["replicas"] == 8
        assert layer["predicted"]["load_imbalance"] <= 1.05 + 1e-9  # planned and judged on the same tokens
    code, text, err = run_cli(capsys, "evaluate", "--plan", out, "--traces", run_dir, "--json")
    assert code == 0, err
    evaluated = json.loads(text)["plan"]["layers"]
    assert [m["copies_per_token"] for m in evaluated] == pytest.approx(
        [m["predicted"]["copies_per_token"] for m in doc["layers"]]
    )
    code, text, err = run_cli(capsys, "evaluate", "--plan", out, "--traces", run_dir)
    assert code == 0 and "copies/tok" in text


def test_a_plan_with_every_expert_twice_points_to_the_balanced_copy_choice(run_dir, tmp_path, capsys):
    out = tmp_path / "plan.json"
    code, text, err = run_cli(capsys, "plan", "--traces", run_dir, "--ranks", 4, "--replicas", 32, "--out", out)
    assert code == 0, err
    assert "every expert got a partner copy (" in text and "train with `c2r-train --copy-choice balanced`" in text
    # the rank loads a balanced run would see, predicted from the judged steps' expert loads: nearly level, and
    # more level than the rule's worst layer
    line = next(line for line in text.splitlines() if line.startswith("PREDICTION with --copy-choice balanced"))
    worst = float(line.split(" mean over layers, ")[1].split()[0])
    rule = max(layer["predicted"]["load_imbalance"] for layer in json.loads(out.read_text())["layers"])
    assert 1.0 <= worst < 1.02 and worst < rule, (line, rule)
    plan = load_plan(out, num_layers=2, num_experts=16, num_ranks=4)
    assert all(len(ranks) >= 2 for layout in plan.layouts for ranks in layout.ranks_of_experts)


def test_every_expert_twice_with_a_layer_that_has_no_held_out_tokens(tmp_path, capsys):
    # the balanced prediction skips a layer with nothing to judge (here: layer 1 not recorded in the held-out steps)
    run = tmp_path / "run"
    recorder = RoutingTraceRecorder(
        run / "profile" / "traces", num_layers=2, num_experts=16, top_k=4, source="test", config=TraceConfig()
    )
    for step in range(6):
        recorder.step = step
        for layer in range(2 if step < 4 else 1):
            recorder.record(layer, torch.from_numpy(clustered(500, seed=10 * layer + step, zipf=1.2).astype(np.int64)))
    recorder.close()
    argv = ["plan", "--traces", run, "--ranks", 4, "--replicas", "2E", "--holdout", 0.34, "--out", tmp_path / "p.json"]
    code, text, err = run_cli(capsys, *argv)
    assert code == 0, err
    line = next(line for line in text.splitlines() if line.startswith("PREDICTION with --copy-choice balanced"))
    assert "per step (each step's busiest rank)" in line and (tmp_path / "p.json").exists()


def test_bad_replicas_get_one_line(run_dir, tmp_path, capsys):
    cases = [
        ("12", "P (12) must be >= experts (16)"),
        ("18", "P (18) must be a multiple of ranks (4)"),
        ("68", "P (68) must be <= experts x ranks (16 x 4)"),
        ("many", "--replicas takes P physical slots, +N extra slots or a multiple of the experts (2E); got 'many'"),
        ("E", "--replicas takes P physical slots, +N extra slots or a multiple of the experts (2E); got 'E'"),
        ("5E", "P (80) must be <= experts x ranks (16 x 4)"),
    ]
    for value, message in cases:
        argv = ["plan", "--traces", run_dir, "--ranks", 4, "--replicas", value, "--out", tmp_path / "p.json"]
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err and not (tmp_path / "p.json").exists()
    with pytest.raises(PlacementError, match=r"P \(20\) must be a multiple of ranks \(8\)"):
        parse_num_slots("+4", 16, 8)
    assert parse_num_slots("+4", 16, 4) == parse_num_slots(20, 16, 4) == 20
    assert parse_num_slots("2E", 16, 4) == parse_num_slots("+16", 16, 4) == 32


def test_eplb_packing_never_puts_two_replicas_of_one_expert_on_one_gpu():
    """`_pack_lpt` with random loads and replica counts (up to one per GPU), each GPU P/G slots of distinct experts,
    every replica placed. The first case goes through the trade (its last replica, of expert 2, finds room only on
    the GPU already holding it: a full GPU hands one of its experts over)."""
    from placement.export import _pack_lpt

    cases = [(2, np.array([0.031, 0.066, 0.056, 0.666, 0.22, 1.153]), np.array([1, 1, 2, 1, 1, 2]))]
    rng = np.random.default_rng(0)
    while len(cases) < 300:
        gpus, experts = int(rng.integers(2, 5)), int(rng.integers(2, 7))
        count = rng.integers(1, gpus + 1, experts)
        if count.sum() % gpus == 0:
            cases.append((gpus, rng.random(experts) * count, count))
    for gpus, load, count in cases:
        packed = _pack_lpt(load, count, gpus)
        assert all(len(g) == count.sum() // gpus and len(set(g)) == len(g) for g in packed), (load, count, packed)
        assert np.bincount(np.concatenate(packed), minlength=len(load)).tolist() == count.tolist()


def test_a_large_replicated_plan_is_written_at_once():
    """`dumps` puts each list of numbers on one line; its old pattern backtracked exponentially on a list of numbers
    followed by a nested list (a replicated expert's ranks), so a 256-expert replicated plan never got written
    (0.47 s at 20 numbers, x4 per 2 more). Now: well under a second, and the JSON reads back the same."""
    homes = np.arange(256) % 64  # 4 per rank; experts 0..63 get replicas on the next two ranks: 6 slots per rank
    layout = ExpertLayout(homes, 64, [((e + 1) % 64, (e + 2) % 64) if e < 64 else () for e in range(256)])
    doc = {"layers": [{"expert_to_rank": layout.to_json()}] * 58}
    start = time.perf_counter()
    text = dumps(doc)
    assert time.perf_counter() - start < 1.0
    assert json.loads(text) == json.loads(json.dumps(doc))
    assert "[0, 1, 2]" in text  # expert 0: home 0, replicas on 1 and 2, on one line


def test_step_views_lower_the_worst_step():
    """16 experts on 4 ranks, 24 slots, 8 noisy steps of 100 tokens: with each step's expert load (the step views,
    `placement.replicate` and `placement.loadcap`) the replicas are placed so that the worst step's busiest rank,
    recounted token by token per step, is lower than with the pooled load alone, and the pooled load stays near the
    target."""
    ids = synthetic_expert_ids(800, 16, 4, num_clusters=4, zipf=0.8, seed=5, structure_seed=1)
    steps = np.arange(800) // 100
    routing = routing_from_expert_ids(ids, 16, steps_N=steps)
    homes = plan_placement([routing], 4, max_load=1.05, per_step=False, progress=False)[0]
    worst = []
    for step_load in (None, routing.step_load_SE):
        layout = replicate_layer(routing, homes, 24, 1.05, step_load_SE=step_load)
        per_step = [recount(ids[steps == s], layout)[1] for s in range(8)]
        worst.append(max(load.max() / load.mean() for load in per_step))
        assert layer_metrics(routing, layout)["load_imbalance"] <= 1.08
    assert worst[1] < worst[0]


def test_copy_order_moves_meet_a_target_the_slot_moves_alone_miss(monkeypatch):
    """Rule 1 sends a token to the first copy (home first) on a rank it visits, so the order of an expert's copies
    decides which rank serves the tokens that visit several of them. 32 experts on 8 ranks, 48 slots, target 1.03:
    with the reorders among the slot moves the fill ends at 1.025 on the planning tokens; with swaps and
    replacements alone it stops at 1.042 (found in a sweep of small synthetic cases, where the reorders were never
    worse)."""
    from placement.replicate import _Replicator

    ids = synthetic_expert_ids(2000, 32, 4, num_clusters=4, zipf=1.2, seed=0, structure_seed=0)
    routing = routing_from_expert_ids(ids, 32)
    homes = plan_placement([routing], 8, max_load=1.05, progress=False)[0]
    with_order = replicate_layer(routing, homes, 48, 1.03)
    assert layer_metrics(routing, with_order)["load_imbalance"] <= 1.03 + 1e-9
    slot_moves = _Replicator._slot_moves
    monkeypatch.setattr(_Replicator, "_slot_moves", lambda self: [m for m in slot_moves(self) if m[0] != "order"])
    without = replicate_layer(routing, homes, 48, 1.03)
    assert layer_metrics(routing, without)["load_imbalance"] > 1.04
    # the recount agrees with the prediction for the reordered plan (copies and loads)
    _, load = recount(ids, with_order)
    metrics = layer_metrics(routing, with_order)
    assert np.abs(np.array(metrics["rank_load"]) - load).max() <= with_order.num_slots  # within a pair per copy
