"""c2r: communication-aware expert-parallel Mixture-of-Experts on DeepSpeed, with dropless MegaBlocks kernels.

Where a token goes, in folder order:
    c2r/routing/   a router picks up to K experts per token            -> RoutingResult
    c2r/experts/   a backend permutes tokens by expert and runs the MLPs -> combined output
    c2r/moe.py     the dropless MoE layer tying the two together
    c2r/model.py   a small GPT whose MLPs are MoE layers
"""

__version__ = "0.1.0"
