"""Expert weights between Hugging Face's layout and ours.

Hugging Face 5.x: ``gate_up_proj`` [E, 2F, D] (the gate's F rows, then the up projection's) and ``down_proj``
[E, D, F]; an expert computes ``down @ (silu(gate @ x) * (up @ x))``. Ours (c2r.experts.ExpertWeights): ``w1``
(gate), ``v1`` (up) and ``w2`` (down, transposed) stacked as [E*F, D]. Both compute the same SwiGLU.

Shape legend: E experts, F expert ffn size, D hidden size, X experts on this rank.
"""

from __future__ import annotations

import torch

from c2r.experts import ExpertWeights


@torch.no_grad()
def set_expert(experts: ExpertWeights, slot: int, gate_FD: torch.Tensor, up_FD: torch.Tensor, down_DF: torch.Tensor):
    """Write one expert's three Hugging Face matrices into local slot ``slot`` of ``experts``."""
    F = experts.ffn_hidden_size
    expected = (F, experts.hidden_size)
    shapes = (tuple(gate_FD.shape), tuple(up_FD.shape), tuple(down_DF.t().shape))
    if any(s != expected for s in shapes):
        raise ValueError(f"expert matrices gate/up/down^T have shapes {shapes}, expected {expected} each")
    rows = slice(slot * F, (slot + 1) * F)
    experts.w1[rows] = gate_FD
    experts.v1[rows] = up_FD
    experts.w2[rows] = down_DF.t()


def load_hf_experts(experts: ExpertWeights, gate_up_EXD: torch.Tensor, down_EDF: torch.Tensor, local: list[int]):
    """Copy the logical experts ``local`` (in slot order) from a Hugging Face experts module's tensors."""
    F = experts.ffn_hidden_size
    for slot, expert in enumerate(local):
        set_expert(experts, slot, gate_up_EXD[expert, :F], gate_up_EXD[expert, F:], down_EDF[expert])


def hf_expert_tensors(w1_EFD: torch.Tensor, v1_EFD: torch.Tensor, w2_EFD: torch.Tensor):
    """Our [E, F, D] matrices (logical order) -> Hugging Face's (``gate_up_proj`` [E, 2F, D], ``down_proj``
    [E, D, F])."""
    return torch.cat([w1_EFD, v1_EFD], dim=1), w2_EFD.transpose(1, 2).contiguous()
