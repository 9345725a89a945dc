"""Triton kernels for the slot sums of the torch backend and the expert-parallel dispatch (CUDA; ``slot_rows.py``
uses torch elsewhere).

Why kernels: profiled on one H200 (docs/benchmarks.md, "Slot sums as Triton kernels"), the weighted sum of each row's
K slots done as a gather of Z x K rows and a batched matmul ``[Z, 1, K] @ [Z, K, D]`` ran cuBLAS at a fifth of the
memory speed (2.1 ms a layer step at T=16k, K=8, D=2048), and at K = 1 (per-rank combine on one rank) a ``gemmk1``
kernel took ~1 ms a call. These read each valid pair's row once, skip empty slots (a per-rank destination's copies
use about K / R of their K slots), accumulate in float32 and need no atomics (each output row or pair has one
program), as MegaBlocks' own gather/scatter kernels do.

- :func:`sum_slots_forward`: ``out[z] = sum over valid k of w[z, k] * y[inverse[z, k]]`` (w = 1 without weights).
- :func:`sum_slots_backward`: per pair p of row z, slot k: ``grad_y[p] = w[z, k] * grad_out[z]`` and, when wanted,
  ``grad_w[z, k] = <grad_out[z], y[p]>`` (zero on empty slots).

Shape legend: the package legend (``c2r/__init__.py``), and Z rows of K slots, P valid (row, slot) pairs in key order
(``slot_rows.SlotOrder``).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# Triton decides at decoration whether these kernels compile for a GPU or run in its interpreter on CPU tensors.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Elements of one program's [K, BLOCK_D] tile: large enough to stream whole rows, small enough for the registers.
_TILE = 8192


@triton.jit
def _sum_slots_kernel(
    y_ptr, inverse_ptr, valid_ptr, w_ptr, out_ptr, D: tl.constexpr, K: tl.constexpr, K_POW2: tl.constexpr,
    HAS_W: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    z = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, K_POW2)
    in_row = slots < K
    valid = (tl.load(valid_ptr + z * K + slots, mask=in_row, other=0) != 0) & in_row
    rows = tl.load(inverse_ptr + z * K + slots, mask=valid, other=0).to(tl.int64)
    if HAS_W:
        w = tl.load(w_ptr + z * K + slots, mask=valid, other=0.0).to(tl.float32)
    else:
        w = valid.to(tl.float32)
    w = tl.where(valid, w, 0.0)  # an empty slot's weight never reaches the sum, even if it is not finite
    cols = tl.arange(0, BLOCK_D)
    for start in range(0, D, BLOCK_D):
        in_d = start + cols < D
        tile = tl.load(
            y_ptr + rows[:, None] * D + start + cols[None, :], mask=valid[:, None] & in_d[None, :], other=0.0
        )
        total = tl.sum(tile.to(tl.float32) * w[:, None], axis=0)
        tl.store(out_ptr + z * D + start + cols, total.to(out_ptr.dtype.element_ty), mask=in_d)


@triton.jit
def _sum_slots_backward_kernel(
    grad_out_ptr, y_ptr, row_ptr, flat_ptr, w_ptr, grad_y_ptr, grad_w_ptr, D: tl.constexpr,
    HAS_W: tl.constexpr, WANT_GRAD_W: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    p = tl.program_id(0).to(tl.int64)
    z = tl.load(row_ptr + p).to(tl.int64)
    flat = tl.load(flat_ptr + p).to(tl.int64)
    if HAS_W:
        w = tl.load(w_ptr + flat).to(tl.float32)
    else:
        w = 1.0
    cols = tl.arange(0, BLOCK_D)
    dot = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        in_d = start + cols < D
        g = tl.load(grad_out_ptr + z * D + start + cols, mask=in_d, other=0.0).to(tl.float32)
        tl.store(grad_y_ptr + p * D + start + cols, (g * w).to(grad_y_ptr.dtype.element_ty), mask=in_d)
        if WANT_GRAD_W:
            y = tl.load(y_ptr + p * D + start + cols, mask=in_d, other=0.0).to(tl.float32)
            dot += g * y
    if WANT_GRAD_W:
        tl.store(grad_w_ptr + flat, tl.sum(dot, axis=0).to(grad_w_ptr.dtype.element_ty))


def on_device_of(tensor: torch.Tensor):
    """Triton launches on the current GPU, whichever holds the tensors: make it the tensor's (CPU tensors, under
    Triton's interpreter: nothing to do)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _block_d(num_slots: int, D: int) -> int:
    return max(16, min(triton.next_power_of_2(D), _TILE // triton.next_power_of_2(num_slots), 1024))


def sum_slots_forward(
    y_PD: torch.Tensor, inverse_ZK: torch.Tensor, valid_ZK: torch.Tensor, weights_ZK: torch.Tensor | None
) -> torch.Tensor:
    """[Z, D] in ``y_PD``'s dtype: each row's valid slots' rows of ``y_PD`` (through ``inverse_ZK``), weighted and
    summed."""
    Z, K = valid_ZK.shape
    D = y_PD.shape[1]
    out_ZD = torch.empty(Z, D, dtype=y_PD.dtype, device=y_PD.device)
    if Z == 0:
        return out_ZD
    if y_PD.shape[0] == 0:
        return out_ZD.zero_()
    weights = weights_ZK.contiguous() if weights_ZK is not None else valid_ZK  # unread without weights
    with on_device_of(y_PD):
        _sum_slots_kernel[(Z,)](
            y_PD.contiguous(), inverse_ZK.contiguous(), valid_ZK.contiguous().view(torch.uint8), weights, out_ZD, D,
            K=K, K_POW2=triton.next_power_of_2(K), HAS_W=weights_ZK is not None, BLOCK_D=_block_d(K, D),
        )  # fmt: skip
    return out_ZD


def sum_slots_backward(
    grad_ZD: torch.Tensor,
    y_PD: torch.Tensor | None,
    row_P: torch.Tensor,
    flat_P: torch.Tensor,
    weights_ZK: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad_y_PD, grad_weights_ZK): the gradients of :func:`sum_slots_forward` (whose output has ``y_PD``'s dtype, so
    ``grad_ZD`` has it too); the second only when ``y_PD`` (the forward's input) is given, zero on empty slots, in
    ``weights_ZK``'s dtype."""
    P, D = row_P.shape[0], grad_ZD.shape[1]
    grad_y_PD = torch.empty(P, D, dtype=grad_ZD.dtype, device=grad_ZD.device)
    want_grad_w = y_PD is not None and weights_ZK is not None
    grad_w_ZK = weights_ZK.new_zeros(weights_ZK.shape) if want_grad_w else None  # contiguous: indexed flat
    if P == 0:
        return grad_y_PD, grad_w_ZK
    weights = weights_ZK.contiguous() if weights_ZK is not None else flat_P  # unread without weights
    with on_device_of(grad_ZD):
        _sum_slots_backward_kernel[(P,)](
            grad_ZD.contiguous(), y_PD.contiguous() if want_grad_w else grad_ZD, row_P.contiguous(),
            flat_P.contiguous(), weights, grad_y_PD, grad_w_ZK if want_grad_w else grad_y_PD, D,
            HAS_W=weights_ZK is not None, WANT_GRAD_W=want_grad_w, BLOCK_D=min(triton.next_power_of_2(D), 1024),
        )  # fmt: skip
    return grad_y_PD, grad_w_ZK
