"""MegaBlocks' dropless expert computation on our stacked weights (CUDA only).

``impl="grouped"``: the same steps as MegaBlocks' ``ParallelDroplessMLP.grouped_forward_once``: radix-sort the
expert ids, histogram them, gather tokens into expert order with MegaBlocks' Triton kernels, run the expert MLP as
grouped GEMMs (grouped_gemm), and scatter back with the combine weights folded in. ``impl="sparse"``: its
block-sparse stk path (c2r/experts/megablocks_sparse.py). ``impl="grouped_mm"``: MegaBlocks' permutation kernels
around ``torch._grouped_mm`` (one kernel for all experts, counts read on the device: with a fixed k the layer makes no
host sync). Empty slots (variable k) go to an
extra bin past the last expert: gathered but never multiplied, and scattered with weight 0.

Shape legend: the package legend (``c2r/__init__.py``), and P = T * K (token, slot) rows in expert order (empty slots
last).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from c2r.experts.megablocks_sparse import sparse_expert_mlp
from c2r.experts.torch_backend import grouped_mm_mlp, grouped_mm_supported
from c2r.experts.weights import ExpertWeights, gelu_tanh
from c2r.host_syncs import host_copy, wait_for
from c2r.routing.result import RoutingResult

GPU_INSTALL_HINT = (
    "install the GPU extras built against your torch: `pip install --no-deps --no-build-isolation megablocks==0.10.0 "
    "grouped_gemm==0.3.0 stanford-stk==0.7.1` (see README.md, 'GPU install'), or use backend='torch'"
)


@functools.cache  # asked at every layer's forward under backend "auto"; a failing import is retried each time
def megablocks_unavailable_reason() -> str | None:
    """None when MegaBlocks' grouped path can run here, else why not (a sentence naming what to do)."""
    if not torch.cuda.is_available():
        return "the megablocks backend needs a CUDA GPU and none is visible (torch.cuda.is_available() is False)"
    try:
        import grouped_gemm  # noqa: F401
        import megablocks.ops  # noqa: F401
    except Exception as error:  # its compiled ops fail with ImportError or OSError depending on what is missing
        return f"MegaBlocks cannot be imported ({type(error).__name__}: {error}); {GPU_INSTALL_HINT}"
    return None


def _grouped_mlp(x_PD: torch.Tensor, batch_sizes_E: torch.Tensor, experts: ExpertWeights) -> torch.Tensor:
    from grouped_gemm import ops as gg_ops

    h_PF = gg_ops.gmm(x_PD, experts.stacked("w1"), batch_sizes_E, trans_b=True)
    if experts.is_glu:
        h_PF = F.silu(h_PF) * gg_ops.gmm(x_PD, experts.stacked("v1"), batch_sizes_E, trans_b=True)
    else:
        h_PF = gelu_tanh(h_PF)
    return gg_ops.gmm(h_PF, experts.stacked("w2"), batch_sizes_E)


class MegaBlocksBackend:
    name = "megablocks"

    def __init__(self, impl: str = "grouped"):
        reason = megablocks_unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        # "grouped" (grouped_gemm), "sparse" (stk block-sparse, c2r/experts/megablocks_sparse.py) or "grouped_mm"
        # (MegaBlocks' permutation around torch._grouped_mm, which reads the counts on the device: no host sync)
        self.impl = impl
        self.name = "megablocks" if impl == "grouped" else f"megablocks-{impl}"  # what logs and tests see

    @staticmethod
    def _check_grouped_mm(x: torch.Tensor, experts: ExpertWeights) -> None:
        if not grouped_mm_supported(x, experts):
            raise ValueError(
                f"megablocks_impl='grouped_mm' needs torch._grouped_mm for bf16 on a Hopper GPU and hidden/ffn sizes "
                f"in multiples of 8; got {x.dtype} on {x.device}, hidden {experts.hidden_size}, ffn "
                f"{experts.ffn_hidden_size} (use megablocks_impl='grouped')"
            )

    @staticmethod
    def _check_input(x: torch.Tensor) -> None:
        if x.device.type != "cuda" or x.dtype != torch.bfloat16:
            raise ValueError(
                f"the megablocks backend runs bfloat16 tensors on a CUDA GPU; got {x.dtype} on "
                f"{x.device} (use backend='auto' or 'torch' for other dtypes/devices)"
            )

    def grouped_mlp(
        self,
        x_PD: torch.Tensor,
        tokens_per_expert_E: torch.Tensor,
        experts: ExpertWeights,
        host_counts: list[int] | None = None,
    ):
        """The expert MLPs on rows already sorted by expert (the permutation is the caller's)."""
        self._check_input(x_PD)
        if self.impl == "grouped_mm":
            self._check_grouped_mm(x_PD, experts)
            return grouped_mm_mlp(x_PD, tokens_per_expert_E, experts)
        if self.impl == "sparse":
            experts_P = torch.repeat_interleave(
                torch.arange(experts.num_experts, device=x_PD.device), tokens_per_expert_E, output_size=x_PD.shape[0]
            )
            return sparse_expert_mlp(x_PD, experts_P, None, 1, experts, has_empty=False)
        if host_counts is not None:
            batch_sizes_E = torch.tensor(host_counts, dtype=torch.long)  # grouped_gemm wants them on the host
        else:
            batch_sizes_E = tokens_per_expert_E.cpu().long()  # NOTE: host sync for grouped_gemm
        return _grouped_mlp(x_PD, batch_sizes_E, experts)

    def _mlp(self, x_PD, batch_sizes_E: torch.Tensor, counts_E: torch.Tensor, experts: ExpertWeights) -> torch.Tensor:
        """grouped_gemm on the host sizes, or torch._grouped_mm on the device counts."""
        if self.impl == "grouped_mm":
            return grouped_mm_mlp(x_PD, counts_E, experts)
        return _grouped_mlp(x_PD, batch_sizes_E, experts)

    def __call__(self, x_TD: torch.Tensor, routing: RoutingResult, experts: ExpertWeights) -> torch.Tensor:
        import megablocks.ops as mops

        self._check_input(x_TD)
        x_TD = x_TD.contiguous()  # its gather kernels read rows D elements apart
        num_tokens, top_k = routing.expert_ids_TK.shape
        num_experts = experts.num_experts
        if self.impl == "grouped_mm":
            self._check_grouped_mm(x_TD, experts)
        if self.impl == "sparse":
            keys, weights = routing.expert_ids_TK, routing.weights_TK
            if not routing.fixed_k:
                keys = torch.where(routing.valid_TK, keys, num_experts)
                weights = torch.where(routing.valid_TK, weights, torch.zeros_like(weights))
            keys, weights = keys.flatten(), weights.flatten().to(x_TD.dtype)
            return sparse_expert_mlp(x_TD, keys, weights, top_k, experts, has_empty=not routing.fixed_k)
        num_bins = num_experts if routing.fixed_k else num_experts + 1  # + the bin of empty slots
        with torch.no_grad():
            keys = routing.expert_ids_TK
            if not routing.fixed_k:
                keys = torch.where(routing.valid_TK, keys, num_experts)
            keys = keys.flatten().int()
            bin_ids, indices = mops.sort(keys, max(1, math.ceil(math.log2(num_bins))))
            tokens_per_bin = mops.histogram(keys, num_bins)
            bins = mops.inclusive_cumsum(tokens_per_bin, 0).view(-1)
        counts_E = tokens_per_bin[:num_experts]
        if self.impl == "grouped_mm" and routing.fixed_k:
            x_PD = mops.gather(x_TD, indices, bin_ids, bins, top_k)
            y_PD = grouped_mm_mlp(x_PD, tokens_per_bin, experts)  # every row is valid: no host sync at all
            return mops.scatter(y_PD, indices, bin_ids, routing.weights_TK.flatten().to(x_TD.dtype), bins, top_k)
        # grouped_gemm wants the sizes on the host. Their copy is queued before the gather and waited for after
        # it is launched, so the host leaves the sync while the GPU still gathers, and launches the GEMMs meanwhile.
        batch_sizes_E, copied = host_copy(counts_E.long())
        x_PD = mops.gather(x_TD, indices, bin_ids, bins, top_k)
        wait_for(copied, "the megablocks backend (grouped_gemm wants its group sizes on the host)")  # NOTE: host sync
        num_valid = num_tokens * top_k if routing.fixed_k else int(batch_sizes_E.sum())
        if num_valid == num_tokens * top_k:
            # No empty slots: no slicing either. Even a full-length slice costs, in the backward, a zero-filled
            # [T*K, D] buffer and a copy into it (~0.4 ms at T=16k, K=8, D=2048 on an H100).
            y_PD = self._mlp(x_PD, batch_sizes_E, counts_E, experts)
        else:
            y_PD = self._mlp(x_PD[:num_valid], batch_sizes_E, counts_E, experts)
            y_PD = F.pad(y_PD, (0, 0, 0, num_tokens * top_k - num_valid))
        weights = routing.weights_TK
        if not routing.fixed_k:
            weights = torch.where(routing.valid_TK, weights, torch.zeros_like(weights))
        return mops.scatter(y_PD, indices, bin_ids, weights.flatten().to(x_TD.dtype), bins, top_k)
