"""benchmarks/ep_bench.py as a smoke test: 2 CPU ranks over gloo, tiny sizes, 1 round; GPU-only contenders skipped."""

import json
import os
import subprocess
import sys
from pathlib import Path

from c2r.parallel.ports import free_port

REPO = Path(__file__).resolve().parents[1]


def test_ep_bench_runs_on_two_gloo_ranks(tmp_path):
    out = tmp_path / "ep.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "benchmarks" / "ep_bench.py"), "--device", "cpu", "--dtype", "float32", "--configs", "tiny",
           "--rounds", "1", "--iters", "2", "--warmup", "1", "--json", str(out),
           "--profile", "1", "--profile-rows", "3"]  # fmt: skip
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1"
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| config | routing | contender | ms |" in proc.stdout
    # --profile: each measured contender's top ops (rank 0), after its timing
    assert "--- profile: tiny synthetic c2r-per-rank-planned, rank 0, 1 steps ---" in proc.stderr
    assert "c10d::alltoall" in proc.stderr

    rows = {(r["routing"], r["contender"]): r for r in json.loads(out.read_text())["rows"]}
    assert not [key for key, r in rows.items() if "error" in r], proc.stdout
    assert "CUDA" in rows["synthetic", "megablocks-dmoe-ep"]["skipped"]  # skipped with its reason, not a crash
    assert "own gate" in rows["synthetic", "deepspeed-moe-ep"]["skipped"]
    assert rows["router", "deepspeed-moe-ep"]["ms_median"] > 0  # DeepSpeed's MoE with ep_size 2 runs on CPU ranks
    for routing in ("synthetic", "router"):
        expert = rows[routing, "c2r-per-expert-contiguous"]
        for layout in ("contiguous", "planned"):
            per_rank = rows[routing, f"c2r-per-rank-{layout}"]
            assert 1 <= per_rank["copies_per_token"] <= expert["copies_per_token"] == 2  # tiny is top-2
            assert per_rank["host_syncs_per_forward"] == 0  # nothing syncs on CPUs; the GPU test counts them
            assert per_rank["all_to_all_ms"] > 0 and "all_to_all_share" in per_rank
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
