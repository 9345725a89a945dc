"""C2R: collaboration-constrained routing (docs/algorithms.md section 2; Zhang et al., NAACL 2025, arXiv 2504.01337).

Each token's top-1 expert is its anchor; the other k-1 experts must come from the anchor's ``top_t`` most frequent
collaborators in a profiled top-k run. Tokens then reach fewer distinct groups of experts, and a placement made from
the same profile puts those groups on the same GPU.

Shape legend: T tokens, D hidden size, E experts, K top-k, W the anchor's ``top_t`` candidate collaborators.
"""

from __future__ import annotations

import torch

from c2r.routing.collaborators import load_collaborators
from c2r.routing.config import RouterConfig
from c2r.routing.result import RoutingResult
from c2r.routing.topk import TopKRouter


class C2RRouter(TopKRouter):
    """Anchor = argmax p; the other k-1 = the most probable of the anchor's first ``top_t`` collaborators.

    Weights are the full-softmax probabilities of the selected experts, renormalised only if ``renormalize`` (as the
    paper: whatever the model normally does). The lists are a buffer, so they travel with the checkpoint.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, config: RouterConfig, layer_index: int = 0):
        super().__init__(hidden_size, num_experts, top_k, config, layer_index)
        self.top_t = config.c2r.resolved_top_t(num_experts)
        lists = load_collaborators(config.c2r.collaborators, layer_index, num_experts)
        self.register_buffer("collaborators_EE", torch.as_tensor(lists, dtype=torch.int64))

    def forward(self, x_TD: torch.Tensor) -> RoutingResult:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        anchor_T = probs_TE.argmax(dim=-1)
        expert_ids_TK = anchor_T[:, None]
        if self.top_k > 1:
            candidates_TW = self.collaborators_EE[anchor_T, : self.top_t]
            _, best_TK1 = probs_TE.gather(1, candidates_TW).topk(self.top_k - 1, dim=-1)
            expert_ids_TK = torch.cat([expert_ids_TK, candidates_TW.gather(1, best_TK1)], dim=1)
        return self.selection_result(logits_TE, probs_TE, expert_ids_TK)
