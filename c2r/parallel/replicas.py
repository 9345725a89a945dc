"""Replicated experts at run time: which copy each routed (token, slot) uses, and the gradient sum that keeps the
copies of one expert identical.

A replicated layout (`placement.layout.ExpertLayout` with ``replicas``) holds some logical experts on several ranks.
The router still chooses logical experts; every dispatch mode first resolves each (token, slot) to one physical slot
with :class:`CopyChooser`, then sends rows exactly as for an unreplicated layout (physical id = rank * X + local slot).

The copy rule (shared with the planner, which predicts loads and copies per token with it), per source rank, for a
slot whose expert e has m > 1 copies on ranks r_1..r_m (home first):
1. the token's *visited ranks* are the ranks of its valid slots whose experts have exactly one copy; if a copy of e
   sits on a visited rank, the slot goes to the first such copy (home-first order): it costs no extra token copy;
2. otherwise the slot is one of e's *free pairs* in this batch on this rank; in flat order (t * K + k) the n-th free
   pair of e goes to copy n mod m: an even split over e's copies, deterministic, computed on the device with no host
   sync (one stable sort of the T * K slots).
Slots of unreplicated experts go to their only copy; an empty slot gets one of its expert's copies (never read).

Copies must stay identical, so that the replicated model is the unreplicated one: :class:`ReplicaGradSum` passes a
rank's expert weights through an autograd function whose backward sums every replicated expert's gradient over its
copies, in one all-reduce over the EP group per layer. See its docstring for why this is right under DeepSpeed.

Shape legend: the package legend (``c2r/__init__.py``), and here M the most copies of one expert (as in
``placement/layout.py``), Y the replicated logical experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from c2r.experts import ExpertWeights
from c2r.experts.slot_rows import count_keys
from placement.layout import ExpertLayout


def rank_within_key(keys_TK: torch.Tensor, mask_TK: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[T, K] int64: for each masked-in slot, how many masked-in slots with the same key come before it in flat
    order (t * K + k); arbitrary where the mask is off. On the device, no host sync: one stable sort."""
    flat_keys = torch.where(mask_TK, keys_TK, num_keys).flatten()
    order = torch.argsort(flat_keys, stable=True)  # by key, flat order within a key
    counts = count_keys(keys_TK, mask_TK, num_keys)
    starts = torch.cat([counts.cumsum(0) - counts, counts.sum().unsqueeze(0)])  # + the masked-off bin's start
    position = torch.arange(flat_keys.numel(), device=keys_TK.device)
    within_sorted = position - starts[flat_keys[order]]
    return torch.empty_like(flat_keys).scatter_(0, order, within_sorted).view_as(keys_TK)


class CopyChooser:
    """The copy rule (module docstring) for one layout: ``physical(expert_ids_TK, valid_TK) -> physical_TK``."""

    def __init__(self, layout: ExpertLayout):
        self.num_ranks, self.slots_per_rank = layout.num_ranks, layout.experts_per_rank
        self.replicated = layout.is_replicated
        self._slots_EM = torch.tensor(layout.replica_slots)  # home first, -1 past an expert's copies
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots_EM, copies_E) on ``device``, copied there once rather than every forward."""
        if device not in self._on_device:
            slots_EM = self._slots_EM.to(device)
            self._on_device[device] = (slots_EM, (slots_EM >= 0).sum(1))
        return self._on_device[device]

    def physical(self, expert_ids_TK: torch.Tensor, valid_TK: torch.Tensor) -> torch.Tensor:
        """[T, K] int64 physical slot of each (token, slot): rank = physical // X, local slot = physical % X."""
        slots_EM, copies_E = self._tables(expert_ids_TK.device)
        if not self.replicated:
            return slots_EM[:, 0][expert_ids_TK]
        T, K = expert_ids_TK.shape
        R, X, M = self.num_ranks, self.slots_per_rank, slots_EM.shape[1]
        slots_TKM, copies_TK = slots_EM[expert_ids_TK], copies_E[expert_ids_TK]
        # 1. Visited ranks: those of the token's valid slots of single-copy experts.
        single_TK = valid_TK & (copies_TK == 1)
        visited_TR = torch.zeros(T, R + 1, dtype=torch.bool, device=expert_ids_TK.device)
        visited_TR.scatter_(1, torch.where(single_TK, slots_TKM[..., 0] // X, R), True)
        visited_TR[:, R] = False  # column R: where the other slots and the padding copies point
        has_copy_TKM = slots_TKM >= 0
        rank_TKM = torch.where(has_copy_TKM, slots_TKM // X, R)
        on_visited_TKM = visited_TR.gather(1, rank_TKM.view(T, K * M)).view(T, K, M)
        # the first copy (home-first) on a visited rank; M where there is none
        first_TK = torch.where(on_visited_TKM, torch.arange(M, device=slots_TKM.device), M).amin(2)
        # 2. Free pairs: the n-th of expert e in flat order goes to copy n mod m.
        free_TK = valid_TK & (copies_TK > 1) & (first_TK == M)
        nth_TK = rank_within_key(expert_ids_TK, free_TK, slots_EM.shape[0])
        copy_TK = torch.where(free_TK, nth_TK % copies_TK, torch.where(first_TK < M, first_TK, 0))
        return slots_TKM.gather(2, copy_TK.unsqueeze(2)).squeeze(2)


class _SumOverCopies(torch.autograd.Function):
    """Identity on a rank's expert weights; its backward sums each replicated expert's gradient over its copies."""

    @staticmethod
    def forward(ctx, sync: ReplicaGradSum, *weights: torch.Tensor):
        ctx.sync = sync
        return tuple(w.view_as(w) for w in weights)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        return None, *ctx.sync.sum_gradients(grads)


class _SyncedExperts:
    """What a backend reads of :class:`~c2r.experts.ExpertWeights` (sizes, ``stacked``, ``expert_mlp``), over the
    weights as they come out of :class:`_SumOverCopies`. The methods are ExpertWeights' own, so the math is shared."""

    stacked = ExpertWeights.stacked
    expert_mlp = ExpertWeights.expert_mlp
    is_glu = ExpertWeights.is_glu

    def __init__(self, experts: ExpertWeights, w1: torch.Tensor, v1: torch.Tensor | None, w2: torch.Tensor):
        self.num_experts, self.activation = experts.num_experts, experts.activation
        self.hidden_size, self.ffn_hidden_size = experts.hidden_size, experts.ffn_hidden_size
        self.w1, self.v1, self.w2 = w1, v1, w2


class ReplicaGradSum:
    """Keeps the copies of each replicated expert identical: ``sync(experts)`` returns the weights the backend
    should compute with; in the backward, each replicated expert's gradient becomes the sum of the gradients of all
    its copies in the EP group (one all-reduce of a [Y, F, D]-per-matrix buffer per layer).

    Why this is right under DeepSpeed ZeRO 0/1/2 with expert data parallelism: the sum happens inside autograd, before
    the gradient reaches the parameter, so DeepSpeed's gradient hooks (ZeRO-2's reduce-scatter buckets, ZeRO-0/1's
    all-reduce after backward) only ever see summed gradients. Each copy then holds exactly the gradient the single
    unreplicated expert would have in this EP group; DeepSpeed averages it over the expert-data-parallel group (the
    same local slot in the other EP groups, which hold the same logical expert since every EP group uses the same
    layout), as it does for any expert. Identical gradients, identical optimizer states, identical updates: copies
    start equal (`local_expert_weights` copies them from the full model) and stay equal.

    Ordering: the all-reduce runs in the backward of a node made before the dispatch's all-to-alls, on every rank of
    the group (every backend's grouped MLP uses all local weights, also with no rows), so all ranks meet it at the
    same point of their backward.

    Gradient clipping: DeepSpeed's global gradient norm sums every physical slot's gradient, so a replicated
    expert's would count once per copy; ``c2r.deepspeed.replica_norm`` (ZeRO 1/2) and ``c2r.deepspeed.zero0_norm``
    (ZeRO 0) correct the norm so that it counts once, under CPU offload too. DeepSpeed's ``BF16_Optimizer`` (bf16
    ZeRO 1 with fp32 gradient accumulation) is not corrected (the clip coefficient is still the same on every rank, so
    copies stay identical, but can differ from the unreplicated run's), and such a run says so
    (``c2r.deepspeed.setup.warn_if_clipping_counts_replicas``); docs/design.md, "Gradient clipping with replicated
    experts".
    """

    def __init__(self, layout: ExpertLayout, rank: int, group=None):
        replicated = [e for e, ranks in enumerate(layout.ranks_of_experts) if len(ranks) > 1]
        index = {e: y for y, e in enumerate(replicated)}
        local = layout.local_experts(rank)
        self.num_replicated, self.slots_per_rank = len(replicated), layout.experts_per_rank
        self.local_slots = [x for x, e in enumerate(local) if e in index]  # this rank's slots holding replicas
        self.buffer_rows = [index[local[x]] for x in self.local_slots]  # their row in the shared buffer
        self.group = group
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(local_slots, buffer_rows) as index tensors on ``device``, made once (no host-to-device copy per step)."""
        if device not in self._on_device:
            self._on_device[device] = (
                torch.tensor(self.local_slots, dtype=torch.int64, device=device),
                torch.tensor(self.buffer_rows, dtype=torch.int64, device=device),
            )
        return self._on_device[device]

    def __call__(self, experts: ExpertWeights) -> ExpertWeights | _SyncedExperts:
        if self.num_replicated == 0 or not torch.is_grad_enabled():
            return experts
        names = ("w1", "v1", "w2") if experts.is_glu else ("w1", "w2")
        synced = dict(zip(names, _SumOverCopies.apply(self, *(getattr(experts, n) for n in names))))
        return _SyncedExperts(experts, synced["w1"], synced.get("v1"), synced["w2"])

    def sum_gradients(self, grads: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """Each grad [X * F, D]: the replicated slots' rows summed over the EP group, the others unchanged."""
        X = self.slots_per_rank
        grads_XFD = [g.contiguous().view(X, -1, g.shape[1]) for g in grads]
        _, F, D = grads_XFD[0].shape
        slots, rows = self._indices(grads[0].device)
        buffer = grads[0].new_zeros(self.num_replicated, len(grads), F, D)  # (Y, matrices w1 [v1] w2, F, D)
        if self.local_slots:
            buffer[rows] = torch.stack([g[slots] for g in grads_XFD], 1)
        dist.all_reduce(buffer, group=self.group)
        summed = []
        for n, g_XFD in enumerate(grads_XFD):
            g_XFD = g_XFD.clone()
            if self.local_slots:
                g_XFD[slots] = buffer[rows, n]
            summed.append(g_XFD.view_as(grads[n]))
        return summed
