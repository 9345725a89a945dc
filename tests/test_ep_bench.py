"""benchmarks/ep_bench.py as a smoke test: 2 CPU ranks over gloo, tiny sizes, 1 round; GPU-only contenders skipped."""

import importlib.util
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from c2r.parallel.ports import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--dtype", "float32", "--configs", "tiny", "--rounds", "1", "--iters", "2", "--warmup", "1"]


def run_ep_bench(args: list[str], pythonpath: list[str] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "benchmarks" / "ep_bench.py"), *TINY, *args]  # fmt: skip
    path = os.pathsep.join([*pythonpath, str(REPO), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def ep_bench():
    """The script as a module (its functions, in this process; nothing distributed)."""
    spec = importlib.util.spec_from_file_location("ep_bench", REPO / "benchmarks" / "ep_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture
def without_mtkahypar(tmp_path):
    """A PYTHONPATH entry whose ``mtkahypar`` fails to import, as on a GPU image without the wheel."""
    (tmp_path / "hide" / "mtkahypar").mkdir(parents=True)
    (tmp_path / "hide" / "mtkahypar" / "__init__.py").write_text('raise ImportError("mtkahypar hidden by the test")\n')
    return str(tmp_path / "hide")


def test_ep_bench_runs_on_two_gloo_ranks(tmp_path):
    out = tmp_path / "ep.json"
    proc = run_ep_bench(["--json", str(out), "--profile", "1", "--profile-rows", "3"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| config | routing | contender | plan | ms |" in proc.stdout
    # each row is printed as it completes, before the final table (a run cut short keeps its rows)
    first_row = proc.stdout.index("row | tiny | synthetic | c2r-per-expert-contiguous | - |")
    assert first_row < proc.stdout.index("| config | routing |")
    # only the layouts the contenders use are planned, on a sample, and stderr says how long each took
    assert "ep_bench: tiny: planned on 128 synthetic tokens (kahypar): planned " in proc.stderr
    # --profile: each measured contender's top ops (rank 0), after its timing
    assert "--- profile: tiny synthetic c2r-per-rank-planned, rank 0, 1 steps ---" in proc.stderr
    assert "c10d::alltoall" in proc.stderr

    saved = json.loads(out.read_text())
    assert saved["complete"] and saved["plans"] == {"tiny": "kahypar"}
    rows = {(r["routing"], r["contender"]): r for r in saved["rows"]}
    assert not [key for key, r in rows.items() if "error" in r], proc.stdout
    assert "CUDA" in rows["synthetic", "megablocks-dmoe-ep"]["skipped"]  # skipped with its reason, not a crash
    assert "own gate" in rows["synthetic", "deepspeed-moe-ep"]["skipped"]
    deepspeed = rows["router", "deepspeed-moe-ep"]
    assert deepspeed["ms_median"] > 0  # DeepSpeed's MoE with ep_size 2 runs on CPU ranks
    # its top-2 gate picks the second expert by score, as every other contender does (DeepSpeed's default samples it)
    assert deepspeed["deepspeed_gate"] == {"k": 2, "drop_tokens": False, "top2_2nd_expert_sampling": False}
    for routing in ("synthetic", "router"):
        expert, per_rank = rows[routing, "c2r-per-expert-contiguous"], rows[routing, "c2r-per-rank-contiguous"]
        assert 1 <= per_rank["copies_per_token"] <= expert["copies_per_token"] == 2  # tiny is top-2
        assert per_rank["host_syncs_per_forward"] == 0  # nothing syncs on CPUs; the GPU test counts them
        assert per_rank["all_to_all_ms"] > 0 and "all_to_all_share" in per_rank
    # The plans come from synthetic routing: under the router's routing their rows are skipped, saying why
    for layout in ("planned", "capped", "replicated", "balanced"):
        row = rows["router", f"c2r-per-rank-{layout}"]
        assert "synthetic routing" in row["skipped"] and "plan" not in row, row
    assert rows["synthetic", "c2r-per-rank-planned"]["plan"] == "kahypar"
    assert rows["synthetic", "c2r-per-rank-capped"]["plan"] == "kahypar, --max-load 1.1"
    # The plan is made from a sample of the same clustered routing: it must cut the copies per-rank dispatch sends.
    planned, contiguous = rows["synthetic", "c2r-per-rank-planned"], rows["synthetic", "c2r-per-rank-contiguous"]
    assert planned["copies_per_token"] < contiguous["copies_per_token"]
    # The replicated layout (the plan's homes + 2 replica slots per rank) runs in every mode, dropless: per-expert
    # dispatch still sends each (token, expert) pair once. Whether its load spreads is a GPU-size measurement: at
    # this toy size (128 tokens per rank) the sample it is planned on says little about the routing it runs.
    for mode in ("per-expert", "per-rank", "per-node"):
        replicated, homes = rows["synthetic", f"c2r-{mode}-replicated"], rows["synthetic", f"c2r-{mode}-planned"]
        assert replicated["ms_median"] > 0 and replicated["rank_load_max_mean"] >= 1.0, mode
        saved = replicated["expert_to_rank"]  # the layout's JSON: a rank, or [home, replicas...] per expert
        assert [e if isinstance(e, int) else e[0] for e in saved] == homes["expert_to_rank"], mode
        assert sum(len(e) - 1 for e in saved if isinstance(e, list)) == 2 * 2, mode  # 2 replica slots x 2 ranks
    assert rows["synthetic", "c2r-per-expert-replicated"]["copies_per_token"] == 2
    # The balanced contenders: every expert twice (2 x 8 slots on 2 ranks: each expert on both) and the balanced
    # copy choice, dropless in every mode; with every expert on both ranks the shares level the two ranks, up to
    # each source rank's rounding of its quotas (here 256 pairs a rank: 1.016 is 4 pairs)
    for mode in ("per-expert", "per-rank", "per-node"):
        balanced = rows["synthetic", f"c2r-{mode}-balanced"]
        assert all(isinstance(e, list) and len(e) == 2 for e in balanced["expert_to_rank"]), mode
        assert balanced["ms_median"] > 0 and balanced["rank_load_max_mean"] <= 1.03, (mode, balanced)
        assert balanced["rank_load_max_mean"] < rows["synthetic", f"c2r-{mode}-contiguous"]["rank_load_max_mean"]
    # Overlapped dispatch (c2r/parallel/overlap.py) sends exactly what its plain mode sends.
    for name in ("per-expert-contiguous", "per-rank-planned"):
        for chunks in (2, 4):
            overlapped = rows["synthetic", f"c2r-{name}-overlap{chunks}"]
            assert overlapped["copies_per_token"] == rows["synthetic", f"c2r-{name}"]["copies_per_token"]
            assert overlapped["ms_median"] > 0 and overlapped["host_syncs_per_forward"] == 0


def test_a_planner_named_with_plan_method_that_fails_stops_the_run_in_one_line(without_mtkahypar):
    proc = run_ep_bench(["--plan-method", "kahypar", "--routing", "synthetic", "--contenders",
                         "c2r-per-rank-contiguous", "c2r-per-rank-planned"], [without_mtkahypar])  # fmt: skip
    assert proc.returncode != 0, proc.stdout[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ep_bench:")]
    assert len(lines) == 1 and lines[0].startswith("ep_bench: --plan-method kahypar failed on tiny: PlacementError"), (
        proc.stderr[-3000:]
    )
    assert "row |" not in proc.stdout  # it stops before measuring anything


def test_the_default_planner_falls_back_to_greedy_and_says_so(without_mtkahypar, tmp_path):
    """Without --plan-method a failed Mt-KaHyPar warns and plans with greedy: the plan column names it. With nodes
    of one rank, the inter-node column counts what crosses nodes: per-rank, every remote copy; per-node, the network
    stage alone (its copies/token add both stages)."""
    out = tmp_path / "ep.json"
    proc = run_ep_bench(["--routing", "synthetic", "--gpus-per-node", "1", "--json", str(out), "--contenders",
                         "c2r-per-rank-planned", "c2r-per-node-planned"], [without_mtkahypar])  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ep_bench: WARNING: the kahypar planner failed on tiny" in proc.stderr
    assert "| tiny | synthetic | c2r-per-rank-planned | greedy (kahypar failed) |" in proc.stdout
    rows = {r["contender"]: r for r in json.loads(out.read_text())["rows"]}
    per_rank, per_node = rows["c2r-per-rank-planned"], rows["c2r-per-node-planned"]
    assert per_rank["plan"] == "greedy (kahypar failed)"
    assert per_rank["inter_node_bytes_per_token"] == per_rank["remote_bytes_per_token"] > 0
    assert per_node["counts"] == "both stages" and "counts" not in per_rank
    assert 0 < per_node["inter_node_copies_per_token"] < per_node["copies_per_token"]


def test_rows_and_json_are_written_as_each_contender_completes(ep_bench, tmp_path, capsys):
    args = Namespace(json=tmp_path / "ep.json", rounds=1, iters=2)
    report = ep_bench.Report(args, 2, "ep_bench: 2 ranks")
    row = {"config": "tiny", "routing": "synthetic", "contender": "raw-all-to-all", "ms_median": 1.0, "ms_min": 1.0,
           "ms_max": 1.0, "round_medians": [1.0], "host_syncs_per_forward": 0, "peak_gib": None}  # fmt: skip
    report.add(row)
    assert capsys.readouterr().out == "row | tiny | synthetic | raw-all-to-all | - | 1.00 | 1.00-1.00 | 1.00 | - | - " \
        "| - | - | - | - | 0 | - |\n"  # fmt: skip
    saved = json.loads(args.json.read_text())
    assert not saved["complete"] and saved["rows"] == [row]
    report.add({**row, "contender": "single-device", "skipped": "why"})
    assert len(json.loads(args.json.read_text())["rows"]) == 2
    capsys.readouterr()
    report.finish()
    out = capsys.readouterr().out
    assert out.startswith("ep_bench: 2 ranks\n") and "| tiny | synthetic | single-device | - | skipped: why |" in out
    assert json.loads(args.json.read_text())["complete"]
    assert [p.name for p in tmp_path.iterdir()] == ["ep.json"]  # no partial file left beside it


def test_plan_on_rank0_stops_or_falls_back(ep_bench, monkeypatch, capsys):
    """A planner that raises: named with --plan-method, the line that stops the run; by default, greedy."""
    cfg = ep_bench.CONFIGS["tiny"]

    def broken(*args, method="kahypar", **kwargs):
        if method != "greedy":
            raise RuntimeError("no partition\nsecond line")
        return real(*args, method=method, **kwargs)

    real = ep_bench.plan_layer
    monkeypatch.setattr(ep_bench, "plan_layer", broken)
    args = Namespace(plan_method="kahypar", plan_tokens=64)
    saved, used, failed = ep_bench.plan_on_rank0(cfg, 2, 1, {"planned"}, args)
    assert failed == "ep_bench: --plan-method kahypar failed on tiny: RuntimeError: no partition" and not saved
    args.plan_method = None
    saved, used, failed = ep_bench.plan_on_rank0(cfg, 2, 1, {"planned", "replicated"}, args)
    assert failed is None and used == "greedy (kahypar failed)" and set(saved) == {"planned", "replicated"}
    err = capsys.readouterr().err
    assert "WARNING: the kahypar planner failed on tiny (RuntimeError: no partition)" in err
    assert "planned on 64 synthetic tokens (greedy (kahypar failed)): planned " in err
