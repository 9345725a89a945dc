"""Expert parallelism: expert layouts, the all-to-all dispatcher, and sharding a model's experts over ranks."""

from c2r.parallel.dispatch import DispatchMeta, ExpertParallelDispatcher
from c2r.parallel.expert_parallel import local_expert_weights, shard_experts
from c2r.parallel.layout import ExpertLayout

__all__ = ["DispatchMeta", "ExpertLayout", "ExpertParallelDispatcher", "local_expert_weights", "shard_experts"]
