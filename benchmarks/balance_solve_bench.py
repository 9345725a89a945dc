"""The top-k router's batch balance solve (`c2r.routing.balance.solve_bias`) on one GPU: its rounds with the Triton
margin kernel (c2r/routing/margin_kernel.py, the default on GPUs) and with the torch step (the fallback), both
replayed from a CUDA graph as in training, for T tokens x E experts, top-8. Prints a markdown table: microseconds
per solve (the median of 5 rounds of 50 solves, the GPU otherwise idle), and the load max/mean the solve leaves on
clustered logits of that size (tokens in 8 groups that favour different experts, as a router's input looks once a
model has learnt something): the balance a round buys, next to its cost.

    python benchmarks/balance_solve_bench.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from c2r.graphed import graphed_call  # noqa: E402
from c2r.routing.balance import solve_bias, token_margins  # noqa: E402

SHAPES = ((8192, 64), (32768, 64), (16384, 128), (16384, 256))  # (T, E)
TOP_K = 8


def median_us(call, rounds: int = 5, calls: int = 50) -> float:
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(rounds):
        start.record()
        for _ in range(calls):
            call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls * 1e3)
    return sorted(times)[rounds // 2]


def clustered_logits(T: int, E: int, device: str) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(T + E)
    centres = torch.randn(8, E, device=device, generator=generator) * 3
    groups = torch.randint(0, 8, (T,), device=device, generator=generator)
    return centres[groups] + 0.3 * torch.randn(T, E, device=device, generator=generator)


def load_max_mean(logits: torch.Tensor, bias: torch.Tensor) -> float:
    picks = (logits + bias).topk(TOP_K, dim=1).indices
    counts = torch.bincount(picks.flatten(), minlength=logits.shape[1]).float()
    return float(counts.max() / counts.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, nargs="+", default=[4, 6, 8], help="solve rounds to time")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("balance_solve_bench: needs a CUDA GPU")
    from c2r.routing.margin_kernel import token_margins_kernel

    print(f"# {torch.cuda.get_device_name()}, top-{TOP_K}, us per solve from a CUDA graph (load max/mean after it)\n")
    print("| T | E | margin step | " + " | ".join(f"{r} rounds" for r in args.rounds) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in args.rounds) + " |")
    for T, E in SHAPES:
        logits = clustered_logits(T, E, "cuda")
        for name, margins in (("Triton kernel", token_margins_kernel), ("torch", token_margins)):
            cells = []
            for rounds in args.rounds:

                def solve(rounds=rounds, margins=margins, logits=logits):
                    return graphed_call(solve_bias, logits, top_k=TOP_K, rounds=rounds, margins=margins)

                cells.append(f"{median_us(solve):.0f} ({load_max_mean(logits, solve()):.3f})")
            print(f"| {T} | {E} | {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
