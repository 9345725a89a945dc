"""c2r: communication-aware expert-parallel Mixture-of-Experts on DeepSpeed, with dropless MegaBlocks kernels.

The top layer of three: ``profiling/`` (traces, counters, dashboards) and ``placement/`` (layouts and plans) are
tools below it that never import ``c2r``; everything here may import them (docs/design.md).

Where a token goes, in folder order:
    c2r/routing/    a router picks up to K experts per token              -> RoutingResult
    c2r/experts/    a backend permutes tokens by expert and runs the MLPs   -> combined output
    c2r/parallel/   or, expert parallel: the dispatcher sends each token to the ranks holding its experts and back
    c2r/moe.py      the dropless MoE layer tying them together
    c2r/model.py    a small GPT whose MLPs are MoE layers; c2r/hf/ the same layer inside Hugging Face models
    c2r/deepspeed/  our layer and routers inside DeepSpeed's MoE, process groups, checkpoints, moving experts
    c2r/run_setup.py, train.py, adak_train.py   the run setup and the entry points (c2r-train, c2r-adak)

Shape legend (one for the whole package, ``placement/`` and ``profiling/`` included; tensors carry it as a suffix,
``expert_ids_TK``, ``w1_EFD``):
    B batch, S sequence length, T tokens on this rank (B * S), D hidden (model width), H attention heads,
    V vocabulary, F expert FFN width, E routed (logical) experts, K routing slots per token, R ranks in the
    expert-parallel group, X experts per rank (E / R; its slots, replicas included, with replicated experts),
    C rows this rank sends (copies), Q rows it receives, L MoE layers, N nodes, G expert groups.
A file may name a further letter in its own docstring, never reuse one of these for something else.
"""

__version__ = "0.1.0"
