"""Mt-KaHyPar presets side by side: held-out copies per token and planning time of `plan_layer` (what
``c2r-place plan --max-load none`` runs per layer), for layer shapes from 32 to 256 experts.

Each case: synthetic clustered routing with skewed popularity (placement/synthetic.py), 3 layers; each layer planned
on 20,000 tokens (c2r-place's default sample) and judged on 20,000 other tokens of the same layer (another seed, the
same experts' popularity and clusters). One Mt-KaHyPar thread, as each worker of ``c2r-place plan --jobs N`` runs.
The presets of one case run one after the other in this process, so both see the same machine.

Run from the repository root (CPU, about 2 minutes for the two default presets):
    python benchmarks/placement_presets.py
    python benchmarks/placement_presets.py --presets deterministic deterministic_multilevel default
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from placement.inputs import routing_from_expert_ids  # noqa: E402
from placement.kahypar_context import KAHYPAR_PRESETS, MULTILEVEL  # noqa: E402
from placement.layout import ExpertLayout  # noqa: E402
from placement.methods import plan_layer  # noqa: E402
from placement.objective import layer_metrics  # noqa: E402
from placement.synthetic import synthetic_expert_ids  # noqa: E402

# (experts, top-k, clusters, Zipf exponent, ranks, nodes)
CASES = [
    (256, 8, 32, 0.3, 64, 8),  # DeepSeek-V3's shape (benchmarks/placement_scale.py)
    (128, 8, 16, 0.3, 32, 4),
    (64, 8, 8, 0.6, 8, 1),  # OLMoE's shape (benchmarks/placement_load.py)
    (64, 8, 8, 0.6, 16, 1),
    (64, 8, 8, 0.6, 16, 2),
    (32, 4, 4, 0.6, 8, 1),
]
TOKENS = 20_000
LAYERS = 3


def layer_ids(experts: int, top_k: int, clusters: int, zipf: float, layer: int, seed: int) -> np.ndarray:
    return synthetic_expert_ids(
        TOKENS, experts, top_k, num_clusters=clusters, zipf=zipf, cluster_bonus=3.0, seed=seed, structure_seed=layer
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", choices=KAHYPAR_PRESETS, default=["deterministic", MULTILEVEL])
    args = p.parse_args()
    print(
        "| experts, top-k | ranks (nodes) | "
        + " | ".join(f"{x}: copies/token, held out | {x}: s per layer" for x in args.presets)
        + " |"
    )
    print("| --- | --- |" + " --- | --- |" * len(args.presets))
    for experts, top_k, clusters, zipf, ranks, nodes in CASES:
        plan = [
            routing_from_expert_ids(layer_ids(experts, top_k, clusters, zipf, i, 100 + i), experts)
            for i in range(LAYERS)
        ]
        held = [
            routing_from_expert_ids(layer_ids(experts, top_k, clusters, zipf, i, 200 + i), experts)
            for i in range(LAYERS)
        ]
        cells = []
        for preset in args.presets:
            copies, seconds = [], 0.0
            for planning, judging in zip(plan, held):
                start = time.perf_counter()
                labels = plan_layer(planning, ranks, nodes, method="kahypar", seed=0, preset=preset, threads=1)
                seconds += time.perf_counter() - start
                copies.append(layer_metrics(judging, ExpertLayout(labels, ranks), nodes)["copies_per_token"])
            cells += [f"{np.mean(copies):.4f}", f"{seconds / LAYERS:.2f}"]
        print(f"| {experts}, top-{top_k} | {ranks} ({nodes}) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
