"""Ranks grouped into nodes for ``per-node`` dispatch: how many ranks a node holds, and the two process groups.

A node's ranks are consecutive global ranks (what every launcher gives: rank = node * gpus_per_node + local rank).
Inside an expert-parallel group of R ranks that makes N = R / W nodes of W ranks each, EP rank r being local index
r % W of node r // W. Two process groups per rank (DeepSpeed's expert-parallel groups are made the same way, once):
- ``inter``: the EP group's ranks with this rank's local index, one per node (N ranks): the network hop;
- ``intra``: this rank's node inside the EP group (W ranks): the NVLink hop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist

# Who tells a process how many ranks its node runs: torchrun, the deepspeed launcher, Open MPI's mpirun, SLURM.
LOCAL_SIZE_ENV = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")


def launcher_ranks_per_node() -> int | None:
    """Ranks per node as the launcher set it in the environment, or None (no launcher said)."""
    for name in LOCAL_SIZE_ENV:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def resolve_ranks_per_node(gpus_per_node: int | None, ep_size: int) -> int:
    """W, the ranks of one node inside an EP group of ``ep_size`` ranks.

    ``gpus_per_node``: the config's value (None: the launcher's local world size, else every rank on one node). An EP
    group within one node (``gpus_per_node`` a multiple of ``ep_size``: EP groups are consecutive ranks) is one node.
    """
    per_node = gpus_per_node or launcher_ranks_per_node() or ep_size
    if per_node <= 0:
        raise ValueError(f"gpus_per_node ({per_node}) must be > 0")
    if ep_size % per_node == 0:
        return per_node
    if per_node % ep_size == 0:
        return ep_size
    raise ValueError(
        f"gpus_per_node ({per_node}) must divide the expert-parallel ranks ({ep_size}) or be a multiple of them"
    )


@dataclass(frozen=True)
class NodeGroups:
    """This rank's place among the nodes of its EP group, and the groups of its two hops (see the module doc)."""

    ranks_per_node: int  # W
    num_nodes: int  # N
    inter: dist.ProcessGroup  # same local index, one rank per node, in node order
    intra: dist.ProcessGroup  # this rank's node, in local-index order


def make_node_groups(ranks_per_node: int, group=None) -> NodeGroups:
    """Create the inter- and intra-node groups of every EP group (a collective: every rank of the world calls it, as
    ``dist.new_group`` needs); make them once per model and hand them to each layer's dispatcher.

    ``group``: this rank's EP group (default: the world); ``ranks_per_node`` must divide its size.
    """
    ep_ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    W = ranks_per_node
    if len(ep_ranks) % W:
        raise ValueError(f"gpus_per_node ({W}) must divide the expert-parallel ranks ({len(ep_ranks)})")
    N = len(ep_ranks) // W
    # Every rank must create every group in the same order, its own or not: learn all EP groups first.
    everyone: list[list[int]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(everyone, ep_ranks)
    mine = {}
    for ranks in sorted({tuple(r) for r in everyone}):
        for local in range(W):
            members = [ranks[node * W + local] for node in range(N)]
            created = dist.new_group(members)
            if dist.get_rank() in members:
                mine["inter"] = created
        for node in range(N):
            members = list(ranks[node * W : (node + 1) * W])
            created = dist.new_group(members)
            if dist.get_rank() in members:
                mine["intra"] = created
    return NodeGroups(W, N, mine["inter"], mine["intra"])
