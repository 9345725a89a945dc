"""Routing traces: which experts each token chose, per MoE layer, streamed to disk in shards with bounded memory.

Layout of a trace directory (one per run; every rank writes its own files):

    header.json                 {"format": "c2r-routing-trace", "version": 1, "num_layers": L, "num_experts": E,
                                 "top_k": K, "router": ..., "source": ..., "sample_rate": p, "token_cap": N | null,
                                 "world_size": W, ...}   (rank 0)
    rank000-00000.npz ...       shards: layer int16 [N], step int32 [N], expert_ids int16 [N, K] (-1: empty slot),
                                weights float32 [N, K]. Written to a temporary name and renamed, so a crash never
                                leaves a half-written shard under a shard's name.
    counts-rank000.npz          online counters over *every* routed token (not only the sampled ones):
                                coactivation int64 [L, E, E] (tokens whose expert set holds both i and j; the
                                diagonal is the expert load), tokens int64 [L]

Shape legend: T tokens, K slots, E experts, L MoE layers, N trace rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from profiling.files import atomic_save_npz, atomic_write_text

FORMAT = "c2r-routing-trace"
VERSION = 1


@dataclass
class TraceConfig:
    """Sampling of the written trace; the online counters always see every token.

    Attributes:
        sample_rate: fraction of tokens written (uniform, per batch).
        token_cap: at most this many tokens written per layer per rank (None: no cap).
        shard_rows: rows buffered before a shard is written (bounds memory: about 8 + 6K bytes a row).
    """

    sample_rate: float = 1.0
    token_cap: int | None = None
    shard_rows: int = 65536

    def __post_init__(self) -> None:
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate ({self.sample_rate}) must be in (0, 1]")
        if self.token_cap is not None and self.token_cap < 0:
            raise ValueError(f"token_cap ({self.token_cap}) must be >= 0")
        if self.shard_rows <= 0:
            raise ValueError(f"shard_rows ({self.shard_rows}) must be > 0")


def coactivation_counts(expert_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E, E] int64: C[i, j] = tokens whose (valid) expert set holds both i and j; C[i, i] = load of i."""
    valid = expert_ids_TK >= 0
    onehot_TE = torch.zeros(expert_ids_TK.shape[0], num_experts, dtype=torch.float32, device=expert_ids_TK.device)
    # scatter_add, not scatter_: an empty slot (clamped to expert 0, adding 0) must not overwrite a real expert 0.
    onehot_TE.scatter_add_(1, expert_ids_TK.clamp(min=0).long(), valid.float())
    # float32 products are exact while a batch has fewer than 2**24 tokens
    return (onehot_TE.t() @ onehot_TE).round().long()


class RoutingTraceRecorder:
    """Collects routing decisions and writes them as shards (see the module docstring for the layout)."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        num_layers: int,
        num_experts: int,
        top_k: int,
        source: str,
        router: str = "topk",
        rank: int = 0,
        world_size: int = 1,
        config: TraceConfig | None = None,
        extra_header: dict[str, Any] | None = None,
        seed: int = 0,
    ):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = config or TraceConfig()
        self.num_layers, self.num_experts, self.top_k, self.rank = num_layers, num_experts, top_k, rank
        self.step = 0
        # Rows and counters stay on the routing's device until a flush: one device-to-host copy per shard instead
        # of several host syncs per layer and step.
        self._rows: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
        self._buffered = 0
        self._shard_index = 0
        self._written_per_layer = np.zeros(num_layers, dtype=np.int64)
        self._coactivation: torch.Tensor | None = None
        self.tokens = torch.zeros(num_layers, dtype=torch.int64)
        self._generator = torch.Generator().manual_seed(seed + 1009 * rank)
        if rank == 0:
            header = {
                "format": FORMAT,
                "version": VERSION,
                "num_layers": num_layers,
                "num_experts": num_experts,
                "top_k": top_k,
                "router": router,
                "source": source,
                "world_size": world_size,
                "sample_rate": self.config.sample_rate,
                "token_cap": self.config.token_cap,
                **(extra_header or {}),
            }
            atomic_write_text(self.dir / "header.json", json.dumps(header, indent=2))

    def record(self, layer: int, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor | None = None) -> None:
        """One layer's routing for one batch. ``expert_ids_TK``: int, -1 marks an empty slot."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range for a trace of {self.num_layers} MoE layers")
        if expert_ids_TK.shape[1] != self.top_k:
            raise ValueError(
                f"layer {layer} routed {expert_ids_TK.shape[1]} slots per token, the trace header says "
                f"top_k={self.top_k}"
            )
        ids = expert_ids_TK.detach()
        if self._coactivation is None:
            self._coactivation = torch.zeros(
                self.num_layers, self.num_experts, self.num_experts, dtype=torch.int64, device=ids.device
            )
        self._coactivation[layer] += coactivation_counts(ids, self.num_experts)
        self.tokens[layer] += ids.shape[0]
        keep = self._sample(layer, ids.shape[0])
        if keep is None:
            return
        keep = keep.to(ids.device)
        weights = (
            weights_TK.detach()[keep].float()
            if weights_TK is not None
            else torch.ones_like(ids[keep], dtype=torch.float32)
        )
        self._rows.append((layer, self.step, ids[keep].to(torch.int16), weights))
        self._buffered += len(keep)
        self._written_per_layer[layer] += len(keep)
        if self._buffered >= self.config.shard_rows:
            self.flush()

    @property
    def coactivation(self) -> torch.Tensor:
        """[L, E, E] int64 online co-activation over every recorded token (on the CPU; a host sync on GPUs)."""
        if self._coactivation is None:
            return torch.zeros(self.num_layers, self.num_experts, self.num_experts, dtype=torch.int64)
        return self._coactivation.cpu()

    def _sample(self, layer: int, num_tokens: int) -> torch.Tensor | None:
        room = num_tokens
        if self.config.token_cap is not None:
            room = min(room, int(self.config.token_cap - self._written_per_layer[layer]))
        if room <= 0:
            return None
        keep = torch.arange(num_tokens)
        if self.config.sample_rate < 1.0:
            keep = keep[torch.rand(num_tokens, generator=self._generator) < self.config.sample_rate]
        return keep[:room] if len(keep) else None

    def flush(self) -> None:
        """Write the buffered rows as one shard, and the counters (so a crash keeps what was seen)."""
        if self._rows:
            ids = torch.cat([r[2] for r in self._rows]).cpu().numpy()  # NOTE: host sync, once per shard
            shard = {
                "layer": np.concatenate([np.full(len(r[2]), r[0], np.int16) for r in self._rows]),
                "step": np.concatenate([np.full(len(r[2]), r[1], np.int32) for r in self._rows]),
                "expert_ids": ids,
                "weights": torch.cat([r[3] for r in self._rows]).cpu().numpy(),
            }
            atomic_save_npz(self.dir / f"rank{self.rank:03d}-{self._shard_index:05d}.npz", shard)
            self._shard_index += 1
            self._rows, self._buffered = [], 0
        atomic_save_npz(
            self.dir / f"counts-rank{self.rank:03d}.npz",
            {"coactivation": self.coactivation.numpy(), "tokens": self.tokens.numpy()},
        )

    def close(self) -> None:
        self.flush()
