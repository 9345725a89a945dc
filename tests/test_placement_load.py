"""The load cap (placement/loadcap.py), the cost model (placement/cost.py) and issue 12's bugs: pairwise predictions
for top-k > 2, replicas of one expert on one GPU, one-line errors for truncated / misplaced files."""

import json
from itertools import combinations

import numpy as np
import pytest
import torch

from placement.cli import main
from placement.cost import CostModel, calibrate, format_costs, layer_cost
from placement.export import replicate_hot_experts
from placement.inputs import routing_from_coactivation, routing_from_expert_ids
from placement.layout import ExpertLayout
from placement.loadcap import STEP_VIEWS, _Cost, cap_load, load_views, min_max_load, needs_replication
from placement.methods import balanced_labelings, partition_kahypar, partition_kahypar_capped, steiner_cost_batch
from placement.objective import layer_metrics, load_key
from placement.plan import load_plan
from placement.synthetic import synthetic_expert_ids
from profiling.reader import coactivation_from_ids
from profiling.trace import RoutingTraceRecorder, TraceConfig


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def rank_load(routing, labels, num_ranks):
    load = np.bincount(labels, weights=routing.expert_load_E, minlength=num_ranks)
    return load.max() / load.mean()


# ---- the cap ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("c", [1, 5])
def test_swap_gains_are_exact(c):
    """Every swap's gain (lower bound + the sets holding both experts) equals the cost difference recomputed from
    scratch (rank KM1 + (c - 1) node KM1), also after swaps have patched the counts."""
    E, R, G = 12, 6, 3
    routing = routing_from_expert_ids(synthetic_expert_ids(500, E, 4, seed=3), E)
    labels = np.random.default_rng(0).permutation(np.arange(E) % R)
    cost = _Cost(routing, labels, R, G, c)
    for step in range(3):
        lower = cost.lower_gains(labels)
        before = steiner_cost_batch(routing, labels[None], G, c)[0]
        for a, b in combinations(range(E), 2):
            if labels[a] == labels[b]:
                continue
            swapped = labels.copy()
            swapped[[a, b]] = labels[[b, a]]
            truth = steiner_cost_batch(routing, swapped[None], G, c)[0] - before
            assert cost.exact_gain(labels, lower, a, b) == pytest.approx(truth)
            assert lower[a, b] <= truth + 1e-9
        other = int(np.flatnonzero(labels != labels[step])[0])
        cost.swap(labels, step, other)


def test_cap_meets_a_reachable_cap_at_the_enumerated_optimum_or_close():
    """8 experts, 4 ranks, skewed load: the capped plan holds exactly 2 experts per rank, meets the cap, and its
    KM1 is within 5% of the best capped placement found by enumerating all 105."""
    E, R, cap = 8, 4, 1.15
    ids = synthetic_expert_ids(4000, E, 3, num_clusters=2, zipf=0.6, seed=5)
    routing = routing_from_expert_ids(ids, E)
    start = partition_kahypar(routing, R)
    result = cap_load(routing, start, R, cap)
    assert np.bincount(result.labels, minlength=R).tolist() == [2] * R
    assert result.met and not result.needs_replication
    assert rank_load(routing, result.labels, R) <= cap + 1e-9
    candidates = balanced_labelings(E, R)
    loads = np.array([rank_load(routing, x, R) for x in candidates])
    feasible = candidates[loads <= cap + 1e-9]
    best = steiner_cost_batch(routing, feasible, R, 1).min()
    ours = steiner_cost_batch(routing, result.labels[None], R, 1)[0]
    assert ours <= 1.05 * best


def test_kahypar_under_the_cap_holds_both_slots_and_load():
    """Weight = big constant + load: a result has exactly E/R experts per rank and load <= cap x mean; an
    impossible cap (one expert with half the load) gives None, and the caller falls back."""
    E, R = 16, 4
    routing = routing_from_expert_ids(synthetic_expert_ids(4000, E, 4, num_clusters=4, zipf=0.6, seed=2), E)
    labels = partition_kahypar_capped(routing, R, routing.expert_load_E, 1.1, threads=1)
    assert labels is not None
    assert np.bincount(labels, minlength=R).tolist() == [E // R] * R
    assert rank_load(routing, labels, R) <= 1.1 + 1e-9
    hot = np.stack([np.zeros(2000, dtype=np.int64), np.random.default_rng(0).integers(1, E, 2000)], axis=1)
    hot_routing = routing_from_expert_ids(hot, E)
    assert partition_kahypar_capped(hot_routing, R, hot_routing.expert_load_E, 1.1, threads=1) is None


def test_an_impossible_cap_is_named_and_the_max_load_minimised():
    """One expert carries half the load on 4 ranks: no placement without replicas gets below 2.0; the planner
    says so and reaches the bound."""
    E, R = 8, 4
    rng = np.random.default_rng(0)
    ids = np.stack([np.zeros(2000, dtype=np.int64), rng.integers(1, E, 2000)], axis=1)
    routing = routing_from_expert_ids(ids, E)
    assert needs_replication(routing.expert_load_E, R, 1.1)
    result = cap_load(routing, np.arange(E) % R, R, 1.1)
    assert not result.met and result.needs_replication
    assert result.max_load == pytest.approx(min_max_load(routing.expert_load_E, R), rel=0.02)


def test_the_cap_holds_on_every_planning_step_too():
    """Worked example: 4 experts on 2 ranks; step 0 routes 100 tokens to {0, 1}, step 1 100 tokens to {2, 3}. The
    copies-optimal plan ({0, 1} | {2, 3}) is balanced on the pooled load (1.0) but each step puts all the load on one
    rank (2.0). Held on each step (``step_load_SE``), the cap splits both pairs: 1.0 on each step, 2 copies a token."""
    ids = np.array([[0, 1]] * 100 + [[2, 3]] * 100)
    routing = routing_from_expert_ids(ids, 4, steps_N=np.repeat([0, 1], 100))
    assert routing.step_load_SE.tolist() == [[100, 100, 0, 0], [0, 0, 100, 100]]
    pooled = cap_load(routing, np.array([0, 0, 1, 1]), 2, 1.1)
    assert pooled.met and pooled.labels.tolist() == [0, 0, 1, 1] and pooled.max_load == 1.0  # nothing to do
    each = cap_load(routing, np.array([0, 0, 1, 1]), 2, 1.1, step_load_SE=routing.step_load_SE)
    assert each.met and each.max_load == pytest.approx(1.0)
    assert each.labels[0] != each.labels[1] and each.labels[2] != each.labels[3]


def test_at_most_eight_evenly_spaced_steps_are_held_to_the_cap():
    """The margin must not grow with the trace: of 32 planning steps, 8 evenly spaced ones (the first and the last
    among them) become views, each scaled to the pooled total; 5 steps stay 5; steps without load are left out."""
    load_E = np.array([30.0, 10.0])
    steps_SE = np.stack([[s + 1.0, 1.0] for s in range(32)])
    views = load_views(load_E, steps_SE)
    assert STEP_VIEWS == 8 and views.shape == (1 + 8, 2)
    assert views[0].tolist() == [30.0, 10.0] and np.allclose(views.sum(axis=1), 40.0)
    firsts = views[1:, 0] / views[1:, 1]  # step s has loads [s + 1, 1]: the ratio names the step
    assert firsts.round().astype(int).tolist() == [s + 1 for s in np.linspace(0, 31, 8).round().astype(int)]
    assert firsts[0] == 1 and firsts[-1] == 32
    few = np.array([[1.0, 1.0], [0.0, 0.0], [2.0, 1.0], [3.0, 1.0], [4.0, 1.0], [5.0, 1.0]])
    assert load_views(load_E, few).shape == (1 + 5, 2)


def test_steps_that_cannot_all_meet_the_cap_keep_the_pooled_cap():
    """Noisy steps (20 tokens each, 16 experts, 4 ranks): where no placement meets 1.1 on every step it holds (8 of
    the 20, evenly spaced), the repair lowers their worst but never lets the pooled load above the cap it met
    first."""
    ids = synthetic_expert_ids(400, 16, 4, num_clusters=4, zipf=0.7, seed=3, structure_seed=0)
    routing = routing_from_expert_ids(ids, 16, steps_N=np.arange(400) // 20)
    start = partition_kahypar(routing, 4)
    pooled = cap_load(routing, start, 4, 1.1)
    each = cap_load(routing, start, 4, 1.1, step_load_SE=routing.step_load_SE)
    held = routing.step_load_SE[np.linspace(0, 19, STEP_VIEWS).round().astype(int)]  # the 8 steps held to it
    worst_step = [max(rank_load_of(row, lab, 4) for row in held) for lab in (pooled.labels, each.labels)]
    assert not each.met and worst_step[1] < worst_step[0]  # the steps could not all meet it; their worst went down
    assert rank_load(routing, each.labels, 4) <= 1.1 + 1e-9  # the pooled cap still holds
    assert each.max_load == pytest.approx(worst_step[1])


def rank_load_of(load_E, labels, num_ranks):
    load = np.bincount(labels, weights=load_E, minlength=num_ranks)
    return load.max() / load.mean()


# ---- c2r-place plan with the cap -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Profiler traces: 16 experts, top-4, clustered, skewed popularity, 8 steps of 400 tokens per layer."""
    run = tmp_path_factory.mktemp("run")
    recorder = RoutingTraceRecorder(
        run / "profile" / "traces", num_layers=2, num_experts=16, top_k=4, source="test", config=TraceConfig()
    )
    for step in range(8):
        recorder.step = step
        for layer in range(2):
            ids = synthetic_expert_ids(
                400, 16, 4, num_clusters=4, zipf=0.7, seed=10 * layer + step, structure_seed=layer
            )
            recorder.record(layer, torch.from_numpy(ids.astype(np.int64)))
    recorder.close()
    return run


def test_plan_with_cap_records_load_and_costs_and_pareto(run_dir, tmp_path, capsys):
    out = tmp_path / "plan.json"
    code, text, err = run_cli(capsys, "plan", "--traces", run_dir, "--ranks", 4, "--pareto", "--out", out, "-q")
    assert code == 0, err
    assert "load cap 1.1 x mean: met on" in text and "PREDICTED step time" in text
    assert "max-load  copies/tok" in text and "    none" in text and "    1.05" in text
    plan = load_plan(out)
    assert plan.data["options"]["max_load"] == 1.1 and plan.data["options"]["per_step_cap"] is True
    for layer in plan.data["layers"]:
        assert layer["load_cap"]["met"] == (layer["predicted"]["load_imbalance"] <= 1.1 + 1e-9)
        assert layer["predicted"]["predicted_step_ms"] > 0
        assert not layer["load_cap"]["needs_replication"]
        assert layer["predicted"]["load_imbalance"] <= 1.1 + 1e-9  # planned and judged on the same tokens
    uncapped = tmp_path / "none.json"
    assert run_cli(capsys, "plan", "--traces", run_dir, "--ranks", 4, "--max-load", "none", "--out", uncapped)[0] == 0
    pooled = tmp_path / "pooled.json"
    assert run_cli(capsys, "plan", "--traces", run_dir, "--ranks", 4, "--no-per-step-cap", "--out", pooled)[0] == 0
    assert load_plan(pooled).data["options"]["per_step_cap"] is False
    loose = load_plan(uncapped).data["predicted"]
    assert loose["max_load_imbalance"] > 1.1  # the cap did something
    assert plan.data["predicted"]["copies_per_token"] >= loose["copies_per_token"] - 1e-9


def test_plan_in_parallel_equals_one_process(run_dir, tmp_path, capsys):
    """--jobs 2 (layers in spawned workers, Mt-KaHyPar on one thread each): the same plan, homes and replicas, as
    --jobs 1; the load cap and the replica fill both run in the workers."""
    plans = []
    for jobs in (1, 2):
        out = tmp_path / f"plan{jobs}.json"
        argv = ["plan", "--traces", run_dir, "--ranks", 4, "--replicas", "+4", "--jobs", jobs, "--out", out, "-q"]
        code, _, err = run_cli(capsys, *argv)
        assert code == 0, err
        plans.append(load_plan(out))
    assert [lay.ranks_of_experts for lay in plans[0].layouts] == [lay.ranks_of_experts for lay in plans[1].layouts]
    assert plans[0].data["predicted"] == plans[1].data["predicted"]
    assert any(any(r) for r in plans[0].layouts[0].replicas)  # replicas were planned, not skipped
    code, _, err = run_cli(capsys, "plan", "--traces", run_dir, "--ranks", 4, "--jobs", 0, "--out", tmp_path / "p")
    assert code == 2 and err.strip().endswith("--jobs must be an integer >= 1 (worker processes); got 0")
    assert len(err.strip().splitlines()) == 1


def test_plan_keeps_contiguous_where_it_does_not_win(tmp_path, capsys):
    """Uniform independent routing on 2 layers: nothing to win; a layer whose plan is no better than contiguous
    on both counts is stored as contiguous and named."""
    E = 8
    trace = tmp_path / "traces"
    recorder = RoutingTraceRecorder(trace, num_layers=1, num_experts=E, top_k=1, source="test", config=TraceConfig())
    for step in range(4):
        recorder.step = step
        recorder.record(0, torch.arange(E).repeat(50)[:, None])  # top-1, exactly uniform: every placement ties
    recorder.close()
    code, text, err = run_cli(
        capsys, "plan", "--traces", trace, "--ranks", 2, "--method", "random", "--out", tmp_path / "p.json"
    )
    assert code == 0, err
    assert "kept the contiguous placement on layers [0]" in text
    assert load_plan(tmp_path / "p.json").layouts[0] == ExpertLayout.contiguous(E, 2)


def test_max_load_of_exactly_one_plans(run_dir, tmp_path, capsys):
    """The tightest cap the CLI takes: Mt-KaHyPar's part bounds are rounded up (rounded down, they summed below the
    total weight and Mt-KaHyPar refused the input: "c2r-place plan: error: [Invalid Input] ...")."""
    out = tmp_path / "plan.json"
    assert main(["plan", "--traces", str(run_dir), "--ranks", "4", "--max-load", "1.0", "--out", str(out), "-q"]) == 0
    assert load_plan(out).num_ranks == 4
    assert "Invalid Input" not in capsys.readouterr().err


def test_max_load_below_one_is_refused(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--traces", str(run_dir), "--ranks", "4", "--max-load", "0.9", "--out", str(tmp_path / "p")])
    assert "must be >= 1.0; got 0.9" in capsys.readouterr().err


# ---- cost model ------------------------------------------------------------------------------------------------


def test_cost_model_by_hand():
    """2 ranks, 1 node: 1.5 copies/token -> 0.75 cross-rank; 1000 tokens x 100 bytes x 0.75 x 4 exchanges over
    1 GB/s = 0.3 ms. Compute: load 1.2 x 1000 tokens x k 2 x 3 x 2 x 3 matrices x 50 x 10 flops at 1 TFLOP/s."""
    model = CostModel(
        tokens_per_rank=1000, hidden=50, ffn=10, bytes_per_element=2, intra_node_gb_s=1.0, expert_tflop_s=1.0
    )
    metrics = {"tokens": 1, "copies_per_token": 1.5, "slots_per_token": 2.0, "load_imbalance": 1.2}
    cost = layer_cost(metrics, model, num_ranks=2)
    assert cost["comm_ms"] == pytest.approx(4 * 1000 * 100 * 0.75 / 1e9 * 1e3)
    assert cost["compute_ms"] == pytest.approx(1.2 * 1000 * 2 * 3 * 2 * 3 * 50 * 10 / 1e12 * 1e3)


def test_cost_model_costs_plan_and_baseline_on_one_load_ratio():
    """The compute term takes each step's busiest rank where every placement compared has it; where one does not
    (a replicated plan's metrics have no per-step load), both are costed on the pooled ratio."""
    model = CostModel(tokens_per_rank=1000, hidden=50, ffn=10, intra_node_gb_s=1.0, expert_tflop_s=1.0)
    stepped = {"tokens": 1, "copies_per_token": 1.5, "slots_per_token": 2.0, "load_imbalance": 1.2}
    stepped["step_load_imbalance"] = 1.5
    pooled_only = {k: v for k, v in stepped.items() if k != "step_load_imbalance"}
    assert load_key([stepped], [dict(stepped)]) == "step_load_imbalance"
    assert load_key([pooled_only], [stepped]) == "load_imbalance"
    per_step = layer_cost(stepped, model, 2, load="step_load_imbalance")["compute_ms"]
    assert per_step == pytest.approx(layer_cost(stepped, model, 2)["compute_ms"] * 1.5 / 1.2)
    text = format_costs([(pooled_only, stepped)], model, 2, 1)
    assert "the busiest rank, pooled" in text and "+0.0%" in text
    assert "each recorded step" in format_costs([(stepped, stepped)], model, 2, 1)


def test_calibrate_reads_comm_records(tmp_path):
    comm = tmp_path / "profile" / "comm"
    comm.mkdir(parents=True)
    record = {
        "ep_rank": 0,
        "tokens": 512,
        "send_copies": [300, 200],
        "bytes_per_copy": 256,
        "time_ms": {"dispatch": 0.5, "combine": 0.5},
    }
    (comm / "comm-rank000.jsonl").write_text(json.dumps(record) + "\n")
    model = calibrate(tmp_path)
    # the measured bytes of a copy (a per-rank copy carries its routing slots too), not a hidden size made of them
    assert model.tokens_per_rank == 512 and model.copy_bytes == 256 and model.hidden == CostModel().hidden
    assert model.intra_node_gb_s == pytest.approx(2 * 200 * 256 / 1e-3 / 1e9)
    assert "calibrated" in model.source


def test_the_predicted_step_time_states_the_traced_experts_and_the_measured_copy(tmp_path, capsys):
    # 64 hidden in fp32 and top-2: 256 bytes of row + 2 x 2 x 4 bytes of routing slots = 272 bytes a per-rank copy;
    # the traced experts: ffn 96, GELU (2 matrices). The summary said "hidden 68, ffn 238" (made of the bytes).
    run = tmp_path / "run"
    header = {"hidden_size": 64, "ffn_hidden_size": 96, "expert_matrices": 2, "dtype": "fp32"}
    recorder = RoutingTraceRecorder(
        run / "profile" / "traces", num_layers=1, num_experts=8, top_k=2, source="test", extra_header=header
    )
    for step in range(4):
        recorder.step = step
        recorder.record(0, torch.from_numpy(synthetic_expert_ids(200, 8, 2, seed=step).astype(np.int64)))
    recorder.close()
    record = {"ep_rank": 0, "tokens": 200, "send_copies": [90, 110], "bytes_per_copy": 272, "time_ms": {"dispatch": 1}}
    (run / "profile" / "comm").mkdir()
    (run / "profile" / "comm" / "comm-rank000.jsonl").write_text(json.dumps(record) + "\n")
    argv = ["plan", "--traces", run, "--ranks", 2, "--calibrate", run, "--out", tmp_path / "p.json", "-q"]
    code, text, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "tokens/rank, hidden 64, ffn 96, 272 bytes a copy (measured), " in text
    assert load_plan(tmp_path / "p.json").data["predicted"]["predicted_step_ms"] > 0


# ---- the bugs --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4, 8])
def test_pairwise_prediction_is_possible_for_any_k(k):
    """A top-k co-activation matrix: the estimated copies per token lie in [1, min(k, R)] (the old bound gave 0.07
    at 2 ranks for top-8), and equal the exact trace value for top-2."""
    E, R = 16, 2
    ids = synthetic_expert_ids(3000, E, k, num_clusters=2, seed=k)
    exact = routing_from_expert_ids(ids, E)
    pairwise = routing_from_coactivation(coactivation_from_ids(ids, E))
    layout = ExpertLayout(partition_kahypar(exact, R), R)
    estimate = layer_metrics(pairwise, layout)["copies_per_token"]
    truth = layer_metrics(exact, layout)["copies_per_token"]
    assert 1.0 <= estimate <= min(k, R)
    if k == 2:
        assert estimate == pytest.approx(truth)


def test_replicas_of_one_expert_never_share_a_gpu():
    """One expert far hotter than the rest gets replicas on as many GPUs as it may, and never two on one GPU; the
    packing that once stacked them (hot replicas first, few slots) included."""
    load = np.array([[1000.0, 1, 1, 1], [5, 5, 5, 500], [10, 9, 8, 7]])
    for replicas in (8, 12, 16):
        phy2log, _, logcnt = replicate_hot_experts(load, replicas, 4)
        for layer in phy2log.reshape(3, 4, -1):
            for gpu in layer:
                assert len(set(gpu.tolist())) == len(gpu)
        assert (logcnt <= 4).all() and (logcnt.sum(axis=1) == replicas).all()


def test_bad_files_get_one_line_each(tmp_path, capsys, run_dir):
    ids = synthetic_expert_ids(200, 8, 2, seed=0)
    good = tmp_path / "counts.npz"
    np.savez(good, coactivation=coactivation_from_ids(ids, 8)[None], tokens=np.array([200]))
    truncated = tmp_path / "counts-rank000.npz"
    truncated.write_bytes(good.read_bytes()[:100])
    bad_npy = tmp_path / "bad.npy"
    bad_npy.write_bytes(b"\x93NUMPY garbage")
    plan_dir = tmp_path / "plans"
    plan_dir.mkdir()
    cases = [
        (["plan", "--coactivation", truncated, "--ranks", 2, "--out", tmp_path / "p.json"], str(truncated)),
        (["plan", "--coactivation", bad_npy, "--ranks", 2, "--out", tmp_path / "p.json"], str(bad_npy)),
        (["plan", "--coactivation", good, "--ranks", 2, "--out", plan_dir], f"--out {plan_dir} is a directory"),
        (
            [
                "plan",
                "--coactivation",
                good,
                "--ranks",
                2,
                "--calibrate",
                plan_dir / "no",
                "--out",
                tmp_path / "p.json",
            ],
            "does not exist",
        ),
    ]
    for argv, needle in cases:
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert run_cli(capsys, "plan", "--coactivation", good, "--ranks", 2, "--out", tmp_path / "p.json")[0] == 0
    code, out, err = run_cli(capsys, "export", "--plan", tmp_path / "p.json", "--format", "eplb", "--out", plan_dir)
    assert code == 2 and "is a directory" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_capped_plan_for_one_rank_needs_no_mt_kahypar(monkeypatch):
    """One rank holds every expert: the plan is that, whatever the cap, and asks nothing of Mt-KaHyPar (the GPU
    host has none: ep_bench's capped layout on one GPU failed there)."""
    import placement.methods as methods
    from placement.errors import PlacementError
    from placement.methods import plan_placement

    def missing(threads):
        raise PlacementError("method 'kahypar' needs Mt-KaHyPar")

    monkeypatch.setattr(methods, "_mtkahypar", missing)
    routing = routing_from_expert_ids(synthetic_expert_ids(500, 8, 2, seed=0), 8)
    (layout,) = plan_placement([routing], 1, max_load=1.1, progress=False)
    assert layout.as_array().tolist() == [0] * 8


def test_a_plan_is_kept_or_dropped_on_the_planning_tokens_and_reported_on_the_held_out_ones():
    """Whether a layer keeps contiguous placement is decided on the tokens the plan was made on: deciding on the
    held-out tokens and then reporting on them meant that no layer could ever show a loss (selection on the test
    set). The held-out report follows the decision, wins and losses alike."""
    from placement.evaluate import keep_contiguous_where_plan_loses

    def results(plan_copies, contig_copies):
        def layers(copies):
            return [{"layer": i, "tokens": 10, "copies_per_token": c, "load_imbalance": 1.0, "exact": True}
                    for i, c in enumerate(copies)]  # fmt: skip

        return {"plan": {"layers": layers(plan_copies)}, "contiguous": {"layers": layers(contig_copies)}}

    layouts = [ExpertLayout((1, 0, 0, 1), 2), ExpertLayout((1, 0, 1, 0), 2)]
    judged = results([1.5, 1.9], [1.6, 1.8])  # planning tokens: the plan wins layer 0, loses layer 1
    held_out = results([1.7, 1.7], [1.6, 1.8])  # held out the other way round
    kept, switched = keep_contiguous_where_plan_loses(judged, layouts, None, held_out)
    assert switched == [1] and kept[0] == layouts[0] and kept[1] == ExpertLayout.contiguous(4, 2)
    assert [e["copies_per_token"] for e in held_out["plan"]["layers"]] == [1.7, 1.8]  # layer 0's loss is shown
