"""MegaBlocks' block-sparse expert MLP (stk), with the 16-bit block-index overflow fixed (CUDA only).

MegaBlocks' ``mlp_impl="sparse"`` computes all experts as two block-sparse products: the rows routed to each expert
are padded to a multiple of 128 and the [rows, E*F] hidden activations are a block-diagonal sparse matrix, so one
Triton kernel runs every expert (no per-expert GEMM launches). MegaBlocks refuses it with triton >= 3.2 because stk's
kernels then produce wrong results: they load the block row/column indices as int16 and multiply them by the block
size (``pid_m * BLOCK_M``, ``column * BLOCK_SIZE * stride``), which triton < 3.2 silently widened and triton >= 3.2
computes in int16, overflowing past 256 block rows or columns (32,768 padded rows, or E*F = 32,768). Upstream stk PR
#17 widens the loads inside the kernels. We carry the fix without touching stk: the kernels are generic in the index
dtype, so we build the topology with **int32** block indices (the values themselves fit 16 bits; only the products
overflowed) and every product is then computed in 32 bits. ``tests/test_gpu.py`` checks the path against the float32
reference on shapes past both limits.

Shape legend: the package legend (``c2r/__init__.py``), and B = 128 (the block size), Q = padded rows (each
expert's rows rounded up to a multiple of B).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from c2r.experts.weights import ExpertWeights, gelu_tanh

BLOCK = 128  # MegaBlocks' block size for the sparse path; stk's kernels are compiled for it.


def sparse_shape_problem(ffn_hidden_size: int) -> str | None:
    """None when the sparse path can run this expert width, else why not."""
    if ffn_hidden_size % BLOCK:
        return (
            f"megablocks_impl='sparse' needs ffn_hidden_size divisible by its block size {BLOCK}; got "
            f"{ffn_hidden_size} (use megablocks_impl='grouped')"
        )
    return None


def _topology(padded_rows: int, padded_bins_E: torch.Tensor, num_experts: int, ffn_hidden_size: int):
    """The block-diagonal [Q, E*F] sparsity pattern as an stk.Matrix, with int32 block indices (the overflow fix)."""
    import megablocks.ops as mops
    import stk

    block_rows = padded_rows // BLOCK
    blocks_per_row = ffn_hidden_size // BLOCK
    device = padded_bins_E.device
    offsets = torch.arange(0, block_rows * blocks_per_row + 1, blocks_per_row, dtype=torch.int32, device=device)
    column_indices = mops.topology(padded_bins_E, BLOCK, block_rows, blocks_per_row).int()
    # Never read: stk wants a data tensor for its shape only (MegaBlocks uses the meta device the same way).
    data = torch.empty(column_indices.numel(), BLOCK, BLOCK, dtype=torch.bfloat16, device="meta")
    shape = (padded_rows, ffn_hidden_size * num_experts)
    row_indices = stk.ops.row_indices(shape, data, offsets, column_indices)  # int32, like column_indices
    # The transpose's metadata, as MegaBlocks' dMoE.sparse_transpose builds it (sort rows by column).
    block_columns = shape[1] // BLOCK
    _, gather_indices = mops.sort(column_indices, max(1, math.ceil(math.log2(block_columns))))
    column_indices_t = row_indices.gather(0, gather_indices.long())
    block_offsets_t = gather_indices.int()
    nnz_per_column = mops.inclusive_cumsum(mops.histogram(column_indices, block_columns), 0).view(-1)
    offsets_t = torch.cat([torch.zeros(1, dtype=torch.int32, device=device), nnz_per_column.int()])
    return stk.Matrix(shape, data, row_indices, column_indices, offsets, column_indices_t, offsets_t, block_offsets_t)


def _sparse_mlp(x_QD: torch.Tensor, topo, experts: ExpertWeights) -> torch.Tensor:
    """Every expert's MLP as block-sparse products: x @ w1^T into the topology's blocks, activation, @ w2."""
    import stk

    h = stk.ops.sdd(x_QD, experts.w1.t(), topo)
    if experts.is_glu:
        gate = stk.ops.sdd(x_QD, experts.v1.t(), topo)
        act = F.silu(h.data) * gate.data
    else:
        act = gelu_tanh(h.data)
    h = stk.Matrix(
        h.size(),
        act,
        h.row_indices,
        h.column_indices,
        h.offsets,
        h.column_indices_t,
        h.offsets_t,
        h.block_offsets_t,
    )
    return stk.ops.dsd(h, experts.w2)


def sparse_expert_mlp(
    x_TD: torch.Tensor,
    keys_P: torch.Tensor,
    weights_P: torch.Tensor | None,
    top_k: int,
    experts: ExpertWeights,
    has_empty: bool,
) -> torch.Tensor:
    """The block-sparse experts on T tokens with P = T * top_k (token, slot) expert ids ``keys_P``, combined with
    ``weights_P`` (None: unweighted). With ``has_empty`` (variable k), a key equal to E marks an empty slot: gathered
    into a bin past the last expert, never multiplied, scattered with weight 0 (the caller zeroes its weight).
    Returns [T, D].

    Host syncs: one (the padded row count sizes the gathered buffer), or two with empty slots (where the experts'
    rows end inside it)."""
    import megablocks.ops as mops

    num_experts = experts.num_experts
    num_bins = num_experts + 1 if has_empty else num_experts
    with torch.no_grad():
        keys_P = keys_P.int()
        bin_ids, indices = mops.sort(keys_P, max(1, math.ceil(math.log2(num_bins))))
        rows_per_bin = mops.histogram(keys_P, num_bins)
        padded_bins = mops.inclusive_cumsum(mops.round_up(rows_per_bin, BLOCK), 0).view(-1)
        bins = mops.inclusive_cumsum(rows_per_bin, 0).view(-1)
    x_QD = mops.padded_gather(x_TD, indices, bin_ids, bins, padded_bins, top_k)  # NOTE: host sync (its row count)
    if has_empty:
        expert_rows = int(padded_bins[num_experts - 1])  # NOTE: host sync; the empty slots' bin follows
        topo = _topology(expert_rows, padded_bins[:num_experts], num_experts, experts.ffn_hidden_size)
        y_QD = F.pad(_sparse_mlp(x_QD[:expert_rows], topo, experts), (0, 0, 0, x_QD.shape[0] - expert_rows))
    else:
        topo = _topology(x_QD.shape[0], padded_bins, num_experts, experts.ffn_hidden_size)
        y_QD = _sparse_mlp(x_QD, topo, experts)
    return mops.padded_scatter(y_QD, indices, bin_ids, weights_P, bins, padded_bins, top_k)
