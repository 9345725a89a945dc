"""The batch balance solve's per-token step (`c2r.routing.balance.token_margins`) as one Triton kernel (CUDA; the
torch version elsewhere, and as the reference).

Why a kernel: the torch step is a top-(k+1) over each token's E scores, a compare, a select and a subtraction, and
the top-k alone took most of a round (the solve replayed from a CUDA graph: ~60 us a round at 8,192 tokens x 64
experts on one H200, 8 rounds x 8 layers a step). A token's E scores fit in registers, so one pass finds its k-th and
(k+1)-th best by removing the best one at a time (k reductions over E lanes) and writes every margin, transposed, so
that the per-expert selection that follows reads contiguous rows. For finite logits the values are the torch step's
exactly: the same float32 sum and subtraction, and order statistics are exact (NaN differs: torch's top-k ranks it
first, Triton's max does not; NaN logits are the router's own error, c2r/routing/finite.py).

Shape legend: T tokens, E experts; BT tokens a program, BE the power of two >= E.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _token_margins_kernel(
    logits_ptr, bias_ptr, out_ptr, T, E, TOP_K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    e = tl.arange(0, BE)
    inside = (t[:, None] < T) & (e[None, :] < E)
    bias = tl.load(bias_ptr + e, mask=e < E, other=0.0)
    scores = tl.load(logits_ptr + t[:, None] * E + e[None, :], mask=inside, other=float("-inf")) + bias[None, :]
    # remove the best score k - 1 times, one occurrence at a time (argmax takes the first of equal ones), so that
    # equal scores count once each, as in a top-k
    rest = scores
    for _ in tl.static_range(TOP_K - 1):
        best = tl.argmax(rest, axis=1)
        rest = tl.where(e[None, :] == best[:, None], float("-inf"), rest)
    kth = tl.max(rest, axis=1)
    rest = tl.where(e[None, :] == tl.argmax(rest, axis=1)[:, None], float("-inf"), rest)
    after = tl.max(rest, axis=1)
    bar = tl.where(scores >= kth[:, None], after[:, None], kth[:, None])
    tl.store(out_ptr + e[None, :] * T + t[:, None], scores - bar, mask=inside)


def token_margins_kernel(logits_TE: torch.Tensor, bias_E: torch.Tensor, top_k: int) -> torch.Tensor:
    """[E, T] float32, as `c2r.routing.balance.token_margins` (module docstring); float32 CUDA tensors, top_k < E."""
    T, E = logits_TE.shape
    out = torch.empty(E, T, dtype=torch.float32, device=logits_TE.device)
    BE = triton.next_power_of_2(E)
    BT = max(1, 4096 // BE)  # 4,096 scores a program: 32 registers a thread in 4 warps
    _token_margins_kernel[(triton.cdiv(T, BT),)](
        logits_TE.contiguous(), bias_E.contiguous(), out, T, E, TOP_K=top_k, BT=BT, BE=BE,
    )  # fmt: skip
    return out
