"""`c2r.parallel.replicas.balanced_shares` as one Triton kernel (CUDA; the torch loop elsewhere, and as the reference).

Why a kernel: the loop is 64 rounds of ~18 tiny tensor ops, ~1,100 kernels a layer forward; replayed from a CUDA
graph they still took 2.2 ms per call on one H200 (E = 64, R = 16; 15.7 ms eager; the kernel 0.07 ms:
tests/test_gpu.py, docs/benchmarks.md), as much as a layer's expert compute. The whole problem is small (E x M
copies, R ranks), so one program holds it in registers and runs every round: the same arithmetic as the torch loop
(float64, the same steps), its sums in another order, so the shares agree to float64 rounding, and every rank
computes the same shares (one program, a fixed order).

Shape legend: E experts, M most copies of one expert, R ranks; BE, BM, BR their powers of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _balanced_shares_kernel(
    count_ptr, rank_ptr, out_ptr, E, M, ITERS: tl.constexpr, BE: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    e = tl.arange(0, BE)
    m = tl.arange(0, BM)
    in_EM = (e[:, None] < E) & (m[None, :] < M)
    rank_EM = tl.load(rank_ptr + e[:, None] * M + m[None, :], mask=in_EM, other=-1)
    on_EM = rank_EM >= 0
    copies_E = tl.sum(on_EM.to(tl.float64), axis=1)
    cells_EM = on_EM & (copies_E[:, None] > 1)
    count_E = tl.load(count_ptr + e, mask=e < E, other=0).to(tl.float64)
    # each copy's rank as a one-hot row: per-rank sums are sums over the copies, in one fixed order
    onehot_CR = tl.reshape(rank_EM, (BE * BM,))[:, None] == tl.arange(0, BR)[None, :]
    home_EM = on_EM & (m[None, :] == 0) & (copies_E[:, None] == 1)
    fixed_C = tl.reshape(tl.where(home_EM, count_E[:, None], 0.0), (BE * BM,))
    fixed_R = tl.sum(tl.where(onehot_CR, fixed_C[:, None], 0.0), axis=0)
    cells_C = tl.reshape(cells_EM, (BE * BM,))
    degree_R = tl.sum(tl.where(onehot_CR & cells_C[:, None], 1.0, 0.0).to(tl.float64), axis=0)
    step = 1.0 / tl.maximum(tl.max(degree_R, axis=0), 1.0)
    share_EM = tl.where(cells_EM, (count_E / tl.maximum(copies_E, 1.0))[:, None], 0.0)
    for _ in range(ITERS):
        share_C = tl.reshape(share_EM, (BE * BM,))
        load_R = fixed_R + tl.sum(tl.where(onehot_CR, share_C[:, None], 0.0), axis=0)
        load_EM = tl.reshape(tl.sum(tl.where(onehot_CR, load_R[None, :], 0.0), axis=1), (BE, BM))
        mean_E = tl.sum(tl.where(cells_EM, load_EM, 0.0), axis=1) / tl.maximum(copies_E, 1.0)
        share_EM = tl.where(cells_EM, tl.maximum(share_EM + step * (mean_E[:, None] - load_EM), 0.0), 0.0)
        share_EM = share_EM * (count_E / tl.maximum(tl.sum(share_EM, axis=1), 1e-300))[:, None]
    tl.store(out_ptr + e[:, None] * M + m[None, :], share_EM, mask=in_EM)


def balanced_shares_kernel(count_E: torch.Tensor, rank_EM: torch.Tensor, num_ranks: int, iters: int) -> torch.Tensor:
    """[E, M] float64, as `c2r.parallel.replicas.balanced_shares` (module docstring); CUDA tensors."""
    E, M = rank_EM.shape
    out = torch.empty(E, M, dtype=torch.float64, device=rank_EM.device)
    BE, BM, BR = (triton.next_power_of_2(n) for n in (E, M, num_ranks))
    _balanced_shares_kernel[(1,)](
        count_E.contiguous(), rank_EM.contiguous(), out, E, M, ITERS=iters, BE=BE, BM=BM, BR=BR,
        num_warps=4 if BE * BM * BR <= 4096 else 16,
    )  # fmt: skip
    return out
