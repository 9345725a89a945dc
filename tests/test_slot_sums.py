"""The slot sums of the lean expert-parallel path (c2r/experts/slot_rows.py): the GPU path's Triton kernels
(c2r/experts/slot_kernels.py), run on CPU tensors by Triton's interpreter, against the torch path in float64.

Shapes a dispatch meets: K = 1 (per-rank combine on one rank), K not a power of two, D not a multiple of the kernel's
block, rows with no valid slot, no pairs at all, bf16 rows, and a non-finite weight on an empty slot (never read).
The kernels' own process sets TRITON_INTERPRET before Triton compiles anything, so the check runs in a
subprocess (tests/triton_interpreter.py)."""

import os

import torch

from tests.triton_interpreter import check_interpreted

# (Z rows, K slots, D, fraction of empty slots, dtype)
CASES = [
    (37, 8, 100, 0.4, torch.float32),
    (16, 1, 64, 0.3, torch.float32),
    (9, 6, 2100, 0.5, torch.float32),
    (12, 3, 40, 1.0, torch.float32),  # no pairs at all
    (21, 4, 96, 0.25, torch.bfloat16),
    (10, 64, 33, 0.9, torch.float32),  # per-rank combine over 64 ranks
]


def random_order(Z: int, K: int, empty: float, seed: int):
    """A SlotOrder of Z x K slots keyed by one of 5 random experts, ``empty`` of the slots invalid (row 0 all empty)."""
    from c2r.experts.slot_rows import SlotOrder, sort_slots

    g = torch.Generator().manual_seed(seed)
    valid_ZK = torch.rand(Z, K, generator=g) >= empty
    valid_ZK[0] = False
    keys_ZK = torch.randint(0, 5, (Z, K), generator=g)
    return SlotOrder.first(sort_slots(keys_ZK, valid_ZK, 5), valid_ZK, int(valid_ZK.sum()))


def slot_sums(order, x_ZD, w_ZK, unweighted: bool):
    """Forward + backward of expand -> scale -> sum: (out, x grad, weight grad), in float64."""
    from c2r.experts.slot_rows import expand_rows, sum_slots

    x_ZD = x_ZD.clone().requires_grad_(True)
    w_ZK = w_ZK.clone().requires_grad_(True)
    y_PD = expand_rows(x_ZD, order) * torch.linspace(0.5, 1.5, x_ZD.shape[1], dtype=x_ZD.dtype, device=x_ZD.device)
    out_ZD = sum_slots(y_PD, order) if unweighted else sum_slots(y_PD, order, w_ZK)
    grad_ZD = torch.randn(out_ZD.shape, generator=torch.Generator().manual_seed(9)).to(out_ZD)
    (out_ZD * grad_ZD).sum().backward()
    w_grad = torch.zeros_like(w_ZK) if w_ZK.grad is None else w_ZK.grad
    return [t.double() for t in (out_ZD.detach(), x_ZD.grad, w_grad)]


def check_cases() -> None:
    """Every case, kernels against the torch path; run under TRITON_INTERPRET=1."""
    for case_index, (Z, K, D, empty, dtype) in enumerate(CASES):
        order = random_order(Z, K, empty, seed=case_index)
        g = torch.Generator().manual_seed(100 + case_index)
        x_ZD = torch.randn(Z, D, generator=g)
        w_ZK = torch.rand(Z, K, generator=g)
        w_ZK[~order.valid_ZK] = float("nan")  # an empty slot's weight is never read
        for unweighted in (False, True):
            where = f"Z={Z} K={K} D={D} empty={empty} {dtype} unweighted={unweighted}"
            os.environ["TRITON_INTERPRET"] = "1"
            got = slot_sums(order, x_ZD.to(dtype), w_ZK, unweighted)
            del os.environ["TRITON_INTERPRET"]  # the torch path, in float64 on the same (rounded) rows
            want = slot_sums(order, x_ZD.to(dtype).double(), w_ZK.double(), unweighted)
            # bf16: the kernels round the scaled rows and the output gradient to bf16 as the layer does (~0.3%)
            tol = {"atol": 0.15, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
            for name, a, b in zip(("out", "x grad", "weight grad"), got, want):
                b = torch.where(order.valid_ZK, b, 0.0) if name == "weight grad" else b
                torch.testing.assert_close(a, b, **tol, msg=f"{where}: {name}")
            assert torch.isfinite(got[0]).all(), where
    check_views_and_non_finite_rows()
    print("slot sums: all cases equal")


def check_views_and_non_finite_rows() -> None:
    """Strided rows and a transposed weight view, weights that need no gradient; and a non-finite row reaches only
    the rows whose valid slots read it (an empty slot reads nothing), on both paths."""
    from c2r.experts.slot_rows import sum_slots

    order = random_order(13, 5, 0.3, seed=42)
    P = order.num_pairs
    g = torch.Generator().manual_seed(43)
    y_wide = torch.randn(P, 2 * 24, generator=g).requires_grad_(True)
    w_T = torch.rand(5, 13, generator=g)  # no gradient wanted
    results = []
    for interpret in (True, False):
        os.environ.pop("TRITON_INTERPRET", None)
        if interpret:
            os.environ["TRITON_INTERPRET"] = "1"
        out = sum_slots(y_wide[:, ::2], order, w_T.t())
        (grad,) = torch.autograd.grad(out.square().sum(), y_wide)
        results.append((out.detach().double(), grad.double()))
        bad = y_wide.detach()[:, ::2].clone()
        bad[0] = float("inf")
        reads_pair0 = (order.inverse_ZK == 0) & order.valid_ZK
        finite_rows = torch.isfinite(sum_slots(bad, order, w_T.t())).all(1)
        assert torch.equal(finite_rows, ~reads_pair0.any(1)), f"interpret={interpret}: {finite_rows.tolist()}"
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_triton_slot_sum_kernels_equal_the_torch_path():
    check_interpreted("tests.test_slot_sums")
