"""Expert MLP settings: activation and compute backend."""

from __future__ import annotations

from dataclasses import dataclass

from c2r.config_utils import require_choice

ACTIVATIONS = ("swiglu", "gelu")
BACKENDS = ("auto", "reference", "torch", "megablocks")
MEGABLOCKS_IMPLS = ("grouped", "sparse", "grouped_mm")
TORCH_IMPLS = ("auto", "grouped_mm", "loop")


@dataclass
class ExpertConfig:
    """How the experts compute.

    Attributes:
        activation: ``swiglu`` (w1, v1, w2 as in Mixtral / Qwen3-MoE) or ``gelu`` (w1, w2; tanh GELU as MegaBlocks).
        backend: ``reference`` (per-expert loop, the ground truth), ``torch`` (sort + torch._grouped_mm),
            ``megablocks`` (MegaBlocks' permute kernels + grouped_gemm, CUDA only) or ``auto`` (on a bf16 GPU the
            faster of the two for the nearest measured shape, c2r/experts/backend_choice.py; else torch).
        megablocks_impl: MegaBlocks' ``grouped`` path (grouped_gemm) or ``sparse`` (stk block-sparse kernels, with
            the triton >= 3.2 index overflow fixed: c2r/experts/megablocks_sparse.py; needs F divisible by 128) or
            ``grouped_mm`` (its permutation kernels around ``torch._grouped_mm``; bf16 on Hopper).
        torch_impl: for the torch backend, ``grouped_mm``, ``loop`` (a loop over sorted segments) or ``auto``
            (grouped_mm where torch supports the device/dtype/shape; on the CPU the loop, which measured about 2x
            faster than the CPU grouped_mm kernel).
    """

    activation: str = "swiglu"
    backend: str = "auto"
    megablocks_impl: str = "grouped"
    torch_impl: str = "auto"

    def __post_init__(self) -> None:
        require_choice("activation", self.activation, ACTIVATIONS)
        require_choice("expert backend", self.backend, BACKENDS)
        require_choice("megablocks_impl", self.megablocks_impl, MEGABLOCKS_IMPLS)
        require_choice("torch_impl", self.torch_impl, TORCH_IMPLS)

    def check_fits(self, ffn_hidden_size: int) -> None:
        """Refuse, with one line, an expert width this configuration cannot compute."""
        if self.backend == "megablocks" and self.megablocks_impl == "sparse":
            from c2r.experts.megablocks_sparse import sparse_shape_problem

            problem = sparse_shape_problem(ffn_hidden_size)
            if problem is not None:
                raise ValueError(problem)
