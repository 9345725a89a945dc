"""Routers whose gate is the identity, so the input *is* the logits: hand-computed cases stay readable."""

from __future__ import annotations

import torch

from c2r.routing import RouterConfig, build_router
from c2r.routing.config import AdaMoEConfig, C2RConfig, GroupLimitedConfig, ReMoEConfig


def identity_router(kind: str, num_experts: int, top_k: int, **config):
    sub = {
        "c2r": C2RConfig,
        "group_limited": GroupLimitedConfig,
        "adamoe": AdaMoEConfig,
        "remoe": ReMoEConfig,
    }
    kwargs = {k: (sub[k](**v) if k in sub and isinstance(v, dict) else v) for k, v in config.items()}
    router = build_router(num_experts, num_experts, top_k, RouterConfig(kind=kind, **kwargs))
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(num_experts))
    return router


def write_lists(path, coactivation) -> str:
    from c2r.routing.collaborators import save_collaborators

    save_collaborators(path, coactivation, {"source": "test"})
    return str(path)
