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
    for argv, message in cases:
        capsys.readouterr()
        code, out, err = run_cli(capsys, *argv)
        assert code == 2, (argv, out, err)
        assert message in err and "Traceback" not in err, (argv, err)


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
