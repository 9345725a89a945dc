"""Per-node dispatch over gloo, ranks grouped into virtual nodes (2 x 2 on 4 ranks, 2 x 4 on 8), against the
single-process reference: outputs and gradients, several layouts and routings in one spawn per world size, and the
rows it sends over the network recounted here from the routing alone."""

import pytest
import torch
import torch.distributed as dist

from c2r.experts import ExpertConfig, build_backend
from c2r.moe import MoEConfig, MoELayer
from c2r.parallel import build_dispatcher, local_expert_weights, make_node_groups, resolve_ranks_per_node, shard_experts
from placement.layout import ExpertLayout
from tests.dispatch_cases import assert_ranks_match_reference, expert_inputs, run_rows
from tests.distributed import run_distributed
from tests.routing_cases import make_routing, random_routing
from tests.test_expert_parallel import MetaRecorder

T, D, F, E, K = 10, 8, 4, 16, 4  # tokens per rank, hidden, ffn, experts, slots
NODES = 2


def planned_layout(world: int) -> ExpertLayout:
    """A non-contiguous layout: expert e on rank ((5e + 3) mod E) // X (5 is prime to E: X experts per rank)."""
    X = E // world
    return ExpertLayout(tuple(((5 * e + 3) % E) // X for e in range(E)), world)


CASES = {
    # name: (layout, routing kind)
    "contiguous, empty slots": ("contiguous", "empty_slots"),
    "planned, empty slots": ("planned", "empty_slots"),
    "node 1 receives nothing": ("contiguous", "node1_idle"),  # experts E/2.. (node 1's) never chosen
    "rank 1 sends nothing": ("planned", "rank1_silent"),
}


def case_layout(kind: str, world: int) -> ExpertLayout:
    return ExpertLayout.contiguous(E, world) if kind == "contiguous" else planned_layout(world)


def case_routing(kind: str, world: int):
    idle = E // 2 if kind == "node1_idle" else 0
    routing = random_routing(world * T, K, E, empty_fraction=0.3, idle_experts=idle, seed=7)
    valid = routing.valid_TK.clone()
    if kind == "rank1_silent":
        valid[T : 2 * T] = False
    return make_routing(routing.expert_ids_TK, routing.weights_TK, valid, E)


def moe_layer() -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(D, MoEConfig(num_experts=E, top_k=2, ffn_hidden_size=F, experts=ExpertConfig(backend="torch")))


def worker(rank, world):
    W = world // NODES
    full, x = expert_inputs(world * T, E, D, F)
    rows = slice(rank * T, (rank + 1) * T)
    groups = make_node_groups(W)  # once, for every case
    backend = build_backend("torch", ExpertConfig(torch_impl="grouped_mm"))
    results = {}
    for name, (layout_kind, routing_kind) in CASES.items():
        layout = case_layout(layout_kind, world)
        recorder = MetaRecorder()
        experts = local_expert_weights(full, layout.local_experts(rank))
        dispatcher = build_dispatcher("per-node", layout, None, recorder, W, groups)
        y, x_grad, w_grad = run_rows(dispatcher, x, case_routing(routing_kind, world), backend, experts, rows)
        (meta,) = recorder.metas
        results[name] = {
            "y": y,
            "x_grad": x_grad,
            "w_grad": w_grad,
            "expert_grads": {n: p.grad for n, p in experts.named_parameters()},
            "local_experts": layout.local_experts(rank),
            "computed": int(meta.tokens_per_local_expert_X.sum()),
            "sent": sum(meta.send_splits),
            "received": sum(meta.recv_splits),
            "network_rows": len(meta.token_idx_C),  # stage 1: one row per (token, destination node)
            "inter_node_copies": meta.inter_node_copies,
            "counts": (int(meta.distinct_nodes), int(meta.remote_nodes), int(meta.distinct_ranks)),
        }
    # The whole layer, sharded by shard_experts with its router: the router's gradient too.
    layer = moe_layer()
    shard_experts(layer, planned_layout(world), mode="per-node", ranks_per_node=W)
    x_layer = x[rows].clone().requires_grad_(True)
    y, _ = layer(x_layer)
    (y * torch.randn(world * T, D, generator=torch.Generator().manual_seed(5))[rows]).sum().backward()
    router_grad = layer.router.gate.weight.grad.clone()
    dist.all_reduce(router_grad)
    results["layer"] = {"y": y.detach(), "x_grad": x_layer.grad, "router_grad": router_grad}
    return results


def recount(routing, layout: ExpertLayout, world: int, rank: int) -> dict:
    """From the routing alone: per token of ``rank``, its experts' distinct nodes and ranks."""
    W = world // NODES
    nodes = ranks = remote = 0
    for t in range(rank * T, (rank + 1) * T):
        hit = {layout.expert_to_rank[int(e)] for e, v in zip(routing.expert_ids_TK[t], routing.valid_TK[t]) if v}
        hit_nodes = {r // W for r in hit}
        nodes, ranks, remote = nodes + len(hit_nodes), ranks + len(hit), remote + len(hit_nodes - {rank // W})
    return {"nodes": nodes, "ranks": ranks, "remote_nodes": remote}


def check_layer(per_rank, world):
    layer = moe_layer()
    _, x = expert_inputs(world * T, E, D, F)
    x = x.clone().requires_grad_(True)
    y, _ = layer(x)
    (y * torch.randn(world * T, D, generator=torch.Generator().manual_seed(5))).sum().backward()
    results = [r["layer"] for r in per_rank]
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), y.detach())
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in results]), x.grad)
    for r in results:
        torch.testing.assert_close(r["router_grad"], layer.router.gate.weight.grad)


@pytest.mark.parametrize("world", [4, 8])  # 2 nodes x 2 ranks, 2 nodes x 4 ranks
def test_per_node_dispatch_matches_reference(tmp_path, world):
    per_rank = run_distributed(worker, world, tmp_path)
    full, x = expert_inputs(world * T, E, D, F)
    reference = build_backend("reference", ExpertConfig())
    for name, (layout_kind, routing_kind) in CASES.items():
        layout, routing = case_layout(layout_kind, world), case_routing(routing_kind, world)
        full.zero_grad(set_to_none=True)
        results = [r[name] for r in per_rank]
        assert_ranks_match_reference(results, run_rows(None, x, routing, reference, full), full, name)
        # Dropless, counted: every valid pair computed once; every row sent is received.
        assert sum(r["computed"] for r in results) == int(routing.valid_TK.sum()), name
        assert sum(r["sent"] for r in results) == sum(r["received"] for r in results), name
        # Over the network: one row per (token, destination node), the token's own node not crossing; within the
        # node, one row per (token, destination rank). Recounted from the routing, rank by rank.
        for rank, r in enumerate(results):
            want = recount(routing, layout, world, rank)
            assert r["network_rows"] == want["nodes"], (name, rank)
            assert r["inter_node_copies"] == want["remote_nodes"], (name, rank)
            assert r["counts"] == (want["nodes"], want["remote_nodes"], want["ranks"]), (name, rank)
        total = {key: sum(recount(routing, layout, world, s)[key] for s in range(world)) for key in ("nodes", "ranks")}
        assert sum(r["sent"] for r in results) == total["nodes"] + total["ranks"], name
        assert sum(r["inter_node_copies"] for r in results) > 0, name  # rows do cross nodes
        if routing_kind == "node1_idle":
            W = world // NODES
            assert all(r["computed"] == 0 for r in results[W:]), name  # node 1 receives nothing to compute
    check_layer(per_rank, world)


def test_gpus_per_node_is_validated_with_both_numbers():
    with pytest.raises(ValueError, match=r"gpus_per_node \(3\) must divide the expert-parallel ranks \(4\)"):
        resolve_ranks_per_node(3, 4)
    assert resolve_ranks_per_node(2, 8) == 2
    assert resolve_ranks_per_node(8, 4) == 4  # the EP group fits in one node


def train_worker(rank, world, raws):
    from c2r.config_utils import config_from_dict
    from c2r.train import RunConfig, train

    return [train(config_from_dict(RunConfig, raw))["step_losses"] for raw in raws]


def test_training_with_per_node_dispatch_equals_per_rank(tmp_path):
    from profiling.summary import format_summary, summarize
    from tests.run_configs import tiny_run_config

    def raw(name, **options):
        return tiny_run_config(tmp_path / name, steps=4, eval_every=4, ep_size=4, **options)

    # One spawn, two runs (4 spawned DeepSpeed processes cost more than the runs): per-rank, then 4 CPU ranks as
    # 2 virtual nodes of 2, profiled (profiling observes, it changes no number).
    per_rank, per_node = run_distributed(
        train_worker,
        4,
        tmp_path / "spawn",
        [raw("per_rank", dispatch="per-rank"), raw("per_node", dispatch="per-node", gpus_per_node=2, profile=True)],
    )[0]
    torch.testing.assert_close(per_node, per_rank, rtol=2e-5, atol=2e-5)
    summary = summarize(tmp_path / "per_node")
    for layer in summary["layers"]:
        assert layer["mode"] == "per-node" and layer["ranks_per_node"] == 2
        # Over the network, one copy per (token, other destination node): what the recorded node counts say.
        assert layer["inter_node_copies_per_token"] == pytest.approx(layer["remote_nodes_per_token"])
        assert 0 < layer["inter_node_copies_per_token"] <= 1.0  # 2 nodes: at most one other node
        assert sum(map(sum, layer["copies_node_to_node"])) == sum(map(sum, layer["copies_rank_to_rank"]))
    assert "inter-node copies/token" in format_summary(summary)
