"""Overlapped (chunked) dispatch over gloo: chunked == unchunked == the single-process reference, in outputs and
gradients (input, combine weights, expert weights), both modes; dropless counted and the metadata's counts equal to
the unchunked ones. Chunks: T not divisible by C, chunks where some rank sends or receives nothing, and more chunks
than tokens (empty chunks)."""

import pytest
import torch

from c2r.experts import ExpertConfig, build_backend
from c2r.parallel import build_dispatcher, local_expert_weights, shard_experts
from c2r.parallel.overlap import InFlight, chunk_bounds
from placement.layout import ExpertLayout
from tests.dispatch_cases import assert_ranks_match_reference, expert_inputs, run_rows
from tests.distributed import run_distributed
from tests.routing_cases import make_routing, random_routing
from tests.test_expert_parallel import MetaRecorder, build_layer, forward_backward, global_batch, upstream_grad

T, D, F, E, K = 7, 16, 8, 8, 3  # T tokens per rank: 7 is divisible by none of the chunk counts below
CHUNKS = (1, 2, 3, 9)  # 9 > T: the last chunks hold no token on any rank

# name: (world, homes, replicas {expert: extra ranks}, routing kind)
CASES = {
    "2 ranks, empty slots": (2, [1, 0, 1, 0, 0, 1, 1, 0], {}, "empty_slots"),
    "2 ranks, rank 1 receives nothing": (2, [0, 0, 0, 0, 1, 1, 1, 1], {}, "rank1_idle"),
    "2 ranks, rank 1 sends nothing": (2, [0, 0, 0, 0, 1, 1, 1, 1], {}, "rank1_silent"),
    "2 ranks, early tokens stay home": (2, [0, 0, 0, 0, 1, 1, 1, 1], {}, "home_first"),
    "2 ranks, replicated": (2, [0, 0, 0, 0, 1, 1, 1, 1], {0: (1,), 5: (0,)}, "empty_slots"),
    "4 ranks, replicated, rank 3 idle": (4, [0, 0, 1, 1, 2, 2, 3, 3], {0: (1,), 1: (2,), 2: (0,), 5: (3,)}, "idle"),
    # copy_choice="balanced" (its name says so): the copies chosen once over all T tokens, as without chunks
    "4 ranks, replicated, balanced copies": (4, [0, 0, 1, 1, 2, 2, 3, 3], {0: (1, 2), 3: (0,), 4: (3,)}, "empty_slots"),
}


def case_layout(name: str) -> ExpertLayout:
    world, homes, extra, _ = CASES[name]
    return ExpertLayout(tuple(homes), world, tuple(extra.get(e, ()) for e in range(E)) if extra else None)


def case_routing(name: str):
    """The global routing of world * T tokens (rank r holds rows r*T .. r*T+T-1)."""
    world, _, _, kind = CASES[name]
    idle = {"rank1_idle": 4, "idle": 3}.get(kind, 0)  # experts 4..7 (5..7) never chosen
    routing = random_routing(world * T, K, E, empty_fraction=0.3, idle_experts=idle, seed=5)
    valid, ids = routing.valid_TK.clone(), routing.expert_ids_TK.clone()
    if kind == "rank1_silent":
        valid[T : 2 * T] = False  # every chunk of rank 1 sends nothing
    if kind == "home_first":  # rank 0's first 3 tokens (its first chunk at C = 3) only use rank 0's experts
        ids[:3] = torch.tensor([0, 1, 2])
        valid[:3] = True
    return make_routing(ids, routing.weights_TK, valid, E)


def run_dispatch(dispatcher, x, routing, experts, rows=slice(None)):
    """Forward + backward of a weighted sum; returns (y, x grad, combine-weight grad)."""
    backend = build_backend("torch" if dispatcher else "reference", ExpertConfig(torch_impl="grouped_mm"))
    return run_rows(dispatcher, x, routing, backend, experts, rows)


def chunked_worker(rank, world, names):
    results = {}
    for name in names:
        layout, routing = case_layout(name), case_routing(name)
        full, x = expert_inputs(world * T, E, D, F)
        for mode in ("per-expert", "per-rank"):
            for chunks in CHUNKS:
                recorder = MetaRecorder()
                experts = local_expert_weights(full, layout.local_experts(rank))
                choice = "balanced" if "balanced" in name else "rule"
                dispatcher = build_dispatcher(mode, layout, None, recorder, overlap_chunks=chunks, copy_choice=choice)
                y, x_grad, w_grad = run_dispatch(dispatcher, x, routing, experts, slice(rank * T, (rank + 1) * T))
                (meta,) = recorder.metas
                results[name, mode, chunks] = {
                    "y": y,
                    "x_grad": x_grad,
                    "w_grad": w_grad,
                    "expert_grads": {n: p.grad for n, p in experts.named_parameters()},
                    "local_experts": layout.local_experts(rank),
                    "counts": {
                        "send_splits": meta.send_splits,
                        "recv_splits": meta.recv_splits,
                        "computed_X": meta.tokens_per_local_expert_X.tolist(),
                        "valid_slots": int(meta.valid_slots),
                        "distinct_ranks": int(meta.distinct_ranks),
                        "remote_ranks": int(meta.remote_ranks),
                        "sent_tokens": sorted(meta.token_idx_C.tolist()),
                    },
                }
    return results


def check_case(name: str, per_rank: list[dict]) -> None:
    world = CASES[name][0]
    full, x = expert_inputs(world * T, E, D, F)
    routing = case_routing(name)
    reference = run_dispatch(None, x, routing, full)
    total_valid = int(routing.valid_TK.sum())
    for mode in ("per-expert", "per-rank"):
        for chunks in CHUNKS:
            results = [r[name, mode, chunks] for r in per_rank]
            where = f"{name}, {mode}, {chunks} chunks"
            assert_ranks_match_reference(results, reference, full, where)
            # Dropless, counted: each valid pair computed once; and the same counts as the unchunked dispatch, rank by
            # rank (every chunk's rows add up to the plain mode's splits).
            assert sum(sum(r["counts"]["computed_X"]) for r in results) == total_valid, where
            for rank, r in enumerate(results):
                assert r["counts"] == per_rank[rank][name, mode, 1]["counts"], f"{where}, rank {rank}"


@pytest.mark.parametrize("world", [2, 4])
def test_chunked_dispatch_matches_unchunked_and_reference(tmp_path, world):
    names = [name for name, case in CASES.items() if case[0] == world]
    per_rank = run_distributed(chunked_worker, world, tmp_path, names)
    for name in names:
        check_case(name, per_rank)
    if world == 2:  # the cases test what they say
        assert per_rank[1]["2 ranks, rank 1 receives nothing", "per-rank", 3]["counts"]["recv_splits"] == [0, 0]
        assert per_rank[1]["2 ranks, rank 1 sends nothing", "per-rank", 3]["counts"]["send_splits"] == [0, 0]


def layer_worker(rank, world, mode, chunks):
    """The whole MoE layer (its own top-k router) through shard_experts: the router's own weight gradient too."""
    layer = build_layer()
    shard_experts(layer, ExpertLayout.contiguous(8, world), mode=mode, overlap_chunks=chunks)
    rows = slice(rank * 24, (rank + 1) * 24)
    y, x_grad, _ = forward_backward(layer, global_batch(world, "none")[rows], upstream_grad(world)[rows])
    router_grad = layer.router.gate.weight.grad.clone()
    torch.distributed.all_reduce(router_grad)  # the data-parallel gradient sum the trainer would do
    return {"y": y, "x_grad": x_grad, "router_grad": router_grad}


@pytest.mark.parametrize("mode", ["per-expert", "per-rank"])
def test_chunked_layer_matches_single_process(tmp_path, mode):
    results = run_distributed(layer_worker, 2, tmp_path, mode, 5)  # 24 tokens per rank in 5 chunks
    ref = build_layer()
    y_ref, x_grad_ref, _ = forward_backward(ref, global_batch(2, "none"), upstream_grad(2))
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), y_ref)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in results]), x_grad_ref)
    for r in results:
        torch.testing.assert_close(r["router_grad"], ref.router.gate.weight.grad)


def test_chunk_bounds():
    assert chunk_bounds(7, 3) == [0, 3, 5, 7]  # the first T mod C chunks one longer, as torch.tensor_split
    assert chunk_bounds(2, 4) == [0, 1, 2, 2, 2]  # more chunks than tokens: empty chunks
    assert [len(c) for c in torch.arange(7).tensor_split(3)] == [3, 2, 2]


def test_bad_overlap_chunks_name_the_values():
    from c2r.parallel.expert_parallel import check_overlap_chunks

    with pytest.raises(ValueError, match=r"overlap_chunks \(0\) must be an integer >= 1"):
        check_overlap_chunks(0, "per-rank")
    with pytest.raises(
        ValueError, match=r"overlap_chunks \(2\) works with dispatch per-expert or per-rank, not 'per-node'"
    ):
        check_overlap_chunks(2, "per-node")


class ScheduleLog:
    """Records, on one rank, when each exchange is launched and landed (forward and backward) and when each chunk's
    expert MLP runs (forward) and has computed its input gradient (backward)."""

    def __init__(self):
        self.events, self.started = [], {}
        for step in ("launch", "land", "launch_backward", "land_backward"):  # patched in this rank's process only
            setattr(InFlight, step, self._wrap(step, getattr(InFlight, step)))

    def _wrap(self, step, method):
        log = self

        def logged(flight, *args):
            if step == "launch":  # name each exchange by its chunk: the n-th "combine" launched is chunk n's
                flight.tag = f"{flight.name}{log.started.setdefault(flight.name, [0])[0]}"
                log.started[flight.name][0] += 1
            log.events.append(f"{step}:{flight.tag}")
            return method(flight, *args)

        return logged

    def backend(self):
        log, torch_backend = self, build_backend("torch", ExpertConfig())

        class Logged:
            chunk = 0

            def grouped_mlp(self, x_PD, counts, experts, host_counts=None):
                c, self.chunk = self.chunk, self.chunk + 1
                log.events.append(f"mlp{c}")
                x_PD.register_hook(lambda grad: log.events.append(f"mlp_backward{c}"))
                return torch_backend.grouped_mlp(x_PD, counts, experts, host_counts)

        return Logged()


def schedule_worker(rank, world, mode, chunks):
    log = ScheduleLog()
    name = "2 ranks, empty slots"
    layout, routing = case_layout(name), case_routing(name)
    full, x = expert_inputs(world * T, E, D, F)
    experts = local_expert_weights(full, layout.local_experts(rank))
    dispatcher = build_dispatcher(mode, layout, None, MetaRecorder(), overlap_chunks=chunks)
    rows = slice(rank * T, (rank + 1) * T)
    x = x[rows].clone().requires_grad_(True)
    local = make_routing(routing.expert_ids_TK[rows], routing.weights_TK[rows], routing.valid_TK[rows], E)
    local.weights_TK.requires_grad_(True)
    y = dispatcher(x, local, log.backend(), experts)
    log.events.append("backward")
    y.sum().backward()
    return log.events


@pytest.mark.parametrize("mode", ["per-expert", "per-rank"])
def test_exchanges_overlap_expert_compute_forward_and_backward(tmp_path, mode):
    """Chunk c's experts run (forward) and compute their gradients (backward) while chunk c+1's dispatch and chunk
    c-1's combine are in flight: launched before, landed after. Every rank starts the collectives in one order."""
    chunks = 3
    events_0, events_1 = run_distributed(schedule_worker, 2, tmp_path, mode, chunks)
    assert events_0 == events_1
    at = {event: i for i, event in enumerate(events_0)}
    for c in range(chunks):
        for other, name in ((c + 1, "dispatch"), (c - 1, "combine")):
            if 0 <= other < chunks:
                assert at[f"launch:{name}{other}"] < at[f"mlp{c}"] < at[f"land:{name}{other}"], events_0
                assert (
                    at[f"launch_backward:{name}{other}"] < at[f"mlp_backward{c}"] < at[f"land_backward:{name}{other}"]
                ), events_0


def train_worker(rank, world, raw):
    from c2r.config_utils import config_from_dict
    from c2r.train import RunConfig, train

    result = train(config_from_dict(RunConfig, raw))
    layers = [m.dispatcher for m in result["engine"].module.modules() if getattr(m, "dispatcher", None) is not None]
    return {"step_losses": result["step_losses"], "chunks": {getattr(d, "overlap_chunks", 1) for d in layers}}


def comm_records(out_dir) -> list[dict]:
    """The all-to-all profiler's records of both ranks, without their times (which overlap changes)."""
    import json
    from pathlib import Path

    lines = [json.loads(line) for f in sorted(Path(out_dir).rglob("comm-rank*.jsonl")) for line in f.open()]
    return [{k: v for k, v in record.items() if k != "time_ms"} for record in lines]


def test_c2r_train_with_overlap_chunks_trains_like_without(tmp_path):
    """c2r-train on 2 ranks (ZeRO-2, ep 2, per-rank dispatch, profiled): train.overlap_chunks=3 gives the same losses
    and the profiler records the same copies, loads and counts, step by step and layer by layer."""
    from tests.run_configs import tiny_run_config

    runs = {}
    for chunks in (1, 3):
        raw = tiny_run_config(
            tmp_path / f"out{chunks}", steps=4, profile=True, ep_size=2, dispatch="per-rank", overlap_chunks=chunks
        )
        raw["train"].update(eval_every=4, eval_batches=1, save_every=0, save_last=False)
        runs[chunks] = run_distributed(train_worker, 2, tmp_path / f"run{chunks}", raw)
    assert runs[3][0]["chunks"] == {3} and runs[1][0]["chunks"] == {1}
    torch.testing.assert_close(runs[3][0]["step_losses"], runs[1][0]["step_losses"], rtol=2e-5, atol=2e-5)
    records = comm_records(tmp_path / "out3")
    assert len(records) == 2 * 4 * 2  # ranks x steps x MoE layers
    assert records == comm_records(tmp_path / "out1")
