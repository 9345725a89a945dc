"""``backend: auto`` on a GPU: the expert compute that measured fastest for the nearest recorded shape.

MegaBlocks' grouped_gemm, as commonly built, issues one cuBLAS GEMM per expert, so it is launch-bound where experts
are many and small, while ``torch._grouped_mm`` runs one kernel for all of them; with few large experts
grouped_gemm's cuBLAS GEMMs win. Three contenders: ``megablocks`` (its permutation + grouped_gemm), ``torch`` (our
sort + torch._grouped_mm) and ``megablocks-gmm`` (MegaBlocks' permutation kernels around torch._grouped_mm, counts
read on the device: no host sync with a fixed k; ``megablocks_impl: grouped_mm``). Which one a shape gets is a
measurement, not a guess: every row below is a median from ``benchmarks/layer_bench.py`` recorded in
docs/benchmarks.md (forward + backward of one MoE block, bf16), and a shape takes the winner of its nearest row
(distance in log2 of experts, expert width and hidden size; the activation must match where a row of it exists). A
shape far from every row still gets the nearest one: add a row when you measure a new shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Measured:
    """One layer_bench row: the shape, the contenders' median ms, and where the numbers are recorded."""

    device: str  # compute-capability family, e.g. "sm90" (H100 and H200)
    activation: str
    num_experts: int
    hidden_size: int
    ffn_hidden_size: int
    megablocks_ms: float
    torch_ms: float
    source: str
    megablocks_gmm_ms: float | None = None  # rows recorded before that path existed have none

    @property
    def fastest(self) -> str:
        times = {"megablocks": self.megablocks_ms, "torch": self.torch_ms}
        if self.megablocks_gmm_ms is not None:
            times["megablocks-gmm"] = self.megablocks_gmm_ms
        return min(times, key=times.__getitem__)


# The newest measurement of each shape: the mean of two layer_bench runs' medians in one call (docs/benchmarks.md,
# "The torch backend on slot orders"). Older rows (H100 2026-11-24, H200 2026-12-01) are in docs/benchmarks.md; the
# torch backend won its two rows here only after it moved to slot orders and Triton slot sums (ninth session).
_SOURCE = "docs/benchmarks.md, one H200, 2026-12-02, ninth session"
MEASURED: tuple[Measured, ...] = (
    Measured("sm90", "swiglu", 128, 2048, 768, 18.977, 9.538, _SOURCE, megablocks_gmm_ms=10.061),
    Measured("sm90", "swiglu", 8, 4096, 14336, 28.756, 30.234, _SOURCE, megablocks_gmm_ms=30.516),
    Measured("sm90", "gelu", 64, 2048, 1024, 8.940, 7.351, _SOURCE, megablocks_gmm_ms=8.071),
    Measured("sm90", "gelu", 8, 4096, 14336, 19.201, 19.825, _SOURCE, megablocks_gmm_ms=20.227),
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
