"""Expert parallelism: the all-to-all dispatchers (per-expert, per-rank), sharding a model's experts over the ranks of
an `ExpertLayout` (placement.layout)."""

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

__all__ = [
    "DISPATCH_MODES",
    "DispatchMeta",
    "DispatchObserver",
    "NoObserver",
    "PerExpertDispatcher",
    "PerRankDispatcher",
    "build_dispatcher",
    "local_expert_weights",
    "model_layouts",
    "shard_experts",
]
