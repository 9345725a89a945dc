"""What every expert-parallel equality test does on each rank and in its single-process reference: the same experts
and input, and one forward + backward of a fixed weighted sum over a rank's rows."""

from __future__ import annotations

import torch

from c2r.experts import ExpertWeights
from tests.routing_cases import make_routing


def expert_inputs(num_tokens: int, num_experts: int, hidden: int, ffn: int) -> tuple[ExpertWeights, torch.Tensor]:
    """All experts (SwiGLU, seed 0) and ``num_tokens`` input rows (seed 4): the same on every rank."""
    torch.manual_seed(0)
    experts = ExpertWeights(num_experts, hidden, ffn, "swiglu")
    return experts, torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(4))


def run_rows(dispatcher, x, routing, backend, experts, rows=slice(None)):
    """Forward + backward of ``sum(y * g)`` (g fixed, seed 3) over ``rows`` of ``x`` and ``routing`` (a rank's
    tokens; all of them for the reference): (y, x grad, combine-weight grad). ``dispatcher`` None runs ``backend``
    on the rows directly."""
    num_experts = routing.tokens_per_expert_E.numel()
    x = x[rows].clone().requires_grad_(True)
    local = make_routing(
        routing.expert_ids_TK[rows], routing.weights_TK[rows].detach(), routing.valid_TK[rows], num_experts
    )
    local.weights_TK.requires_grad_(True)
    y = dispatcher(x, local, backend, experts) if dispatcher else backend(x, local, experts)
    grad_out = torch.randn(routing.num_tokens, x.shape[1], generator=torch.Generator().manual_seed(3))[rows]
    (y * grad_out).sum().backward()
    return y.detach(), x.grad, local.weights_TK.grad


def assert_ranks_match_reference(results: list[dict], reference, full: ExpertWeights, where: str) -> None:
    """The ranks' outputs and input/combine-weight gradients, concatenated in rank order, equal the single-process
    ``reference`` ((y, x grad, combine-weight grad) of ``run_rows``); each rank's expert gradients equal the
    reference's rows of its ``local_experts`` (a replica holds its expert's whole gradient, summed over copies)."""
    for key, want in zip(("y", "x_grad", "w_grad"), reference):
        assert_close_to_scale(torch.cat([r[key] for r in results]), want, where)
    E, F, D = full.num_experts, full.ffn_hidden_size, full.hidden_size
    for r in results:
        for name, grad in r["expert_grads"].items():
            want = getattr(full, name).grad.view(E, F, D)[r["local_experts"]].reshape(-1, D)
            assert_close_to_scale(grad, want, f"{where}: grad of {name}")


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, where: str) -> None:
    """float32 closeness measured against the tensor's own scale: these layers' outputs are ~1e-3, under the default
    absolute tolerance (1e-5), which would let a 0.1% error in a fast path pass."""
    torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-5 * float(want.abs().max().clamp(max=1)), msg=where)
