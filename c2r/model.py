"""A small GPT whose MLPs are (every N layers) dropless MoE layers. Small enough to hold in your head.

Shape legend: B batch, S sequence length, D model width, H heads, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from c2r.config_utils import require_positive
from c2r.moe import MoEConfig, MoELayer
from c2r.routing import RoutingResult


@dataclass
class ModelConfig:
    """Model shape. ``moe_every=N`` makes every N-th block (the N-th, 2N-th, ...) an MoE block; the rest use a
    dense MLP of width ``dense_ffn_hidden_size`` (default 4 * d_model)."""

    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    moe_every: int = 1
    dense_ffn_hidden_size: int | None = None
    tie_embeddings: bool = True
    dropout: float = 0.0
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        require_positive(
            vocab_size=self.vocab_size,
            block_size=self.block_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            d_model=self.d_model,
            moe_every=self.moe_every,
        )
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.dense_ffn_hidden_size is not None and self.dense_ffn_hidden_size <= 0:
            raise ValueError(
                f"dense_ffn_hidden_size ({self.dense_ffn_hidden_size}) must be > 0, or null for 4 x d_model"
            )
        if self.moe_every > self.n_layer:
            raise ValueError(f"moe_every ({self.moe_every}) > n_layer ({self.n_layer}) leaves no MoE layer")

    def is_moe_layer(self, index: int) -> bool:
        return index % self.moe_every == self.moe_every - 1

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layer))

    def flops_per_token(self) -> float:
        """Model FLOPs per trained token (forward and backward), the estimate behind model FLOPs utilisation: 6 x
        the matrix weights a token passes through (attention projections, router, top_k experts, dense MLPs, LM
        head) + 12 x layers x d_model x block_size for attention's scores and values (PaLM, appendix B). At the
        configured top_k: variable-k routers spend less."""
        d, moe = self.d_model, self.moe
        expert = (3 if moe.experts.activation == "swiglu" else 2) * d * moe.ffn_hidden_size
        dense_layers = self.n_layer - self.num_moe_layers
        weights = self.n_layer * 4 * d * d + self.num_moe_layers * (d * moe.num_experts + moe.top_k * expert)
        weights += dense_layers * 2 * d * (self.dense_ffn_hidden_size or 4 * d) + d * self.vocab_size
        return 6 * weights + 12 * self.n_layer * d * self.block_size


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, S, V)
    loss: torch.Tensor | None  # lm_loss + aux_loss, what the optimizer minimises
    lm_loss: torch.Tensor | None
    aux_loss: torch.Tensor
    routing: list[RoutingResult]  # one per MoE layer, in depth order


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (t.view(B, S, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, S, D/H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class DenseMLP(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(d_model, hidden, bias=False)
        self.proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.proj(F.gelu(self.fc(x), approximate="tanh")), None


class Block(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        # GPT-2's scaled init of residual projections, so depth does not blow up the residual stream.
        out_std = 0.02 / math.sqrt(2 * config.n_layer)
        if config.is_moe_layer(index):
            moe_index = sum(config.is_moe_layer(i) for i in range(index))
            self.mlp: nn.Module = MoELayer(config.d_model, config.moe, output_init_std=out_std, layer_index=moe_index)
        else:
            self.mlp = DenseMLP(config.d_model, config.dense_ffn_hidden_size or 4 * config.d_model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingResult | None]:
        x = x + self.attn(self.ln1(x))
        y, routing = self.mlp(self.ln2(x))
        return x + y, routing


class MoEGPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.block_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._init_dense_weights()
        if config.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def _init_dense_weights(self) -> None:
        out_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            # Routers initialise their own layers (gate, null gate, allocator).
            if isinstance(module, (nn.Linear, nn.Embedding)) and ".router." not in name:
                std = out_std if name.endswith(".proj") else 0.02
                nn.init.normal_(module.weight, std=std)

    def moe_layers(self) -> list[MoELayer]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoELayer)]

    def forward(self, idx_BS: torch.Tensor, targets_BS: torch.Tensor | None = None) -> ModelOutput:
        B, S = idx_BS.shape
        if self.config.block_size < S:
            raise ValueError(f"sequence length {S} exceeds block_size {self.config.block_size}")
        pos = torch.arange(S, device=idx_BS.device)
        x = self.drop(self.tok_emb(idx_BS) + self.pos_emb(pos))  # (B, S, D)
        routings: list[RoutingResult] = []
        for block in self.blocks:
            x, routing = block(x)
            if routing is not None:
                routings.append(routing)
        logits = self.head(self.ln_f(x))  # (B, S, V)
        aux_loss = sum((r.aux_loss for r in routings), logits.new_zeros((), dtype=torch.float32))
        lm_loss = loss = None
        if targets_BS is not None:
            lm_loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets_BS.reshape(-1))
            loss = lm_loss + aux_loss
        return ModelOutput(logits, loss, lm_loss, aux_loss, routings)

    def num_parameters(self) -> dict[str, int]:
        """Total parameters and those active per token (top-k of the experts)."""
        total = sum(p.numel() for p in self.parameters())
        expert = sum(p.numel() for layer in self.moe_layers() for p in layer.experts.parameters())
        moe = self.config.moe
        active = total - expert + expert * moe.top_k // moe.num_experts
        return {"total": total, "expert": expert, "active_per_token": active}
