"""The plain reference: a loop over experts, each computing its own tokens. Slow, obvious, and the ground truth
every fast path is tested against.

Shape legend: T tokens, K slots, D hidden size, N tokens of one expert.
"""

from __future__ import annotations

import torch

from c2r.experts.torch_backend import segment_loop_mlp
from c2r.experts.weights import ExpertWeights
from c2r.routing.result import RoutingResult


class ReferenceBackend:
    name = "reference"

    def grouped_mlp(self, x_SD: torch.Tensor, tokens_per_expert_E: torch.Tensor, experts: ExpertWeights):
        """Rows already sorted by expert (expert parallelism hands them over so): one expert at a time."""
        return segment_loop_mlp(x_SD, tokens_per_expert_E, experts)

    def __call__(self, x_TD: torch.Tensor, routing: RoutingResult, experts: ExpertWeights) -> torch.Tensor:
        out_TD = torch.zeros_like(x_TD)
        for e in range(experts.num_experts):
            token_N, slot_N = ((routing.expert_ids_TK == e) & routing.valid_TK).nonzero(as_tuple=True)
            if token_N.numel() == 0:
                continue
            y_ND = experts.expert_mlp(x_TD[token_N], e)
            w_N1 = routing.weights_TK[token_N, slot_N].to(y_ND.dtype).unsqueeze(1)
            out_TD = out_TD.index_add(0, token_N, y_ND * w_N1)
        return out_TD
