"""c2r-place simulate (placement/simulate.py): copies counted per dispatch mode against an independent per-token
recount, the time model's sanity, the one-line errors and the CLI end to end on a tiny trace."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from placement.cost import CostModel, fit_latency_bandwidth
from placement.layout import ExpertLayout
from placement.simulate import Cluster, copies_per_token, dispatch_rows, predict_layer, slot_ranks, source_ranks
from placement.synthetic import synthetic_expert_ids
from profiling.trace import RoutingTraceRecorder, TraceConfig
from tests.test_placement_cli import run_cli

E, K = 8, 3


def recount(ids_NK: np.ndarray, e2r: list[int], R: int, W: int) -> dict[str, dict[str, int]]:
    """Rows per mode split into all / inter-node / intra-node, token by token, straight from the dispatch rules."""
    dest_NK = np.where(ids_NK >= 0, np.asarray(e2r)[np.maximum(ids_NK, 0)], -1)
    return recount_destinations(dest_NK, R, W)


def recount_destinations(dest_NK: np.ndarray, R: int, W: int) -> dict[str, dict[str, int]]:
    """``recount`` from each slot's destination rank (-1: empty)."""
    out = {m: {"all": 0, "inter": 0, "intra": 0} for m in ("per-expert", "per-rank", "per-node")}
    N = len(dest_NK)

    def add(mode, s, d):
        out[mode]["all"] += 1
        if s // W != d // W:
            out[mode]["inter"] += 1
        elif s != d:
            out[mode]["intra"] += 1

    for t, row in enumerate(dest_NK):
        s = t * R // N  # contiguous blocks of tokens per source rank
        dests = [int(d) for d in row if d >= 0]
        for d in dests:
            add("per-expert", s, d)
        for d in set(dests):
            add("per-rank", s, d)
        for node in {d // W for d in dests}:
            forwarder = node * W + s % W
            add("per-node", s, forwarder)  # over the network (or to itself, on its own node)
            for d in {d for d in dests if d // W == node}:
                add("per-node", forwarder, d)  # within the destination node
    return out


def hand_made_trace() -> np.ndarray:
    # 8 tokens over 4 ranks (2 each); experts 0-1 on rank 0, 2-3 on rank 1 (node 0), 4-5 rank 2, 6-7 rank 3 (node 1)
    return np.array(
        [
            [0, 1, -1],  # rank 0: both on its own rank: per-rank 1 local copy, per-node 1 local + 1 local
            [0, 4, 6],  # rank 0: nodes {0, 1}: 1 network copy to rank 2, forwarded to rank 3
            [2, 5, 7],  # rank 1: own node rank 1 (local), node 1 via rank 3 -> ranks 2 and 3
            [-1, -1, -1],  # rank 1: an empty token sends nothing
            [1, 3, 5],  # rank 2
            [6, 7, 4],  # rank 2
            [0, 2, 3],  # rank 3: node 0 via rank 1 -> ranks 0 and 1
            [5, 5, 6],  # rank 3: a repeated expert is one pair per slot (per-expert) but one rank
        ]
    )


@pytest.mark.parametrize("e2r", [[0, 0, 1, 1, 2, 2, 3, 3], [3, 1, 0, 2, 1, 3, 2, 0]])
def test_copies_equal_an_independent_recount(e2r):
    ids, cluster = hand_made_trace(), Cluster(2, 2)
    rows = dispatch_rows(slot_ranks(ids, ExpertLayout(tuple(e2r), 4)), source_ranks(len(ids), 4), cluster)
    got = copies_per_token(rows, len(ids), cluster)
    want = recount(ids, e2r, 4, 2)
    for mode in want:
        for key in ("all", "inter", "intra"):
            assert got[mode][key] * len(ids) == pytest.approx(want[mode][key]), (mode, key)
    # worked by hand for the contiguous layout: 20 valid slots; per-node sends 4 network copies (tokens 1, 2, 4 and 6
    # reach one remote node each; the others stay on their own node)
    if e2r == [0, 0, 1, 1, 2, 2, 3, 3]:
        assert want["per-expert"]["all"] == 20 and want["per-node"]["inter"] == 4


def test_per_node_network_copies_are_the_distinct_remote_nodes_on_synthetic_routing():
    ids = synthetic_expert_ids(800, 32, 6, num_clusters=4, seed=3)
    cluster = Cluster(4, 2)
    e2r = np.random.default_rng(0).permutation(np.arange(32) % 8)
    rows = dispatch_rows(slot_ranks(ids, ExpertLayout(tuple(e2r.tolist()), 8)), source_ranks(800, 8), cluster)
    got = copies_per_token(rows, 800, cluster)
    src = source_ranks(800, 8)
    remote_nodes = sum(len({e2r[e] // 2 for e in row} - {src[t] // 2}) for t, row in enumerate(ids))
    assert got["per-node"]["inter"] * 800 == pytest.approx(remote_nodes)
    want = recount(ids, e2r.tolist(), 8, 2)
    assert got["per-rank"]["inter"] * 800 == pytest.approx(want["per-rank"]["inter"])
    assert got["per-node"]["intra"] * 800 == pytest.approx(want["per-node"]["intra"])


def test_predicted_time_falls_as_bandwidth_rises_and_latency_adds_per_peer():
    ids = synthetic_expert_ids(512, 16, 4, seed=1)
    layout, cluster = ExpertLayout.contiguous(16, 8), Cluster(2, 4)
    base = CostModel(tokens_per_rank=1024, hidden=512, ffn=256, latency_us=0.0)
    slow = predict_layer(ids, layout, cluster, base)
    fast_inter = predict_layer(ids, layout, cluster, CostModel(**{**vars(base), "inter_node_gb_s": 400.0}))
    fast_intra = predict_layer(ids, layout, cluster, CostModel(**{**vars(base), "intra_node_gb_s": 800.0}))
    for mode in slow:
        assert fast_inter[mode]["all_to_all_ms"] < slow[mode]["all_to_all_ms"]
        assert fast_intra[mode]["all_to_all_ms"] < slow[mode]["all_to_all_ms"]
        assert fast_inter[mode]["step_ms"] < slow[mode]["step_ms"]
        assert slow[mode]["latency_ms"] == 0.0
    with_latency = predict_layer(ids, layout, cluster, CostModel(**{**vars(base), "latency_us": 10.0}))
    # forward + backward: per-expert 2 x 2 exchanges over 7 peers; per-node 2 x (2 inter over 1 peer + 4 intra over 3)
    assert with_latency["per-expert"]["latency_ms"] == pytest.approx(2 * 2 * 7 * 0.010)
    assert with_latency["per-node"]["latency_ms"] == pytest.approx(2 * (3 * 1 + 3 * 3) * 0.010)
    # per-node sends fewer rows over the network than per-rank, which sends fewer than per-expert
    inter = {m: slow[m]["inter_node_copies_per_token"] for m in slow}
    assert inter["per-node"] < inter["per-rank"] < inter["per-expert"]


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    recorder = RoutingTraceRecorder(
        run / "profile" / "traces", num_layers=2, num_experts=E, top_k=K, source="test", config=TraceConfig()
    )
    for layer in range(2):
        ids = synthetic_expert_ids(64, E, K, num_clusters=2, seed=layer, structure_seed=layer).astype(np.int64)
        recorder.record(layer, torch.from_numpy(ids))
    recorder.close()
    return run


def test_cli_end_to_end_on_a_tiny_trace(trace_dir, tmp_path, capsys):
    out_json = tmp_path / "sim.json"
    code, out, err = run_cli(
        capsys, "simulate", "--traces", trace_dir, "--nodes", 2, "--gpus-per-node", 2, "--method", "greedy",
        "--hidden", 64, "--json", out_json, "-q",
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith("PREDICTED by a cost model, not measured: 2 node(s) x 2 GPU(s) = 4 ranks")
    assert "50 GB/s inter-node" in out and "hidden 64" in out
    doc = json.loads(out_json.read_text())
    assert doc["predicted"] is True and len(doc["layers"]) == 2
    for layer, plans in enumerate(doc["layers"]):
        assert set(plans) == {"contiguous", "planned", "capped"}
        for plan, modes in plans.items():
            e2r = doc["expert_to_rank"][plan][layer]
            from profiling.reader import read_traces

            ids = read_traces(trace_dir / "profile" / "traces", progress=False).expert_ids[layer]
            want = recount(ids, e2r, 4, 2)
            for mode, m in modes.items():
                assert m["step_ms"] > m["all_to_all_ms"] > 0
                assert m["inter_node_copies_per_token"] * len(ids) == pytest.approx(want[mode]["inter"])


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--nodes", 4, "--gpus-per-node", 4], "= 16 ranks, but the traces have 8 experts"),
        (["--nodes", 3, "--gpus-per-node", 1], "ranks must divide 8"),
        (["--nodes", 0, "--gpus-per-node", 2], "--nodes must be a whole number >= 1; got 0"),
        (["--nodes", 1, "--gpus-per-node", 2, "--inter-gb-s", "0"], "expected a number > 0; got '0'"),
        (["--nodes", 1, "--gpus-per-node", 2, "--latency-us", "-1"], "expected a number >= 0; got '-1'"),
        (["--nodes", 1, "--gpus-per-node", 2, "--calibrate", "/nonexistent/cal.json"], "does not exist"),
    ],
)
def test_bad_input_is_one_line(trace_dir, capsys, argv, needle):
    try:
        code, _, err = run_cli(capsys, "simulate", "--traces", trace_dir, "-q", *argv)
    except SystemExit as stop:  # argparse's own checks
        code, (_, err) = stop.code, capsys.readouterr()
    assert code == 2 and needle in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_traces_and_help(tmp_path, capsys):
    code, _, err = run_cli(capsys, "simulate", "--traces", tmp_path / "none", "--nodes", 1, "--gpus-per-node", 2)
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    out = subprocess.run([sys.executable, "-m", "placement.cli", "simulate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--gpus-per-node" in out.stdout and "PREDICT" in out.stdout


def test_calibration_json_sets_the_rates_and_flags_still_win(trace_dir, tmp_path, capsys):
    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps({"intra_node_gb_s": 2.5, "inter_node_gb_s": 1.5, "latency_us": 900, "source": "a fit"}))
    argv = ["simulate", "--traces", trace_dir, "--nodes", 2, "--gpus-per-node", 2, "--method", "greedy", "-q"]
    code, out, err = run_cli(capsys, *argv, "--calibrate", cal, "--latency-us", 100)
    assert code == 0, err
    header = out.splitlines()[0]
    assert "2.5 GB/s intra-node, 1.5 GB/s inter-node" in header and "100 us per peer" in header
    assert f"calibrated on {cal} (a fit)" in header
    cal.write_text(json.dumps({"bandwidth": 3}))
    code, _, err = run_cli(capsys, *argv, "--calibrate", cal)
    assert code == 2 and "holds none of intra_node_gb_s" in err and len(err.strip().splitlines()) == 1
    for bad, needle in (({"latency_us": "fast"}, "must be numbers: {'latency_us': 'fast'}"),
                        ({"intra_node_gb_s": -2}, "intra_node_gb_s must be > 0; got -2")):  # fmt: skip
        cal.write_text(json.dumps(bad))
        code, _, err = run_cli(capsys, *argv, "--calibrate", cal)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_fit_latency_bandwidth_recovers_the_rates_of_synthetic_records():
    # records of 2 forward token exchanges (per-expert) and 4 (per-node's stages): time = exchanges x 50 us + bytes /
    # 2 GB/s; the metadata and backward exchanges are left out of the fit
    records = []
    for remote, names in ((1000, ("dispatch", "combine")), (4000, ("dispatch", "combine")),
                          (2500, ("dispatch_inter", "dispatch_intra", "combine_intra", "combine_inter"))):  # fmt: skip
        seconds = len(names) * 50e-6 + 2 * remote * 512 / 2e9
        times = {n: seconds * 1e3 / len(names) for n in names}
        records.append({"ep_rank": 0, "send_copies": [7, remote], "bytes_per_copy": 512,
                        "time_ms": {**times, "dispatch_meta": 9.0, "combine_backward": 9.0}})  # fmt: skip
    latency_us, gb_s = fit_latency_bandwidth(records)
    assert latency_us == pytest.approx(50.0) and gb_s == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no cross-rank bytes"):
        fit_latency_bandwidth([{"ep_rank": 0, "send_copies": [5, 0], "time_ms": {"dispatch": 1.0}}] * 2)


def test_replicated_layouts_are_counted_with_the_dispatchers_copy_rule():
    # The recount takes each slot's rank from c2r/parallel/replicas.py (what the dispatchers run, in torch), per
    # source rank; the simulator uses its numpy twin. Every mode's copies (all / inter / intra) must agree.
    from c2r.parallel.replicas import CopyChooser

    ids = synthetic_expert_ids(800, 8, 3, num_clusters=2, seed=5)
    layout = ExpertLayout.from_json([[0, 1, 2, 3], 0, 1, 1, 2, [2, 3], 3, 0], 4, num_experts=8)
    cluster, src = Cluster(2, 2), source_ranks(800, 4)
    got = copies_per_token(dispatch_rows(slot_ranks(ids, layout, src), src, cluster), 800, cluster)
    chooser, every = CopyChooser(layout), torch.ones(200, 3, dtype=torch.bool)
    dest = np.concatenate([chooser.physical(torch.from_numpy(ids[src == r]).long(), every).numpy() for r in range(4)])
    want = recount_destinations(dest // layout.experts_per_rank, 4, 2)
    for mode in want:
        for key in ("all", "inter", "intra"):
            assert got[mode][key] * 800 == pytest.approx(want[mode][key]), (mode, key)
    unreplicated = recount(ids, [0, 0, 1, 1, 2, 2, 3, 3], 4, 2)
    assert want["per-rank"]["all"] < unreplicated["per-rank"]["all"]  # the hot expert's copies save copies
    # --copy-choice balanced: the twin of copy_choice="balanced" (its dispatchers: tests/test_replicas.py), every
    # source with the batch's counts; no pair lost, the busiest rank lighter than under the rule
    balanced = slot_ranks(ids, layout, src, "balanced")
    assert ((balanced >= 0) == (ids >= 0)).all()
    load_rule, load_balanced = (np.bincount(d[d >= 0], minlength=4) for d in (slot_ranks(ids, layout, src), balanced))
    assert load_balanced.sum() == load_rule.sum() and load_balanced.max() < load_rule.max(), (load_rule, load_balanced)


def test_cli_adds_the_replicated_plan(trace_dir, tmp_path, capsys):
    out_json = tmp_path / "sim.json"
    code, out, err = run_cli(
        capsys, "simulate", "--traces", trace_dir, "--nodes", 1, "--gpus-per-node", 4, "--method", "greedy",
        "--plans", "contiguous", "--replicas", "+4", "--json", out_json, "-q",
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out_json.read_text())
    assert set(doc["layers"][0]) == {"contiguous", "replicated"}
    replicated = ExpertLayout.from_json(doc["expert_to_rank"]["replicated"][0], 4)
    assert replicated.num_slots == 12 and "replicated  per-rank" in out
    code, out, err = run_cli(
        capsys, "simulate", "--traces", trace_dir, "--nodes", 1, "--gpus-per-node", 4, "--replicas", "5"
    )
    assert code == 2 and "P (5) must be >= experts (8)" in err and err.count("\n") == 1
