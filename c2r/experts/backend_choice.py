"""``backend: auto`` on a GPU: the expert compute that measured fastest for the nearest recorded shape.

MegaBlocks' grouped_gemm, as commonly built, issues one cuBLAS GEMM per expert, so it is launch-bound where experts
are many and small, while ``torch._grouped_mm`` runs one kernel for all of them; with few large experts MegaBlocks'
permutation kernels win. Which side of that line a shape falls on is a measurement, not a guess: every row below is a
median from ``benchmarks/layer_bench.py`` recorded in docs/benchmarks.md (forward + backward of one MoE block, bf16),
and a shape takes the winner of its nearest row (distance in log2 of experts, expert width and hidden size; the
activation must match where a row of it exists). A shape far from every row still gets the nearest one: add a row
when you measure a new shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Measured:
    """One layer_bench row: the shape, the two backends' median ms, and where the numbers are recorded."""

    device: str  # compute-capability family, e.g. "sm90" (H100 and H200)
    activation: str
    num_experts: int
    hidden_size: int
    ffn_hidden_size: int
    megablocks_ms: float
    torch_ms: float
    source: str

    @property
    def fastest(self) -> str:
        return "megablocks" if self.megablocks_ms <= self.torch_ms else "torch"


MEASURED: tuple[Measured, ...] = (
    Measured("sm90", "swiglu", 128, 2048, 768, 19.143, 16.048, "docs/benchmarks.md, one H100, 2026-11-24"),
    Measured("sm90", "swiglu", 8, 4096, 14336, 30.250, 32.851, "docs/benchmarks.md, one H100, 2026-11-24"),
    Measured("sm90", "gelu", 64, 2048, 1024, 11.187, 13.555, "docs/benchmarks.md, one H100, 2026-11-24"),
    Measured("sm90", "gelu", 8, 4096, 14336, 20.367, 21.807, "docs/benchmarks.md, one H100, 2026-11-24"),
    Measured("sm90", "swiglu", 128, 2048, 768, 21.941, 14.658, "docs/benchmarks.md, one H200, 2026-12-01"),
    Measured("sm90", "swiglu", 8, 4096, 14336, 29.266, 31.924, "docs/benchmarks.md, one H200, 2026-12-01"),
    Measured("sm90", "gelu", 64, 2048, 1024, 9.764, 12.577, "docs/benchmarks.md, one H200, 2026-12-01"),
    Measured("sm90", "gelu", 8, 4096, 14336, 19.487, 21.197, "docs/benchmarks.md, one H200, 2026-12-01"),
)


def device_family(capability: tuple[int, int]) -> str:
    return f"sm{capability[0]}{capability[1]}"


def _distance(row: Measured, num_experts: int, hidden_size: int, ffn_hidden_size: int) -> float:
    return (
        abs(math.log2(row.num_experts) - math.log2(num_experts))
        + abs(math.log2(row.ffn_hidden_size) - math.log2(ffn_hidden_size))
        + abs(math.log2(row.hidden_size) - math.log2(hidden_size))
    )


def nearest_measurement(
    family: str, activation: str, num_experts: int, hidden_size: int, ffn_hidden_size: int
) -> Measured | None:
    """The recorded row closest to this shape on this device family (same activation first); None if the family
    has no rows (then ``auto`` keeps its default)."""
    rows = [r for r in MEASURED if r.device == family]
    same_activation = [r for r in rows if r.activation == activation]
    candidates = same_activation or rows
    if not candidates:
        return None
    return min(candidates, key=lambda r: _distance(r, num_experts, hidden_size, ffn_hidden_size))
