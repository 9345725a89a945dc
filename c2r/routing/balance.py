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

    b = -mean_T(l) (each expert's logits centred on the batch); s = std(l + b); target = T k / E
    repeat R times (i = 0..R-1):  c = top-k counts of (l + b);  b = b - s (c - target) / target / (1 + i)
    select top-k of (l + b);  combine weights are the unbiased softmax probabilities of the selected experts

and once per optimizer step, b_run = m b_run + (1 - m) mean(b over the step's batches and every rank). In
evaluation the selection uses b_run alone, so an evaluated model does not depend on its batch. No host sync: the
loop runs a fixed number of rounds on the device.

On a GPU the solve is replayed from a CUDA graph (`c2r.graphed`): its R rounds are ~6 small kernels each, ~50
launches per layer forward that the host must issue one by one, and at 8k tokens a step the ~1B model's forward is
bound by the host's launches (docs/gpu_runs.md). One graph per (batch shape, k, R, device), shared by every layer of
that shape, captured at its first use; the replay computes exactly what the eager loop computes (tests/test_gpu.py).
"""

from __future__ import annotations

import torch
from torch import nn

from c2r.graphed import graphed_call


def solve_bias(logits_TE: torch.Tensor, top_k: int, rounds: int) -> torch.Tensor:
    """The batch's balancing bias [E] (module docstring) from its detached float32 logits [T, E], T > 0."""
    T, E = logits_TE.shape
    target = T * top_k / E
    # Start from the bias that centres every expert's logits on this batch (= routing on what differs between
    # tokens: the router's input minus its batch mean), and step in units of what is left.
    bias_E = -logits_TE.mean(0)
    step = (logits_TE + bias_E).std().clamp_min(1e-6)
    for i in range(rounds):
        # Each expert's top-k count, as the experts scoring at least each token's k-th best score: four kernel
        # launches a round where a histogram of the picks takes eight; this loop runs rounds x layers times per
        # step and is launch-bound (docs/gpu_runs.md). The two differ only on an exact tie at the k-th score.
        scores_TE = logits_TE + bias_E
        kth_T1 = scores_TE.topk(top_k, dim=1).values[:, -1:]
        counts_E = (scores_TE >= kth_T1).sum(0, dtype=torch.float32)
        # Harmonic steps: the first rounds' steps overshoot (an expert above target drops below it, and back);
        # 1 / (1 + i) damps that where 1 / sqrt(1 + i) left 8 rounds at 1.1-2.4 max/mean on synthetic logits
        # (1.01-1.22 with these), and the ~1B model at 1.23-1.51 (1.04-1.22): docs/gpu_runs.md, part 5
        bias_E.addcmul_(counts_E - target, step, value=-1.0 / (target * (1 + i)))
    return bias_E


def solve_bias_fast(logits_TE: torch.Tensor, top_k: int, rounds: int) -> torch.Tensor:
    """`solve_bias`, from a CUDA graph where the logits are on the current GPU (`c2r.graphed`)."""
    return graphed_call(solve_bias, logits_TE, top_k=top_k, rounds=rounds)


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
