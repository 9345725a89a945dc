"""`c2r.parallel.replicas.balanced_shares` as one Triton kernel (CUDA; the torch loop elsewhere, and as the reference).

Why a kernel: the loop is 64 rounds of ~18 tiny tensor ops, ~1,100 kernels a layer forward; replayed from a CUDA
graph they still took 2.2 ms per call on one H200 (E = 64, R = 16; 15.7 ms eager; the kernel 0.05 ms:
tests/test_gpu.py, docs/benchmarks.md), as much as a layer's expert compute. The whole problem is small (E x M
copies, R ranks), so one program holds it in registers and runs every round: the same arithmetic as the torch loop
(float64, the same steps), its sums in another order, so the shares agree to float64 rounding, and every rank
computes the same shares (one program, a fixed order).

Each round needs every rank's load, a sum over its copies. The copies are sorted by rank once, so a round's per-rank
sums are one running sum over the copies in that order, read at the ends of each rank's run: O(E x M) work a round.
(The first kernel summed a one-hot [E x M, R] every round: 0.67 ms at E = 256 on 64 ranks, 7.4 ms with a third copy
of some experts, against 0.09 and 0.17 ms this way; docs/benchmarks.md.) A difference of running sums is off by
float64 rounding of the total, ~1e-16 x the batch's pairs: far below the one pair the quotas round to.

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
    BC: tl.constexpr = BE * BM
    e = tl.arange(0, BE)
    m = tl.arange(0, BM)
    r = tl.arange(0, BR)
    in_EM = (e[:, None] < E) & (m[None, :] < M)
    rank_EM = tl.load(rank_ptr + e[:, None] * M + m[None, :], mask=in_EM, other=-1)
    on_EM = rank_EM >= 0
    copies_E = tl.sum(on_EM.to(tl.float64), axis=1)
    cells_EM = on_EM & (copies_E[:, None] > 1)
    count_E = tl.load(count_ptr + e, mask=e < E, other=0).to(tl.float64)
    # Setup, once: the copies in rank order (a sort of rank x BC + copy), each rank's run [start, end) in it, and
    # the fixed load and the replicated copies of each rank (a one-hot over copies x ranks, once, not every round).
    rank_C = tl.reshape(rank_EM, (BC,))
    key_C = tl.where(rank_C >= 0, rank_C, BR)  # copies past an expert's last: after every rank
    order_C = tl.sort(key_C * BC + tl.arange(0, BC)) % BC  # position -> copy
    start_R = tl.sum((key_C[:, None] < r[None, :]).to(tl.int32), axis=0)
    end_R = tl.sum((key_C[:, None] <= r[None, :]).to(tl.int32), axis=0)
    onehot_CR = key_C[:, None] == r[None, :]
    home_EM = on_EM & (m[None, :] == 0) & (copies_E[:, None] == 1)
    fixed_C = tl.reshape(tl.where(home_EM, count_E[:, None], 0.0), (BC,))
    fixed_R = tl.sum(tl.where(onehot_CR, fixed_C[:, None], 0.0), axis=0)
    cells_C = tl.reshape(cells_EM, (BC,))
    degree_R = tl.sum(tl.where(onehot_CR & cells_C[:, None], 1.0, 0.0).to(tl.float64), axis=0)
    step = 1.0 / tl.maximum(tl.max(degree_R, axis=0), 1.0)
    last_R = tl.maximum(end_R - 1, 0)
    before_R = tl.maximum(start_R - 1, 0)
    rank_of_C = tl.maximum(rank_C, 0)
    share_EM = tl.where(cells_EM, (count_E / tl.maximum(copies_E, 1.0))[:, None], 0.0)
    for _ in range(ITERS):
        # each rank's replicated load: a running sum over the copies in rank order, differenced at the runs' ends
        running_C = tl.cumsum(tl.gather(tl.reshape(share_EM, (BC,)), order_C, 0), 0)
        upto_R = tl.where(end_R > 0, tl.gather(running_C, last_R, 0), 0.0)
        below_R = tl.where(start_R > 0, tl.gather(running_C, before_R, 0), 0.0)
        load_R = fixed_R + (upto_R - below_R)
        load_EM = tl.reshape(tl.gather(load_R, rank_of_C, 0), (BE, BM))
        mean_E = tl.sum(tl.where(cells_EM, load_EM, 0.0), axis=1) / tl.maximum(copies_E, 1.0)
        share_EM = tl.where(cells_EM, tl.maximum(share_EM + step * (mean_E[:, None] - load_EM), 0.0), 0.0)
        total_E = tl.sum(share_EM, axis=1)  # 0: nothing replicated, or every share clipped (they stay 0)
        share_EM = share_EM * tl.where(total_E > 0, count_E / tl.maximum(total_E, 1e-300), 0.0)[:, None]
    tl.store(out_ptr + e[:, None] * M + m[None, :], share_EM, mask=in_EM)


def balanced_shares_kernel(
    count_E: torch.Tensor, rank_EM: torch.Tensor, num_ranks: int, iters: int, num_warps: int | None = None
) -> torch.Tensor:
    """[E, M] float64, as `c2r.parallel.replicas.balanced_shares` (module docstring); CUDA tensors. ``num_warps``:
    default by the number of copies (benchmarks/share_kernel_bench.py times others)."""
    E, M = rank_EM.shape
    out = torch.empty(E, M, dtype=torch.float64, device=rank_EM.device)
    BE, BM, BR = (triton.next_power_of_2(n) for n in (E, M, num_ranks))
    if num_warps is None:
        num_warps = min(16, max(4, BE * BM // 32))  # measured best at 128, 256, >= 512 copies
    _balanced_shares_kernel[(1,)](
        count_E.contiguous(), rank_EM.contiguous(), out, E, M, ITERS=iters, BE=BE, BM=BM, BR=BR, num_warps=num_warps,
    )  # fmt: skip
    return out
