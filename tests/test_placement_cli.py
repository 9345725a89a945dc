"""`c2r-place` end to end on traces written by the profiler's recorder: plan, evaluate, export, and bad input
(exit code 2 with a message naming the values, never a traceback)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from placement.cli import main
from placement.methods import METHODS
from placement.plan import load_plan
from placement.synthetic import synthetic_expert_ids
from profiling.trace import RoutingTraceRecorder, TraceConfig

E, K, L = 16, 4, 3


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory (run/profile/traces) with clustered routing over 6 steps, 100 tokens per layer per step."""
    run = tmp_path_factory.mktemp("run")
    recorder = RoutingTraceRecorder(
        run / "profile" / "traces",
        num_layers=L,
        num_experts=E,
        top_k=K,
        source="test",
        config=TraceConfig(shard_rows=256),
    )
    for step in range(6):
        recorder.step = step
        for layer in range(L):
            ids = synthetic_expert_ids(100, E, K, num_clusters=4, seed=100 * layer + step, structure_seed=layer).astype(
                np.int64
            )
            ids[np.random.default_rng(step).random(ids.shape) < 0.05] = -1  # a few empty slots
            recorder.record(layer, torch.from_numpy(ids))
    recorder.close()
    return run


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_evaluate_export(run_dir, tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    code, out, err = run_cli(
        capsys, "plan", "--traces", run_dir, "--ranks", 4, "--nodes", 2, "--holdout", 0.34, "--out", plan_path, "-q"
    )
    assert code == 0, err
    assert "copies/tok" in out and "contig" in out and "random" in out and f"wrote {plan_path}" in out
    assert "predicted on the held-out steps >= 4" in out
    plan = load_plan(plan_path, num_layers=L, num_experts=E, num_ranks=4)
    data = plan.data
    assert data["inputs"]["kind"] == "traces" and data["inputs"]["digest"].startswith("sha256:")
    assert data["inputs"]["holdout"]["first_held_out_step"] == 4
    assert data["predicted"]["copies_per_token"] < data["baseline_contiguous"]["copies_per_token"]
    assert data["layers"][0]["predicted"]["tokens"] == 200  # held-out steps 4 and 5

    code, out, err = run_cli(capsys, "evaluate", "--plan", plan_path, "--traces", run_dir, "--json", "-q")
    assert code == 0, err
    doc = json.loads(out[out.index("{") :])
    assert set(doc) >= {"plan", "contiguous", "random"}
    # the plan's own holdout is reused on its own traces, so evaluate reproduces the prediction
    assert doc["plan"]["overall"]["copies_per_token"] == pytest.approx(data["predicted"]["copies_per_token"])
    assert doc["plan"]["layers"][0]["cross_rank_bytes_per_token"] > 0
    code, out, _ = run_cli(
        capsys,
        "evaluate",
        "--plan",
        plan_path,
        "--traces",
        run_dir,
        "--holdout",
        0,
        "--hidden",
        1024,
        "--dtype",
        "fp32",
        "-q",
    )
    assert code == 0 and "cross KiB/tok" in out and "nodes/tok" in out
    assert "  600 " in out  # all 6 steps x 100 tokens

    for fmt in ("eplb", "autoep"):
        out_file = tmp_path / f"{fmt}.json"
        code, out, err = run_cli(capsys, "export", "--plan", plan_path, "--format", fmt, "--out", out_file)
        assert code == 0, err
        doc = json.loads(out_file.read_text())
        assert len(doc["layers"] if fmt == "autoep" else doc["phy2log"]) == L
    code, out, _ = run_cli(capsys, "export", "--plan", plan_path, "--format", "autoep")
    assert json.loads(out)["layers"][0]["expert_placement"]["ep_size"] == 4


def test_every_method_plans_from_traces(run_dir, tmp_path, capsys):
    for method in METHODS:
        if method == "exact":
            continue  # 16 experts on 4 ranks is beyond enumeration
        code, _, err = run_cli(
            capsys,
            "plan",
            "--traces",
            run_dir,
            "--ranks",
            4,
            "--method",
            method,
            "--out",
            tmp_path / f"{method}.json",
            "-q",
        )
        assert code == 0, (method, err)
        assert load_plan(tmp_path / f"{method}.json").method == method


def test_plan_from_coactivation(tmp_path, capsys):
    ids = synthetic_expert_ids(500, 8, 2, num_clusters=2, seed=1)
    onehot = np.zeros((500, 8), dtype=np.int64)
    onehot[np.arange(500)[:, None], ids] = 1
    np.save(tmp_path / "c.npy", np.stack([onehot.T @ onehot] * 2))
    code, out, err = run_cli(
        capsys,
        "plan",
        "--coactivation",
        tmp_path / "c.npy",
        "--ranks",
        2,
        "--method",
        "exact",
        "--out",
        tmp_path / "p.json",
    )
    assert code == 0, err
    assert "pairwise approximation" in out
    assert load_plan(tmp_path / "p.json").data["inputs"]["kind"] == "coactivation"


def test_bad_input_exits_2_with_a_message(run_dir, tmp_path, capsys):
    cases = [
        (
            ["plan", "--traces", run_dir, "--ranks", 3, "--out", tmp_path / "x.json"],
            "ranks (3) must divide experts (16)",
        ),
        (
            ["plan", "--traces", run_dir, "--ranks", 4, "--nodes", 3, "--out", tmp_path / "x.json"],
            "nodes (3) must divide ranks (4)",
        ),
        (["plan", "--traces", tmp_path / "nope", "--ranks", 4, "--out", tmp_path / "x.json"], "does not exist"),
        (
            ["plan", "--traces", run_dir, "--ranks", 4, "--holdout", 2, "--out", tmp_path / "x.json"],
            "fraction in (0, 1); got 2.0",
        ),
    ]
    np.save(tmp_path / "bad.npy", np.ones((3, 4)))
    cases.append(
        (
            ["plan", "--coactivation", tmp_path / "bad.npy", "--ranks", 2, "--out", tmp_path / "x.json"],
            "got shape [3, 4]",
        )
    )
    np.save(tmp_path / "zeros.npy", np.zeros((8, 8), dtype=np.int64))  # no tokens: refused before a plan is written
    cases.append(
        (
            ["plan", "--coactivation", tmp_path / "zeros.npy", "--ranks", 2, "--out", tmp_path / "zeros.npy.json"],
            "no routed tokens",
        )
    )
    np.save(tmp_path / "asym.npy", np.array([[0, 1], [2, 0]]))
    cases.append(
        (["plan", "--coactivation", tmp_path / "asym.npy", "--ranks", 2, "--out", tmp_path / "x.json"], "not symmetric")
    )
    other = tmp_path / "other.json"
    main(["plan", "--traces", str(run_dir), "--ranks", "2", "--out", str(other), "-q"])
    data = json.loads(other.read_text())
    data["num_experts"] = 32
    data["layers"] = [dict(e, expert_to_rank=[0] * 16 + [1] * 16, rank_to_experts=None) for e in data["layers"]]
    for e in data["layers"]:
        e.pop("rank_to_experts")
    (tmp_path / "wrong.json").write_text(json.dumps(data))
    cases.append(
        (
            ["evaluate", "--plan", tmp_path / "wrong.json", "--traces", run_dir],
            "plan for 32 experts, but 16 experts were expected",
        )
    )
    data["version"] = 7
    (tmp_path / "v7.json").write_text(json.dumps(data))
    cases.append((["export", "--plan", tmp_path / "v7.json", "--format", "eplb"], "plan version 7"))
    # co-activation counts that no routing can produce: a pair counted more often than an expert's load, and
    # 'tokens' below the busiest expert's load (or negative): refused, no plan written
    counts = np.array([[5, 3, 1, 0], [3, 4, 2, 0], [1, 2, 3, 1], [0, 0, 1, 2]])
    zero_diag = counts.copy()
    zero_diag[0, 0] = 0
    np.save(tmp_path / "zerodiag.npy", zero_diag)
    np.savez(tmp_path / "negtok.npz", coactivation=counts[None], tokens=np.array([-7]))
    np.savez(tmp_path / "fewtok.npz", coactivation=counts[None], tokens=np.array([1]))
    for name, message in [
        ("zerodiag.npy", "pair count [0, 1] = 3 exceeds an expert's load"),
        ("negtok.npz", "'tokens' of layer 0 is -7"),
        ("fewtok.npz", "'tokens' of layer 0 is 1"),
    ]:
        out = tmp_path / f"{name}.json"
        cases.append((["plan", "--coactivation", tmp_path / name, "--ranks", 2, "--out", out], message))
    # numeric flags out of range: one argparse line each
    for flag, value in [("--threads", -3), ("--max-tokens", -5), ("--hidden", -4096), ("--ranks", 0)]:
        argv = ["plan", "--traces", run_dir, "--ranks", 4, "--out", tmp_path / "x.json", flag, value]
        cases.append((argv, f"argument {flag}: expected an integer"))
    cases.append((["evaluate", "--plan", other, "--traces", run_dir, "--nodes", 0], "argument --nodes"))
    (tmp_path / "file.txt").write_text("x")
    argv = [
        "plan",
        "--traces",
        run_dir,
        "--ranks",
        4,
        "--out",
        tmp_path / "x.json",
        "--calibrate",
        tmp_path / "file.txt",
    ]
    cases.append((argv, "is not a directory; give a profiled run's directory"))
    for argv, message in cases:
        capsys.readouterr()
        try:
            code, out, err = run_cli(capsys, *argv)
        except SystemExit as stop:  # argparse's one line
            code, (out, err) = stop.code, capsys.readouterr()
        assert code == 2, (argv, out, err)
        assert message in err and "Traceback" not in err, (argv, err)
    assert not any(p.name.endswith(".npz.json") or p.name.endswith(".npy.json") for p in tmp_path.iterdir())


def _record(path, steps_by_layer: dict[int, range], sample_rate: float = 1.0, tokens: int = 200):
    """Clustered top-4 routing of 16 experts, layer l recorded at the steps ``steps_by_layer[l]``."""
    recorder = RoutingTraceRecorder(
        path, num_layers=len(steps_by_layer), num_experts=E, top_k=K, source="test",
        config=TraceConfig(shard_rows=256, sample_rate=sample_rate),
    )  # fmt: skip
    for step in range(max(max(s) for s in steps_by_layer.values()) + 1):
        recorder.step = step
        for layer, steps in steps_by_layer.items():
            if step in steps:
                ids = synthetic_expert_ids(tokens, E, K, num_clusters=4, seed=10 * layer + step, structure_seed=layer)
                recorder.record(layer, torch.from_numpy(ids.astype(np.int64)))
    recorder.close()
    return path


@pytest.mark.parametrize("short_layer", [0, 1])
def test_per_step_load_is_shown_only_where_every_layer_has_it(tmp_path, capsys, short_layer):
    """A layer with one held-out step has no per-step load: then no per-step column for any layer, every row as
    long as the header, and the summary compares pooled loads (whichever layer is short)."""
    steps = {layer: range(4) for layer in range(2)}
    steps[short_layer] = range(3)
    traces = _record(tmp_path / "traces", steps)
    plan = tmp_path / "p.json"
    code, out, err = run_cli(
        capsys, "plan", "--traces", traces, "--ranks", 4, "--nodes", 2, "--holdout", 0.5, "--out", plan, "-q"
    )
    assert code == 0, err
    assert "per step" not in out.splitlines()[-1]
    code, out, err = run_cli(capsys, "evaluate", "--plan", plan, "--traces", traces, "--nodes", 2, "--holdout", 0.5)
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.strip().startswith("layer"))
    rows = [line.split() for line in out.splitlines() if line.strip().split(" ")[0] in ("0", "1", "all")]
    assert "per step" not in header and len({len(row) for row in rows}) == 1, out
    # every layer with two held-out steps: the column and the summary's per-step clause are there
    both = _record(tmp_path / "both", {0: range(4), 1: range(4)})
    code, out, err = run_cli(capsys, "plan", "--traces", both, "--ranks", 4, "--holdout", 0.5, "--out", plan, "-q")
    assert code == 0 and "; per step" in out.splitlines()[-1], out
    code, out, err = run_cli(capsys, "evaluate", "--plan", plan, "--traces", both, "--holdout", 0.5)
    header = next(line for line in out.splitlines() if line.strip().startswith("layer"))
    rows = [line.split() for line in out.splitlines() if line.strip().split(" ")[0] in ("0", "1", "all")]
    assert "per step" in header and len({len(row) for row in rows}) == 1, out


def test_a_sampled_trace_has_no_per_step_loads(tmp_path):
    """A sampled trace's steps hold a fraction of their tokens: its per-step loads are not used (no per-step cap,
    no per-step metric), and the input record says why."""
    from placement.inputs import load_trace_input

    inp = load_trace_input(_record(tmp_path / "sampled", {0: range(4)}, sample_rate=0.5), holdout=0.5, progress=False)
    assert inp.plan_routings[0].step_load_SE is None and inp.eval_routings[0].step_load_SE is None
    assert "samples 50.00% of the tokens" in inp.info["step_loads"]
    full = load_trace_input(_record(tmp_path / "full", {0: range(4)}), holdout=0.5, progress=False)
    assert full.plan_routings[0].step_load_SE.shape == (2, E) and "step_loads" not in full.info


def test_help_on_every_subcommand():
    for argv in ([], ["plan"], ["evaluate"], ["export"], ["simulate"]):
        out = subprocess.run([sys.executable, "-m", "placement.cli", *argv, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "usage: c2r-place" in out.stdout
    # The c2r-place console script adds `apply` and `reshard` (checkpoint surgery lives in c2r, above placement).
    for argv in ([], ["plan"], ["evaluate"], ["apply"], ["reshard"], ["export"], ["simulate"]):
        out = subprocess.run([sys.executable, "-m", "c2r.place_cli", *argv, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "usage: c2r-place" in out.stdout
        if not argv:
            assert "{plan,evaluate,apply,reshard,export,simulate}" in out.stdout


def test_topology_map_plans_from_traces_and_evaluates_against_two_level(run_dir, tmp_path, capsys):
    plans, fanout = {}, {}
    for topology in ("two-level", "map"):
        out = tmp_path / f"{topology}.json"
        code, _, err = run_cli(
            capsys, "plan", "--traces", run_dir, "--ranks", 4, "--nodes", 2, "--topology", topology, "--out", out, "-q"
        )
        assert code == 0, (topology, err)
        plans[topology] = load_plan(out)
        assert plans[topology].data["options"]["topology"] == topology
        code, report, err = run_cli(capsys, "evaluate", "--plan", out, "--traces", run_dir, "--json")
        assert code == 0, err
        report = json.loads(report)
        fanout[topology] = report["plan"]["overall"]["node_fanout_per_token"]
        fanout["contiguous"] = report["contiguous"]["overall"]["node_fanout_per_token"]
    for layout in plans["map"].layouts:
        assert sorted(np.bincount(layout.expert_to_rank, minlength=4).tolist()) == [4, 4, 4, 4]  # exactly E/R per rank
    # Both put clustered experts together: fewer nodes per token than the contiguous placement.
    assert fanout["map"] < fanout["contiguous"] and fanout["two-level"] < fanout["contiguous"], fanout


def test_evaluate_uses_the_traced_hidden_size_and_dtype(tmp_path, capsys):
    """A trace of a 128-wide fp32 model: evaluate counts 128 x 4 = 512 bytes per token copy (not 4096 x bf16) and
    says so; --hidden / --dtype still override; a run whose header predates the fields falls back on profile.json
    and the all-to-all records' bytes per copy."""
    run = tmp_path / "run"
    recorder = RoutingTraceRecorder(
        run / "profile" / "traces", num_layers=1, num_experts=E, top_k=K, source="test",
        extra_header={"hidden_size": 128, "dtype": "fp32"},
    )  # fmt: skip
    for step in range(2):
        recorder.step = step
        recorder.record(0, torch.from_numpy(synthetic_expert_ids(100, E, K, seed=step).astype(np.int64)))
    recorder.close()
    plan_path = tmp_path / "plan.json"
    code, out, err = run_cli(capsys, "plan", "--traces", run, "--ranks", 4, "--out", plan_path, "-q")
    assert code == 0, err
    assert "bytes per token copy: 512 = hidden 128 (traced, from the trace header), dtype fp32 (traced" in out

    code, out, err = run_cli(capsys, "evaluate", "--plan", plan_path, "--traces", run, "-q")
    assert code == 0, err
    assert "bytes per token copy: 512 = hidden 128 (traced, from the trace header)" in out
    code, out, _ = run_cli(capsys, "evaluate", "--plan", plan_path, "--traces", run, "--json", "-q")
    traced = json.loads(out[out.index("{") :])
    layer = traced["plan"]["layers"][0]
    assert traced["bytes"]["hidden"] == 128 and traced["bytes"]["dtype"] == "fp32"
    assert layer["cross_rank_bytes_per_token"] == pytest.approx(layer["cross_rank_copies_per_token"] * 512)
    argv = ("evaluate", "--plan", plan_path, "--traces", run, "--hidden", 4096, "--dtype", "bf16", "--json", "-q")
    code, out, _ = run_cli(capsys, *argv)
    given = json.loads(out[out.index("{") :])
    assert given["bytes"]["used"].endswith("hidden 4096 (--hidden), dtype bf16 (--dtype)")
    assert given["plan"]["layers"][0]["cross_rank_bytes_per_token"] == pytest.approx(
        16 * layer["cross_rank_bytes_per_token"]
    )

    # an older run: nothing in the header, hidden_size in profile.json, the dtype from the all-to-all records
    header_path = run / "profile" / "traces" / "header.json"
    header = json.loads(header_path.read_text())
    header_path.write_text(json.dumps({k: v for k, v in header.items() if k not in ("hidden_size", "dtype")}))
    (run / "profile" / "profile.json").write_text(json.dumps({"hidden_size": 64}))
    (run / "profile" / "comm").mkdir()
    (run / "profile" / "comm" / "comm-rank000.jsonl").write_text(json.dumps({"bytes_per_copy": 128}) + "\n")
    code, out, err = run_cli(capsys, "evaluate", "--plan", plan_path, "--traces", run, "--holdout", 0, "-q")
    assert code == 0, err
    assert "bytes per token copy: 128 = hidden 64 (traced, from profile.json and the all-to-all records' " in out
    (run / "profile" / "profile.json").unlink()
    code, out, err = run_cli(capsys, "evaluate", "--plan", plan_path, "--traces", run, "--holdout", 0, "-q")
    assert code == 0, err
    assert "bytes per token copy: 8192 = hidden 4096 (a default: not recorded), dtype bf16 (a default" in out
