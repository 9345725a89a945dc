"""Rows expanded to their valid slots in key order, and summed back: on a GPU with gathers only (no atomics), never a
host sync.

The torch backend (tokens to experts on one device) and the lean expert-parallel path (docs/design.md, "Dispatch")
move rows between two orders:
- Z rows (tokens, or received copies at a destination), each with K slots of which some are valid;
- P valid (row, slot) pairs sorted by a key (an expert id, a physical expert id, a local expert slot, a rank).
A :class:`SlotOrder` holds both directions of that map:
- :func:`expand_rows` (Z -> P): ``x_PD = x_ZD[row_P]``; its backward sums each row's pair gradients.
- :func:`sum_slots` (P -> Z): ``out_ZD = sum_k w_ZK * y_PD[inverse_ZK]`` over the valid slots; its backward writes
  each pair's gradient once.
- :func:`permute_rows`: a permutation whose backward is the inverse permutation (``x[perm]``'s backward is an
  accumulating ``index_put``).
On a GPU both sums are Triton kernels (``slot_kernels.py``): one program per row gathers its valid slots' rows
through the inverse (MegaBlocks' scatter does the same) instead of ``index_add``'s atomic adds, and one program per
pair writes the backward; empty slots are never read. Elsewhere (the CPU, float64, or no Triton) they are
``index_add`` over the P pairs: deterministic on the CPU, and no ``[Z, K, D]`` gather when K is wide (ReMoE routes with
K = E slots).
The number of pairs P is a host int the caller already has (T x K under a fixed k, or from the counts exchange), never
read off the device here.

Shape legend: the package legend (``c2r/__init__.py``), and Z the rows whose slots are ordered (T or Q), P valid
(row, slot) pairs in key order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

import torch
from torch.autograd.function import once_differentiable

# valid slots per key without a host sync; one histogram for routing and dispatch
from c2r.routing.result import count_tokens_per_expert as count_keys  # noqa: F401  (re-exported)


def sort_slots(keys_ZK: torch.Tensor, valid_ZK: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[Z * K] flat slot indices (row * K + slot), valid ones first in key order (stable: by row within a key).

    Launch it before the counts' host copy, cut it with :meth:`SlotOrder.first` after: the sort overlaps the sync."""
    return torch.argsort(torch.where(valid_ZK, keys_ZK, num_keys).flatten(), stable=True)


@dataclass(frozen=True)
class SlotOrder:
    """Valid (row, slot) pairs of Z rows x K slots, in key order.

    Attributes:
        flat_P: ``row * K + slot`` of each pair.
        row_P: its row (``flat_P // K``).
        inverse_ZK: each (row, slot)'s position in P; 0 for empty slots (never read with a non-zero weight).
        valid_ZK: which slots are pairs.
        num_pairs: P, a host int.
    """

    flat_P: torch.Tensor
    row_P: torch.Tensor
    inverse_ZK: torch.Tensor
    valid_ZK: torch.Tensor
    num_pairs: int

    @classmethod
    def first(cls, sorted_flat: torch.Tensor, valid_ZK: torch.Tensor, num_pairs: int) -> SlotOrder:
        """From :func:`sort_slots`' output and the number of valid slots (known on the host)."""
        num_rows, num_slots = valid_ZK.shape
        flat_P = sorted_flat[:num_pairs]
        positions_P = torch.arange(num_pairs, device=flat_P.device)
        inverse = torch.zeros(num_rows * num_slots, dtype=torch.int64, device=flat_P.device)
        inverse.scatter_(0, flat_P, positions_P)  # a permutation's inverse: unique indices, no accumulation
        return cls(flat_P, flat_P // num_slots, inverse.view(num_rows, num_slots), valid_ZK, num_pairs)

    @property
    def shape_ZK(self) -> tuple[int, int]:
        return tuple(self.valid_ZK.shape)


class _ExpandRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ZD: torch.Tensor, order: SlotOrder):
        ctx.order = order
        return x_ZD.index_select(0, order.row_P)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_PD: torch.Tensor):
        order: SlotOrder = ctx.order
        Z = order.shape_ZK[0]
        kernels = _kernels_for(grad_PD)
        if kernels is not None:  # each row's pair gradients summed in one pass
            return kernels.sum_slots_forward(grad_PD, order.inverse_ZK, order.valid_ZK, None), None
        return grad_PD.new_zeros(Z, grad_PD.shape[1]).index_add_(0, order.row_P, grad_PD), None


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor):
        ctx.inverse = inverse
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.index_select(0, ctx.inverse), None, None


def expand_rows(x_ZD: torch.Tensor, order: SlotOrder) -> torch.Tensor:
    """[P, D]: row ``x_ZD[row]`` for each pair, in key order."""
    return _ExpandRows.apply(x_ZD, order)


class _KernelSumSlots(torch.autograd.Function):
    """:func:`sum_slots` through the Triton kernels (``slot_kernels.py``)."""

    @staticmethod
    def forward(ctx, y_PD: torch.Tensor, weights_ZK: torch.Tensor | None, order: SlotOrder, kernels):
        ctx.order, ctx.kernels = order, kernels  # the backward runs on the forward's choice
        wants_grad_w = weights_ZK is not None and ctx.needs_input_grad[1]
        ctx.save_for_backward(y_PD if wants_grad_w else None, weights_ZK)
        return kernels.sum_slots_forward(y_PD, order.inverse_ZK, order.valid_ZK, weights_ZK)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ZD: torch.Tensor):
        order: SlotOrder = ctx.order
        y_PD, weights_ZK = ctx.saved_tensors
        grad_y_PD, grad_w_ZK = ctx.kernels.sum_slots_backward(grad_ZD, y_PD, order.row_P, order.flat_P, weights_ZK)
        return grad_y_PD, grad_w_ZK, None, None


@cache
def _triton_slot_kernels():
    """``slot_kernels`` where Triton imports (torch's CUDA builds bring it), else None."""
    try:
        from c2r.experts import slot_kernels
    except ImportError:
        return None
    return slot_kernels


def _kernels_for(x: torch.Tensor):
    """The Triton kernels for ``x``, or None for the torch path. They take CUDA tensors up to 32 bits (they add in
    float32), and CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1``, how the CPU suite runs them).
    Triton fixes compiled or interpreted when it first imports the kernels, so that import's mode decides."""
    if x.dtype == torch.float64 or not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    kernels = _triton_slot_kernels()
    if kernels is None or x.is_cuda == kernels.INTERPRETED:
        return None
    return kernels


def sum_slots(y_PD: torch.Tensor, order: SlotOrder, weights_ZK: torch.Tensor | None = None) -> torch.Tensor:
    """[Z, D]: ``out[z] = sum over valid slots k of weights[z, k] * y[pair (z, k)]`` (gradients reach weights_ZK);
    without weights, the plain sum of each row's valid slots."""
    kernels = _kernels_for(y_PD)
    if kernels is not None:
        return _KernelSumSlots.apply(y_PD, weights_ZK, order, kernels)
    if weights_ZK is not None:  # each pair's weight, read at valid slots only
        y_PD = y_PD * weights_ZK.flatten()[order.flat_P].to(y_PD.dtype).unsqueeze(1)
    return y_PD.new_zeros(order.shape_ZK[0], y_PD.shape[1]).index_add(0, order.row_P, y_PD)


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``x[perm]`` where ``inverse`` is ``perm``'s inverse permutation (the backward's gather)."""
    return _PermuteRows.apply(x, perm, inverse)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
