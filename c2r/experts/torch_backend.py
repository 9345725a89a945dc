"""Sort + grouped GEMM in plain PyTorch: runs anywhere torch does.

The (token, slot) pairs are sorted by expert once and the tokens gathered into that order (``slot_rows.py``); the
three expert matrices then run as grouped GEMMs (``torch._grouped_mm``) over the sorted rows, or, where torch has no
grouped kernel for the device/dtype/shape, as a loop over the contiguous per-expert segments; each token's outputs
are summed back with its combine weights by gathers, no atomic adds (Triton kernels on a GPU, as in the
expert-parallel dispatch).

Shape legend: the package legend (``c2r/__init__.py``), P (token, slot) rows in expert order, A the rows of one
expert, I and J the input and output width of one grouped GEMM (D or F).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from c2r.experts.slot_rows import SlotOrder, expand_rows, sort_slots, sum_slots
from c2r.experts.weights import ExpertWeights, gelu_tanh
from c2r.routing.result import RoutingResult


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: the CPU ``_grouped_mm`` backward rejects strided
    gradients (e.g. the stride-0 gradient of ``.sum()``)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm_supported(x: torch.Tensor, experts: ExpertWeights) -> bool:
    """Whether ``torch._grouped_mm`` has a kernel for this device, dtype and shape."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cuda":
        ok_dtype = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    else:
        ok_dtype = x.device.type == "cpu" and x.dtype == torch.float32
    # Row strides must be multiples of 16 bytes.
    per_16_bytes = 16 // x.element_size()
    aligned = experts.hidden_size % per_16_bytes == 0 and experts.ffn_hidden_size % per_16_bytes == 0
    return ok_dtype and aligned and experts.w1.dtype == x.dtype


def _gmm(x_PI: torch.Tensor, w_EIJ: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(torch._grouped_mm(x_PI, w_EIJ, offs=offsets_E))


def grouped_mm_mlp(x_PD: torch.Tensor, tokens_per_expert_E: torch.Tensor, experts: ExpertWeights) -> torch.Tensor:
    offsets_E = tokens_per_expert_E.cumsum(0).to(torch.int32)  # no host sync: offsets stay on the device
    h_PF = _gmm(x_PD, experts.stacked("w1").transpose(1, 2), offsets_E)
    if experts.is_glu:
        h_PF = F.silu(h_PF) * _gmm(x_PD, experts.stacked("v1").transpose(1, 2), offsets_E)
    else:
        h_PF = gelu_tanh(h_PF)
    return _gmm(h_PF, experts.stacked("w2"), offsets_E)


def segment_loop_mlp(
    x_PD: torch.Tensor, tokens_per_expert_E: torch.Tensor, experts: ExpertWeights, host_counts: list[int] | None = None
) -> torch.Tensor:
    # NOTE: host sync unless the caller has the counts on the host already; the loop needs segment lengths there
    counts = tokens_per_expert_E.tolist() if host_counts is None else host_counts
    # The weights are split once: each expert's rows as a *view* of one split, whose backward writes every expert's
    # gradient into one buffer. Indexing the parameter per expert instead (ExpertWeights.expert_mlp, the plain
    # reference) makes each expert's backward allocate and add a full [E * F, D] gradient: E times the memory traffic
    # (64 experts: 12x slower steps on the CPU).
    F_ = experts.ffn_hidden_size
    w1_E, w2_E = experts.w1.split(F_), experts.w2.split(F_)
    v1_E = experts.v1.split(F_) if experts.is_glu else None
    out = []
    # Empty segments are computed too (0-row matmuls cost nothing): the output must stay connected to the input in
    # autograd, or a rank that received no tokens would skip the backward all-to-all and hang its peers.
    for e, seg_AD in enumerate(x_PD.split(counts)):
        h_AF = seg_AD @ w1_E[e].t()
        h_AF = F.silu(h_AF) * (seg_AD @ v1_E[e].t()) if experts.is_glu else gelu_tanh(h_AF)
        out.append(h_AF @ w2_E[e])
    return torch.cat(out)


class TorchBackend:
    name = "torch"

    def __init__(self, impl: str = "auto"):
        self.impl = impl

    def use_grouped_mm(self, x: torch.Tensor, experts: ExpertWeights) -> bool:
        if self.impl == "loop":
            return False
        supported = grouped_mm_supported(x, experts)
        if self.impl == "grouped_mm":
            if not supported:
                raise ValueError(
                    f"torch_impl='grouped_mm' has no kernel here: device {x.device}, dtype {x.dtype}, hidden "
                    f"{experts.hidden_size}, ffn {experts.ffn_hidden_size} (needs bf16 on sm90+ GPUs or float32 on "
                    "the CPU, and sizes whose rows are multiples of 16 bytes); use torch_impl='auto'"
                )
            return True
        return supported and x.device.type != "cpu"

    def grouped_mlp(
        self,
        x_PD: torch.Tensor,
        tokens_per_expert_E: torch.Tensor,
        experts: ExpertWeights,
        host_counts: list[int] | None = None,
    ):
        """The expert MLPs on rows already sorted by expert (``grouped_mm`` reads the counts on the device)."""
        if self.use_grouped_mm(x_PD, experts):
            return grouped_mm_mlp(x_PD, tokens_per_expert_E, experts)
        return segment_loop_mlp(x_PD, tokens_per_expert_E, experts, host_counts)

    def __call__(self, x_TD: torch.Tensor, routing: RoutingResult, experts: ExpertWeights) -> torch.Tensor:
        order = sort_by_expert(routing, experts.num_experts)
        y_PD = self.grouped_mlp(expand_rows(x_TD, order), routing.tokens_per_expert_E, experts)
        return sum_slots(y_PD, order, routing.weights_TK)


def sort_by_expert(routing: RoutingResult, num_experts: int) -> SlotOrder:
    """The valid (token, slot) pairs in expert order (by token within an expert)."""
    num_tokens, top_k = routing.expert_ids_TK.shape
    sorted_flat = sort_slots(routing.expert_ids_TK, routing.valid_TK, num_experts)
    # NOTE: host sync only for routers with empty slots; a fixed k has T x K pairs
    num_pairs = num_tokens * top_k if routing.fixed_k else int(routing.valid_TK.sum())
    return SlotOrder.first(sorted_flat, routing.valid_TK, num_pairs)
