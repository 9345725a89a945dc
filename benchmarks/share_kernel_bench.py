"""The balanced copy choice's shares (`c2r.parallel.replicas.balanced_shares`) on one GPU: the Triton kernel
(c2r/parallel/share_kernel.py) at several warp counts against the torch loop replayed from a CUDA graph (the
fallback) and run eagerly (the CPU path), for layouts of E experts on R ranks with every expert twice (--replicas 2E)
and, with "+3rd", a third copy of every 8th expert. Prints a markdown table: ms per call (the best of 3 rounds of
50 calls, the GPU otherwise idle) and the kernel's largest difference from the loop.

    python benchmarks/share_kernel_bench.py
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from c2r.graphed import graphed_call  # noqa: E402
from c2r.parallel.replicas import BALANCE_ITERS, balanced_shares  # noqa: E402

SHAPES = ((64, 8, False), (64, 16, False), (128, 8, False), (256, 8, False), (256, 8, True), (256, 64, False),
          (256, 64, True))  # fmt: skip


def best_ms(call, rounds: int = 3, calls: int = 50) -> float:
    call()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / calls * 1e3)
    return min(times)


def layout_ranks(E: int, R: int, third: bool) -> torch.Tensor:
    """[E, M] each copy's rank: every expert on its home rank and the next (the ring of placement/replicate.py),
    with ``third`` every 8th expert also two ranks on."""
    X = E // R
    copies = [[e // X, (e // X + 1) % R] + ([(e // X + 2) % R] if third and e % 8 == 0 else []) for e in range(E)]
    M = max(map(len, copies))
    return torch.tensor([c + [-1] * (M - len(c)) for c in copies])


def row(E: int, R: int, third: bool, warps: list[int]) -> str:
    """One table row: the kernel at each warp count, as called, the graphed and the eager loop, the difference."""
    from c2r.parallel.share_kernel import balanced_shares_kernel

    rank_EM = layout_ranks(E, R, third).cuda()
    count_E = (torch.rand(E, generator=torch.Generator().manual_seed(0)) ** 3 * 20000).long().cuda()
    kernel_at = partial(balanced_shares_kernel, count_E, rank_EM, R, BALANCE_ITERS)
    cells = [f"{best_ms(partial(kernel_at, num_warps=w)):.3f}" for w in warps]
    cells.append(f"**{best_ms(kernel_at):.3f}**")
    cells.append(f"{best_ms(partial(graphed_call, balanced_shares, count_E, rank_EM, num_ranks=R)):.3f}")
    cells.append(f"{best_ms(partial(balanced_shares, count_E, rank_EM, R), rounds=1, calls=5):.3f}")
    reference = balanced_shares(count_E, rank_EM, R)
    diff = (kernel_at() - reference).abs().max().item()
    return f"| {E}, {R}, {'2 + 3rd' if third else '2'} | " + " | ".join(cells) + f" | {diff:.1e} |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16], help="kernel warp counts to time")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("share_kernel_bench: needs a CUDA GPU")
    head = [f"kernel, {w} warps" for w in args.warps]
    print("| E, R, copies | " + " | ".join(head) + " | kernel as called | graphed loop | eager loop | max diff |")
    print("| --- " * (len(head) + 5) + "|")
    for E, R, third in SHAPES:
        print(row(E, R, third, args.warps), flush=True)


if __name__ == "__main__":
    main()
