"""The batch balance solve's Triton margin kernel (c2r/routing/margin_kernel.py), run on CPU tensors by Triton's
interpreter, against the torch step (c2r/routing/balance.py `token_margins`): equal exactly, on sizes that do not
fill a program's block, E not a power of two, k = 1 and k = E - 1, and scores that tie (a token's equal scores must
count once each, as in a top-k); and the whole solve with the kernel equals the solve with the torch step. The
kernel's own process sets TRITON_INTERPRET before Triton compiles anything (tests/triton_interpreter.py)."""

import torch

from tests.triton_interpreter import check_interpreted

CASES = [(1000, 64, 8), (77, 16, 2), (300, 12, 1), (50, 6, 5), (130, 256, 8)]  # (T, E, k)


def check_cases() -> None:
    """Every case with random logits and bias, then with tied scores; run under TRITON_INTERPRET=1."""
    from c2r.routing.balance import solve_bias, token_margins
    from c2r.routing.margin_kernel import token_margins_kernel

    for T, E, K in CASES:
        generator = torch.Generator().manual_seed(T + E)
        logits = torch.randn(T, E, generator=generator) * 2
        bias = torch.randn(E, generator=generator)
        tied = (logits * 2).round() / 2  # a few values a token: ties within every row
        for x, b in ((logits, bias), (tied, torch.zeros(E)), (tied, (bias * 2).round() / 2)):
            assert torch.equal(token_margins_kernel(x, b, K), token_margins(x, b, K)), (T, E, K)
        solved = solve_bias(logits, K, 3, margins=token_margins_kernel)
        assert torch.equal(solved, solve_bias(logits, K, 3)), (T, E, K)
    print("all cases equal")


def test_the_margin_kernel_equals_the_torch_step():
    check_interpreted("tests.test_margin_kernel")
