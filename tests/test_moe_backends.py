"""Every fast backend against the per-expert reference loop: same outputs, same gradients, no token lost."""

import pytest
import torch

from c2r.experts import ExpertConfig, ExpertWeights, build_backend
from c2r.experts.torch_backend import sort_by_expert
from c2r.moe import MoEConfig, MoELayer
from tests.routing_cases import all_to_one_expert, random_routing

FAST_BACKENDS = [("torch", "loop"), ("torch", "grouped_mm")]
# (tokens, top_k, experts, hidden, ffn, empty-slot fraction, idle experts); hidden/ffn multiples of 4 so the CPU
# grouped_mm kernel runs (it needs 16-byte row strides).
SHAPES = [
    (1, 1, 1, 8, 4, 0.0, 0),
    (37, 2, 8, 16, 12, 0.0, 3),
    (64, 4, 6, 24, 8, 0.3, 1),
    (50, 3, 16, 8, 16, 0.9, 5),
    (20, 2, 4, 12, 20, 1.0, 0),  # every slot empty: output must be exactly zero
]


def run_backend(name, impl, x, routing, experts):
    x = x.detach().clone().requires_grad_(True)
    weights = routing.weights_TK.detach().clone().requires_grad_(True)
    routing.weights_TK = weights
    experts.zero_grad(set_to_none=True)
    out = build_backend(name, ExpertConfig(torch_impl=impl))(x, routing, experts)
    grad_out = torch.linspace(-1, 1, out.numel()).view_as(out)
    if out.requires_grad:  # with every slot empty the reference output is a constant zero
        (out * grad_out).sum().backward()

    def grad_of(t):
        return t.grad if t.grad is not None else torch.zeros_like(t)

    grads = {n: grad_of(p) for n, p in experts.named_parameters()}
    return out.detach(), grad_of(x), grad_of(weights), grads


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}k{s[1]}E{s[2]}empty{s[5]}")
def test_fast_backends_match_reference(activation, shape):
    T, K, E, D, F, empty, idle = shape
    torch.manual_seed(0)
    experts = ExpertWeights(E, D, F, activation)
    x = torch.randn(T, D)
    routing = random_routing(T, K, E, empty_fraction=empty, idle_experts=idle)
    ref = run_backend("reference", "auto", x, routing, experts)
    if empty == 1.0:
        assert ref[0].abs().max() == 0
    for name, impl in FAST_BACKENDS:
        got = run_backend(name, impl, x, routing, experts)
        for what, a, b in zip(("output", "x grad", "weight grad"), got[:3], ref[:3]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name}/{impl} {what}")
        for param in ref[3]:
            torch.testing.assert_close(
                got[3][param], ref[3][param], rtol=1e-5, atol=1e-6, msg=f"{name}/{impl} grad of {param}"
            )


@pytest.mark.parametrize("backend,impl", [("reference", "auto"), *FAST_BACKENDS])
def test_every_valid_slot_is_computed_exactly_once(backend, impl):
    # out[t] = sum over valid slots k of w[t,k] * mlp_e(x[t]), so d<out, g>/d w[t,k] = <mlp_e(x[t]), g[t]> for a slot
    # computed once, twice that if computed twice, 0 if dropped, and must be 0 for an empty slot. We compare each
    # slot's gradient with that expectation computed slot by slot.
    T, K, E, D, F = 40, 3, 8, 16, 8
    torch.manual_seed(1)
    experts = ExpertWeights(E, D, F, "swiglu")
    x = torch.randn(T, D)
    routing = random_routing(T, K, E, empty_fraction=0.25, idle_experts=2)
    _, _, weight_grad, _ = run_backend(backend, impl, x, routing, experts)
    grad_out = torch.linspace(-1, 1, T * D).view(T, D)
    expected = torch.zeros(T, K)
    with torch.no_grad():
        for t in range(T):
            for k in range(K):
                if routing.valid_TK[t, k]:
                    expected[t, k] = (
                        experts.expert_mlp(x[t : t + 1], int(routing.expert_ids_TK[t, k])) * grad_out[t]
                    ).sum()
    torch.testing.assert_close(weight_grad, expected, rtol=1e-5, atol=1e-6)


def test_sort_by_expert_keeps_every_valid_pair_once():
    routing = random_routing(100, 4, 10, empty_fraction=0.4, idle_experts=3, seed=3)
    order = sort_by_expert(routing, 10)
    valid_pairs = routing.valid_TK.sum().item()
    assert order.num_pairs == valid_pairs == order.row_P.numel() == routing.tokens_per_expert_E.sum().item()
    # Each token appears exactly as often as it has valid slots, and the pairs come by expert, idle experts last.
    torch.testing.assert_close(torch.bincount(order.row_P, minlength=100), routing.valid_TK.sum(1))
    experts_P = routing.expert_ids_TK.flatten()[order.flat_P]
    assert (experts_P[1:] >= experts_P[:-1]).all() and experts_P.max() < 7
    assert routing.valid_TK.flatten()[order.flat_P].all()


def test_one_expert_receives_every_token():
    T, K, E, D, F = 64, 2, 8, 8, 8
    torch.manual_seed(2)
    experts = ExpertWeights(E, D, F, "gelu")
    x = torch.randn(T, D)
    routing = all_to_one_expert(T, K, E, expert=5)
    assert routing.tokens_per_expert_E.tolist() == [0, 0, 0, 0, 0, T, 0, 0]
    ref = run_backend("reference", "auto", x, routing, experts)
    for name, impl in FAST_BACKENDS:
        torch.testing.assert_close(run_backend(name, impl, x, routing, experts)[0], ref[0])


def test_layer_backends_agree_end_to_end_with_router():
    torch.manual_seed(4)
    outs = {}
    for backend in ("reference", "torch"):
        torch.manual_seed(4)
        layer = MoELayer(
            16, MoEConfig(num_experts=8, top_k=2, ffn_hidden_size=8, experts=ExpertConfig(backend=backend))
        )
        x = torch.randn(3, 5, 16, requires_grad=True)
        y, routing = layer(x)
        (y.square().sum() + routing.aux_loss).backward()
        outs[backend] = (y, x.grad, layer.router.gate.weight.grad, layer.experts.w2.grad)
        assert y.shape == x.shape
    for a, b in zip(outs["torch"], outs["reference"]):
        torch.testing.assert_close(a, b)


def test_bad_layer_configs_give_clear_errors():
    with pytest.raises(ValueError, match=r"top_k \(9\) must be between 1 and num_experts \(8\)"):
        MoEConfig(num_experts=8, top_k=9)
    with pytest.raises(ValueError, match=r"expert backend 'cuda-magic' is not one of \['auto', 'reference'"):
        ExpertConfig(backend="cuda-magic")
    layer = MoELayer(16, MoEConfig(num_experts=4, top_k=1, ffn_hidden_size=8))
    with pytest.raises(ValueError, match=r"input hidden size 12 does not match the layer's hidden size 16"):
        layer(torch.randn(2, 12))
    other = MoELayer(12, MoEConfig(num_experts=4, top_k=1, ffn_hidden_size=8))
    with pytest.raises(ValueError, match=r"experts.w1 has shape \(32, 16\) but this layer has .*hidden_size=12"):
        other.load_state_dict(layer.state_dict())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_megablocks_where_it_cannot_run_says_why():
    with pytest.raises(RuntimeError, match="megablocks backend needs a CUDA GPU"):
        MoELayer(16, MoEConfig(num_experts=4, top_k=1, ffn_hidden_size=8, experts=ExpertConfig(backend="megablocks")))
    sparse = ExpertConfig(backend="megablocks", megablocks_impl="sparse")
    with pytest.raises(ValueError, match=r"megablocks_impl='sparse' needs ffn_hidden_size divisible by .*128; got 8"):
        MoELayer(16, MoEConfig(num_experts=4, top_k=1, ffn_hidden_size=8, experts=sparse))
    with pytest.raises(RuntimeError, match="megablocks backend needs a CUDA GPU"):
        MoELayer(16, MoEConfig(num_experts=4, top_k=1, ffn_hidden_size=128, experts=sparse))


def test_auto_backend_falls_back_to_torch_on_cpu():
    layer = MoELayer(16, MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=8))
    assert layer.backend_for(torch.randn(2, 16)).name == "torch"


def test_torch_grouped_mm_refuses_unaligned_shapes_clearly():
    experts = ExpertWeights(4, 10, 6, "gelu")  # 10 floats = 40 bytes: not a multiple of 16
    routing = random_routing(8, 2, 4)
    # a ValueError: c2r-train prints it as one line (a RuntimeError was a traceback)
    with pytest.raises(ValueError, match="torch_impl='grouped_mm' has no kernel here.*hidden 10, ffn 6"):
        build_backend("torch", ExpertConfig(torch_impl="grouped_mm"))(torch.randn(8, 10), routing, experts)
    # auto falls back to the loop and still matches the reference
    x = torch.randn(8, 10)
    torch.testing.assert_close(
        build_backend("torch", ExpertConfig())(x, routing, experts),
        build_backend("reference", ExpertConfig())(x, routing, experts),
    )


def test_auto_backend_takes_the_fastest_measured_backend_of_the_nearest_shape():
    from c2r.experts.backend_choice import MEASURED, nearest_measurement

    # Recorded on sm90: our torch backend (slot orders, Triton slot sums, torch._grouped_mm) wins with 64-128 small
    # experts, MegaBlocks' grouped_gemm with 8 large ones.
    assert nearest_measurement("sm90", "swiglu", 128, 2048, 768).fastest == "torch"
    assert nearest_measurement("sm90", "swiglu", 256, 7168, 2048).fastest == "torch"  # DeepSeek-V3-like
    assert nearest_measurement("sm90", "swiglu", 8, 4096, 14336).fastest == "megablocks"
    assert nearest_measurement("sm90", "gelu", 64, 2048, 1024).fastest == "torch"
    assert nearest_measurement("sm90", "gelu", 8, 4096, 14336).fastest == "megablocks"
    assert nearest_measurement("sm80", "swiglu", 128, 2048, 768) is None  # nothing recorded: auto keeps MegaBlocks
    assert all(row.source.startswith("docs/benchmarks.md") for row in MEASURED)


def test_auto_backend_is_torch_on_the_cpu_whatever_the_shape():
    from c2r.experts import ExpertShape, resolve_expert_config

    shape = ExpertShape(num_experts=128, hidden_size=2048, ffn_hidden_size=768)
    cpu = torch.device("cpu")
    assert resolve_expert_config(ExpertConfig(), cpu, torch.float32, shape).backend == "torch"
    assert resolve_expert_config(ExpertConfig(backend="reference"), cpu, torch.float32, shape).backend == "reference"


def test_the_reference_backend_runs_under_autocast():
    # DeepSpeed's torch_autocast: float32 input, bf16 expert rows; the ground truth must still run (it failed in
    # index_add on the mixed dtypes).
    experts = ExpertWeights(4, 16, 8, "swiglu")
    routing = random_routing(12, 2, 4)
    x = torch.randn(12, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = build_backend("reference", ExpertConfig())(x, routing, experts)
        want = build_backend("torch", ExpertConfig(torch_impl="loop"))(x, routing, experts)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_the_layer_hands_its_backend_contiguous_rows():
    # MegaBlocks' gather kernels read rows D elements apart: a slice of a wider tensor must reach them copied.
    seen = []

    def spy(x_TD, routing, experts):
        seen.append(x_TD.is_contiguous())
        return torch.zeros_like(x_TD)

    layer = MoELayer(16, MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=8))
    layer.backend_for = lambda x_TD: spy
    wide = torch.randn(2, 3, 32)
    layer(wide[..., :16])
    assert seen == [True]
