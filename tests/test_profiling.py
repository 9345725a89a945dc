"""Profiler counts against independent recounts, trace/co-activation consistency, damaged inputs, the CLI."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from c2r.config_utils import config_from_dict
from c2r.experts import ExpertConfig
from c2r.moe import MoEConfig, MoELayer
from c2r.parallel import shard_experts
from c2r.profiled import profiled_model
from c2r.train import RunConfig, train
from placement.layout import ExpertLayout
from profiling.comm import CommProfiler
from profiling.reader import coactivation_from_traces, read_comm_records, read_online_counts, read_traces
from profiling.session import ProfileConfig, ProfileSession
from profiling.summary import summarize
from profiling.trace import RoutingTraceRecorder, TraceConfig
from tests.distributed import run_distributed
from tests.routing_cases import random_routing
from tests.run_configs import tiny_run_config

D, E, K, T = 16, 8, 2, 40


def comm_worker(rank, world, expert_to_rank, out_dir, mode):
    torch.manual_seed(0)
    layer = MoELayer(D, MoEConfig(num_experts=E, top_k=K, ffn_hidden_size=8, experts=ExpertConfig(backend="torch")))
    # The profiler first: the dispatcher gets its observer when it is built.
    comm = CommProfiler(f"{out_dir}/comm", num_layers=1)
    shard_experts(layer, ExpertLayout(tuple(expert_to_rank), world), mode=mode, observers=comm.observers)
    session = ProfileSession(out_dir, profiled_model(layer), ProfileConfig(enabled=True, traces=False), {}, comm)
    expected = []
    for step in range(3):
        session.begin_step(step)
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(100 * step + rank), requires_grad=True)
        y, routing = layer(x)
        y.sum().backward()
        session.end_step(step)
        # Independent recount from the routing alone: per destination rank, the valid slots (per-expert) or the
        # tokens with at least one valid slot there (per-rank).
        dest_TK = torch.tensor(expert_to_rank)[routing.expert_ids_TK]
        hits_TRK = torch.stack([(dest_TK == j) & routing.valid_TK for j in range(world)], dim=1)
        per_rank = hits_TRK.sum((0, 2)) if mode == "per-expert" else hits_TRK.any(2).sum(0)
        lam = [len({int(d) for d, v in zip(dest_TK[t], routing.valid_TK[t]) if v}) for t in range(T)]
        own = sum(1 for t in range(T) if any(int(d) == rank and v for d, v in zip(dest_TK[t], routing.valid_TK[t])))
        expected.append({"send": per_rank.tolist(), "distinct": sum(lam), "remote": sum(lam) - own})
    session.close()
    return expected


@pytest.mark.parametrize(
    "world,expert_to_rank,mode",
    [
        (2, [0, 1, 0, 1, 1, 0, 0, 1], "per-expert"),
        (4, [0, 0, 1, 1, 2, 2, 3, 3], "per-expert"),
        (2, [0, 1, 0, 1, 1, 0, 0, 1], "per-rank"),
    ],
)
def test_profiler_counts_equal_what_the_dispatch_sent(tmp_path, world, expert_to_rank, mode):
    expected = run_distributed(comm_worker, world, tmp_path / "w", expert_to_rank, str(tmp_path / "prof"), mode)
    info = json.loads((tmp_path / "prof" / "profile.json").read_text())
    assert info["mode"] == mode  # the dispatch mode the run used, not a fixed "per-expert"
    assert info["expert_to_rank"] == [expert_to_rank]
    records = read_comm_records(tmp_path / "prof" / "comm")
    assert len(records) == 3 * world
    for r in records:
        want = expected[r["rank"]][r["step"]]
        assert r["mode"] == mode
        assert r["send_copies"] == want["send"]
        assert r["distinct_ranks"] == want["distinct"]
        assert r["remote_ranks"] == want["remote"]
        # a copy's row, and per-rank its [2K] float32 slots and weights that travel beside it
        assert r["bytes_per_copy"] == D * 4 + (2 * K * 4 if mode == "per-rank" else 0)
        # What rank r received from rank j is what j sent to r.
        assert r["recv_copies"] == [expected[j][r["step"]]["send"][r["ep_rank"]] for j in range(world)]
        phases = {"dispatch", "combine", "dispatch_backward", "combine_backward"}
        if mode == "per-rank":  # the copies' expert slots and weights travel in exchanges of their own
            phases |= {"dispatch_meta", "dispatch_meta_backward"}
        assert set(r["time_ms"]) == phases
        assert all(ms >= 0 for ms in r["time_ms"].values())
        if mode == "per-expert":
            assert sum(r["local_expert_load"]) == sum(r["recv_copies"])
        else:  # one received copy feeds every expert the token chose on this rank
            assert sum(r["local_expert_load"]) >= sum(r["recv_copies"])


def test_profile_json_of_a_model_without_expert_parallelism_names_no_dispatch_mode(tmp_path):
    layer = MoELayer(D, MoEConfig(num_experts=E, top_k=K, ffn_hidden_size=8))
    ProfileSession(tmp_path, profiled_model(layer), ProfileConfig(enabled=True, traces=False), {}).close()
    info = json.loads((tmp_path / "profile.json").read_text())
    assert info["mode"] is None and info["expert_to_rank"] == [None]
    assert (info["num_layers"], info["num_experts"], info["top_k"], info["hidden_size"]) == (1, E, K, D)


def test_online_coactivation_equals_the_written_traces(tmp_path):
    recorder = RoutingTraceRecorder(
        tmp_path, num_layers=2, num_experts=6, top_k=3, source="test", config=TraceConfig(shard_rows=50)
    )
    for step in range(4):
        recorder.step = step
        for layer in range(2):
            routing = random_routing(37, 3, 6, empty_fraction=0.2, seed=10 * step + layer)
            recorder.record(layer, torch.where(routing.valid_TK, routing.expert_ids_TK, -1), routing.weights_TK)
    recorder.close()
    traces = read_traces(tmp_path, progress=False)
    assert len(list(tmp_path.glob("rank000-*.npz"))) > 1  # several shards: memory stays bounded
    online, tokens = read_online_counts(tmp_path)
    assert tokens.tolist() == [4 * 37, 4 * 37]
    np.testing.assert_array_equal(coactivation_from_traces(traces), online)
    # Worked check of the definition: C[i, j] counts tokens holding both i and j; C[i, i] is i's load.
    ids = traces.expert_ids[0]
    i, j = 1, 4
    both = sum(1 for row in ids if i in row and j in row)
    assert online[0, i, j] == online[0, j, i] == both
    assert online[0, i, i] == int((ids == i).sum())


def test_sampling_and_token_cap_bound_what_is_written(tmp_path):
    recorder = RoutingTraceRecorder(
        tmp_path,
        num_layers=1,
        num_experts=4,
        top_k=2,
        source="test",
        config=TraceConfig(sample_rate=0.25, token_cap=300),
    )
    for step in range(10):
        recorder.record(0, random_routing(200, 2, 4, seed=step).expert_ids_TK)
    recorder.close()
    traces = read_traces(tmp_path, progress=False)
    assert len(traces.expert_ids[0]) == 300  # 10 * 200 * 0.25 = 500 sampled, capped at 300
    assert read_online_counts(tmp_path)[1].tolist() == [2000]  # the counters still see every token


def write_trace(tmp_path, shards=3):
    recorder = RoutingTraceRecorder(
        tmp_path, num_layers=1, num_experts=4, top_k=2, source="test", config=TraceConfig(shard_rows=10)
    )
    for step in range(shards):
        recorder.record(0, random_routing(10, 2, 4, seed=step).expert_ids_TK)
    recorder.close()


def test_damaged_shards_are_skipped_and_named(tmp_path, caplog):
    write_trace(tmp_path)
    (tmp_path / "rank000-00001.npz").write_bytes(b"PK\x03\x04 truncated")
    np.savez(
        tmp_path / "rank000-00002.npz",
        layer=np.zeros(5, np.int16),
        step=np.zeros(5, np.int32),
        expert_ids=np.zeros((5, 3), np.int16),
        weights=np.zeros((5, 3), np.float32),
    )  # K=3, header says 2
    traces = read_traces(tmp_path, progress=False)
    assert [name for name, _ in traces.skipped] == ["rank000-00001.npz", "rank000-00002.npz"]
    assert "top_k=2" in traces.skipped[1][1]
    assert len(traces.expert_ids[0]) == 10  # the readable shard is still used
    assert "skipped trace shard rank000-00001.npz" in caplog.text


def test_empty_or_unreadable_trace_directories_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trace header"):
        read_traces(tmp_path)
    write_trace(tmp_path, shards=1)
    (tmp_path / "rank000-00000.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="every trace shard .* is unreadable"):
        read_traces(tmp_path, progress=False)
    for shard in tmp_path.glob("rank*.npz"):
        shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"no trace shards \(rank\*-\*.npz\)"):
        read_traces(tmp_path)


def profiled_worker(rank, world, raw):
    result = train(config_from_dict(RunConfig, raw))
    return result["step_losses"]


def test_profiled_training_run_writes_traces_and_comm_and_changes_nothing(tmp_path):
    plain = run_distributed(
        profiled_worker, 2, tmp_path / "a", tiny_run_config(tmp_path / "plain", 6, eval_every=3, ep_size=2)
    )
    raw = tiny_run_config(tmp_path / "prof", 6, profile=True, eval_every=3, ep_size=2)
    raw["profile"].update(kernel_steps=2, kernel_warmup=3)  # the kernel profile too, over steps 3 and 4
    profiled = run_distributed(profiled_worker, 2, tmp_path / "b", raw)
    assert plain[0] == profiled[0]  # profiling observes; it does not change the numbers
    kernels = (tmp_path / "prof" / "profile" / "kernels.txt").read_text()
    assert "steps 3-4 (2 steps)" in kernels
    for phase in ("forward", "backward", "optimizer", "loss_log"):
        assert re.search(rf"^{phase} +\d+\.\d+", kernels, re.MULTILINE), phase
    assert {p.name for p in (tmp_path / "prof" / "profile").glob("kernels_rank*")} == {
        "kernels_rank0.json.gz",
        "kernels_rank1.json.gz",
    }
    info = json.loads((tmp_path / "prof" / "profile" / "profile.json").read_text())
    assert info["mode"] == "per-expert" and info["expert_to_rank"] == [[0, 0, 0, 0, 1, 1, 1, 1]] * 2
    summary = summarize(tmp_path / "prof")
    assert len(summary["steps"]) == 6 and len(summary["layers"]) == 2
    layer = summary["layers"][0]
    copies = np.array(layer["copies_rank_to_rank"])
    assert copies.shape == (2, 2) and copies.sum() == 6 * 2 * 4 * 32 * 2  # steps * ranks * batch * block * k
    assert layer["copies_per_token"] == 2.0
    assert 1.0 <= layer["distinct_ranks_per_token"] <= 2.0
    traces = read_traces(tmp_path / "prof" / "profile" / "traces", progress=False)
    assert len(traces.expert_ids[1]) == 6 * 2 * 4 * 32

    cli = [sys.executable, "-m", "profiling.cli"]
    out = subprocess.run([*cli, "summarize", str(tmp_path / "prof")], capture_output=True, text=True)
    assert out.returncode == 0 and "cross/tok" in out.stdout and "all-to-all time" in out.stdout
    out = subprocess.run([*cli, "summarize", "--json", str(tmp_path / "prof")], capture_output=True, text=True)
    assert json.loads(out.stdout)["format"] == "c2r-profile-summary"
    npy = tmp_path / "coact.npy"
    out = subprocess.run([*cli, "coactivation", str(tmp_path / "prof"), "-o", str(npy)], capture_output=True, text=True)
    assert out.returncode == 0 and np.load(npy).shape == (2, 8, 8)
    out = subprocess.run(
        [*cli, "coactivation", str(tmp_path / "prof"), "-o", str(tmp_path / "co2")], capture_output=True, text=True
    )
    assert f"wrote {tmp_path / 'co2.npy'}:" in out.stdout and (tmp_path / "co2.npy").exists()  # the name np.save wrote


def test_cli_errors_are_clear(tmp_path):
    cli = [sys.executable, "-m", "profiling.cli"]
    assert subprocess.run([*cli, "--help"], capture_output=True).returncode == 0
    out = subprocess.run([*cli, "summarize", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and "no profile in" in out.stderr and "Traceback" not in out.stderr


def test_gpu_busy_time_counts_overlapping_kernels_once():
    from profiling.kernels import busy_ms

    ns = 1_000_000  # 1 ms
    assert busy_ms([]) == 0.0
    # two overlapping streams (0-3 and 2-5 ms), one nested kernel (1-2), a gap, then 7-8 ms: 5 + 1 busy ms
    assert busy_ms([(7 * ns, 8 * ns), (0, 3 * ns), (2 * ns, 5 * ns), (1 * ns, 2 * ns)]) == 6.0


def test_top_by_phase_table_ranks_each_phases_entries_by_time_per_step():
    from profiling.kernels import top_by_phase_table

    ms = 1_000_000  # ns
    kernels = {
        "forward": [("gemm", 2 * ms)],
        "optimizer": [("copy_unrolled", 3 * ms), ("adamw", 5 * ms), ("copy_unrolled", 3 * ms), ("norm", 1 * ms)],
        "loss_log": [],
    }
    lines = top_by_phase_table(kernels, steps=2, what="kernels", rows=2)
    # The costlier phase first; within it the two costliest kernels, each as ms and launches per step; no empty phase.
    assert lines == [
        "",
        "top kernels of phase optimizer (ms/step, kernels/step):",
        "      3.00     1.0  copy_unrolled",
        "      2.50     0.5  adamw",
        "",
        "top kernels of phase forward (ms/step, kernels/step):",
        "      1.00     0.5  gemm",
    ]


def test_host_calls_of_a_phase_are_its_outermost_ops_and_the_time_between_them():
    from torch.profiler import ProfilerActivity, profile

    from profiling.kernels import BETWEEN_OPS, host_calls_by_phase, phase

    x = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with phase("optimizer"):
            for _ in range(3):
                torch.linalg.vector_norm(x.double())  # aten::linalg_vector_norm calls aten::to inside it
        x.sum()  # outside every phase
    events = prof.profiler.kineto_results.events()
    calls = host_calls_by_phase(events)
    names = [name for name, _ in calls["optimizer"]]
    assert names.count("aten::to") == 3  # x.double(): outermost, so counted; the norm's inner ops are not
    assert names.count("aten::linalg_vector_norm") == 3 and "aten::sum" not in names
    range_ns = next(e.duration_ns() for e in events if e.name() == "c2r.optimizer")
    assert names.count(BETWEEN_OPS) == 1 and sum(ns for _, ns in calls["optimizer"]) == range_ns


def test_host_calls_on_another_thread_count_for_the_phase_whose_window_they_start_in():
    """The backward's ops run on autograd's thread on a GPU, outside the main thread's range."""
    from types import SimpleNamespace

    from profiling.kernels import BETWEEN_OPS, host_calls_by_phase

    def event(name, start, end, thread):
        return SimpleNamespace(
            name=lambda: name, start_ns=lambda: start, end_ns=lambda: end, duration_ns=lambda: end - start,
            start_thread_id=lambda: thread, device_type=lambda: torch.autograd.DeviceType.CPU,
            is_user_annotation=lambda: False,
        )  # fmt: skip

    events = [
        event("c2r.backward", 0, 100, thread=1),
        event("aten::item", 90, 99, thread=1),  # the main thread waits for the result at the end
        event("evaluate_function: MmBackward0", 10, 40, thread=2),
        event("aten::mm", 12, 30, thread=2),  # inside the one above: not outermost
        event("evaluate_function: SumBackward0", 50, 60, thread=2),
        event("evaluate_function: late", 120, 130, thread=2),  # after the window
    ]
    calls = dict(host_calls_by_phase(events)["backward"])
    assert calls == {
        "aten::item": 9,
        BETWEEN_OPS: 91,
        "evaluate_function: MmBackward0": 30,
        "evaluate_function: SumBackward0": 10,
    }


def test_host_calls_survive_a_child_that_outlasts_its_parent_and_an_op_as_long_as_its_phase():
    from types import SimpleNamespace

    from profiling.kernels import BETWEEN_OPS, host_calls_by_phase

    def event(name, start, end):
        return SimpleNamespace(
            name=lambda: name, start_ns=lambda: start, end_ns=lambda: end, duration_ns=lambda: end - start,
            start_thread_id=lambda: 1, device_type=lambda: torch.autograd.DeviceType.CPU,
            is_user_annotation=lambda: False,
        )  # fmt: skip

    # a launch whose timestamps poke past its op's end: the next op is still the phase's, not the launch's, child
    events = [
        event("c2r.optimizer", 0, 100),
        event("aten::a", 10, 20),
        event("cudaLaunchKernel", 15, 21),
        event("aten::b", 20, 40),
    ]
    assert dict(host_calls_by_phase(events)["optimizer"]) == {"aten::a": 10, "aten::b": 20, BETWEEN_OPS: 70}
    # an op exactly as long as its phase, listed first: the phase is still its parent, and nothing counts twice
    events = [event("aten::a", 0, 100), event("c2r.optimizer", 0, 100)]
    assert dict(host_calls_by_phase(events)["optimizer"]) == {"aten::a": 100, BETWEEN_OPS: 0}


def test_gpu_idle_gaps_are_charged_to_the_phase_that_launched_the_kernel_after_them():
    from types import SimpleNamespace

    from profiling.kernels import idle_gaps, idle_table, launch_phases

    def event(name, start, end, device="CPU", correlation=0):
        return SimpleNamespace(
            name=lambda: name, start_ns=lambda: start, end_ns=lambda: end, duration_ns=lambda: end - start,
            start_thread_id=lambda: 1, device_type=lambda: getattr(torch.autograd.DeviceType, device),
            is_user_annotation=lambda: False, correlation_id=lambda: correlation,
        )  # fmt: skip

    ms = 1_000_000
    events = [
        event("c2r.forward", 0, 10 * ms),
        event("cudaLaunchKernel", 1 * ms, 1 * ms + 5, correlation=1),
        event("cudaLaunchKernel", 8 * ms, 8 * ms + 5, correlation=2),
        event("c2r.optimizer", 10 * ms, 20 * ms),
        event("cudaLaunchKernel", 11 * ms, 11 * ms + 5, correlation=3),
        event("gemm", 1 * ms, 3 * ms, "CUDA", 1),
        event("norm", 2 * ms, 4 * ms, "CUDA", 1),  # overlaps the gemm (another stream): no gap between them
        event("topk", 9 * ms, 10 * ms, "CUDA", 2),  # 5 ms after the norm: the forward's host was late
        event("adamw", 12 * ms, 13 * ms, "CUDA", 3),  # 2 ms after the topk: the optimizer's
    ]
    assert [(gap, before.name(), after.name()) for gap, before, after in idle_gaps(events)] == [
        (5 * ms, "norm", "topk"),
        (2 * ms, "topk", "adamw"),
    ]
    lines = idle_table(events, launch_phases(events), steps=1)
    assert lines[2:4] == ["      5.00  forward", "      2.00  optimizer"]
    assert lines[6].split()[:2] == ["5000.0", "forward"] and lines[6].endswith("norm -> topk")


def test_host_syncs_are_counted_by_the_python_frames_that_made_them():
    # torch's sync debug mode raises these warnings on a GPU; the counter is the same code on any device
    import warnings

    from profiling.host_syncs import SYNC_WARNING, HostSyncs, catch_sync_warnings, sync_table

    def reads_a_value():
        warnings.warn(f"reads_a_value {SYNC_WARNING}", stacklevel=1)

    syncs = HostSyncs()
    with warnings.catch_warnings(record=True) as shown, catch_sync_warnings(syncs):
        for _ in range(3):
            reads_a_value()
        warnings.warn("not a sync: shown as usual", stacklevel=1)
    assert [str(w.message) for w in shown] == ["not a sync: shown as usual"]
    assert syncs.count == 3
    ((site, count),) = syncs.by_site.items()
    assert count == 3
    assert site[0].startswith("tests/test_profiling.py:") and site[0].endswith(" reads_a_value")
    assert site[1].endswith(" test_host_syncs_are_counted_by_the_python_frames_that_made_them")
    lines = sync_table(syncs, steps=2)
    assert "1.5" in lines[1] and lines[2].split()[0] == "1.5"
    assert "reads_a_value  <  tests/test_profiling.py" in lines[2]


def test_with_gradient_accumulation_the_comm_records_count_every_micro_batch(tmp_path):
    """Each forward of a step is dispatched (grad_accum of them): its record counts them all, as the traces and the
    exchange times do (it held the last micro-batch only, so bytes and time came from different token sets)."""
    raw = tiny_run_config(tmp_path / "run", 3, profile=True, eval_every=3, ep_size=2, grad_accum=2)
    raw["train"]["dispatch"] = "per-rank"
    run_distributed(profiled_worker, 2, tmp_path / "w", raw)
    records = [json.loads(line) for p in sorted((tmp_path / "run" / "profile" / "comm").glob("comm-rank*.jsonl"))
               for line in p.read_text().splitlines()]  # fmt: skip
    traces = read_traces(tmp_path / "run" / "profile" / "traces", progress=False)
    for layer in range(2):
        mine = [r for r in records if r["layer"] == layer]
        assert len(mine) == 3 * 2  # steps x ranks
        assert sum(r["tokens"] for r in mine) == len(traces.expert_ids[layer])
        assert sum(sum(r["local_expert_load"]) for r in mine) == int((traces.expert_ids[layer] >= 0).sum())


def test_rank_load_imbalance_is_the_worst_expert_parallel_groups():
    """4 ranks, ep_size 2: groups (0, 1) and (2, 3). Pooled over the groups the two EP positions carry 30 and 30
    (1.0); group (2, 3) alone is 20 against 0 (2.0): its GPUs wait for the busy one, so that is the imbalance."""
    from profiling.summary import _layer_traffic

    def record(rank, load):
        return {"rank": rank, "ep_rank": rank % 2, "ep_size": 2, "send_copies": [1, 1], "local_expert_load": load,
                "tokens": 1, "valid_slots": 1, "distinct_ranks": 1, "remote_ranks": 0, "bytes_per_copy": 2}  # fmt: skip

    records = [record(0, [5, 5]), record(1, [5, 5]), record(2, [10, 10]), record(3, [0, 0])]
    traffic = _layer_traffic(records, 2)
    assert traffic["rank_load"] == [30, 10]
    assert traffic["rank_load_imbalance"] == pytest.approx(2.0)


def test_a_run_without_counters_yet_still_summarises_and_a_damaged_counters_file_is_named(tmp_path):
    """A run killed before its trace recorder first wrote its counters: the traffic is summarised without expert
    loads (it was an error); a truncated counters file is one line naming it (it was a BadZipFile traceback)."""
    raw = tiny_run_config(tmp_path / "run", 2, profile=True, eval_every=2, ep_size=2)
    run_distributed(profiled_worker, 2, tmp_path / "w", raw)
    traces = tmp_path / "run" / "profile" / "traces"
    counts = sorted(traces.glob("counts-rank*.npz"))
    saved = [p.read_bytes() for p in counts]
    for path in counts:
        path.unlink()
    summary = summarize(tmp_path / "run")
    assert summary["layers"][0]["copies_per_token"] > 0 and "expert_load" not in summary["layers"][0]
    counts[0].write_bytes(saved[0][:100])
    with pytest.raises(ValueError, match=r"counts-rank000.npz is not a readable counters file"):
        summarize(tmp_path / "run")
