"""Expert parallelism: the all-to-all dispatchers (per-expert, per-rank, per-node; the first two also in token chunks
whose exchanges overlap the expert compute, `overlap.py`), sharding a model's experts over
the ranks of an `ExpertLayout` (placement.layout), ranks grouped into nodes (`nodes.py`), and the host-sync counter
(`profiling.host_syncs.count_host_syncs`), re-exported here."""

from c2r.parallel.dispatch import (
    DISPATCH_MODES,
    DispatchMeta,
    DispatchObserver,
    NoObserver,
    PerExpertDispatcher,
    PerRankDispatcher,
)
from c2r.parallel.expert_parallel import build_dispatcher, local_expert_weights, model_layouts, shard_experts
from c2r.parallel.nodes import NodeGroups, make_node_groups, resolve_ranks_per_node
from c2r.parallel.overlap import OverlappedPerExpertDispatcher, OverlappedPerRankDispatcher
from c2r.parallel.per_node import PerNodeDispatcher
from profiling.host_syncs import count_host_syncs

__all__ = [
    "DISPATCH_MODES",
    "DispatchMeta",
    "DispatchObserver",
    "NoObserver",
    "NodeGroups",
    "OverlappedPerExpertDispatcher",
    "OverlappedPerRankDispatcher",
    "PerExpertDispatcher",
    "PerNodeDispatcher",
    "PerRankDispatcher",
    "build_dispatcher",
    "count_host_syncs",
    "local_expert_weights",
    "make_node_groups",
    "model_layouts",
    "resolve_ranks_per_node",
    "shard_experts",
]
