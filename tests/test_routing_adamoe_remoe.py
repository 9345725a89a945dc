"""AdaMoE null experts and ReMoE ReLU routing against hand-computed cases (docs/algorithms.md sections 4 and 5)."""

import numpy as np
import pytest
import torch

from c2r.experts import ExpertConfig
from c2r.moe import MoEConfig, MoELayer
from c2r.routing import RouterConfig, after_optimizer_step, build_router
from c2r.routing.adamoe import null_aware_balance_loss
from c2r.routing.config import AdaMoEConfig, ReMoEConfig
from c2r.routing.remoe import load_balanced_l1
from tests.router_helpers import identity_router


def adamoe_with_logits(num_experts: int, num_null: int, top_k: int, **config):
    """Identity gate for the true experts and a null gate reading the inputs' last m features."""
    router = build_router(
        num_experts + num_null,
        num_experts,
        top_k,
        RouterConfig(kind="adamoe", adamoe=AdaMoEConfig(num_null_experts=num_null), **config),
    )
    with torch.no_grad():
        eye = torch.eye(num_experts + num_null)
        router.gate.weight.copy_(eye[:num_experts])
        router.null_gate.weight.copy_(eye[num_experts:])
    return router


def test_adamoe_nulls_are_empty_slots_and_weights_renormalise_over_true_experts():
    # E=3 true + m=2 nulls, k=3. Token 0: p over [e0 e1 e2 n0 n1] = [.4 .05 .05 .3 .2] -> top-3 = e0, n0, n1:
    #   one true expert, weight .4/.4 = 1. Token 1: [.3 .25 .05 .1 .3] -> e0 (.3), n1 (.3), e1 (.25):
    #   weights .3/.55 and .25/.55. Token 2: [.05 .05 .1 .5 .3] -> n0, n1, e2: weight 1.
    probs = torch.tensor([[0.4, 0.05, 0.05, 0.3, 0.2], [0.3, 0.25, 0.05, 0.1, 0.3], [0.05, 0.05, 0.1, 0.5, 0.3]])
    router = adamoe_with_logits(3, 2, 3, aux_loss_weight=0.0)
    r = router(probs.log())
    assert r.valid_TK.sum(dim=1).tolist() == [1, 2, 1]
    assert not r.fixed_k
    weights = {
        (t, int(e)): float(w)
        for t in range(3)
        for e, w, v in zip(r.expert_ids_TK[t], r.weights_TK[t].detach(), r.valid_TK[t])
        if v
    }
    assert weights == pytest.approx({(0, 0): 1.0, (1, 0): 0.3 / 0.55, (1, 1): 0.25 / 0.55, (2, 2): 1.0})
    assert r.tokens_per_expert_E.tolist() == [2, 1, 1]
    assert (r.weights_TK[~r.valid_TK] == 0).all()


def test_adamoe_token_of_only_nulls_gets_exactly_zero_output():
    E, m, D = 4, 4, 8
    layer = MoELayer(
        D,
        MoEConfig(
            num_experts=E,
            top_k=2,
            ffn_hidden_size=8,
            router=RouterConfig(kind="adamoe", adamoe=AdaMoEConfig(num_null_experts=m)),
            experts=ExpertConfig(backend="torch"),
        ),
    )
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.null_gate.weight.fill_(1.0)  # nulls win for positive inputs
    x = torch.cat([torch.ones(3, D), -torch.ones(2, D)])
    y, r = layer(x)
    assert r.valid_TK[:3].sum() == 0 and r.valid_TK[3:].sum() == 4
    assert torch.equal(y[:3], torch.zeros(3, D))  # exactly zero, not tiny
    assert y[3:].abs().sum() > 0
    (y.sum()).backward()
    assert torch.isfinite(layer.router.gate.weight.grad).all()


def test_null_aware_balance_loss_formula():
    # E=2 true, m=2 nulls, T=2, K=2. Selections: [e0, n0], [e0, n1] -> f = [2/4, 0, 1/4, 1/4];
    # nulls get their mean: f~ = [.5, 0, .25, .25] (unchanged here). P = mean probs.
    probs = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.4, 0.2, 0.1, 0.3]])
    selected = torch.tensor([[0, 2], [0, 3]])
    P = probs.mean(dim=0)
    expected = 4 * (0.5 * P[0] + 0 * P[1] + 0.25 * P[2] + 0.25 * P[3])
    torch.testing.assert_close(null_aware_balance_loss(probs, selected, 2), expected)
    # Unequal null loads are averaged: [e0, n0], [e1, n0] -> f nulls = [.5, 0] -> both .25.
    selected = torch.tensor([[0, 2], [1, 2]])
    expected = 4 * (0.25 * P[0] + 0.25 * P[1] + 0.25 * P[2] + 0.25 * P[3])
    torch.testing.assert_close(null_aware_balance_loss(probs, selected, 2), expected)


def test_adamoe_alpha_schedule_and_conversion_from_topk():
    config = RouterConfig(
        kind="adamoe", aux_loss_weight=0.02, adamoe=AdaMoEConfig(num_null_experts=3, aux_loss_switch_step=2)
    )
    router = build_router(6, 4, 3, config)
    assert router.current_aux_loss_weight() == 0.02
    after_optimizer_step(router)
    after_optimizer_step(router)
    assert router.current_aux_loss_weight() == 1e-4
    router.init_from_pretrained({"kind": "topk"})
    torch.testing.assert_close(router.null_gate.weight, router.gate.weight[[0, 1, 2]])
    before = router.null_gate.weight.clone()
    router.init_from_pretrained({"kind": "adamoe"})  # an AdaMoE checkpoint keeps its trained nulls
    assert torch.equal(router.null_gate.weight, before)


def test_adamoe_bad_configs():
    with pytest.raises(ValueError, match=r"num_null_experts > 0 \(got 0\)"):
        RouterConfig(kind="adamoe").check_fits(8, 2)
    with pytest.raises(ValueError, match=r"top_k \(13\) must be between 1 and num_experts \+ num_null_experts \(12\)"):
        RouterConfig(kind="adamoe", adamoe=AdaMoEConfig(num_null_experts=4)).check_fits(8, 13)


def test_remoe_gates_and_regulariser_hand_case():
    # Logits [[1, -1, 2, 0], [-1, -2, 3, .5]] -> gates relu: [[1, 0, 2, 0], [0, 0, 3, .5]].
    router = identity_router("remoe", 4, 2)
    r = router(torch.tensor([[1.0, -1.0, 2.0, 0.0], [-1.0, -2.0, 3.0, 0.5]]))
    assert r.valid_TK.tolist() == [[True, False, True, False], [False, False, True, True]]
    torch.testing.assert_close(r.weights_TK, torch.tensor([[1.0, 0, 2.0, 0], [0, 0, 3.0, 0.5]]))
    assert r.tokens_per_expert_E.tolist() == [1, 0, 2, 1]
    # f_e = E/(k T) * count = 4/4 * [1, 0, 2, 1]; L = (1/T) sum f_e g_te = (1*1 + 2*2 + 2*3 + 1*.5) / 2 = 5.75.
    gates = r.weights_TK
    torch.testing.assert_close(load_balanced_l1(gates, 2), torch.tensor(5.75))
    torch.testing.assert_close(r.aux_loss, torch.tensor(1e-8 * 5.75))


def test_remoe_lambda_update_direction_and_checkpoint_round_trip():
    router = identity_router("remoe", 4, 1)  # target sparsity 1 - 1/4 = .75
    router.train()
    router(torch.ones(5, 4))  # every gate positive: sparsity 0 < .75 -> too dense -> lambda * 1.2
    stats = after_optimizer_step(router)
    assert router.reg_lambda == np.float32(np.float32(1e-8) * np.float32(1.2))
    assert stats["remoe_sparsity"] == 0.0 and stats["remoe_lambda"] == pytest.approx(1.2e-8)
    router(-torch.ones(5, 4))  # all zero: sparsity 1 > .75 -> lambda / 1.2
    after_optimizer_step(router)
    assert router.reg_lambda == pytest.approx(1e-8, rel=1e-6)
    router(-torch.ones(5, 4))  # still too sparse, but lambda stays at its floor, lambda_init
    after_optimizer_step(router)
    assert router.reg_lambda == np.float32(1e-8)
    router.reg_lambda = np.float32(3.5e-3)
    fresh = identity_router("remoe", 4, 1)
    fresh.load_state_dict(router.state_dict())
    assert fresh.reg_lambda == np.float32(3.5e-3) and isinstance(fresh.reg_lambda, np.float32)
    fresh.to(torch.bfloat16)  # a bf16 model keeps lambda in float32
    assert fresh.get_extra_state()["reg_lambda"].dtype == torch.float32


def test_remoe_lambda_is_shared_across_layers_from_their_mean_sparsity():
    a, b = identity_router("remoe", 4, 2), identity_router("remoe", 4, 2)
    a.train(), b.train()
    model = torch.nn.ModuleList([a, b])
    a(torch.ones(4, 4))  # sparsity 0
    b(torch.ones(4, 4) * torch.tensor([1.0, -1, -1, -1]))  # sparsity .75: the mean .375 < target .5 -> multiply
    after_optimizer_step(model)
    assert a.reg_lambda == b.reg_lambda == pytest.approx(1.2e-8)


def test_remoe_layer_is_dropless_for_uneven_fan_out():
    # Tokens with 0, 1 and all 8 experts active: the layer equals the per-expert reference loop.
    torch.manual_seed(0)
    E, D = 8, 8
    layer = MoELayer(
        D,
        MoEConfig(
            num_experts=E,
            top_k=2,
            ffn_hidden_size=16,
            router=RouterConfig(kind="remoe"),
            experts=ExpertConfig(backend="torch"),
        ),
    )
    reference = MoELayer(
        D,
        MoEConfig(
            num_experts=E,
            top_k=2,
            ffn_hidden_size=16,
            router=RouterConfig(kind="remoe"),
            experts=ExpertConfig(backend="reference"),
        ),
    )
    reference.load_state_dict(layer.state_dict())
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.eye(E))
        reference.router.gate.weight.copy_(torch.eye(E))
    x = torch.cat([-torch.ones(1, D), torch.eye(D)[:1], torch.ones(1, D), torch.randn(20, D)])
    y, r = layer(x)
    y_ref, _ = reference(x)
    assert r.valid_TK.sum(dim=1)[:3].tolist() == [0, 1, 8]
    torch.testing.assert_close(y, y_ref)
    assert torch.equal(y[0], torch.zeros(D))


def test_remoe_bad_config():
    with pytest.raises(ValueError, match=r"lambda_factor > 1 \(got 1.0\)"):
        RouterConfig(kind="remoe", remoe=ReMoEConfig(lambda_factor=1.0)).check_fits(8, 2)


@pytest.mark.parametrize(
    "kind, top_k, extra", [("adamoe", 4, {"adamoe": AdaMoEConfig(num_null_experts=8)}), ("remoe", 2, {})]
)
def test_variable_k_costs_only_the_valid_slots(kind, top_k, extra):
    # The experts see exactly the valid (token, slot) rows: a token with fewer active experts costs fewer FLOPs.
    torch.manual_seed(0)
    layer = MoELayer(
        16,
        MoEConfig(
            num_experts=8,
            top_k=top_k,
            ffn_hidden_size=8,
            router=RouterConfig(kind=kind, **extra),
            experts=ExpertConfig(backend="torch"),
        ),
    )
    backend = layer.backend_for(torch.zeros(1, 16))
    rows = []
    real = backend.grouped_mlp
    backend.grouped_mlp = lambda x_PD, counts, experts: rows.append(x_PD.shape[0]) or real(x_PD, counts, experts)
    _, routing = layer(torch.randn(64, 16))
    valid = int(routing.valid_TK.sum())
    assert rows == [valid] and valid < routing.valid_TK.numel()


def test_remoe_ignores_an_empty_batch_in_its_sparsity():
    """A forward with no tokens (an empty micro-batch or rank) measured 0 / 0 = NaN, and the all-reduced NaN made
    every rank divide lambda whatever the real sparsity: it now adds no gates, and all-empty steps leave lambda."""
    from c2r.routing import RouterConfig, build_router

    router = build_router(16, 8, 2, RouterConfig(kind="remoe")).train()
    router.reg_lambda = np.float32(1e-3)
    with torch.no_grad():
        router.gate.weight.fill_(1.0)  # every gate open on a positive input: sparsity 0, below the target 0.75
    router(torch.ones(4, 16))
    router(torch.zeros(0, 16))
    stats = type(router).update_after_step([router])
    assert stats["remoe_sparsity"] == 0.0 and router.reg_lambda > np.float32(1e-3)  # too dense: lambda grows
    router(torch.zeros(0, 16))
    assert type(router).update_after_step([router]) == {} and router._forwards == 0
