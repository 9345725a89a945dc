"""Router settings: one home for every router's options, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from c2r.config_utils import require_choice

ROUTER_KINDS = ("topk",)


@dataclass
class RouterConfig:
    """Options of the router; ``num_experts`` and ``top_k`` live on the MoE config they belong to.

    Attributes:
        kind: which router (see ``ROUTER_KINDS``).
        renormalize: rescale the selected top-k probabilities to sum to 1 (Mixtral, Qwen3 do; Qwen1.5 does not).
        aux_loss_weight: alpha of the Switch/GShard load-balancing loss.
        z_loss_weight: beta of the router z-loss (0 turns it off).
        check_finite: raise on NaN/Inf router logits. Costs one host sync per layer on GPU.
    """

    kind: str = "topk"
    renormalize: bool = True
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    check_finite: bool = True

    def __post_init__(self) -> None:
        require_choice("router kind", self.kind, ROUTER_KINDS)
        if self.aux_loss_weight < 0 or self.z_loss_weight < 0:
            raise ValueError(
                f"aux_loss_weight ({self.aux_loss_weight}) and z_loss_weight ({self.z_loss_weight}) must be >= 0"
            )
