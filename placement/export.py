"""Plans in other systems' formats: DeepSeek EPLB's ``phy2log / log2phy / logcnt`` and DeepSpeed AutoEP's expert
placement descriptor; and a simple EPLB-style replication of hot experts (load only).

Shape legend: L layers, E logical experts, P physical expert slots (replicas), G GPUs (ranks), X max replicas.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from placement.errors import PlacementError
from placement.layout import ExpertLayout
from placement.plan import Plan

EXPORT_FORMATS = ("eplb", "autoep")


def eplb_mapping(layouts: list[ExpertLayout]) -> dict[str, np.ndarray]:
    """A placement without replication in EPLB's terms (physical slot p lives on GPU p // (E/G); each GPU's slots
    hold its experts in local-slot order, ascending id): phy2log [L, E], log2phy [L, E, 1], logcnt [L, E] (all 1)."""
    phy2log = np.stack([layout.physical_to_logical for layout in layouts])
    log2phy = np.stack([layout.logical_to_physical for layout in layouts])[:, :, None]
    return {"phy2log": phy2log, "log2phy": log2phy, "logcnt": np.ones(phy2log.shape, dtype=np.int64)}


def _replica_counts(load_E: np.ndarray, num_replicas: int, num_gpus: int) -> np.ndarray:
    """Give each extra replica to the expert with the highest load per replica (EPLB's rule), at most one replica
    per GPU each (a second replica on one GPU spreads no load)."""
    count_E = np.ones(len(load_E), dtype=np.int64)
    for _ in range(num_replicas - len(load_E)):
        per_replica = np.where(count_E < num_gpus, load_E / count_E, -np.inf)
        count_E[np.argmax(per_replica)] += 1
    return count_E


def _pack_lpt(load_E: np.ndarray, count_E: np.ndarray, num_gpus: int) -> list[list[int]]:
    """Longest-processing-time packing of replicas (load / count each) onto GPUs with equal slot counts, never two
    replicas of one expert on one GPU: each replica goes to the least loaded GPU with room that does not hold its
    expert yet. If every GPU with room holds it, a full GPU h without it trades one of its experts x (one the GPU
    with room g lacks: h holds slots distinct experts, g at most slots - 2 besides this one) for it."""
    slots = int(count_E.sum()) // num_gpus
    replicas = np.repeat(np.arange(len(load_E)), count_E)
    per_replica_E = load_E / count_E
    order = np.argsort(-per_replica_E[replicas], kind="stable")
    gpu_load = np.zeros(num_gpus)
    gpu_experts: list[list[int]] = [[] for _ in range(num_gpus)]
    for i in order:
        expert = int(replicas[i])
        room = np.array([len(x) < slots for x in gpu_experts])
        free = room & np.array([expert not in x for x in gpu_experts])
        if free.any():
            gpu = int(np.argmin(np.where(free, gpu_load, np.inf)))
        else:  # the trade described above
            g = int(np.flatnonzero(room)[0])
            gpu = next(h for h in range(num_gpus) if expert not in gpu_experts[h])
            x = next(e for e in gpu_experts[gpu] if e not in gpu_experts[g])
            gpu_experts[gpu].remove(x)
            gpu_experts[g].append(x)
            gpu_load[gpu] -= per_replica_E[x]
            gpu_load[g] += per_replica_E[x]
        gpu_experts[gpu].append(expert)
        gpu_load[gpu] += per_replica_E[expert]
    return gpu_experts


def replicate_hot_experts(
    load_LE: np.ndarray, num_replicas: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB-style load balancing (load only; ignores co-activation): replicate the hottest experts up to
    ``num_replicas`` physical slots, then LPT-pack replicas onto ``num_gpus`` GPUs with equal slot counts.

    Returns (like deepseek-ai/EPLB's ``rebalance_experts``):
        phy2log [L, P]: logical expert of each physical slot (slot p on GPU p // (P / G));
        log2phy [L, E, X]: physical slots of each logical expert, -1 padded;
        logcnt [L, E]: replicas per logical expert.
    """
    load_LE = np.asarray(load_LE, dtype=np.float64)
    num_layers, num_experts = load_LE.shape
    if num_replicas < num_experts or num_replicas % num_gpus:
        raise PlacementError(
            f"replicas ({num_replicas}) must be >= experts ({num_experts}) and a multiple of GPUs ({num_gpus})"
        )
    if num_replicas > num_experts * num_gpus:
        raise PlacementError(
            f"replicas ({num_replicas}) must be <= experts x GPUs ({num_experts} x {num_gpus}): at most one replica "
            "of an expert per GPU"
        )
    logcnt = np.stack([_replica_counts(load, num_replicas, num_gpus) for load in load_LE])
    phy2log = np.stack([np.concatenate(_pack_lpt(load, cnt, num_gpus)) for load, cnt in zip(load_LE, logcnt)]).astype(
        np.int64
    )
    log2phy = np.full((num_layers, num_experts, int(logcnt.max())), -1, dtype=np.int64)
    for layer in range(num_layers):
        filled = np.zeros(num_experts, dtype=np.int64)
        for slot, expert in enumerate(phy2log[layer]):
            log2phy[layer, expert, filled[expert]] = slot
            filled[expert] += 1
    return phy2log, log2phy, logcnt


def autoep_descriptor(layout: ExpertLayout) -> dict[str, Any]:
    """DeepSpeed AutoEP's placement descriptor (deepspeed/checkpoint/autoep_affine.py, version 1):
    {"version": 1, "num_experts": E, "ep_size": R, "ranks": [{"rank": r, "experts": [ids in local packed order]}]}."""
    return {
        "version": 1,
        "num_experts": layout.num_experts,
        "ep_size": layout.num_ranks,
        "ranks": [{"rank": r, "experts": experts} for r, experts in enumerate(layout.rank_to_experts)],
    }


def export_plan(plan: Plan, fmt: str, num_replicas: int | None = None) -> dict[str, Any]:
    """The plan as a JSON-ready document in ``fmt`` ("eplb" or "autoep"), one entry per layer.

    eplb with ``num_replicas``: hot experts replicated by `replicate_hot_experts` from the plan's recorded expert
    load; that placement balances load only and does NOT keep the plan's co-activation grouping."""
    for layout in plan.layouts:
        layout.require_unreplicated("c2r-place export")
    if fmt not in EXPORT_FORMATS:
        raise PlacementError(f"unknown export format {fmt!r}; choose from {', '.join(EXPORT_FORMATS)}")
    if fmt == "autoep":
        if num_replicas is not None:
            raise PlacementError("--replicas applies to --format eplb only (AutoEP has no replicas)")
        return {
            "format": "autoep-expert-placement",
            "num_layers": plan.num_layers,
            "layers": [
                {"layer": layer, "expert_placement": autoep_descriptor(layout)}
                for layer, layout in enumerate(plan.layouts)
            ],
        }
    if num_replicas is None or num_replicas == plan.num_experts:
        arrays = eplb_mapping(plan.layouts)
    else:
        if plan.expert_load is None:
            raise PlacementError("--replicas needs the expert load recorded in the plan; this plan has none")
        phy2log, log2phy, logcnt = replicate_hot_experts(plan.expert_load, num_replicas, plan.num_ranks)
        arrays = {"phy2log": phy2log, "log2phy": log2phy, "logcnt": logcnt}
    return {
        "format": "eplb",
        "num_layers": plan.num_layers,
        "num_logical_experts": plan.num_experts,
        "num_physical_experts": int(arrays["phy2log"].shape[1]),
        "num_gpus": plan.num_ranks,
        **{key: value.tolist() for key, value in arrays.items()},
    }
