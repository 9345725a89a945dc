"""What the planner reads: routing traces (per-token expert sets) or co-activation count matrices, reduced per MoE
layer to a `LayerRouting` (the distinct expert sets with their multiplicity).

Shape legend: N trace rows (tokens), K slots per token, M distinct expert sets, E experts, L MoE layers.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from placement.errors import PlacementError


@dataclass(frozen=True)
class LayerRouting:
    """One MoE layer's routing as the planner sees it.

    Attributes:
        sets_MK: int32 [M, K] distinct expert sets, ascending within a row, -1 padding at the end (a token whose
            every slot is empty is the all -1 row).
        weight_M: int64 [M] how many tokens chose each set.
        expert_load_E: float64 [E] token-expert pairs per expert (the compute load).
        num_tokens: tokens the layer routed (sum of weight_M for traces; inferred for co-activation input).
        coactivation_EE: for co-activation input only: the symmetric pair counts (diagonal: expert load). Then
            ``sets_MK`` holds the pairs (i < j) with ``weight_M = C[i, j]``, and per-token metrics are the pairwise
            approximation (exact for top-2), see `placement.objective`.
        step_load_SE: for traces of at least 2 recorded steps: float64 [S, E] each step's expert load (what the
            load cap also holds on each step, `placement.loadcap.cap_load`); None otherwise.
    """

    sets_MK: np.ndarray
    weight_M: np.ndarray
    expert_load_E: np.ndarray
    num_tokens: int
    coactivation_EE: np.ndarray | None = field(default=None, repr=False)
    step_load_SE: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_experts(self) -> int:
        return len(self.expert_load_E)

    @property
    def pairwise(self) -> bool:
        return self.coactivation_EE is not None

    @property
    def set_size_M(self) -> np.ndarray:
        return (self.sets_MK >= 0).sum(axis=1)


def _canonical_sets(ids_NK: np.ndarray, num_experts: int) -> np.ndarray:
    """[N, K] -> int32 [N, K]: ascending valid ids first, repeated ids dropped, -1 padding at the end."""
    ids = ids_NK.astype(np.int32, copy=True)
    ids[ids < 0] = num_experts  # sorts after every real expert
    ids.sort(axis=1)
    repeated = np.zeros(ids.shape, dtype=bool)
    repeated[:, 1:] = ids[:, 1:] == ids[:, :-1]
    if repeated.any():
        ids[repeated] = num_experts
        ids.sort(axis=1)
    ids[ids == num_experts] = -1
    return ids


def _unique_rows(sets_NK: np.ndarray, weight_N: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows and their summed weight (1 per row when ``weight_N`` is None)."""
    if len(sets_NK) == 0:
        return sets_NK.reshape(0, sets_NK.shape[1]), np.zeros(0, dtype=np.int64)
    rows = np.ascontiguousarray(sets_NK)
    view = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    _, first, inverse = np.unique(view, return_index=True, return_inverse=True)
    weight = np.bincount(inverse, weights=weight_N, minlength=len(first))
    return rows[first], weight.astype(np.int64)


def routing_from_expert_ids(
    expert_ids_NK: np.ndarray, num_experts: int, steps_N: np.ndarray | None = None
) -> LayerRouting:
    """One layer's traced tokens ([N, K] expert ids, -1 = empty slot) -> `LayerRouting`; ``steps_N``: each token's
    recorded step, for the per-step expert loads (kept where there are at least 2 steps)."""
    ids = np.asarray(expert_ids_NK)
    if ids.ndim != 2:
        raise PlacementError(f"expert ids must be [tokens, slots]; got shape {list(ids.shape)}")
    if ids.size and ids.max() >= num_experts:
        raise PlacementError(f"expert id {int(ids.max())} is out of range for {num_experts} experts")
    sets_NK = _canonical_sets(ids, num_experts)
    sets_MK, weight_M = _unique_rows(sets_NK)
    valid = sets_NK[sets_NK >= 0]
    load_E = np.bincount(valid, minlength=num_experts).astype(np.float64)
    return LayerRouting(
        sets_MK, weight_M, load_E, int(len(ids)), step_load_SE=_step_loads(sets_NK, steps_N, num_experts)
    )


def _step_loads(sets_NK: np.ndarray, steps_N: np.ndarray | None, num_experts: int) -> np.ndarray | None:
    """[S, E] expert load per distinct step (ascending), or None for fewer than 2 steps. A step with under half the
    median step's tokens (the last step a recorder's token cap cut short) is left out: its load is mostly noise."""
    if steps_N is None or len(np.unique(steps_N)) < 2:
        return None
    _, step_of_N, tokens_S = np.unique(steps_N, return_inverse=True, return_counts=True)
    valid = sets_NK >= 0
    flat = step_of_N[:, None].repeat(sets_NK.shape[1], axis=1)[valid] * num_experts + sets_NK[valid]
    num_steps = len(tokens_S)
    loads = np.bincount(flat, minlength=num_steps * num_experts).reshape(num_steps, num_experts).astype(np.float64)
    loads = loads[tokens_S >= 0.5 * np.median(tokens_S)]
    return loads if len(loads) >= 2 else None


def steps_for_loads(header: dict[str, Any], steps: list[np.ndarray], info: dict[str, Any]) -> list:
    """Each layer's token steps to read per-step expert loads from (the per-step cap, the per-step load metric), or
    None per layer where they are not used, with the reason in ``info["step_loads"]``. A sampled trace records a
    fraction of each step's tokens (``profile.trace.sample_rate``): at 1% a step of a 4096-token batch is ~40 tokens,
    whose expert load is mostly sampling noise."""
    rate = float(header.get("sample_rate") or 1.0)
    if rate < 1.0:
        info["step_loads"] = (
            f"not used: the trace samples {rate:.2%} of the tokens: a step's sample is too small to read its load"
        )
        return [None] * len(steps)
    return steps


def validate_coactivation(counts: np.ndarray, name: str = "co-activation matrix") -> np.ndarray:
    """[E, E] or [L, E, E] -> float64 [L, E, E], checked: square, symmetric, finite, non-negative, integer counts."""
    counts = np.asarray(counts)
    if counts.ndim not in (2, 3) or counts.shape[-1] != counts.shape[-2]:
        raise PlacementError(
            f"{name} must be [E, E] or [L, E, E] with square [E, E] slices; got shape {list(counts.shape)}"
        )
    if not np.issubdtype(counts.dtype, np.number) or np.issubdtype(counts.dtype, np.complexfloating):
        raise PlacementError(f"{name} must hold numbers; got dtype {counts.dtype}")
    counts = counts.astype(np.float64).reshape(-1, counts.shape[-1], counts.shape[-1])
    if not np.isfinite(counts).all():
        raise PlacementError(f"{name} holds non-finite values (NaN or inf)")
    if (counts < 0).any():
        layer, i, j = (int(x) for x in np.argwhere(counts < 0)[0])
        raise PlacementError(f"{name} holds negative counts, e.g. layer {layer} [{i}, {j}] = {counts[layer, i, j]:g}")
    asym = np.abs(counts - counts.transpose(0, 2, 1))
    if asym.max(initial=0) > 0:
        layer, i, j = (int(x) for x in np.unravel_index(asym.argmax(), asym.shape))
        raise PlacementError(
            f"{name} is not symmetric: layer {layer} [{i}, {j}] = {counts[layer, i, j]:g} but "
            f"[{j}, {i}] = {counts[layer, j, i]:g}"
        )
    if (counts != np.round(counts)).any():
        layer, i, j = (int(x) for x in np.argwhere(counts != np.round(counts))[0])
        raise PlacementError(
            f"{name} must hold integer token counts; layer {layer} [{i}, {j}] = {counts[layer, i, j]:g}"
        )
    # With a diagonal (expert loads), a pair count is at most either expert's load: both experts served those tokens.
    # (An all-zero diagonal is the top-2 form, where loads are the row sums.)
    diag_LE = np.diagonal(counts, axis1=1, axis2=2)
    bound = np.minimum(diag_LE[:, :, None], diag_LE[:, None, :])
    over = (counts > bound) & ~np.eye(counts.shape[-1], dtype=bool) & diag_LE.any(axis=1)[:, None, None]
    if over.any():
        layer, i, j = (int(x) for x in np.argwhere(over)[0])
        raise PlacementError(
            f"{name} layer {layer}: pair count [{i}, {j}] = {counts[layer, i, j]:g} exceeds an expert's load on the "
            f"diagonal ([{i}, {i}] = {counts[layer, i, i]:g}, [{j}, {j}] = {counts[layer, j, j]:g}); the diagonal must "
            "be each expert's token count (or all zero for top-2 pair counts)"
        )
    return counts


def _pairwise_routing(counts_EE: np.ndarray, num_tokens: int) -> LayerRouting:
    """Pairs (i < j) with C[i, j] > 0 as 2-sets; the diagonal of ``counts_EE`` is the expert load."""
    iu, ju = np.triu_indices(len(counts_EE), k=1)
    pair_weight = counts_EE[iu, ju]
    keep = pair_weight > 0
    sets_MK = np.stack([iu[keep], ju[keep]], axis=1).astype(np.int32).reshape(-1, 2)
    load_E = np.diag(counts_EE).astype(np.float64)
    return LayerRouting(sets_MK, pair_weight[keep].astype(np.int64), load_E, num_tokens, coactivation_EE=counts_EE)


def routing_from_coactivation(counts_EE: np.ndarray, num_tokens: int | None = None) -> LayerRouting:
    """A symmetric pair-count matrix (C[i, j] = tokens choosing both i and j) -> pairwise `LayerRouting`.

    The diagonal, when present, is the expert load. When the diagonal is all zero the input is read as top-2 routing
    (each token is one pair): load[i] = sum_j C[i, j] and tokens = sum_{i<j} C[i, j]. Otherwise, without
    ``num_tokens``, tokens are inferred assuming every token used the same number k of distinct experts:
    sum_{i<j} C = T k (k - 1) / 2 and trace(C) = T k give k = 1 + 2 pairs / trace and T = trace / k.
    """
    counts = validate_coactivation(counts_EE)[0]
    off = counts - np.diag(np.diag(counts))
    pairs_total = float(np.triu(off, k=1).sum())
    load_E = np.diag(counts).copy()
    if not load_E.any():
        load_E = off.sum(axis=1)
        counts = off + np.diag(load_E)
        inferred_tokens = pairs_total
    else:
        k = 1.0 + 2.0 * pairs_total / load_E.sum()
        inferred_tokens = load_E.sum() / k
    tokens = int(num_tokens) if num_tokens is not None else int(round(inferred_tokens))
    return _pairwise_routing(counts, tokens)


def restrict(routing: LayerRouting, experts: np.ndarray) -> LayerRouting:
    """The routing seen by a subset of experts (renumbered 0..len-1 in the given order): each set keeps only its
    members in the subset. Used to split one node's experts over its GPUs."""
    experts = np.asarray(experts, dtype=np.int64)
    local_E = np.full(routing.num_experts, -1, dtype=np.int32)
    local_E[experts] = np.arange(len(experts), dtype=np.int32)
    if routing.pairwise:
        return _pairwise_routing(routing.coactivation_EE[np.ix_(experts, experts)], routing.num_tokens)
    sets = np.where(routing.sets_MK >= 0, local_E[np.maximum(routing.sets_MK, 0)], -1)
    sets = _canonical_sets(sets, len(experts))
    sets_MK, weight_M = _unique_rows(sets, routing.weight_M.astype(np.float64))
    return LayerRouting(sets_MK, weight_M, routing.expert_load_E[experts], routing.num_tokens)


def subsample(routing: LayerRouting, max_tokens: int | None, seed: int = 0) -> LayerRouting:
    """At most ``max_tokens`` tokens drawn without replacement (seeded; expert load recounted on the sample). Plans
    from a 20k-token sample cost a fraction of the time with little loss (benchmarks/placement_scale.py); a
    co-activation routing is returned as is."""
    if routing.pairwise or max_tokens is None or max_tokens <= 0 or routing.num_tokens <= max_tokens:
        return routing
    rng = np.random.default_rng(seed)
    weight_M = rng.multivariate_hypergeometric(routing.weight_M, max_tokens, method="marginals")
    keep = weight_M > 0
    sets_MK, weight_M = routing.sets_MK[keep], weight_M[keep].astype(np.int64)
    valid = sets_MK >= 0
    load_E = np.bincount(
        sets_MK[valid], weights=np.broadcast_to(weight_M[:, None], sets_MK.shape)[valid], minlength=routing.num_experts
    )
    return LayerRouting(sets_MK, weight_M, load_E, int(max_tokens))


# ---- files -----------------------------------------------------------------------------------------------------


def find_trace_dir(path: str | Path) -> Path:
    """Accept a trace directory (header.json + shards), a profile directory (traces/) or a run directory
    (profile/traces/)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    for candidate in (path, path / "traces", path / "profile" / "traces"):
        if (candidate / "header.json").exists():
            return candidate
    raise FileNotFoundError(
        f"no routing traces in {path} (expected header.json in it, in {path / 'traces'} or in "
        f"{path / 'profile' / 'traces'}; record them with c2r-train --profile)"
    )


ELEMENT_DTYPES = {1: "fp8", 2: "bf16", 4: "fp32"}  # bytes per element -> a dtype name of that width


def recorded_activation(path: str | Path) -> tuple[int | None, str | None, str]:
    """The traced model's hidden size and activation dtype as its profile recorded them: the trace header, else the
    profile.json beside the traces, else (dtype only) the bytes per token copy in the all-to-all records. Returns
    (hidden, dtype name, where they came from); None for what nothing recorded."""
    trace_dir = find_trace_dir(path)
    sources = [(trace_dir / "header.json", "the trace header"), (trace_dir.parent / "profile.json", "profile.json")]
    hidden = dtype = None
    found = []
    for file, name in sources:
        info = json.loads(file.read_text()) if file.exists() else {}
        if hidden is None and info.get("hidden_size"):
            hidden, found = int(info["hidden_size"]), [*found, name]
        if dtype is None and info.get("dtype"):
            dtype = str(info["dtype"])
            found = found if name in found else [*found, name]
    comm = sorted((trace_dir.parent / "comm").glob("comm-rank*.jsonl"))
    if hidden and dtype is None and comm:
        first = comm[0].read_text().split("\n", 1)[0]
        element = json.loads(first)["bytes_per_copy"] // hidden if first.strip() else None
        if element in ELEMENT_DTYPES:
            dtype, found = ELEMENT_DTYPES[element], [*found, "the all-to-all records' bytes per copy"]
    return hidden, dtype, " and ".join(found)


def recorded_experts(path: str | Path) -> tuple[int | None, int | None]:
    """(FFN width, matrices per expert: 3 SwiGLU, 2 GELU) of the traced model's experts, as its trace header or the
    profile.json beside the traces recorded them (profiles since 2026-12-03); None for what neither recorded."""
    trace_dir = find_trace_dir(path)
    for file in (trace_dir / "header.json", trace_dir.parent / "profile.json"):
        info = json.loads(file.read_text()) if file.exists() else {}
        if info.get("ffn_hidden_size"):
            return int(info["ffn_hidden_size"]), info.get("expert_matrices")
    return None, None


def digest_files(paths: list[Path]) -> str:
    """sha256 over the files' names and bytes (sorted by name): identifies the exact inputs of a plan."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


def trace_digest(trace_dir: Path) -> str:
    return digest_files([trace_dir / "header.json", *trace_dir.glob("rank*-*.npz")])


@dataclass
class PlannerInput:
    """Everything `c2r-place` reads, split into the part plans are made from and the part they are judged on.

    Attributes:
        plan_routings / eval_routings: one `LayerRouting` per MoE layer (the same list when there is no holdout).
        info: the plan file's ``inputs`` record (kind, path, digest, tokens, holdout, ...).
    """

    num_layers: int
    num_experts: int
    plan_routings: list[LayerRouting]
    eval_routings: list[LayerRouting]
    info: dict[str, Any]

    @property
    def pairwise(self) -> bool:
        return any(r.pairwise for r in self.plan_routings)


def holdout_cutoff(steps: list[np.ndarray], fraction: float) -> int:
    """The first held-out step: the latest ``fraction`` of distinct recorded steps are held out (no token of a
    held-out step is planned on, so nothing leaks from evaluation into the plan)."""
    if not 0.0 < fraction < 1.0:
        raise PlacementError(f"--holdout must be a fraction in (0, 1); got {fraction}")
    distinct = np.unique(np.concatenate([s for s in steps if len(s)] or [np.zeros(0, np.int64)]))
    if len(distinct) < 2:
        raise PlacementError(
            f"--holdout {fraction} needs traces from at least 2 training steps to split by step; these hold "
            f"{len(distinct)} (steps {distinct.tolist()})"
        )
    held = min(max(1, int(round(fraction * len(distinct)))), len(distinct) - 1)
    return int(distinct[len(distinct) - held])


def load_trace_input(path: str | Path, holdout: float | None = None, progress: bool = True) -> PlannerInput:
    """Routing traces -> per-layer `LayerRouting`s, optionally split by step (later steps held out)."""
    from profiling.reader import read_traces

    trace_dir = find_trace_dir(path)
    traces = read_traces(trace_dir, progress=progress)
    num_layers, num_experts = traces.num_layers, traces.num_experts
    empty_ids = np.zeros((0, int(traces.header["top_k"])), dtype=np.int16)
    ids = [traces.expert_ids.get(layer, empty_ids) for layer in range(num_layers)]
    steps = [traces.steps.get(layer, np.zeros(0, np.int32)) for layer in range(num_layers)]
    info: dict[str, Any] = {
        "kind": "traces",
        "path": str(trace_dir),
        "digest": trace_digest(trace_dir),
        "tokens": int(sum(len(x) for x in ids)),
        "top_k": int(traces.header["top_k"]),
        "holdout": None,
        "skipped_shards": [name for name, _ in traces.skipped],
    }
    plan_ids, eval_ids, plan_steps, eval_steps = ids, ids, steps, steps
    if holdout:
        cutoff = holdout_cutoff(steps, holdout)
        plan_ids = [x[s < cutoff] for x, s in zip(ids, steps)]
        eval_ids = [x[s >= cutoff] for x, s in zip(ids, steps)]
        plan_steps = [s[s < cutoff] for s in steps]
        eval_steps = [s[s >= cutoff] for s in steps]
        info["holdout"] = {
            "fraction": holdout,
            "first_held_out_step": cutoff,
            "plan_tokens": int(sum(len(x) for x in plan_ids)),
            "eval_tokens": int(sum(len(x) for x in eval_ids)),
        }
    plan_steps = steps_for_loads(traces.header, plan_steps, info)
    eval_steps = steps_for_loads(traces.header, eval_steps, info)
    plan_routings = [routing_from_expert_ids(x, num_experts, s) for x, s in zip(plan_ids, plan_steps)]
    eval_routings = (
        plan_routings
        if not holdout
        else [routing_from_expert_ids(x, num_experts, s) for x, s in zip(eval_ids, eval_steps)]
    )
    return PlannerInput(num_layers, num_experts, plan_routings, eval_routings, info)


def _read_counts(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The ``coactivation`` array (and ``tokens``, when an .npz has them) of a .npy / .npz file."""
    if path.suffix != ".npz":
        return np.load(path, allow_pickle=False), None
    with np.load(path, allow_pickle=False) as data:
        if "coactivation" not in data:
            raise PlacementError(f"{path} holds {sorted(data.keys())}; expected an array named 'coactivation'")
        return data["coactivation"], (data["tokens"].reshape(-1) if "tokens" in data else None)


def load_coactivation_input(path: str | Path, holdout: float | None = None) -> PlannerInput:
    """A ``.npy`` [L, E, E] / [E, E] count matrix, or an ``.npz`` with ``coactivation`` (and optionally ``tokens``
    [L], e.g. the profiler's counts-rank*.npz)."""
    path = Path(path)
    if holdout:
        raise PlacementError("--holdout needs per-token traces (--traces); a co-activation matrix has no steps")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        raise PlacementError(f"{path} is a directory; --coactivation takes a .npy or .npz file")
    try:
        counts, tokens = _read_counts(path)
    except PlacementError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        # numpy's own message ("cannot reshape array...", "File is not a zip file") does not name the file
        raise PlacementError(f"{path} is not a readable co-activation .npy/.npz file (truncated?): {error}") from error
    counts = validate_coactivation(counts, f"co-activation matrix {path.name}")
    if tokens is not None and len(tokens) != len(counts):
        raise PlacementError(f"{path} has tokens for {len(tokens)} layers but co-activation for {len(counts)}")
    if tokens is not None:
        # a token uses an expert at most once: every expert's load (the diagonal) is at most the layer's tokens
        loads_L = np.diagonal(counts, axis1=1, axis2=2).max(axis=1)
        bad = [i for i, t in enumerate(tokens) if not (np.isfinite(t) and t == round(t) and t >= loads_L[i])]
        if bad:
            i = bad[0]
            raise PlacementError(
                f"{path}: 'tokens' of layer {i} is {tokens[i]:g}, but it must be a whole number of tokens at least "
                f"its busiest expert's load ({loads_L[i]:g})"
            )
    routings = [routing_from_coactivation(c, None if tokens is None else int(tokens[i])) for i, c in enumerate(counts)]
    info = {
        "kind": "coactivation",
        "path": str(path),
        "digest": digest_files([path]),
        "tokens": int(sum(r.num_tokens for r in routings)),
        "holdout": None,
        "approximation": "pairwise (exact for top-2 routing)",
    }
    return PlannerInput(len(counts), counts.shape[-1], routings, routings, info)


def load_input(
    traces: str | Path | None = None,
    coactivation: str | Path | None = None,
    holdout: float | None = None,
    progress: bool = True,
) -> PlannerInput:
    if (traces is None) == (coactivation is None):
        raise PlacementError("give exactly one of --traces DIR or --coactivation FILE")
    inp = (
        load_trace_input(traces, holdout, progress)
        if traces is not None
        else load_coactivation_input(coactivation, holdout)
    )
    if not any(r.num_tokens for r in inp.plan_routings):  # nothing to plan on (and nothing to judge a plan by)
        raise PlacementError(f"{traces if traces is not None else coactivation} holds no routed tokens on any layer")
    return inp
