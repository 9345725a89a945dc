"""The plain reference: a loop over experts, each computing its own tokens. Slow, obvious, and the ground truth
every fast path is tested against.

Shape legend: T tokens, K slots, D hidden size, N tokens of one expert.
"""

from __future__ import annotations

import torch

from c2r.experts.weights import ExpertWeights
from c2r.routing.result import RoutingResult


class ReferenceBackend:
    name = "reference"

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
