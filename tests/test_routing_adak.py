"""Ada-K router: allocator shapes, the three modes and forced ks, renormalised weights, k* = 1 is top-1."""

import math

import pytest
import torch

from c2r.model import ModelConfig, MoEGPT
from c2r.moe import MoEConfig, MoELayer
from c2r.routing import RouterConfig, TopKRouter, build_router
from c2r.routing.adak import AdaKRouter, adak_routers, select_top_k_star
from c2r.routing.config import AdaKConfig


def adak_config(mode: str = "argmax", max_k: int = 0) -> RouterConfig:
    return RouterConfig(kind="adak", adak=AdaKConfig(max_k=max_k, mode=mode))


def hand_router(mode: str = "argmax") -> tuple[AdaKRouter, torch.Tensor]:
    """D = 2, E = 4, top-2. Token 0 = (1, 0), token 1 = (0, 1), so each token reads one column of the weights.

    Router logits: token 0 (0, 2, 1, 0.5) -> experts by probability 1, 2, 3, 0;
                   token 1 (3, 0, 1, 2)   -> experts 0, 3, 2, 1.
    Allocator logits: token 0 (5, 0, 0, 0) -> argmax k = 1; token 1 (0, 0, 5, 0) -> argmax k = 3.
    """
    router = AdaKRouter(2, 4, 2, adak_config(mode))
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[0.0, 3.0], [2.0, 0.0], [1.0, 1.0], [0.5, 2.0]]))
        router.allocator.weight.copy_(torch.tensor([[5.0, 0.0], [0.0, 0.0], [0.0, 5.0], [0.0, 0.0]]))
    return router, torch.eye(2)


def test_allocator_shapes_names_and_uniform_start():
    router = build_router(6, 8, 2, adak_config(max_k=5))
    assert isinstance(router, AdaKRouter)
    assert router.allocator.weight.shape == (5, 6) and router.allocator.bias is None
    assert router.gate.weight.shape == (8, 6)
    assert AdaKRouter(6, 8, 2, adak_config()).max_k == 8  # max_k 0: all experts
    assert not [name for name, _ in router.named_parameters() if "expert" in name]
    router(torch.randn(3, 6))
    allocation = router.last_allocation
    assert allocation.log_probs_TJ.shape == (3, 5) and allocation.router_probs_TE.shape == (3, 8)
    torch.testing.assert_close(allocation.probs_TJ, torch.full((3, 5), 0.2))  # zero weights: uniform over k


def test_model_init_keeps_the_allocator_at_zero():
    config = ModelConfig(n_layer=2, d_model=16, n_head=2, moe=MoEConfig(num_experts=4, router=adak_config()))
    routers = adak_routers(MoEGPT(config))
    assert len(routers) == 2
    assert all(bool((r.allocator.weight == 0).all()) for r in routers)


def test_select_top_k_star_hand_case():
    probs_TE = torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.1, 0.5, 0.15, 0.25]])
    ids, weights, valid = select_top_k_star(probs_TE, torch.tensor([2, 1]), 4)
    assert ids.tolist() == [[1, 3, 0, 0], [1, 0, 0, 0]]  # empty slots hold 0
    assert valid.tolist() == [[True, True, False, False], [True, False, False, False]]
    torch.testing.assert_close(weights, torch.tensor([[0.5 / 0.75, 0.25 / 0.75, 0, 0], [1.0, 0, 0, 0]]))
    _, raw, _ = select_top_k_star(probs_TE, torch.tensor([2, 1]), 4, renormalize=False)
    torch.testing.assert_close(raw, torch.tensor([[0.5, 0.25, 0, 0], [0.5, 0, 0, 0]]))


def test_argmax_mode_masks_and_renormalises():
    router, x = hand_router("argmax")
    routing = router(x)
    assert router.last_allocation.k_T.tolist() == [1, 3]
    assert routing.max_k == 4 and not routing.fixed_k
    assert routing.valid_TK.tolist() == [[True, False, False, False], [True, True, True, False]]
    assert routing.expert_ids_TK.tolist() == [[1, 0, 0, 0], [0, 3, 2, 0]]
    p1 = torch.tensor([3.0, 0.0, 1.0, 2.0]).softmax(0)
    top3 = p1[[0, 3, 2]]
    torch.testing.assert_close(routing.weights_TK[0], torch.tensor([1.0, 0, 0, 0]))
    torch.testing.assert_close(routing.weights_TK[1, :3], top3 / top3.sum())
    assert routing.tokens_per_expert_E.tolist() == [1, 1, 1, 1]
    assert float(routing.active_experts_per_token()) == 2.0


def test_default_mode_is_plain_top_k():
    router, _ = hand_router("default")
    x = torch.randn(5, 2)
    plain = TopKRouter(2, 4, 2, RouterConfig())
    plain.gate.weight.data.copy_(router.gate.weight)
    ours, ref = router(x), plain(x)
    assert ours.fixed_k and ours.max_k == 2
    assert torch.equal(ours.expert_ids_TK, ref.expert_ids_TK) and bool(ours.valid_TK.all())
    torch.testing.assert_close(ours.weights_TK, ref.weights_TK)
    torch.testing.assert_close(ours.aux_loss, ref.aux_loss)
    assert router.last_allocation.k_T.tolist() == [2] * 5


def test_sample_mode_draws_from_the_allocator():
    router, x = hand_router("sample")
    with torch.no_grad():
        router.allocator.weight.mul_(10)  # logits 50 vs 0: effectively deterministic
    routing = router(x)
    assert router.last_allocation.k_T.tolist() == [1, 3]
    assert routing.valid_TK.sum(dim=1).tolist() == [1, 3]
    torch.manual_seed(0)
    uniform = AdaKRouter(4, 4, 2, adak_config("sample"))  # zero allocator: k uniform over 1..4
    routing = uniform(torch.randn(4000, 4))
    k_T = uniform.last_allocation.k_T
    assert torch.equal(routing.valid_TK.sum(dim=1), k_T)
    assert sorted(k_T.unique().tolist()) == [1, 2, 3, 4]
    assert abs(k_T.float().mean().item() - 2.5) < 0.1
    torch.testing.assert_close(uniform.last_allocation.log_prob_T, torch.full((4000,), math.log(0.25)))


def test_forced_ks_override_the_mode_until_cleared():
    router, x = hand_router("argmax")
    router.force_k(torch.tensor([2, 4]))
    routing = router(x)
    assert routing.valid_TK.sum(dim=1).tolist() == [2, 4] and not routing.fixed_k
    assert routing.expert_ids_TK[1].tolist() == [0, 3, 2, 1]
    log_probs = router.last_allocation.log_probs_TJ
    torch.testing.assert_close(router.last_allocation.log_prob_T, log_probs[[0, 1], [1, 3]])
    assert router.last_allocation.log_prob_T.requires_grad  # PPO's gradient flows to the allocator
    with pytest.raises(ValueError, match="forced ks are for 2 tokens, this call has 3"):
        router(torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"values in 1\.\.4"):
        router.force_k(torch.tensor([0, 5]))
    router.force_k(None)
    router(x)
    assert router.last_allocation.k_T.tolist() == [1, 3]  # back to argmax
    with pytest.raises(ValueError, match="adak mode 'greedy' is not one of"):
        router.set_mode("greedy")


def moe_pair(top_k_plain: int) -> tuple[MoELayer, MoELayer]:
    torch.manual_seed(0)
    adak = MoELayer(8, MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=16, router=adak_config()))
    plain = MoELayer(8, MoEConfig(num_experts=4, top_k=top_k_plain, ffn_hidden_size=16))
    plain.load_state_dict(adak.state_dict(), strict=False)  # same gate and experts; the allocator has no twin
    return adak, plain


def test_k_star_1_equals_top_1_and_k_star_top_k_equals_top_k():
    x = torch.randn(2, 5, 8)
    adak, top1 = moe_pair(1)
    adak.router.force_k(torch.ones(10, dtype=torch.long))
    torch.testing.assert_close(adak(x)[0], top1(x)[0])
    adak, top2 = moe_pair(2)
    adak.router.force_k(torch.full((10,), 2))
    torch.testing.assert_close(adak(x)[0], top2(x)[0])
    adak.router.force_k(None)
    adak.router.set_mode("default")
    torch.testing.assert_close(adak(x)[0], top2(x)[0])


def test_forcing_a_rollouts_ks_replays_it_exactly():
    # PPO's later epochs re-run the model with the rollout's ks: every layer must see the same inputs again.
    torch.manual_seed(1)
    config = ModelConfig(
        block_size=8, n_layer=2, d_model=16, n_head=2, moe=MoEConfig(num_experts=4, router=adak_config("sample"))
    )
    model = MoEGPT(config)
    routers = adak_routers(model)
    for router in routers:
        torch.nn.init.normal_(router.allocator.weight, std=0.5)
    idx = torch.randint(0, 256, (2, 8))
    logits = model(idx).logits
    actions = [r.last_allocation.k_T for r in routers]
    log_probs = [r.last_allocation.log_prob_T.detach() for r in routers]
    for router, k_T in zip(routers, actions):
        router.force_k(k_T)
    torch.testing.assert_close(model(idx).logits, logits)
    for router, old in zip(routers, log_probs):
        torch.testing.assert_close(router.last_allocation.log_prob_T.detach(), old)
