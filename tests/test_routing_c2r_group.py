"""C2R and group-limited routing against hand-computed cases (docs/algorithms.md sections 2 and 3)."""

import numpy as np
import pytest
import torch

from c2r.routing import RouterConfig, build_router
from c2r.routing.cli import main as route_main
from c2r.routing.cli import pair_coverage
from c2r.routing.collaborators import collaborator_lists, load_collaborators
from c2r.routing.config import C2RConfig, GroupLimitedConfig
from tests.router_helpers import identity_router, write_lists

# Co-activation of 4 experts: 0 mostly with 2, then 3, then 1; 1 with 3; ties broken by index.
COACT = np.array(
    [
        [9, 1, 5, 2],
        [1, 9, 0, 4],
        [5, 0, 9, 3],
        [2, 4, 3, 9],
    ]
)


def test_collaborator_lists_sort_by_count_and_put_self_last():
    lists = collaborator_lists(COACT)[0]
    assert lists.tolist() == [[2, 3, 1, 0], [3, 0, 2, 1], [0, 3, 1, 2], [1, 2, 0, 3]]
    # T=1 keeps, per row, the largest off-diagonal count: 5 + 4 + 5 + 4 = 18 of 2 * (1+5+2+0+4+3) = 30.
    assert pair_coverage(COACT, lists, 1) == pytest.approx(18 / 30)


def test_c2r_picks_the_anchor_then_the_best_candidates(tmp_path):
    lists = write_lists(tmp_path / "l.npz", COACT)
    # Token: p ordered 1 > 0 > 2 > 3. Anchor = 1; its list is [3, 0, 2, 1].
    # T=1: the only candidate is 3, though 0 is more probable; T=2: candidates {3, 0}: picks 0 (plain top-2).
    logits = torch.log(torch.tensor([[0.3, 0.4, 0.2, 0.1]]))
    r1 = identity_router("c2r", 4, 2, renormalize=False, c2r={"collaborators": lists, "top_t": 1})(logits)
    assert r1.expert_ids_TK.tolist() == [[1, 3]]
    torch.testing.assert_close(r1.weights_TK, torch.tensor([[0.4, 0.1]]))  # full-softmax values
    r2 = identity_router("c2r", 4, 2, renormalize=False, c2r={"collaborators": lists, "top_t": 2})(logits)
    assert r2.expert_ids_TK.tolist() == [[1, 0]]
    r3 = identity_router("c2r", 4, 3, renormalize=True, c2r={"collaborators": lists, "top_t": 2})(logits)
    assert r3.expert_ids_TK.tolist() == [[1, 0, 3]]
    torch.testing.assert_close(r3.weights_TK, torch.tensor([[0.4, 0.3, 0.1]]) / 0.8)
    assert r3.valid_TK.all() and r3.tokens_per_expert_E.tolist() == [1, 1, 0, 1]


def test_c2r_equals_topk_when_every_collaborator_is_a_candidate(tmp_path):
    lists = write_lists(tmp_path / "l.npz", np.full((8, 8), 5))
    c2r = build_router(16, 8, 3, RouterConfig(kind="c2r", c2r=C2RConfig(collaborators=lists, top_t=7)))
    topk = build_router(16, 8, 3, RouterConfig(kind="topk"))
    topk.load_state_dict({"gate.weight": c2r.gate.weight})
    x = torch.randn(64, 16)
    a, b = c2r(x), topk(x)
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK)
    torch.testing.assert_close(a.weights_TK, b.weights_TK)


def test_c2r_lists_travel_with_the_state_dict(tmp_path):
    lists = write_lists(tmp_path / "l.npz", COACT)
    router = identity_router("c2r", 4, 2, c2r={"collaborators": lists, "top_t": 2})
    assert torch.equal(router.state_dict()["collaborators_EE"], torch.as_tensor(collaborator_lists(COACT)[0]))


def test_c2r_bad_configs_name_the_values(tmp_path):
    with pytest.raises(ValueError, match="needs collaborator lists"):
        RouterConfig(kind="c2r").check_fits(8, 2)
    lists = write_lists(tmp_path / "l.npz", COACT)
    with pytest.raises(ValueError, match=r"top_t \(1\) must be between top_k - 1 \(2\)"):
        RouterConfig(kind="c2r", c2r=C2RConfig(collaborators=lists, top_t=1)).check_fits(4, 3)
    with pytest.raises(ValueError, match=r"this model has 8 experts"):
        load_collaborators(lists, 0, 8)
    with pytest.raises(ValueError, match=r"lists for 1 MoE layers"):
        load_collaborators(lists, 1, 4)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        load_collaborators(tmp_path / "missing.npz", 0, 4)
    with pytest.raises(ValueError, match=r"top_k \(9\) must be between 1 and num_experts \(8\)"):
        RouterConfig().check_fits(8, 9)


def test_c2r_route_cli_writes_lists_from_counts(tmp_path, capsys):
    np.save(tmp_path / "c.npy", np.stack([COACT, COACT]))
    assert (
        route_main(["collaborators", "--coactivation", str(tmp_path / "c.npy"), "--out", str(tmp_path / "l.npz")]) == 0
    )
    assert "2 MoE layers of 4 experts" in capsys.readouterr().out
    assert load_collaborators(tmp_path / "l.npz", 1, 4).tolist() == collaborator_lists(COACT)[0].tolist()
    assert route_main(["collaborators", "--out", str(tmp_path / "x.npz")]) == 2


def test_group_limited_hand_case():
    # 4 experts in 2 groups {0,1} {2,3}; k=2, M=1: group score = sum of the group's top-2.
    # p = [.30, .05, .25, .40]: group 0 scores .35, group 1 scores .65 -> experts 3 and 2, although 0 > 2.
    logits = torch.log(torch.tensor([[0.30, 0.05, 0.25, 0.40]]))
    r = identity_router("group_limited", 4, 2, renormalize=False, group_limited={"max_groups": 1, "num_groups": 2})(
        logits
    )
    assert r.expert_ids_TK.tolist() == [[3, 2]]
    torch.testing.assert_close(r.weights_TK, torch.tensor([[0.40, 0.25]]))
    # M=2 = the number of groups: plain top-2.
    r = identity_router("group_limited", 4, 2, renormalize=False, group_limited={"max_groups": 2, "num_groups": 2})(
        logits
    )
    assert r.expert_ids_TK.tolist() == [[3, 0]]


@pytest.mark.parametrize("groups, max_groups, k", [(4, 1, 2), (4, 2, 4), (8, 3, 6), (2, 1, 3)])
def test_group_limited_never_exceeds_m_groups_and_equals_topk_at_m_eq_g(groups, max_groups, k):
    E = 16
    config = RouterConfig(
        kind="group_limited", group_limited=GroupLimitedConfig(max_groups=max_groups, num_groups=groups)
    )
    router = build_router(32, E, k, config)
    x = torch.randn(500, 32)
    ids = router(x).expert_ids_TK
    groups_hit = torch.tensor([len(set((row // (E // groups)).tolist())) for row in ids])
    assert int(groups_hit.max()) <= max_groups
    assert ids.unique(dim=1).shape[1] == k  # k distinct experts per token
    full = build_router(
        32,
        E,
        k,
        RouterConfig(kind="group_limited", group_limited=GroupLimitedConfig(max_groups=groups, num_groups=groups)),
    )
    topk = build_router(32, E, k, RouterConfig(kind="topk"))
    full.gate.weight.data.copy_(router.gate.weight)
    topk.gate.weight.data.copy_(router.gate.weight)
    assert torch.equal(full(x).expert_ids_TK, topk(x).expert_ids_TK)


def test_group_limited_groups_follow_a_placement_and_nodes():
    router = build_router(8, 8, 2, RouterConfig(kind="group_limited", group_limited=GroupLimitedConfig(max_groups=1)))
    router.set_expert_placement([1, 0, 1, 0, 3, 2, 3, 2], num_ranks=4)  # groups = ranks
    ids = router(torch.randn(200, 8)).expert_ids_TK
    rank = torch.tensor([1, 0, 1, 0, 3, 2, 3, 2])
    assert (rank[ids].min(dim=1).values == rank[ids].max(dim=1).values).all()
    nodes = build_router(
        8, 8, 2, RouterConfig(kind="group_limited", group_limited=GroupLimitedConfig(max_groups=1, num_groups=2))
    )
    nodes.set_expert_placement([1, 0, 1, 0, 3, 2, 3, 2], num_ranks=4)  # 2 nodes of ranks {0,1} {2,3}
    assert nodes.group_of_E.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_group_limited_bias_moves_load_to_idle_experts():
    # Aux-loss-free balancing: b_e += gamma * sign(mean_load - load_e).
    router = identity_router("group_limited", 4, 1, aux_loss_weight=0.0, group_limited={"bias_update_rate": 0.001})
    router.train()
    router(torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 3)))  # every token to expert 0: load [3, 0, 0, 0]
    stats = type(router).update_after_step([router])
    torch.testing.assert_close(router.selection_bias_E, torch.tensor([-0.001, 0.001, 0.001, 0.001]))
    assert stats["group_limited_max_bias"] == pytest.approx(0.001)
    state = router.state_dict()
    fresh = identity_router("group_limited", 4, 1, group_limited={"bias_update_rate": 0.001})
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.selection_bias_E, router.selection_bias_E)
    assert fresh.selection_bias_E.dtype == torch.float32


def test_group_limited_bad_configs_name_the_values():
    with pytest.raises(ValueError, match=r"max_groups \(3\) is larger than the number of groups \(2\)"):
        RouterConfig(kind="group_limited", group_limited=GroupLimitedConfig(max_groups=3, num_groups=2)).check_fits(
            8, 2
        )
    with pytest.raises(ValueError, match=r"num_groups \(3\) must divide num_experts \(8\)"):
        RouterConfig(kind="group_limited", group_limited=GroupLimitedConfig(num_groups=3)).check_fits(8, 2)
    with pytest.raises(ValueError, match=r"cannot hold top_k \(3\)"):
        RouterConfig(kind="group_limited", group_limited=GroupLimitedConfig(max_groups=1, num_groups=4)).check_fits(
            8, 3
        )
    router = build_router(8, 8, 2, RouterConfig(kind="group_limited", group_limited=GroupLimitedConfig(max_groups=2)))
    with pytest.raises(ValueError, match=r"max_groups \(2\) is larger than the number of groups \(1\)"):
        router.set_expert_placement([0] * 8, num_ranks=1)


def test_c2r_route_reads_a_trace_directory_with_or_without_counters(tmp_path, capsys):
    from profiling.trace import RoutingTraceRecorder

    # Two tokens through one layer of 4 experts: {0, 2} and {0, 2}, then {1, 3}: C[0, 2] = 2, C[1, 3] = 1.
    recorder = RoutingTraceRecorder(tmp_path / "traces", num_layers=1, num_experts=4, top_k=2, source="test")
    recorder.record(0, torch.tensor([[0, 2], [2, 0], [1, 3]]))
    recorder.close()
    assert route_main(["collaborators", str(tmp_path / "traces"), "--out", str(tmp_path / "a.npz")]) == 0
    for counters in (tmp_path / "traces").glob("counts-rank*.npz"):
        counters.unlink()  # e.g. traces written by the Hugging Face hooks of another tool: the shards alone
    assert route_main(["collaborators", str(tmp_path / "traces"), "--out", str(tmp_path / "b.npz")]) == 0
    for name in ("a.npz", "b.npz"):
        lists = load_collaborators(tmp_path / name, 0, 4)
        assert lists[0, 0] == 2 and lists[1, 0] == 3 and lists[2, 0] == 0 and lists[3, 0] == 1
