"""The plain reference: a loop over experts, each computing its own tokens. Slow, obvious, and the ground truth
every fast path is tested against.

Shape legend: the package legend (``c2r/__init__.py``), P rows in expert order, A the rows of one expert.
"""

from __future__ import annotations

import torch

from c2r.experts.torch_backend import segment_loop_mlp
from c2r.experts.weights import ExpertWeights
from c2r.routing.result import RoutingResult


class ReferenceBackend:
    name = "reference"

    def grouped_mlp(
        self,
        x_PD: torch.Tensor,
        tokens_per_expert_E: torch.Tensor,
        experts: ExpertWeights,
        host_counts: list[int] | None = None,
    ):
        """Rows already sorted by expert (expert parallelism hands them over so): one expert at a time."""
        return segment_loop_mlp(x_PD, tokens_per_expert_E, experts, host_counts)

    def __call__(self, x_TD: torch.Tensor, routing: RoutingResult, experts: ExpertWeights) -> torch.Tensor:
        out_TD = torch.zeros_like(x_TD)
        for e in range(experts.num_experts):
            token_A, slot_A = ((routing.expert_ids_TK == e) & routing.valid_TK).nonzero(as_tuple=True)
            if token_A.numel() == 0:
                continue
            y_AD = experts.expert_mlp(x_TD[token_A], e)
            w_A1 = routing.weights_TK[token_A, slot_A].to(y_AD.dtype).unsqueeze(1)
            out_TD = out_TD.index_add(0, token_A, (y_AD * w_A1).to(out_TD.dtype))  # autocast: bf16 rows, fp32 out
        return out_TD
