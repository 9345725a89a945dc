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

``copy_choice="balanced"`` (``train.copy_choice``) replaces the fixed even split by one that knows the batch: each
rank counts its pairs per expert, one all-reduce of those E counts over the EP group gives the batch's counts, and
every rank computes from them the same shares (`balanced_shares`: how many of each replicated expert's pairs each of
its copies should take so that the ranks' loads come out level), then sends its own pairs in those proportions:
the slots rule 1 would keep on a visited rank first (up to that copy's share), the rest in flat order over the
remaining shares. Still on the device with no host sync, deterministic, and the same function (copies are
identical), for one more small collective per layer forward. It moves load between copies batch by batch, which
the fixed split cannot: the drift of expert loads between the plan's tokens and a training step's
(docs/placement.md, "A load-aware copy choice").

Copies must stay identical, so that the replicated model is the unreplicated one: :class:`ReplicaGradSum` passes a
rank's expert weights through an autograd function whose backward sums every replicated expert's gradient over its
copies, in one all-reduce over the EP group per layer. See its docstring for why this is right under DeepSpeed.

Shape legend: the package legend (``c2r/__init__.py``), and here M the most copies of one expert (as in
``placement/layout.py``), Y the replicated logical experts.
"""

from __future__ import annotations

import logging
from functools import cache

import torch
import torch.distributed as dist

from c2r.config_utils import require_choice
from c2r.experts import ExpertWeights
from c2r.experts.slot_rows import count_keys
from c2r.graphed import graphed_call
from placement.copy_choice import BALANCE_ITERS, COPY_CHOICES  # one home: the numpy twin's module
from placement.layout import ExpertLayout

log = logging.getLogger(__name__)


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


def balanced_shares(count_E: torch.Tensor, rank_EM: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """[E, M] float64: how many of expert e's ``count_E`` pairs (the batch's, every source rank's) its copy m
    (on rank ``rank_EM[e, m]``, -1 past e's copies) should take, so that the ranks' loads come out level.

    Single-copy experts are fixed load. Each replicated expert starts split evenly; then, `BALANCE_ITERS` times,
    every copy's share moves towards the mean load of its expert's copy ranks (a step of 1 / the most replicated
    copies on one rank, so that no rank is overshot), clipped at 0 and rescaled to the expert's count. A diffusion:
    no host sync, the same result on every rank from the same counts (placement/copy_choice.py is its numpy twin)."""
    on_EM = rank_EM >= 0
    copies_E = on_EM.sum(1)
    cells_EM = on_EM & (copies_E > 1)[:, None]
    count_E = count_E.to(torch.float64)
    # per-rank sums as dense sums over a one-hot [E, M, R], not index_add: CUDA's index_add adds with atomics, in
    # an order that changes from run to run, and every rank must compute the same shares
    onehot_EMR = torch.nn.functional.one_hot(rank_EM.clamp(min=0), num_ranks).to(torch.float64) * on_EM[..., None]
    fixed_R = (torch.where(copies_E > 1, 0.0, count_E)[:, None] * onehot_EMR[:, 0]).sum(0)
    step = 1.0 / (cells_EM[..., None] * onehot_EMR).sum((0, 1)).max().clamp(min=1.0)
    share_EM = torch.where(cells_EM, (count_E / copies_E)[:, None], 0.0)
    for _ in range(BALANCE_ITERS):
        load_R = fixed_R + (share_EM[..., None] * onehot_EMR).sum((0, 1))
        load_EM = (onehot_EMR * load_R).sum(2)
        mean_E = torch.where(cells_EM, load_EM, 0.0).sum(1) / copies_E
        share_EM = torch.where(cells_EM, (share_EM + step * (mean_E[:, None] - load_EM)).clamp(min=0.0), 0.0)
        total_E = share_EM.sum(1)  # 0 where nothing is replicated or every share clipped: then the shares stay 0
        share_EM = share_EM * torch.where(total_E > 0, count_E / total_E.clamp(min=1e-300), 0.0)[:, None]
    return share_EM


def balanced_shares_fast(count_E: torch.Tensor, rank_EM: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """`balanced_shares` as one Triton kernel on a GPU (``share_kernel.py``: the loop's ~1,100 small kernels took
    2.2 ms a call even from a CUDA graph), the torch loop elsewhere, and from a CUDA graph where Triton is missing or
    its kernel fails to build here (said once)."""
    global _KERNEL_FAILED
    if rank_EM.is_cuda:
        kernel = _share_kernel()
        if kernel is not None and not _KERNEL_FAILED:
            try:
                with torch.cuda.device(rank_EM.device):  # Triton launches on the current device
                    return kernel.balanced_shares_kernel(count_E, rank_EM, num_ranks, BALANCE_ITERS)
            except Exception as error:  # a compile error or too few registers for this size: correct, slower
                log.warning(
                    "balanced copy shares: the Triton kernel failed (%s; it needs Triton >= 3.2, torch >= 2.6); using "
                    "the torch loop from a CUDA graph (slower, the same shares)",
                    error,
                )
                _KERNEL_FAILED = True
        return graphed_call(balanced_shares, count_E, rank_EM, num_ranks=num_ranks)
    return balanced_shares(count_E, rank_EM, num_ranks)


_KERNEL_FAILED = False  # set once the kernel failed: no second compile attempt per layer forward


@cache
def _share_kernel():
    """``share_kernel`` where Triton imports (torch's CUDA builds bring it), else None."""
    try:
        from c2r.parallel import share_kernel
    except ImportError:
        return None
    return share_kernel


def local_quotas(
    share_EM: torch.Tensor, count_E: torch.Tensor, local_E: torch.Tensor, rank: int = 0, num_ranks: int = 1
) -> torch.Tensor:
    """[E, M] int64: source ``rank``'s pairs of each expert per copy, ``local_E`` split in the batch's proportions
    ``share_EM / count_E``; rounded on the cumulative sum, and the last column set to ``local_E``, so that a row sums
    to ``local_E`` exactly (copies past an expert's last get none: their share is 0). The rounding is dithered by
    source rank (offset (rank + 1/2) / num_ranks before the floor): every rank rounding the same way would pile its
    half pairs onto the same copies, which at a few pairs an expert per rank unbalanced the ranks (16 ranks of 4
    tokens: 1.35 against 1.14 dithered)."""
    fraction_EM = share_EM / count_E.to(torch.float64).clamp(min=1.0)[:, None]
    dither = (rank + 0.5) / num_ranks
    bound_EM = (fraction_EM.cumsum(1) * local_E[:, None] + dither).floor().to(torch.int64).clamp(max=local_E[:, None])
    bound_EM[:, -1] = local_E
    return torch.diff(bound_EM, dim=1, prepend=torch.zeros_like(bound_EM[:, :1]))


class CopyChooser:
    """The copy rule (module docstring) for one layout: ``physical(expert_ids_TK, valid_TK) -> physical_TK``;
    ``copy_choice``: ``rule`` or ``balanced`` (its counts all-reduced over ``group``)."""

    def __init__(self, layout: ExpertLayout, copy_choice: str = "rule", group=None):
        require_choice("copy_choice", copy_choice, COPY_CHOICES)
        self.num_ranks, self.slots_per_rank = layout.num_ranks, layout.experts_per_rank
        self.replicated = layout.is_replicated
        self.balanced, self.group = copy_choice == "balanced", group
        self._slots_EM = torch.tensor(layout.replica_slots)  # home first, -1 past an expert's copies
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _rank(self) -> int:
        """This source rank in the EP group (0 outside a distributed run): the dither of its quotas."""
        return dist.get_rank(self.group) if dist.is_available() and dist.is_initialized() else 0

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(slots_EM, copies_E, rank_EM: each copy's rank, -1 past an expert's copies) on ``device``, made there once
        rather than every forward."""
        if device not in self._on_device:
            slots_EM = self._slots_EM.to(device)
            rank_EM = torch.where(slots_EM >= 0, slots_EM // self.slots_per_rank, -1)
            self._on_device[device] = (slots_EM, (slots_EM >= 0).sum(1), rank_EM)
        return self._on_device[device]

    def physical(self, expert_ids_TK: torch.Tensor, valid_TK: torch.Tensor) -> torch.Tensor:
        """[T, K] int64 physical slot of each (token, slot): rank = physical // X, local slot = physical % X."""
        slots_EM, copies_E, rank_EM = self._tables(expert_ids_TK.device)
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
        if self.balanced:
            copy_TK = self._balanced_copies(expert_ids_TK, valid_TK, first_TK, copies_TK, rank_EM)
            return slots_TKM.gather(2, copy_TK.unsqueeze(2)).squeeze(2)
        # 2. Free pairs: the n-th of expert e in flat order goes to copy n mod m.
        free_TK = valid_TK & (copies_TK > 1) & (first_TK == M)
        nth_TK = rank_within_key(expert_ids_TK, free_TK, slots_EM.shape[0])
        copy_TK = torch.where(free_TK, nth_TK % copies_TK, torch.where(first_TK < M, first_TK, 0))
        return slots_TKM.gather(2, copy_TK.unsqueeze(2)).squeeze(2)

    def _balanced_copies(
        self,
        expert_ids_TK: torch.Tensor,
        valid_TK: torch.Tensor,
        first_TK: torch.Tensor,
        copies_TK: torch.Tensor,
        rank_EM: torch.Tensor,
    ) -> torch.Tensor:
        """[T, K] the copy index of each slot under ``copy_choice="balanced"`` (module docstring)."""
        E, M = rank_EM.shape
        local_E = count_keys(expert_ids_TK, valid_TK, E).to(torch.int64)
        count_E = local_E.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(count_E, group=self.group)  # the batch's pairs per expert: every rank the same shares
        share_EM = balanced_shares_fast(count_E, rank_EM, self.num_ranks)
        quota_EM = local_quotas(share_EM, count_E, local_E, self._rank(), self.num_ranks)
        replicated_TK = valid_TK & (copies_TK > 1)
        # 1. Slots with a copy on a visited rank keep it, up to that copy's quota (first come, flat order).
        prefer_TK = replicated_TK & (first_TK < M)
        key_TK = expert_ids_TK * M + first_TK.clamp(max=M - 1)
        keep_TK = prefer_TK & (rank_within_key(key_TK, prefer_TK, E * M) < quota_EM.flatten()[key_TK])
        kept_EM = count_keys(key_TK, keep_TK, E * M).view(E, M).to(torch.int64)
        # 2. The rest, in flat order, fill each expert's remaining quotas copy by copy.
        spill_TK = replicated_TK & ~keep_TK
        nth_TK = rank_within_key(expert_ids_TK, spill_TK, E)
        ends_EM = (quota_EM - kept_EM).cumsum(1)
        spill_copy_TK = torch.minimum((nth_TK.unsqueeze(2) >= ends_EM[expert_ids_TK]).sum(2), copies_TK - 1)
        return torch.where(
            keep_TK, first_TK, torch.where(spill_TK, spill_copy_TK, torch.where(first_TK < M, first_TK, 0))
        )


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
