import math

import pytest
import torch

from c2r.routing import RouterConfig, TopKRouter
from c2r.routing.losses import load_balancing_loss, router_z_loss


def router_with_logits(logits_TE: torch.Tensor, top_k: int, **config) -> tuple[TopKRouter, torch.Tensor]:
    """A router whose gate is the identity, so the input *is* the logits."""
    num_experts = logits_TE.shape[1]
    router = TopKRouter(num_experts, num_experts, top_k, RouterConfig(**config))
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(num_experts))
    return router, logits_TE


def test_topk_matches_hand_computed_case():
    # Token 0: logits [ln 1, ln 2, ln 3, ln 4] -> p = [.1, .2, .3, .4]; top-2 = experts 3 (.4) and 2 (.3).
    # Token 1: p = [.4, .3, .2, .1]; top-2 = experts 0 and 1.
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]))
    router, x = router_with_logits(logits, top_k=2, renormalize=False, aux_loss_weight=0.0)
    r = router(x)
    assert r.expert_ids_TK.tolist() == [[3, 2], [0, 1]]
    torch.testing.assert_close(r.weights_TK, torch.tensor([[0.4, 0.3], [0.4, 0.3]]))
    assert r.valid_TK.all() and r.fixed_k
    assert r.tokens_per_expert_E.tolist() == [1, 1, 1, 1]
    assert float(r.aux_loss) == 0.0

    router, x = router_with_logits(logits, top_k=2, renormalize=True, aux_loss_weight=0.0)
    torch.testing.assert_close(router(x).weights_TK, torch.tensor([[4 / 7, 3 / 7], [4 / 7, 3 / 7]]))


def test_aux_loss_matches_switch_formula():
    # Worked example, E=4, k=1, T=2: token 0 -> expert 3, token 1 -> expert 0, so f = [.5, 0, 0, .5];
    # P = mean of p over tokens = [.25, .25, .25, .25]; loss = alpha * E * sum f*P = alpha * 4 * .25 = alpha.
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]))
    router, x = router_with_logits(logits, top_k=1, aux_loss_weight=0.01)
    torch.testing.assert_close(router(x).aux_loss, torch.tensor(0.01))

    probs = torch.softmax(torch.randn(16, 8), dim=-1)
    counts = torch.randint(0, 5, (8,))
    expected = 8 * sum((counts[e] / counts.sum()) * probs[:, e].mean() for e in range(8))
    torch.testing.assert_close(load_balancing_loss(probs, counts), expected)
    # The fixed-k form: the caller passes the pair count it knows (no device-side total) and the coefficient.
    torch.testing.assert_close(load_balancing_loss(probs, counts, int(counts.sum()), weight=0.5), 0.5 * expected)


def test_z_loss_formula_and_weighting():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: ln 2 and ln 4.
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(expected))
    router, x = router_with_logits(logits, top_k=1, aux_loss_weight=0.0, z_loss_weight=0.001)
    torch.testing.assert_close(router(x).aux_loss, torch.tensor(0.001 * expected))


def test_router_gradients_flow_through_weights_and_aux_loss():
    router = TopKRouter(8, 4, 2)
    r = router(torch.randn(10, 8))
    (r.weights_TK.sum() + r.aux_loss).backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


def test_nan_logits_raise_a_clear_error():
    router = TopKRouter(8, 4, 2)
    x = torch.randn(6, 8)
    x[4, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"NaN/Inf for 1 of 6 tokens.*\[4\]"):
        router(x)


def test_bad_router_config():
    with pytest.raises(ValueError, match=r"top_k \(5\) must be between 1 and num_experts \(4\)"):
        TopKRouter(8, 4, 5)
    with pytest.raises(ValueError, match="router kind 'nope' is not one of"):
        RouterConfig(kind="nope")


def test_input_dtype_logits_match_float32_routing_on_float32_input():
    router = TopKRouter(16, 8, 2)
    fast = TopKRouter(16, 8, 2, RouterConfig(logits_dtype="input"))
    fast.load_state_dict(router.state_dict())
    x = torch.randn(32, 16)
    a, b = router(x), fast(x)
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK)
    torch.testing.assert_close(a.weights_TK, b.weights_TK)
    assert b.weights_TK.dtype == torch.float32


def imbalance(result) -> float:
    load_E = result.tokens_per_expert_E.float()
    return float(load_E.max() / load_E.mean())


def test_batch_balance_spreads_tokens_that_share_most_of_their_input():
    # Every token is one shared vector plus a small part of its own (the collapse at d_model 2048: docs/gpu_runs.md):
    # plain top-k sends them all to nearly the same experts; the per-batch bias spreads them.
    torch.manual_seed(0)
    x = 4 * torch.randn(64) + 0.3 * torch.randn(2048, 64)
    plain = TopKRouter(64, 32, 4, RouterConfig())
    balanced = TopKRouter(64, 32, 4, RouterConfig(balance="batch"))
    balanced.load_state_dict(plain.state_dict(), strict=False)  # the same gate
    r_plain, r_balanced = plain(x), balanced(x)
    assert imbalance(r_plain) > 4 and imbalance(r_balanced) < 1.3, (imbalance(r_plain), imbalance(r_balanced))
    # The bias only chooses: the weights are the unbiased probabilities of the chosen experts, renormalised.
    probs = torch.softmax(x @ plain.gate.weight.t(), dim=-1)
    chosen = probs.gather(1, r_balanced.expert_ids_TK)
    torch.testing.assert_close(r_balanced.weights_TK, chosen / chosen.sum(1, keepdim=True))
    assert r_balanced.tokens_per_expert_E.sum() == 2048 * 4  # still exactly k distinct experts per token
    assert (r_balanced.expert_ids_TK.sort(1).values.diff(dim=1) > 0).all()


def test_batch_balance_levels_clustered_logits_in_its_default_rounds():
    # Groups of tokens that favour different experts strongly: the counting solve of before ended its 8 rounds at
    # 1.14 (two groups) and 1.60 (four groups) max/mean here; the threshold rounds end at 1.05-1.07
    from c2r.routing.balance import solve_bias

    T, E, K = 8192, 64, 8
    rounds = RouterConfig().balance_rounds
    generator = torch.Generator().manual_seed(0)
    two = (torch.randn(T, 1, generator=generator) > 0).float() * torch.randn(E, generator=generator) * 3
    four = (torch.randn(4, E, generator=generator) * 4)[torch.randint(0, 4, (T,), generator=generator)]
    for logits in (
        two + 0.3 * torch.randn(T, E, generator=generator),
        four + 0.2 * torch.randn(T, E, generator=generator),
    ):
        scores = logits + solve_bias(logits, K, rounds)
        counts = (scores >= scores.topk(K, dim=1).values[:, -1:]).sum(0).float()
        assert counts.max() / counts.mean() < 1.10, counts.max() / counts.mean()


@pytest.mark.parametrize(("T", "E", "K"), [(4096, 64, 8), (1000, 16, 2), (300, 8, 1)])
def test_batch_balance_round_gives_each_expert_exactly_its_target_were_the_others_to_stay(T, E, K):
    """One round of the solve (c2r/routing/balance.py) moves every expert's bias to the value at which, with the
    other experts' biases as they were before the round, exactly round(T k / E) tokens take it."""
    from c2r.routing.balance import solve_bias

    generator = torch.Generator().manual_seed(E)
    logits = torch.randn(T, E, generator=generator) * torch.rand(E, generator=generator) * 3
    before, after = solve_bias(logits, K, 0), solve_bias(logits, K, 1)
    torch.testing.assert_close(before, -logits.mean(0))
    for e in range(E):
        bias = before.clone()
        bias[e] = after[e]
        taken = (logits + bias).topk(K, dim=1).indices
        assert (taken == e).sum() == round(T * K / E), e


def test_batch_balance_takes_every_expert_when_k_is_all_of_them():
    """k = E: every token takes every expert, so the solve keeps its centring start (no round can move a count)."""
    from c2r.routing.balance import solve_bias

    logits = torch.randn(64, 4)
    torch.testing.assert_close(solve_bias(logits, 4, 8), -logits.mean(0))


def test_batch_balance_running_bias_is_what_evaluation_uses():
    from c2r.routing.updates import after_optimizer_step

    torch.manual_seed(1)
    x = 4 * torch.randn(32) + 0.3 * torch.randn(512, 32)
    router = TopKRouter(32, 16, 2, RouterConfig(balance="batch", balance_momentum=0.5))
    router(x)  # training: solves a bias on this batch, the running bias stays 0 until the optimizer step
    solved = router.balancer._solved_sum_E.clone()
    assert router.balancer.bias_E.abs().sum() == 0
    after_optimizer_step(router)
    torch.testing.assert_close(router.balancer.bias_E, 0.5 * solved)
    router.eval()
    eval_ids = router(x).expert_ids_TK
    logits = x @ router.gate.weight.t()
    assert torch.equal(eval_ids, (logits + 0.5 * solved).topk(2, dim=1).indices)
    after_optimizer_step(router)  # nothing solved in evaluation: the running bias stays
    torch.testing.assert_close(router.balancer.bias_E, 0.5 * solved)
    # saved with the model (float32 extra state), restored exactly
    copy_ = TopKRouter(32, 16, 2, RouterConfig(balance="batch"))
    copy_.load_state_dict(router.state_dict())
    assert torch.equal(copy_.balancer.bias_E, router.balancer.bias_E)


@pytest.mark.parametrize(
    "config,message",
    [
        ({"balance": "sinkhorn"}, "router balance 'sinkhorn' is not one of"),
        ({"balance": "batch", "kind": "c2r"}, "router balance 'batch' is for the topk router; router kind is 'c2r'"),
        ({"balance": "batch", "balance_rounds": 0}, r"balance_rounds \(0\) must be >= 1"),
        ({"balance": "batch", "balance_momentum": 1.0}, r"balance_momentum \(1.0\) in \[0, 1\)"),
    ],
)
def test_batch_balance_bad_config(config, message):
    with pytest.raises(ValueError, match=message):
        RouterConfig(**config)
