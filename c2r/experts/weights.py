"""Expert parameters in MegaBlocks' stacked layout, shared by every backend.

``w1``, ``v1`` (SwiGLU only) and ``w2`` all have shape [E * F, D]: expert e owns rows e*F .. (e+1)*F. A checkpoint
written with one backend therefore loads with any other, CPU or GPU.

Shape legend: E experts, F expert ffn size, D hidden size, N tokens routed to one expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # MegaBlocks' default activation; using the same one keeps our weights interchangeable with its dMoE.
    return F.gelu(x, approximate="tanh")


class ExpertWeights(nn.Module):
    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_hidden_size: int,
        activation: str,
        init_std: float = 0.02,
        output_init_std: float = 0.02,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.activation = activation
        rows = num_experts * ffn_hidden_size
        self.w1 = nn.Parameter(torch.empty(rows, hidden_size))
        self.v1 = nn.Parameter(torch.empty(rows, hidden_size)) if activation == "swiglu" else None
        self.w2 = nn.Parameter(torch.empty(rows, hidden_size))
        nn.init.normal_(self.w1, std=init_std)
        if self.v1 is not None:
            nn.init.normal_(self.v1, std=init_std)
        nn.init.normal_(self.w2, std=output_init_std)

    @property
    def is_glu(self) -> bool:
        return self.v1 is not None

    def stacked(self, name: str) -> torch.Tensor:
        """``w1`` / ``v1`` / ``w2`` viewed as [E, F, D]."""
        return getattr(self, name).view(self.num_experts, self.ffn_hidden_size, self.hidden_size)

    def expert_mlp(self, x_ND: torch.Tensor, expert: int) -> torch.Tensor:
        """One expert's MLP on its tokens: the plain math every fast path must reproduce."""
        rows = slice(expert * self.ffn_hidden_size, (expert + 1) * self.ffn_hidden_size)
        h_NF = x_ND @ self.w1[rows].t()
        if self.is_glu:
            h_NF = F.silu(h_NF) * (x_ND @ self.v1[rows].t())
        else:
            h_NF = gelu_tanh(h_NF)
        return h_NF @ self.w2[rows]

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, hidden={self.hidden_size}, ffn={self.ffn_hidden_size}, "
            f"activation={self.activation}"
        )
