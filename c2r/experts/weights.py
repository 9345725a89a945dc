"""Expert parameters in MegaBlocks' stacked layout, shared by every backend.

``w1``, ``v1`` (SwiGLU only) and ``w2`` all have shape [E * F, D]: expert e owns rows e*F .. (e+1)*F. A checkpoint
written with one backend therefore loads with any other, CPU or GPU.

Shape legend: the package legend (``c2r/__init__.py``), and A the rows routed to one expert.
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

    # DeepSpeed finds expert tensors by this key pattern (deepspeed_moe.experts.deepspeed_experts.<local id>.<name>)
    # and writes one checkpoint file per expert from it.
    PER_EXPERT_KEY = "deepspeed_experts"

    def use_per_expert_state_dict(self, enabled: bool = True) -> None:
        """Save/load each expert's rows as its own tensor ``deepspeed_experts.<i>.w1`` (shape [F, D]) instead of the
        stacked ``w1`` (shape [E*F, D]). The parameters stay stacked; only the checkpoint keys change."""
        self._per_expert_state_dict = enabled

    def _param_names(self) -> list[str]:
        return [n for n in ("w1", "v1", "w2") if getattr(self, n) is not None]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not getattr(self, "_per_expert_state_dict", False):
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self._param_names():
            stacked = self.stacked(name) if keep_vars else self.stacked(name).detach()
            for e in range(self.num_experts):
                destination[f"{prefix}{self.PER_EXPERT_KEY}.{e}.{name}"] = stacked[e]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if getattr(self, "_per_expert_state_dict", False):
            for name in self._param_names():
                keys = [f"{prefix}{self.PER_EXPERT_KEY}.{e}.{name}" for e in range(self.num_experts)]
                present = [k for k in keys if k in state_dict]
                if present and len(present) < len(keys):
                    missing_keys.extend(k for k in keys if k not in state_dict)
                elif present:
                    state_dict[f"{prefix}{name}"] = torch.cat([state_dict.pop(k) for k in keys])
            stray = [k for k in state_dict if k.startswith(f"{prefix}{self.PER_EXPERT_KEY}.")]
            unexpected_keys.extend(stray)
            for k in stray:
                state_dict.pop(k)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @property
    def is_glu(self) -> bool:
        return self.v1 is not None

    def stacked(self, name: str) -> torch.Tensor:
        """``w1`` / ``v1`` / ``w2`` viewed as [E, F, D]."""
        return getattr(self, name).view(self.num_experts, self.ffn_hidden_size, self.hidden_size)

    def expert_mlp(self, x_AD: torch.Tensor, expert: int) -> torch.Tensor:
        """One expert's MLP on its tokens: the plain math every fast path must reproduce."""
        rows = slice(expert * self.ffn_hidden_size, (expert + 1) * self.ffn_hidden_size)
        h_AF = x_AD @ self.w1[rows].t()
        if self.is_glu:
            h_AF = F.silu(h_AF) * (x_AD @ self.v1[rows].t())
        else:
            h_AF = gelu_tanh(h_AF)
        return h_AF @ self.w2[rows]

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, hidden={self.hidden_size}, ffn={self.ffn_hidden_size}, "
            f"activation={self.activation}"
        )
