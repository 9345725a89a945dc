"""Batch-balanced selection for the top-k router: a per-expert bias solved on each training batch.

Why (docs/gpu_runs.md, "Why the default router collapses"): at d_model 2048 with 64 experts and top-8 the router's
*input* is nearly the same vector for every token within a few steps (a byte-level corpus, a high learning rate);
no loss on the router's output can then spread the tokens, and every token picks the same 8 experts. A per-expert
bias on the selection scores can, as long as the inputs differ at all: DeepSeek-V3's auxiliary-loss-free bias does
this one small step per optimizer step (too slow for the first steps of a run); here the bias is *solved on each
batch* to balance that batch's top-k counts, as Megatron-Core's Sinkhorn router balances each batch in training.
Its start removes what every token shares: for a linear router, centring each expert's logits on the batch is the
same as routing on the router's input minus its batch mean.

Algorithm (docs/algorithms.md section 1, "Batch balancing"), on the detached float32 logits l [T, E]:

    b = -mean_T(l) (each expert's logits centred on the batch); target n = round(T k / E)
    repeat R times:  s = l + b
                     bar[t, e] = the k-th best score of token t among the experts other than e
                     m[t, e] = s[t, e] - bar[t, e]
                     b = b - (the n-th and the (n+1)-th largest over t of m[:, e], averaged)
    select top-k of (l + b);  combine weights are the unbiased softmax probabilities of the selected experts

Expert e is in token t's top-k exactly when s[t, e] >= bar[t, e], so each round moves every expert's bias by what
makes its own count exactly n were the others to stay put (a Jacobi iteration on the experts' thresholds). It needs
no step size: the counting solve it replaced (b -= s (c - n) / n / (1 + i)) had one, and at the ~1B size one layer
in 8 rounds still ended at 1.6 max/mean where these end at 1.02 (docs/gpu_runs.md, part 6).
Once per optimizer step, b_run = m b_run + (1 - m) mean(b over the step's batches and every rank). In
evaluation the selection uses b_run alone, so an evaluated model does not depend on its batch. No host sync: the
loop runs a fixed number of rounds on the device.

On a GPU the per-token step (the bars and margins) is one Triton kernel (`margin_kernel.py`: the torch step's
top-(k+1) took most of a round) and the solve is replayed from a CUDA graph (`c2r.graphed`): its R rounds are ~6
small kernels each, ~50 launches per layer forward that the host would issue one by one, and at 8k tokens a step
the ~1B model's forward is bound by the host's launches (docs/gpu_runs.md). One graph per (batch shape, k, R,
device), shared by every layer of that shape, captured at its first use; the replay computes exactly what the eager
torch loop computes (tests/test_gpu.py). 8 rounds at 8,192 tokens x 64 experts: 0.42 ms (the counting solve's
0.49; benchmarks/balance_solve_bench.py, docs/benchmarks.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cache

import torch
from torch import nn

from c2r.graphed import graphed_call

log = logging.getLogger(__name__)


def token_margins(logits_TE: torch.Tensor, bias_E: torch.Tensor, top_k: int) -> torch.Tensor:
    """[E, T]: by how much each expert's score l + b clears the bar to enter each token's top-k (>= 0: it is in),
    the bar being the k-th best score of the token's other experts. top_k < E. (``margin_kernel.py`` is this as one
    Triton kernel.)"""
    scores_TE = logits_TE + bias_E
    best_TK1 = scores_TE.topk(top_k + 1, dim=1).values
    kth_T1, after_T1 = best_TK1[:, top_k - 1 : top_k], best_TK1[:, top_k:]
    # the k-th best of the others is the (k+1)-th best where the expert itself is in the top-k
    return (scores_TE - torch.where(scores_TE >= kth_T1, after_T1, kth_T1)).t()


def solve_bias(
    logits_TE: torch.Tensor, top_k: int, rounds: int, margins: Callable[..., torch.Tensor] = token_margins
) -> torch.Tensor:
    """The batch's balancing bias [E] (module docstring) from its detached float32 logits [T, E], T > 0;
    ``margins``: `token_margins` or its kernel."""
    T, E = logits_TE.shape
    # Start from the bias that centres every expert's logits on this batch (= routing on what differs between
    # tokens: the router's input minus its batch mean).
    bias_E = -logits_TE.mean(0)
    if top_k >= E or T < 2:  # every token takes every expert, or one token: nothing to balance
        return bias_E
    target = min(max(round(T * top_k / E), 1), T - 1)
    for _ in range(rounds):
        margin_ET = margins(logits_TE, bias_E, top_k)
        # Put each expert's bar halfway between its target-th largest margin and the largest one below it: exactly
        # target tokens over it and none on it (where the bar fell on a token, rounding decided whether it took the
        # expert); where margins tie at the target-th, all the tied tokens clear the bar (and the bar is the
        # target-th itself where nothing lies below it)
        inside_E = margin_ET.kthvalue(T - target + 1, dim=1).values
        outside_E = torch.where(margin_ET < inside_E[:, None], margin_ET, -torch.inf).amax(1)
        outside_E = torch.where(outside_E > -torch.inf, outside_E, inside_E)
        bias_E -= (inside_E + outside_E) / 2
    return bias_E


def solve_bias_fast(logits_TE: torch.Tensor, top_k: int, rounds: int) -> torch.Tensor:
    """`solve_bias`, from a CUDA graph where the logits are on the current GPU (`c2r.graphed`), its per-token step
    the Triton kernel there where it builds (else the torch step, said once per size)."""
    margins = token_margins
    on_current_gpu = logits_TE.is_cuda and logits_TE.device.index == torch.cuda.current_device()
    if on_current_gpu and top_k < logits_TE.shape[1] and not torch.cuda.is_current_stream_capturing():
        margins = _margin_step(logits_TE.shape[1], top_k, logits_TE.device)
    return graphed_call(solve_bias, logits_TE, top_k=top_k, rounds=rounds, margins=margins)


@cache
def _margin_step(num_experts: int, top_k: int, device: torch.device) -> Callable[..., torch.Tensor]:
    """The Triton margin kernel, compiled and run once for this size on ``device`` (here, not inside a graph
    capture), or the torch step where Triton is missing or the kernel fails to build (correct, slower)."""
    try:
        from c2r.routing.margin_kernel import token_margins_kernel

        # 16 tokens: Triton compiles one variant for token counts divisible by 16 (every usual batch) and one for
        # the rest; warming on that one keeps the first real solve from compiling another
        token_margins_kernel(
            torch.zeros(16, num_experts, device=device), torch.zeros(num_experts, device=device), top_k
        )
        return token_margins_kernel
    except Exception as error:  # no Triton, or a compile error on this build
        log.warning("batch balance: the Triton margin kernel failed (%s); using the torch step", error)
        return token_margins


class BatchBalancer(nn.Module):
    """The bias of one router (``bias_E``, float32, saved with the model as extra state so bf16 does not round it)."""

    def __init__(self, num_experts: int, rounds: int, momentum: float):
        super().__init__()
        self.rounds = rounds
        self.momentum = momentum
        self.bias_E = torch.zeros(num_experts, dtype=torch.float32)
        self._solved_sum_E: torch.Tensor | None = None  # this step's solved biases, summed (grad accumulation)
        self._solved_count = 0

    def selection_scores(self, logits_TE: torch.Tensor, top_k: int) -> torch.Tensor:
        """[T, E] scores whose top-k is the balanced selection (training: solved on this batch; eval: running)."""
        logits_TE = logits_TE.detach().float()
        self.bias_E = self.bias_E.to(logits_TE.device)
        if not self.training or logits_TE.shape[0] == 0:
            return logits_TE + self.bias_E
        with torch.no_grad():
            bias_E = solve_bias_fast(logits_TE, top_k, self.rounds)
        self._solved_sum_E = bias_E if self._solved_sum_E is None else self._solved_sum_E + bias_E
        self._solved_count += 1
        return logits_TE + bias_E

    def take_solved(self) -> tuple[torch.Tensor, int] | None:
        """This step's summed solved biases and their count (then forgotten), or None if none was solved."""
        if self._solved_sum_E is None:
            return None
        solved = (self._solved_sum_E, self._solved_count)
        self._solved_sum_E, self._solved_count = None, 0
        return solved

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        return {"bias_E": self.bias_E.detach().float().cpu()}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.bias_E = state["bias_E"].float()
