"""Synthetic routing with the structure real MoE routers show: skewed expert popularity (Zipf-like) and clustered
co-activation (experts that tend to fire together). For tests and benchmarks of the planner; not a model.

Shape legend: N tokens, K experts per token, E experts, C clusters.
"""

from __future__ import annotations

import numpy as np


def synthetic_expert_ids(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    *,
    num_clusters: int = 4,
    zipf: float = 1.0,
    cluster_bonus: float = 3.0,
    seed: int = 0,
    structure_seed: int | None = None,
    chunk: int = 16384,
) -> np.ndarray:
    """[N, K] int16 distinct expert ids per token, drawn without replacement by Gumbel top-k over

        logit[n, e] = log popularity[e] + cluster_bonus * [e in the cluster of token n],

    popularity[e] ~ 1 / (position of e in a random order + 1) ** zipf; experts fall into ``num_clusters`` random
    equal clusters; a token's cluster is drawn in proportion to the clusters' total popularity. ``cluster_bonus`` 0
    gives independent (unclustered) routing. ``structure_seed`` (default ``seed``) draws popularity and clusters,
    ``seed`` the tokens: keep the first fixed to sample several batches of one layer. Memory: ``chunk`` x E floats."""
    if top_k > num_experts:
        raise ValueError(f"top_k ({top_k}) must be <= num_experts ({num_experts})")
    structure = np.random.default_rng(seed if structure_seed is None else structure_seed)
    popularity_E = 1.0 / (structure.permutation(num_experts) + 1.0) ** zipf
    cluster_E = structure.permutation(num_experts) % num_clusters
    rng = np.random.default_rng(seed) if structure_seed is not None else structure
    cluster_weight_C = np.bincount(cluster_E, weights=popularity_E, minlength=num_clusters)
    log_pop_E = np.log(popularity_E / popularity_E.sum()).astype(np.float32)
    bonus_CE = (cluster_bonus * (cluster_E[None, :] == np.arange(num_clusters)[:, None])).astype(np.float32)
    out = np.empty((num_tokens, top_k), dtype=np.int16)
    for start in range(0, num_tokens, chunk):
        n = min(chunk, num_tokens - start)
        token_cluster_N = rng.choice(num_clusters, size=n, p=cluster_weight_C / cluster_weight_C.sum())
        uniform = rng.random((n, num_experts), dtype=np.float32)
        gumbel = -np.log(-np.log(np.clip(uniform, 1e-12, 1.0 - 1e-7)))
        scores = log_pop_E + bonus_CE[token_cluster_N] + gumbel  # (n, E)
        out[start : start + n] = np.argpartition(-scores, top_k - 1, axis=1)[:, :top_k]
    return out
