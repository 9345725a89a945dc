"""The balanced copy shares' Triton kernel (c2r/parallel/share_kernel.py), run on CPU tensors by Triton's
interpreter, against the torch loop (c2r/parallel/replicas.py `balanced_shares`): equal to float64 rounding on
layouts with single-copy experts, three copies, every expert twice, and experts that nobody chose. The kernel's own
process sets TRITON_INTERPRET before Triton compiles anything, so the check runs in a
subprocess (tests/triton_interpreter.py)."""

import torch

from tests.triton_interpreter import check_interpreted

# (layout as saved: a rank or the ranks of each expert, ranks)
CASES = [
    ([[0, 1, 2, 3], 0, 1, 1, 2, [2, 3], 3, 0], 4),
    ([[e // 4, (e // 4 + 1) % 16] for e in range(64)], 16),  # every expert twice, in a ring (--replicas 2E)
    ([[e // 4, (e // 4 + [1, 2, 4, 8][e % 4]) % 16] for e in range(64)], 16),  # twice, spread 1, 2, 4, 8 on
    ([[e // 2, (e // 2 + 1) % 3] for e in range(6)], 3),  # 3 ranks: powers of two do not fit
    ([0, 0, 1, 1], 2),  # nothing replicated: every share 0
    ([[0, 1, 2], [1, 2], 0, [0, 1], 2], 3),  # at most 3 copies (not a power of two), ranks of 2 and 3 copies
]


def check_cases() -> None:
    """Every case with random counts (some experts at 0); run under TRITON_INTERPRET=1."""
    from c2r.parallel.replicas import BALANCE_ITERS, balanced_shares
    from c2r.parallel.share_kernel import balanced_shares_kernel
    from placement.layout import ExpertLayout

    for i, (saved, ranks) in enumerate(CASES):
        layout = ExpertLayout.from_json(saved, ranks, num_experts=len(saved))
        slots = torch.tensor(layout.replica_slots)
        rank_EM = torch.where(slots >= 0, slots // layout.experts_per_rank, -1)
        count_E = torch.randint(0, 2000, (len(saved),), generator=torch.Generator().manual_seed(i))
        count_E[::5] = 0
        kernel = balanced_shares_kernel(count_E, rank_EM, ranks, BALANCE_ITERS)
        reference = balanced_shares(count_E, rank_EM, ranks)
        torch.testing.assert_close(kernel, reference, rtol=1e-12, atol=1e-9)
        # a batch of ~1e9 pairs: the running sums' rounding stays far below the one pair the quotas round to
        huge = count_E * 1_000_000
        far = balanced_shares_kernel(huge, rank_EM, ranks, BALANCE_ITERS) - balanced_shares(huge, rank_EM, ranks)
        assert far.abs().max() < 1e-3, far.abs().max()
        replicated = (rank_EM >= 0).sum(1) > 1  # their shares add up to their counts; the others' are 0
        assert torch.allclose(kernel.sum(1)[replicated], count_E[replicated].double())
        assert not kernel[~replicated].any()
    print("all cases equal")


def test_the_share_kernel_equals_the_torch_loop():
    check_interpreted("tests.test_share_kernel")
