"""Any c2r router as the gate of DeepSpeed's own ``deepspeed.moe.layer.MoE``.

One line swaps the gates of every DeepSpeed MoE layer in a model (before ``deepspeed.initialize``)::

    use_router(model, RouterConfig(kind="remoe"))

DeepSpeed 0.19.8's ``MOELayer.forward`` calls ``gate(tokens_SD, used_token, True, use_tutel)`` and unpacks 7 values
(``sparse_routes=True``, the only form it asks for)::

    l_aux, capacity, num_experts, indices_KS, locations_KS, gates_KS, exp_counts_E

It then scatters every (token, slot) with ``indices >= 0`` into row ``indices * capacity + locations`` of an
``[E, capacity, D]`` buffer, all-to-alls that buffer over the expert-parallel group (contiguous placement: expert e
on EP rank ``e // (E / ep_size)``), runs the experts, all-to-alls back, and sums ``gates * expert_output`` over the
slots. Slots with index -1 go to a scratch row that is thrown away, so variable k (empty slots, AdaMoE's null
experts, ReMoE's zero gates, Ada-K) is honoured by DeepSpeed as it is; :class:`RouterGate` only has to mark them -1.

What the adapter guarantees: dropless (capacity = the largest expert load over the whole EP group, so every rank
builds equal buffers and no valid slot is ever cut), unique locations per expert, combine weights = the router's
weights (with their gradient), and no state-dict key containing "expert" (DeepSpeed's checkpointing would take it for
an expert weight; a router with one is refused at construction). Stateful routers stay reachable as ``gate.router``,
so ``c2r.routing.after_optimizer_step(model)`` updates them (ReMoE's lambda, the group-limited bias, AdaMoE's step).

What DeepSpeed's layer still costs: each rank sends ``E * capacity`` rows, padding included, and runs its experts on
them; our own :class:`~c2r.deepspeed.DeepSpeedMoELayer` sends and computes only the valid slots.

Shape legend: S tokens on this rank (DeepSpeed's name; T in c2r.routing), D hidden size, E experts, K slots per token.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size
from torch import nn

from c2r.routing import Router, RouterConfig, RoutingResult, build_router, count_tokens_per_expert
from placement.layout import ExpertLayout, require_divides

log = logging.getLogger("c2r.deepspeed.gates")


class RouterGate(nn.Module):
    """Wraps a c2r router (``router(x_TD) -> RoutingResult``) in DeepSpeed's gate protocol.

    Attributes:
        router: the wrapped router; ``c2r.routing.after_optimizer_step(model)`` finds it as a submodule.
        num_experts: E, the layer's routed experts.
        ep_size: expert-parallel ranks of the layer (set from the group DeepSpeed hands to ``_set_ep_group``).
        ep_group: the expert-parallel process group (None until ``deepspeed.initialize``; fine for ep_size 1).
        last_routing: the last forward's :class:`RoutingResult`, detached (for metrics and tests).
        last_capacity: the capacity of the last forward (rows per expert in DeepSpeed's buffers).
    """

    def __init__(self, router: nn.Module, num_experts: int, ep_size: int = 1):
        super().__init__()
        require_divides(ep_size, "ep_size", num_experts, "num_experts")
        routed = getattr(router, "num_experts", num_experts)
        if routed != num_experts:
            raise ValueError(f"router {type(router).__name__} routes to {routed} experts, the layer has {num_experts}")
        self.router = router
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.ep_group = None
        self.last_routing: RoutingResult | None = None
        self.last_capacity = 0
        # DeepSpeed's save_checkpoint sends every state-dict key of an MoE module that contains "expert" to the
        # per-expert files, and fails on one without a local expert id: refuse such a router now, not at the first save.
        bad = [key for key in self.router.state_dict() if "expert" in key]
        if bad:
            raise ValueError(
                f"router {type(router).__name__} has state-dict keys {bad} containing 'expert', which DeepSpeed's "
                "checkpointing would take for expert weights: rename them"
            )

    @classmethod
    def from_config(
        cls,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        config: RouterConfig,
        layer_index: int = 0,
        ep_size: int = 1,
    ) -> RouterGate:
        """Build the router ``config.kind`` (see :func:`c2r.routing.build_router`) and wrap it."""
        router = build_router(hidden_size, num_experts, top_k, config, layer_index)
        _tell_router_placement(router, num_experts, ep_size)
        return cls(router, num_experts, ep_size)

    def _set_ep_group(self, ep_group) -> None:
        # Called by MoE.set_deepspeed_parallelism inside deepspeed.initialize (through MOELayer._set_ep_group).
        size = dist.get_world_size(ep_group) if ep_group is not None else 1
        if self.ep_size not in (1, size):
            raise ValueError(f"gate built for ep_size {self.ep_size} got an expert-parallel group of {size} ranks")
        self.ep_group = ep_group
        if size != self.ep_size:
            self.ep_size = size
            _tell_router_placement(self.router, self.num_experts, size)

    def forward(
        self,
        input_SD: torch.Tensor,
        used_token_S: torch.Tensor | None = None,
        sparse_routes: bool = True,
        use_tutel: bool = False,
    ) -> tuple:
        """DeepSpeed's 7 values: ``(l_aux, capacity, num_experts, indices_KS, locations_KS, gates_KS, exp_counts_E)``.

        ``indices_KS`` int32 (-1: slot not routed), ``locations_KS`` int32 (row within the expert's buffer; 0 where
        not routed), ``gates_KS`` float32 (0 where not routed), ``exp_counts_E`` int64, ``capacity`` an int64 scalar
        tensor equal on every rank of the EP group. ``used_token_S`` (0 = padding) empties all of a token's slots, and
        the router sees only the used tokens (its loss and statistics count no padding).
        ``use_tutel`` is ignored: MOELayer alone picks its dispatch (its own top-1 gate also hands Tutel -1 for
        dropped routes; the Tutel path is untested here, as Tutel is not installed).
        """
        if not sparse_routes:
            raise NotImplementedError(
                "RouterGate speaks only DeepSpeed's sparse-route protocol (MOELayer in deepspeed>=0.19 asks for it); "
                "the dense combine_weights/dispatch_mask form is not provided"
            )
        if self.ep_size > 1 and self.ep_group is None:
            raise RuntimeError(
                f"RouterGate for ep_size {self.ep_size} has no expert-parallel group yet: swap the gate in before "
                "deepspeed.initialize (which calls _set_ep_group), or call gate._set_ep_group(group)"
            )
        routing = self._route_used_tokens(input_SD, used_token_S)
        valid_SK = routing.valid_TK
        tokens_per_expert_E = routing.tokens_per_expert_E
        locations_SK = locations_in_expert_buffers(routing.expert_ids_TK, valid_SK, self.num_experts)
        capacity = self.group_capacity(tokens_per_expert_E)
        indices_SK = torch.where(valid_SK, routing.expert_ids_TK, -1)
        gates_SK = torch.where(valid_SK, routing.weights_TK, 0.0).float()
        self.last_routing = _detached(routing, valid_SK, tokens_per_expert_E)
        return (
            routing.aux_loss,
            capacity,
            self.num_experts,
            indices_SK.t().to(torch.int32).contiguous(),  # [K, S]
            locations_SK.t().to(torch.int32).contiguous(),  # [K, S]
            gates_SK.t().contiguous(),  # [K, S]
            tokens_per_expert_E.detach(),
        )

    def _route_used_tokens(self, input_SD: torch.Tensor, used_token_S: torch.Tensor | None) -> RoutingResult:
        """The router on the used tokens only, its result on all S rows (padding rows: every slot empty).

        Padding must not reach the router: its balance loss, z-loss and ReMoE's L1 term would average over it (and
        send it gradient), and the per-step statistics of the stateful routers (ReMoE's sparsity that steers lambda,
        the group-limited bias, the batch balancer) would count it."""
        if used_token_S is None:
            return self.router(input_SD)
        rows_U = used_token_S.reshape(-1).nonzero().squeeze(1)  # a host sync, as DeepSpeed's own gates' masks
        if rows_U.numel() == input_SD.shape[0]:
            return self.router(input_SD)
        used = self.router(input_SD[rows_U])
        num_tokens, max_k = input_SD.shape[0], used.expert_ids_TK.shape[1]

        def rows(values_UK: torch.Tensor) -> torch.Tensor:
            return values_UK.new_zeros((num_tokens, max_k)).index_copy(0, rows_U, values_UK)

        return dataclasses.replace(
            used,
            expert_ids_TK=rows(used.expert_ids_TK),
            weights_TK=rows(used.weights_TK),
            valid_TK=rows(used.valid_TK),
            fixed_k=False,  # the padding rows' slots are empty
        )

    def group_capacity(self, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """Rows per expert buffer: the largest load over experts and EP ranks (at least 1), so nothing is dropped.

        Every EP rank must use the same value: the all-to-all exchanges equal ``[E, capacity, D]`` blocks.
        """
        # NOTE: the all-reduce and DeepSpeed's int(capacity) right after are host syncs; its own dropless gate has both.
        capacity = tokens_per_expert_E.max().clamp(min=1).to(torch.int64)
        if self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
        if groups.mpu is not None and groups._get_expert_model_parallel_world_size() == 1:
            # As DeepSpeed's gate: with tensor-parallel non-experts, MOELayer splits the capacity dimension over the
            # TP ranks (drop_tokens), so it must be a multiple of the TP size.
            tp = bwc_tensor_model_parallel_world_size(mpu=groups.mpu)
            capacity = (capacity + tp - 1) // tp * tp
        self.last_capacity = int(capacity)
        return capacity

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, ep_size={self.ep_size}"


def locations_in_expert_buffers(expert_ids_SK: torch.Tensor, valid_SK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Row of each valid (token, slot) within its expert's buffer: 0, 1, 2, ... in token order, per expert.

    Example (E=3): ids [[0, 2], [2, 1], [0, 2]] all valid -> [[0, 0], [1, 0], [1, 2]]. Empty slots get 0 and must be
    ignored via ``valid_SK``. A sort instead of DeepSpeed's one-hot cumsum: O(S*K) memory instead of O(S*E).
    """
    ids_N = torch.where(valid_SK, expert_ids_SK, num_experts).flatten()  # empty slots sort last, into bin E
    order_N = torch.argsort(ids_N, stable=True)
    counts = count_tokens_per_expert(ids_N, torch.ones_like(ids_N, dtype=torch.bool), num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_sorted_N = torch.arange(ids_N.numel(), device=ids_N.device) - starts[ids_N[order_N]]
    locations_N = torch.empty_like(ids_N).scatter_(0, order_N, rank_in_sorted_N)
    return torch.where(valid_SK, locations_N.view_as(expert_ids_SK), 0)


def use_router(
    model: nn.Module, config: RouterConfig, top_k: int | None = None, first_layer_index: int = 0
) -> list[RouterGate]:
    """Give every ``deepspeed.moe.layer.MoE`` in ``model`` (or ``model`` itself) a c2r router as its gate.

    Call before building the optimizer and ``deepspeed.initialize`` (which hands the gates their EP group). Hidden
    size and k come from the gate being replaced (``top_k`` overrides k: AdaMoE raises it, ReMoE's k is a target);
    layer indices (C2R's per-layer collaborator lists) count the MoE layers in ``model.modules()`` order from
    ``first_layer_index``. The gate is always dropless, whatever the layer's ``drop_tokens`` and capacity factors say;
    a ``noisy_gate_policy`` of the replaced gates is ignored, with a warning. A gate of ours may be replaced too.
    Returns the new gates, in layer order.
    """
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError(f"{type(model).__name__} contains no deepspeed.moe.layer.MoE layer")
    gates, noisy = [], set()
    for offset, layer in enumerate(layers):
        old = layer.deepspeed_moe.gate
        weight = old.wg.weight if hasattr(old, "wg") else next(old.parameters())
        k = top_k if top_k is not None else (old.router.top_k if isinstance(old, RouterGate) else old.k)
        noisy.add(str(getattr(old, "noisy_gate_policy", None)))
        gate = RouterGate.from_config(
            weight.shape[1], layer.num_experts, k, config, first_layer_index + offset, layer.ep_size
        )
        gate.to(device=weight.device)
        if layer.deepspeed_moe.ep_group is not None:  # already initialised: inference, or a swap after the fact
            gate._set_ep_group(layer.deepspeed_moe.ep_group)
        layer.deepspeed_moe.gate = gate
        gates.append(gate)
    if noisy - {"None"}:  # DeepSpeed's gates take None or the string "None" for no noise
        log.warning(
            f"noisy_gate_policy {sorted(noisy - {'None'})} of the replaced gates is ignored: the {config.kind} router "
            "adds no noise to the gate's input or logits"
        )
    return gates


def _tell_router_placement(router: Router, num_experts: int, ep_size: int) -> None:
    """Routers that group experts by rank (group-limited) learn DeepSpeed's placement: contiguous, expert e on EP
    rank ``e // (E / ep_size)``. With one rank they keep their own grouping (``num_groups`` blocks of experts)."""
    if ep_size > 1:
        layout = ExpertLayout.contiguous(num_experts, ep_size)
        router.set_expert_placement(layout.expert_to_rank, layout.num_ranks)


def _detached(routing: RoutingResult, valid_SK: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> RoutingResult:
    return dataclasses.replace(
        routing,
        expert_ids_TK=routing.expert_ids_TK.detach(),
        weights_TK=routing.weights_TK.detach(),
        valid_TK=valid_SK,
        aux_loss=routing.aux_loss.detach(),
        tokens_per_expert_E=tokens_per_expert_E.detach(),
    )
