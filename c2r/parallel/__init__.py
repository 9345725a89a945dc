"""Expert parallelism: expert layouts, the all-to-all dispatchers (per-expert, per-rank), sharding a model's experts."""

from c2r.parallel.dispatch import (
    DISPATCH_MODES,
    DispatchMeta,
    DispatchObserver,
    NoObserver,
    PerExpertDispatcher,
    PerRankDispatcher,
    build_dispatcher,
)
from c2r.parallel.expert_parallel import local_expert_weights, model_layouts, shard_experts
from c2r.parallel.layout import ExpertLayout

__all__ = [
    "DISPATCH_MODES",
    "DispatchMeta",
    "DispatchObserver",
    "ExpertLayout",
    "NoObserver",
    "PerExpertDispatcher",
    "PerRankDispatcher",
    "build_dispatcher",
    "local_expert_weights",
    "model_layouts",
    "shard_experts",
]
