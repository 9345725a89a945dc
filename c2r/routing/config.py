"""Router settings: one home for every router's options, validated on construction.

``RouterConfig.kind`` picks the router; each router's own options live in a sub-config named after it
(``model.moe.router.c2r.top_t``, ``model.moe.router.adamoe.num_null_experts``, ...). ``check_fits`` validates the
options against the layer's expert count and k, which live on the MoE config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from c2r.config_utils import require_choice

ROUTER_KINDS = ("topk", "c2r", "group_limited", "adamoe", "remoe", "adak", "scored")


@dataclass
class C2RConfig:
    """Collaboration-constrained routing (docs/algorithms.md section 2).

    Attributes:
        collaborators: file made by ``c2r-route lists`` (per MoE layer, each expert's collaborators, most frequent
            first). Required: C2R without profiled lists has nothing to constrain to.
        top_t: T, how many of the anchor's collaborators are candidates for the other k-1 slots. ``None``: E // 2
            (the official code uses T=30 for 60 experts and T=5 for 8).
    """

    collaborators: str | None = None
    top_t: int | None = None

    def resolved_top_t(self, num_experts: int) -> int:
        return num_experts // 2 if self.top_t is None else self.top_t


@dataclass
class GroupLimitedConfig:
    """Group- (device-) limited routing (docs/algorithms.md section 3; DeepSeek-V2/V3).

    Attributes:
        max_groups: M, the most groups (ranks or nodes) one token may reach.
        num_groups: G. 0: one group per expert-parallel rank of the layer's placement (a single group without
            expert parallelism). With expert parallelism, a G that divides the rank count groups consecutive ranks
            (nodes); without it, G contiguous blocks of experts.
        bias_update_rate: gamma of DeepSeek-V3's auxiliary-loss-free balancing (0.001 there); 0 turns it off.
    """

    max_groups: int = 1
    num_groups: int = 0
    bias_update_rate: float = 0.0


@dataclass
class AdaMoEConfig:
    """Null experts (docs/algorithms.md section 4). Set the MoE ``top_k`` higher than the plain model's (2 -> 3).

    Attributes:
        num_null_experts: m, experts with zero output that cost no FLOPs and no bytes. Must be > 0.
        aux_loss_weight_after: alpha after ``aux_loss_switch_step`` optimizer steps (the paper: 0.02 for the first
            epoch, set with ``router.aux_loss_weight``, then 1e-4).
        aux_loss_switch_step: when alpha drops; 0 keeps ``router.aux_loss_weight`` throughout.
    """

    num_null_experts: int = 0
    aux_loss_weight_after: float = 1e-4
    aux_loss_switch_step: int = 0


@dataclass
class ReMoEConfig:
    """ReLU routing (docs/algorithms.md section 5). The MoE ``top_k`` is the target number of active experts per token.

    Attributes:
        lambda_init: the L1 regulariser's initial coefficient.
        lambda_factor: alpha: lambda is multiplied (too dense) or divided (too sparse) by it after each step.
    """

    lambda_init: float = 1e-8
    lambda_factor: float = 1.2


@dataclass
class AdaKConfig:
    """Learned per-token k (docs/algorithms.md section 6).

    Attributes:
        max_k: N, the allocator's largest k; 0 means the number of experts.
        mode: ``default``: the plain top-k (the allocator unused: the baseline pass); ``sample``: k drawn from the
            allocator (RL training); ``argmax``: the allocator's most likely k (inference; our choice, as the paper
            does not say).
    """

    max_k: int = 0
    mode: str = "argmax"

    def resolved_max_k(self, num_experts: int) -> int:
        return self.max_k or num_experts


@dataclass
class ScoredConfig:
    """Pretrained routers' scoring rules (``kind="scored"``, c2r/routing/scored.py): DeepSeek-V2/V3 and any top-k
    router that a score function, a routed scaling factor or a fixed expert grouping sets apart. Groups and the
    selection bias's update rate come from ``group_limited`` (``num_groups`` G, ``max_groups`` M,
    ``bias_update_rate``); here the groups are always contiguous blocks of expert ids, whatever the placement.

    Attributes:
        score_function: ``softmax`` (Mixtral, Qwen, DeepSeek-V2) or ``sigmoid`` (DeepSeek-V3).
        routed_scaling_factor: multiplies the combine weights after renormalisation (DeepSeek's route scale).
        group_score_top: a group's score is the sum of its best ``group_score_top`` scores (DeepSeek-V3: 2;
            DeepSeek-V2's group-limited greedy: 1, the max). 0: ceil(k / M), as ``group_limited``.
        norm_epsilon: added to the renormalisation's denominator (DeepSeek-V3: 1e-20).
    """

    score_function: str = "softmax"
    routed_scaling_factor: float = 1.0
    group_score_top: int = 0
    norm_epsilon: float = 0.0


@dataclass
class RouterConfig:
    """Options of the router; ``num_experts`` and ``top_k`` live on the MoE config they belong to.

    Attributes:
        kind: which router (see ``ROUTER_KINDS``).
        renormalize: rescale the selected probabilities to sum to 1 (Mixtral, Qwen3 do; Qwen1.5 does not).
        aux_loss_weight: alpha of the load-balancing loss (Switch/GShard; AdaMoE's null-aware form for ``adamoe``;
            unused by ``remoe``, whose regulariser has its own adaptive coefficient).
        z_loss_weight: beta of the router z-loss (0 turns it off).
        check_finite: raise on NaN/Inf router logits. On a GPU without a host sync: the error comes at a later
            forward of the layer or at the trainer's check once a step (c2r/routing/finite.py).
        logits_dtype: ``float32`` computes the router GEMM in float32 (DeepSeek-V3 style; exact top-k, but about
            1 ms per layer at T=16k, D=2048 on an H100 for the float32 copy of the activations and their gradient);
            ``input`` computes it in the activations' dtype and only the softmax in float32 (Mixtral, MegaBlocks).
        balance: ``batch`` selects (``topk`` router only) on the logits plus a per-expert bias solved on each
            training batch to even out its top-k counts (c2r/routing/balance.py); ``none``: plain top-k; ``auto``
            (c2r-train's default): ``batch`` for the ``topk`` router, ``none`` for the other kinds.
        balance_rounds: rounds of the per-batch solve (each one pass over the logits and one selection per expert,
            on the device).
        balance_momentum: m of the running bias used in evaluation, updated once per optimizer step.
    """

    kind: str = "topk"
    renormalize: bool = True
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    check_finite: bool = True
    logits_dtype: str = "float32"
    balance: str = "none"
    balance_rounds: int = 8
    balance_momentum: float = 0.9
    c2r: C2RConfig = field(default_factory=C2RConfig)
    group_limited: GroupLimitedConfig = field(default_factory=GroupLimitedConfig)
    adamoe: AdaMoEConfig = field(default_factory=AdaMoEConfig)
    remoe: ReMoEConfig = field(default_factory=ReMoEConfig)
    adak: AdaKConfig = field(default_factory=AdaKConfig)
    scored: ScoredConfig = field(default_factory=ScoredConfig)

    @property
    def batch_balanced(self) -> bool:
        """Whether selection is batch-balanced: ``balance`` ``batch``, or ``auto`` with the ``topk`` router (``auto``
        stays as written in saved configs, so a tool that switches the router kind switches balancing with it)."""
        return self.kind == "topk" and self.balance in ("batch", "auto")

    def __post_init__(self) -> None:
        require_choice("router kind", self.kind, ROUTER_KINDS)
        require_choice("logits_dtype", self.logits_dtype, ("float32", "input"))
        require_choice("router balance", self.balance, ("none", "batch", "auto"))
        if self.balance == "batch" and self.kind != "topk":
            raise ValueError(f"router balance '{self.balance}' is for the topk router; router kind is '{self.kind}'")
        if self.balance_rounds < 1 or not 0 <= self.balance_momentum < 1:
            raise ValueError(
                f"balance_rounds ({self.balance_rounds}) must be >= 1 and balance_momentum "
                f"({self.balance_momentum}) in [0, 1)"
            )
        require_choice("adak.mode", self.adak.mode, ("default", "sample", "argmax"))
        require_choice("scored.score_function", self.scored.score_function, ("softmax", "sigmoid"))
        if self.aux_loss_weight < 0 or self.z_loss_weight < 0:
            raise ValueError(
                f"aux_loss_weight ({self.aux_loss_weight}) and z_loss_weight ({self.z_loss_weight}) must be >= 0"
            )

    def check_fits(self, num_experts: int, top_k: int) -> None:
        """Raise a ValueError naming the values when this router cannot run with ``num_experts`` and ``top_k``."""
        max_k = num_experts + (self.adamoe.num_null_experts if self.kind == "adamoe" else 0)
        if not 1 <= top_k <= max_k:
            what = f"num_experts + num_null_experts ({max_k})" if self.kind == "adamoe" else f"num_experts ({max_k})"
            raise ValueError(f"top_k ({top_k}) must be between 1 and {what}")
        check = {
            "c2r": self._check_c2r,
            "group_limited": self._check_group_limited,
            "adamoe": self._check_adamoe,
            "remoe": self._check_remoe,
            "adak": self._check_adak,
            "scored": self._check_scored,
        }.get(self.kind)
        if check is not None:
            check(num_experts, top_k)

    def _check_c2r(self, num_experts: int, top_k: int) -> None:
        if self.c2r.collaborators is None:
            raise ValueError(
                "the c2r router needs collaborator lists: make them from a profiled top-k run with "
                "`c2r-route collaborators RUN --out lists.npz` and set model.moe.router.c2r.collaborators"
            )
        top_t = self.c2r.resolved_top_t(num_experts)
        if not top_k - 1 <= top_t <= num_experts - 1:
            raise ValueError(
                f"c2r top_t ({top_t}) must be between top_k - 1 ({top_k - 1}) and num_experts - 1 ({num_experts - 1})"
            )

    def _check_group_limited(self, num_experts: int, top_k: int) -> None:
        g = self.group_limited
        if g.max_groups < 1 or g.num_groups < 0 or g.bias_update_rate < 0:
            raise ValueError(
                f"group_limited needs max_groups >= 1 (got {g.max_groups}), num_groups >= 0 (got {g.num_groups}) "
                f"and bias_update_rate >= 0 (got {g.bias_update_rate})"
            )
        if g.num_groups:
            check_groups_fit(num_experts, top_k, g.num_groups, g.max_groups)

    def _check_adamoe(self, num_experts: int, top_k: int) -> None:
        a = self.adamoe
        if a.num_null_experts <= 0:
            raise ValueError(
                f"adamoe needs num_null_experts > 0 (got {a.num_null_experts}); without null experts it is top-k"
            )
        if a.aux_loss_weight_after < 0 or a.aux_loss_switch_step < 0:
            raise ValueError(
                f"adamoe aux_loss_weight_after ({a.aux_loss_weight_after}) and aux_loss_switch_step "
                f"({a.aux_loss_switch_step}) must be >= 0"
            )

    def _check_remoe(self, num_experts: int, top_k: int) -> None:
        r = self.remoe
        if r.lambda_init <= 0 or r.lambda_factor <= 1:
            raise ValueError(
                f"remoe needs lambda_init > 0 (got {r.lambda_init}) and lambda_factor > 1 (got {r.lambda_factor})"
            )

    def _check_adak(self, num_experts: int, top_k: int) -> None:
        max_k = self.adak.resolved_max_k(num_experts)
        if not top_k <= max_k <= num_experts:
            raise ValueError(f"adak max_k ({max_k}) must be between top_k ({top_k}) and num_experts ({num_experts})")

    def _check_scored(self, num_experts: int, top_k: int) -> None:
        self._check_group_limited(num_experts, top_k)
        s = self.scored
        group_size = num_experts // (self.group_limited.num_groups or 1)
        if s.routed_scaling_factor <= 0 or s.norm_epsilon < 0 or not 0 <= s.group_score_top <= group_size:
            raise ValueError(
                f"scored needs routed_scaling_factor > 0 (got {s.routed_scaling_factor}), norm_epsilon >= 0 (got "
                f"{s.norm_epsilon}) and group_score_top between 0 and the group size {group_size} "
                f"(got {s.group_score_top})"
            )


def check_groups_fit(num_experts: int, top_k: int, num_groups: int, max_groups: int) -> None:
    """Group-limited routing needs equal groups, M <= G, and room for k experts in M groups."""
    if num_experts % num_groups:
        raise ValueError(f"group_limited num_groups ({num_groups}) must divide num_experts ({num_experts})")
    if max_groups > num_groups:
        raise ValueError(f"group_limited max_groups ({max_groups}) is larger than the number of groups ({num_groups})")
    if max_groups * (num_experts // num_groups) < top_k:
        raise ValueError(
            f"group_limited: max_groups ({max_groups}) groups of {num_experts // num_groups} experts cannot hold "
            f"top_k ({top_k}) experts"
        )
