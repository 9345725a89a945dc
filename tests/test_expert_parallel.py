"""Expert parallelism over gloo (one CPU process per rank) against the single-process layer."""

import pytest
import torch
import torch.distributed as dist

from c2r.experts import ExpertConfig
from c2r.moe import MoEConfig, MoELayer
from c2r.parallel import shard_experts
from placement.layout import ExpertLayout
from tests.dispatch_cases import assert_ranks_match_reference, expert_inputs, run_rows
from tests.distributed import run_distributed

T_PER_RANK, D, F, E, K = 24, 16, 8, 8, 2


def build_layer(backend: str = "torch") -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(D, MoEConfig(num_experts=E, top_k=K, ffn_hidden_size=F, experts=ExpertConfig(backend=backend)))


def global_batch(world: int, skew: str) -> torch.Tensor:
    x = torch.randn(world * T_PER_RANK, D, generator=torch.Generator().manual_seed(1))
    if skew == "one_expert":  # every token prefers the same experts
        x = x * 0.01 + torch.linspace(-1, 1, D)
    return x


def upstream_grad(world: int) -> torch.Tensor:
    return torch.randn(world * T_PER_RANK, D, generator=torch.Generator().manual_seed(2))


def forward_backward(layer: MoELayer, x: torch.Tensor, grad_out: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y, routing = layer(x)
    # A weighted sum (not a mean) so per-rank gradients add up to the global ones.
    (y * grad_out).sum().backward()
    return y.detach(), x.grad, routing


class MetaRecorder:
    """A dispatch observer that keeps every DispatchMeta it is handed (and times nothing)."""

    def __init__(self):
        self.metas = []

    def start(self, name):
        return None

    def stop(self, handle):
        pass

    def on_dispatch(self, meta):
        self.metas.append(meta)


def ep_worker(rank, world, expert_to_rank, skew, mode="per-expert"):
    layer = build_layer()
    layout = ExpertLayout(tuple(expert_to_rank), world)
    recorder = MetaRecorder()
    shard_experts(layer, layout, mode=mode, observers=[recorder])
    rows = slice(rank * T_PER_RANK, (rank + 1) * T_PER_RANK)
    y, x_grad, routing = forward_backward(layer, global_batch(world, skew)[rows], upstream_grad(world)[rows])
    router_grad = layer.router.gate.weight.grad.clone()
    dist.all_reduce(router_grad)  # the data-parallel gradient sum the trainer would do
    (meta,) = recorder.metas
    dest_TK = torch.tensor(expert_to_rank)[routing.expert_ids_TK]
    distinct = sum(len({int(d) for d, v in zip(dest_TK[t], routing.valid_TK[t]) if v}) for t in range(len(dest_TK)))
    return {
        "distinct_ranks": distinct,
        "y": y,
        "x_grad": x_grad,
        "router_grad": router_grad,
        "expert_grads": {n: p.grad for n, p in layer.experts.named_parameters()},
        "local_experts": layout.local_experts(rank),
        "valid_slots": int(routing.valid_TK.sum()),
        "sent": sum(meta.send_splits),
        "received": sum(meta.recv_splits),
        "computed": int(meta.tokens_per_local_expert_X.sum()),
        "send_splits": meta.send_splits,
        "meta_counts": (meta.num_tokens, int(meta.valid_slots), int(meta.distinct_ranks), int(meta.remote_ranks)),
        "own_rank_tokens": int(((dest_TK == rank) & routing.valid_TK).any(1).sum()),  # tokens with an expert here
    }


@pytest.mark.parametrize("mode", ["per-expert", "per-rank"])
@pytest.mark.parametrize(
    "world,expert_to_rank,skew",
    [
        (2, [0, 0, 0, 0, 1, 1, 1, 1], "none"),
        (4, [0, 0, 1, 1, 2, 2, 3, 3], "none"),
        (2, [1, 0, 1, 0, 0, 1, 1, 0], "none"),  # a non-contiguous placement
        (4, [3, 1, 0, 2, 1, 0, 3, 2], "one_expert"),  # most tokens go to the same experts; some ranks get none
    ],
)
def test_expert_parallel_matches_single_process(tmp_path, world, expert_to_rank, skew, mode):
    results = run_distributed(ep_worker, world, tmp_path, expert_to_rank, skew, mode)
    ref_layer = build_layer()
    y_ref, x_grad_ref, routing = forward_backward(ref_layer, global_batch(world, skew), upstream_grad(world))

    torch.testing.assert_close(torch.cat([r["y"] for r in results]), y_ref)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in results]), x_grad_ref)
    for r in results:
        torch.testing.assert_close(r["router_grad"], ref_layer.router.gate.weight.grad)
        for name, grad in r["expert_grads"].items():
            full = getattr(ref_layer.experts, name).grad.view(E, F, D)[r["local_experts"]].reshape(-1, D)
            torch.testing.assert_close(grad, full, msg=f"grad of {name}")

    # Dropless, counted: every valid (token, slot) pair is computed exactly once. Per-expert dispatch sends one copy
    # per pair; per-rank dispatch one per (token, destination rank), i.e. sum of lambda.
    total_valid = int(routing.valid_TK.sum())
    assert sum(r["valid_slots"] for r in results) == total_valid
    assert sum(r["computed"] for r in results) == total_valid
    sent = sum(r["sent"] for r in results)
    assert sent == sum(r["received"] for r in results)
    assert sent == (total_valid if mode == "per-expert" else sum(r["distinct_ranks"] for r in results))
    # The dispatcher reports the same counts in its metadata, whatever the mode.
    for r in results:
        want = (T_PER_RANK, r["valid_slots"], r["distinct_ranks"], r["distinct_ranks"] - r["own_rank_tokens"])
        assert r["meta_counts"] == want
    if skew == "one_expert":
        assert min(r["computed"] for r in results) == 0  # some rank receives nothing, and that is fine


def test_layout_validation_names_the_values():
    with pytest.raises(ValueError, match=r"ep_size \(3\) must divide num_experts \(8\)"):
        ExpertLayout.contiguous(8, 3)
    with pytest.raises(ValueError, match=r"exactly 2 experts .* these ranks hold: \{0: 3, 1: 1\}"):
        ExpertLayout((0, 0, 0, 1), 2)
    with pytest.raises(ValueError, match=r"names ranks \[5\] outside 0..1"):
        ExpertLayout((0, 5, 1, 1), 2)
    layout = ExpertLayout((1, 0, 1, 0), 2)
    assert layout.local_experts(0) == [1, 3] and layout.logical_to_physical.tolist() == [2, 0, 3, 1]


# Variable-k routing straight into the dispatchers (the routers above are plain top-k): every lean path against the
# per-expert reference loop, outputs and gradients (x, combine weights, expert weights), dropless counted.
VK_T, VK_K = 20, 3
VK_CASES = {
    # name: (expert_to_rank, routing kind)
    "contiguous, empty slots": ([0, 0, 0, 0, 1, 1, 1, 1], "empty_slots"),
    "non-contiguous, empty slots": ([1, 0, 1, 0, 0, 1, 1, 0], "empty_slots"),
    "rank 1 receives nothing": ([0, 0, 0, 0, 1, 1, 1, 1], "rank1_idle"),  # experts 4..7 never chosen
    "rank 1 sends nothing": ([1, 0, 0, 1, 0, 1, 1, 0], "rank1_silent"),  # every slot of rank 1's tokens is empty
}


def vk_routing(kind: str, world: int):
    from tests.routing_cases import make_routing, random_routing

    idle = 4 if kind == "rank1_idle" else 0
    routing = random_routing(world * VK_T, VK_K, E, empty_fraction=0.4, idle_experts=idle, seed=5)
    valid = routing.valid_TK.clone()
    if kind == "rank1_silent":
        valid[VK_T:] = False
    routing = make_routing(routing.expert_ids_TK, routing.weights_TK, valid, E)
    routing.weights_TK.requires_grad_(True)
    return routing


def vk_worker(rank, world):
    from c2r.experts import build_backend
    from c2r.parallel import build_dispatcher, local_expert_weights

    full, x = expert_inputs(world * VK_T, E, D, F)
    rows = slice(rank * VK_T, (rank + 1) * VK_T)
    results = {}
    for name, (expert_to_rank, kind) in VK_CASES.items():
        layout = ExpertLayout(tuple(expert_to_rank), world)
        routing = vk_routing(kind, world)
        for mode in ("per-expert", "per-rank"):
            for impl in ("loop", "grouped_mm"):
                recorder = MetaRecorder()
                experts = local_expert_weights(full, layout.local_experts(rank))
                backend = build_backend("torch", ExpertConfig(torch_impl=impl))
                y, x_grad, w_grad = run_rows(
                    build_dispatcher(mode, layout, None, recorder), x, routing, backend, experts, rows
                )
                (meta,) = recorder.metas
                results[name, mode, impl] = {
                    "y": y,
                    "x_grad": x_grad,
                    "w_grad": w_grad,
                    "expert_grads": {n: p.grad for n, p in experts.named_parameters()},
                    "local_experts": layout.local_experts(rank),
                    "computed": int(meta.tokens_per_local_expert_X.sum()),
                    "sent": sum(meta.send_splits),
                    "received": sum(meta.recv_splits),
                    "distinct": int(meta.distinct_ranks),
                }
    return results


@pytest.mark.parametrize("slot_sums", ["torch", "triton-interpreted"])
def test_lean_dispatch_matches_reference_with_variable_k(tmp_path, monkeypatch, slot_sums):
    """``triton-interpreted``: the ranks sum slots with the GPU path's Triton kernels (c2r/experts/slot_kernels.py),
    run on their CPU tensors by Triton's interpreter."""
    from c2r.experts import build_backend

    if slot_sums == "triton-interpreted":
        pytest.importorskip("triton", reason="the Triton interpreter needs triton (pip install -e '.[dev]')")
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # read by the spawned ranks
    world = 2
    per_rank = run_distributed(vk_worker, world, tmp_path)
    full, x = expert_inputs(world * VK_T, E, D, F)
    for name, (_, kind) in VK_CASES.items():
        routing = vk_routing(kind, world)
        full.zero_grad(set_to_none=True)
        reference = run_rows(None, x, routing, build_backend("reference", ExpertConfig()), full)
        total_valid = int(routing.valid_TK.sum())
        for mode in ("per-expert", "per-rank"):
            for impl in ("loop", "grouped_mm"):
                results = [r[name, mode, impl] for r in per_rank]
                where = f"{name}, {mode}, {impl}"
                assert_ranks_match_reference(results, reference, full, where)
                # Dropless, counted: each valid pair computed once; per-expert sends one row per pair, per-rank one
                # per (token, destination rank).
                assert sum(r["computed"] for r in results) == total_valid, where
                sent = sum(r["sent"] for r in results)
                assert sent == sum(r["received"] for r in results), where
                assert sent == (total_valid if mode == "per-expert" else sum(r["distinct"] for r in results)), where
        if kind == "rank1_idle":
            assert per_rank[1][name, "per-rank", "loop"]["received"] == 0
        if kind == "rank1_silent":
            assert per_rank[1][name, "per-rank", "loop"]["sent"] == 0


class HostCountSpy:
    """The torch backend, recording whether each grouped call got its counts on the host and whether they were right."""

    name = "spy"

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def grouped_mlp(self, x_PD, tokens_per_expert_E, experts, host_counts=None):
        self.calls.append((host_counts, tokens_per_expert_E.tolist()))
        return self.inner.grouped_mlp(x_PD, tokens_per_expert_E, experts, host_counts)


def host_count_worker(rank, world, mode, chunks):
    from c2r.experts import build_backend

    layer = build_layer()
    shard_experts(layer, None, mode=mode, ranks_per_node=1 if mode == "per-node" else None, overlap_chunks=chunks)
    spy = HostCountSpy(build_backend("torch", layer.config.experts))
    layer.backend_for = lambda x: spy
    rows = slice(rank * T_PER_RANK, (rank + 1) * T_PER_RANK)
    forward_backward(layer, global_batch(world, "none")[rows], upstream_grad(world)[rows])
    return spy.calls


@pytest.mark.parametrize(
    "mode,chunks", [("per-expert", 1), ("per-rank", 1), ("per-node", 1), ("per-expert", 3), ("per-rank", 2)]
)
def test_the_backend_gets_the_counts_on_the_host(tmp_path, mode, chunks):
    # The dispatcher has every count on the host after its one count exchange; handing them to the backend spares
    # MegaBlocks' grouped_gemm (and the segment loop) a second host sync per layer (issue 11: <= 2 per forward).
    for calls in run_distributed(host_count_worker, 2, tmp_path, mode, chunks):
        assert len(calls) == chunks
        for host, device in calls:
            assert host == device, (host, device)
