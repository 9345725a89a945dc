"""Forward + backward time of one MoE block, side by side: c2r's MoELayer against the usual alternatives.

What it measures: for each config and contender, the wall time (CUDA events) of one training step of a single block,
``out = block(x); out.float().square().mean().backward()``, router included, after warm-up. It reports the median,
the spread (min-max) over the timed iterations, the achieved TFLOP/s and the time relative to a dense MLP that does
the same matmul FLOPs. Expert-matmul FLOPs for forward + backward are ``3 * 2 * T * k * H * F * m`` with ``m = 3``
for SwiGLU (gate, up, down) and ``m = 2`` for GELU (up, down); router FLOPs are ignored.

Contenders
  SwiGLU rows (qwen3-30b-a3b, mixtral-8x7b):
    ours-megablocks       c2r MoELayer, backend "megablocks" (MegaBlocks permute kernels + grouped_gemm)
    ours-mb-sparse        c2r MoELayer, backend "megablocks", megablocks_impl "sparse" (MegaBlocks' block-sparse stk
                          kernels, 32-bit block indices: c2r/experts/megablocks_sparse.py)
    ours-mb-gmm           c2r MoELayer, backend "megablocks", megablocks_impl "grouped_mm" (MegaBlocks' permutation
                          kernels around torch._grouped_mm: no host sync with a fixed k)
    ours-torch            c2r MoELayer, backend "torch" (sort + torch._grouped_mm)
    ours-auto             c2r MoELayer, backend "auto" (the default: the faster of the two for the nearest measured
                          shape, c2r/experts/backend_choice.py)
    hf-eager              transformers' Qwen3MoeSparseMoeBlock / MixtralSparseMoeBlock, experts_implementation eager
    deepspeed-autoep      DeepSpeed AutoEP's AutoEPMoELayer replacing that HF block (ep_size 1, its default config)
    megablocks-dmoe       megablocks.layers.dmoe.dMoE, mlp_type "glu", mlp_impl "grouped"
    dense-swiglu          one dense SwiGLU MLP of width F on T*k tokens (same matmul FLOPs)
  GELU rows (fine-grained, mixtral-gelu):
    ours-megablocks, ours-mb-sparse, ours-mb-gmm, ours-torch, ours-auto, megablocks-dmoe (mlp_type "mlp", tanh GELU),
    ds-moe-cap1.0         deepspeed.moe.layer.MoE, capacity_factor 1.0, drop_tokens=True (drops overflow tokens)
    ds-moe-dropless       deepspeed.moe.layer.MoE, drop_tokens=False (capacity = the largest expert load)
    dense-gelu            one dense GELU MLP of width F on T*k tokens

Run on the H100 (from the repository root):
    source .device/setup.sh    # installs the deepspeed, megablocks, grouped_gemm, stanford-stk wheels from .device/
    python benchmarks/layer_bench.py --repeats 2 --markdown docs/benchmark_layer.md

GPU prerequisites: a CUDA GPU; torch with torch._grouped_mm (>= 2.8); the wheels in ``.device/wheels`` (deepspeed
0.19.8, megablocks 0.10.0, grouped_gemm 0.3.0, stanford-stk 0.7.1, installed --no-deps by ``.device/setup.sh``);
transformers 5.x for the Hugging Face and AutoEP rows. A contender whose package is missing is reported as n/a.

CPU plumbing test (tiny sizes; GPU-only contenders report n/a):
    python benchmarks/layer_bench.py --smoke --device cpu --dtype float32 --iters 2
"""

# Shape legend: T tokens, H hidden size, F expert ffn hidden size, E experts, k experts per token (top-k).

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Import c2r from this checkout even when it is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DIST_ENV = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
INIT_STD = 0.02


@dataclass(frozen=True)
class BenchConfig:
    name: str
    activation: str  # "swiglu" or "gelu"
    T: int
    H: int
    F: int
    E: int
    k: int
    hf_family: str | None = None  # "qwen3_moe" or "mixtral": which HF block (and AutoEP preset) to build

    def flops(self) -> float:
        """Expert-matmul FLOPs of forward + backward (backward = 2x forward)."""
        matmuls = 3 if self.activation == "swiglu" else 2
        return 3 * 2 * self.T * self.k * self.H * self.F * matmuls


CONFIGS = {
    c.name: c
    for c in (
        BenchConfig("qwen3-30b-a3b", "swiglu", T=16384, H=2048, F=768, E=128, k=8, hf_family="qwen3_moe"),
        BenchConfig("mixtral-8x7b", "swiglu", T=8192, H=4096, F=14336, E=8, k=2, hf_family="mixtral"),
        BenchConfig("fine-grained", "gelu", T=16384, H=2048, F=1024, E=64, k=8),
        BenchConfig("mixtral-gelu", "gelu", T=8192, H=4096, F=14336, E=8, k=2),
    )
}
SMOKE_SIZES = dict(T=256, H=64, F=64, E=8, k=2)


@dataclass
class Bench:
    """A built contender: ``fn(x)`` runs the forward; ``x`` overrides the shared input (the dense rows)."""

    module: nn.Module
    fn: Callable[[torch.Tensor], object]
    x: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def make_input(rows: int, cols: int, device: torch.device, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(rows, cols, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)


def init_params_(module: nn.Module, seed: int) -> None:
    """N(0, 0.02) for every parameter: HF's 3-D expert weights start as torch.empty and its router at zero
    (which would send every token to experts 0..k-1)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            nn.init.normal_(p, std=INIT_STD)


def require_cuda(device: torch.device, what: str) -> None:
    if device.type != "cuda":
        raise RuntimeError(f"{what} needs a CUDA GPU")


def ensure_deepspeed_dist(device: torch.device) -> None:
    """A one-process torch.distributed group, as deepspeed.init_distributed builds it from the env vars."""
    import deepspeed
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        return
    for key, value in DIST_ENV.items():
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)


def first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def balance_loss(out) -> torch.Tensor | float:
    """The contender's own load-balancing loss when its forward returns one as a scalar second element (c2r's
    router, MegaBlocks' dMoE as wrapped below, DeepSpeed MoE's ``l_aux``), else 0. A training step backpropagates
    it, so each layer is timed with the balance loss it would train with."""
    if isinstance(out, (tuple, list)) and len(out) > 1 and torch.is_tensor(out[1]) and out[1].ndim == 0:
        return out[1].float()
    return 0.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# Timing


def fwd_bwd(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> None:
    """One benchmark step: ``loss = fn(x).float().square().mean() + its balance loss; loss.backward()``."""
    out = fn(x)
    (first(out).float().square().mean() + balance_loss(out)).backward()


def time_fwd_bwd(
    fn: Callable[[torch.Tensor], object],
    x: torch.Tensor,
    iters: int,
    warmup: int = 3,
    params: tuple[torch.Tensor, ...] = (),
) -> list[float]:
    """Milliseconds of :func:`fwd_bwd` per iteration, after ``warmup``.

    Gradients are reset to None between iterations, outside the timed region, so no accumulation kernel is timed.
    """
    on_cuda = x.device.type == "cuda"
    grads_of = (x, *params)

    def step():
        fwd_bwd(fn, x)

    for _ in range(warmup):
        step()
        for t in grads_of:
            t.grad = None
    sync(x.device)

    times_ms: list[float] = []
    events = []
    for _ in range(iters):
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            events.append((start, end))
        else:
            t0 = time.perf_counter()
            step()
            times_ms.append((time.perf_counter() - t0) * 1e3)
        for t in grads_of:
            t.grad = None
    sync(x.device)
    if on_cuda:
        times_ms = [start.elapsed_time(end) for start, end in events]
    return times_ms


# ----------------------------------------------------------------------------------------------------------------
# Contender builders: each returns a Bench on `device` in `dtype`. Every one starts from torch.manual_seed(seed).


def build_ours(cfg: BenchConfig, device, dtype, seed: int, backend: str, megablocks_impl: str = "grouped") -> Bench:
    from c2r.experts import ExpertConfig
    from c2r.moe import MoEConfig, MoELayer
    from c2r.routing import RouterConfig

    torch.manual_seed(seed)
    config = MoEConfig(
        num_experts=cfg.E,
        top_k=cfg.k,
        ffn_hidden_size=cfg.F,
        # No per-layer host sync, and the router GEMM in bf16 with a float32 softmax, as MegaBlocks'
        # and HF's routers do (our default float32 router GEMM costs ~1 ms more on the big rows).
        router=RouterConfig(check_finite=False, logits_dtype="input"),
        experts=ExpertConfig(activation=cfg.activation, backend=backend, megablocks_impl=megablocks_impl),
    )
    with device:
        layer = MoELayer(cfg.H, config).to(dtype)

    def fn(x):
        y, routing = layer(x)
        return y, routing.aux_loss  # the router's balance loss (aux_loss_weight 0.01), as c2r-train adds it

    return Bench(layer, fn)


def build_hf_block(cfg: BenchConfig, device, dtype, seed: int) -> nn.Module:
    """transformers' own MoE block (router + experts) for cfg's sizes, eager expert loop, N(0, 0.02) weights."""
    if cfg.hf_family == "qwen3_moe":
        from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        hf_config = Qwen3MoeConfig(
            hidden_size=cfg.H,
            moe_intermediate_size=cfg.F,
            num_experts=cfg.E,
            num_experts_per_tok=cfg.k,
            norm_topk_prob=True,
            hidden_act="silu",
        )
        block_cls = Qwen3MoeSparseMoeBlock
    elif cfg.hf_family == "mixtral":
        from transformers.models.mixtral.configuration_mixtral import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        hf_config = MixtralConfig(
            hidden_size=cfg.H,
            intermediate_size=cfg.F,
            num_local_experts=cfg.E,
            num_experts_per_tok=cfg.k,
            hidden_act="silu",
            router_jitter_noise=0.0,
        )
        block_cls = MixtralSparseMoeBlock
    else:
        raise RuntimeError(f"no Hugging Face block for config {cfg.name}")
    hf_config._experts_implementation = "eager"  # the per-expert loop, not HF's grouped_mm/batched_mm kernels
    with device:
        block = block_cls(hf_config)
    block.config = hf_config  # what AutoEP reads num_experts / top_k from
    init_params_(block, seed)
    return block.to(dtype)


def build_hf_eager(cfg: BenchConfig, device, dtype, seed: int) -> Bench:
    block = build_hf_block(cfg, device, dtype, seed)
    return Bench(block, lambda x: block(x.view(1, cfg.T, cfg.H)))


class _HFModelShell(nn.Module):
    """Just enough of a Hugging Face model for AutoEP to find the block: ``model.layers.0.mlp`` plus ``config``."""

    def __init__(self, block: nn.Module, config):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Module()])
        self.model.layers[0].mlp = block


def build_autoep(cfg: BenchConfig, device, dtype, seed: int) -> Bench:
    """AutoEP's own detection + replacement (AutoEP.ep_parser / replace_moe_layers), on one device: ep_size 1."""
    from deepspeed.module_inject.auto_ep import AutoEP
    from deepspeed.module_inject.auto_ep_config import AutoEPConfig

    block = build_hf_block(cfg, device, dtype, seed)
    shell = _HFModelShell(block, block.config)
    del block
    autoep = AutoEP(shell, AutoEPConfig(enabled=True, autoep_size=1, preset_model=cfg.hf_family))
    specs = autoep.ep_parser()
    if len(specs) != 1:
        raise RuntimeError(f"AutoEP detected {len(specs)} MoE layers, expected 1")
    with device:
        autoep.replace_moe_layers(specs, ep_size=1, ep_rank=0)
    layer = shell.model.layers[0].mlp.to(device=device, dtype=dtype)
    del shell, autoep
    return Bench(layer, lambda x: layer(x.view(1, cfg.T, cfg.H)))


def build_megablocks_dmoe(cfg: BenchConfig, device, dtype, seed: int) -> Bench:
    require_cuda(device, "MegaBlocks")
    from megablocks.layers import moe as mb_moe
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import dMoE

    torch.manual_seed(seed)
    glu = cfg.activation == "swiglu"
    extra = {"activation_fn": F.silu} if glu else {}  # else MegaBlocks' default, tanh GELU
    args = Arguments(
        mlp_type="glu" if glu else "mlp",
        mlp_impl="grouped",
        bf16=dtype == torch.bfloat16,
        fp16=False,
        moe_num_experts=cfg.E,
        moe_top_k=cfg.k,
        hidden_size=cfg.H,
        ffn_hidden_size=cfg.F,
        bias=False,
        return_bias=False,
        device=device,
        num_layers=1,
        moe_loss_weight=0.01,  # c2r's default aux_loss_weight
        **extra,
    )
    layer = dMoE(args).to(dtype)

    def fn(x):
        out = layer(x.view(cfg.T, 1, cfg.H))  # MegaBlocks wants [sl, bs, hs]
        # Its forward only saves the balance loss's inputs (a global list); the loss is computed when asked.
        loss = mb_moe.batched_load_balancing_loss(args)
        mb_moe.clear_load_balancing_loss()
        return out, loss

    return Bench(layer, fn)


def build_ds_moe(cfg: BenchConfig, device, dtype, seed: int, drop_tokens: bool) -> Bench:
    """DeepSpeed's classic GShard-style MoE; the expert is a 2-layer tanh-GELU MLP, copied E times."""
    from deepspeed.moe.layer import MoE

    ensure_deepspeed_dist(device)
    torch.manual_seed(seed)
    with device:
        expert = nn.Sequential(
            nn.Linear(cfg.H, cfg.F, bias=False), nn.GELU(approximate="tanh"), nn.Linear(cfg.F, cfg.H, bias=False)
        ).to(dtype)
        layer = MoE(
            hidden_size=cfg.H,
            expert=expert,
            num_experts=cfg.E,
            ep_size=1,
            k=cfg.k,
            capacity_factor=1.0,
            eval_capacity_factor=1.0,
            drop_tokens=drop_tokens,
        )
    del expert
    init_params_(layer, seed)
    layer = layer.to(dtype)
    layer.set_deepspeed_parallelism()
    return Bench(layer, layer)  # returns (output, l_aux, exp_counts); the timer takes the first


def build_dense(cfg: BenchConfig, device, dtype, seed: int) -> Bench:
    """T*k tokens through one MLP of width F: the experts' matmul FLOPs without any routing."""
    torch.manual_seed(seed)
    glu = cfg.activation == "swiglu"
    with device:
        up = nn.Linear(cfg.H, 2 * cfg.F if glu else cfg.F, bias=False)  # SwiGLU: gate and up in one GEMM
        down = nn.Linear(cfg.F, cfg.H, bias=False)
    module = nn.ModuleDict({"up": up, "down": down})
    init_params_(module, seed)
    module = module.to(dtype)

    def fn(x):
        h = module["up"](x)
        if glu:
            gate, lin = h.chunk(2, dim=-1)
            h = F.silu(gate) * lin
        else:
            h = F.gelu(h, approximate="tanh")
        return module["down"](h)

    return Bench(module, fn, x=make_input(cfg.T * cfg.k, cfg.H, device, dtype, seed + 1))


def contenders_for(cfg: BenchConfig) -> dict[str, Callable]:
    common = {
        "ours-megablocks": lambda *a: build_ours(*a, backend="megablocks"),
        "ours-mb-sparse": lambda *a: build_ours(*a, backend="megablocks", megablocks_impl="sparse"),
        "ours-mb-gmm": lambda *a: build_ours(*a, backend="megablocks", megablocks_impl="grouped_mm"),
        "ours-torch": lambda *a: build_ours(*a, backend="torch"),
        "ours-auto": lambda *a: build_ours(*a, backend="auto"),
    }
    if cfg.activation == "swiglu":
        return {
            **common,
            "hf-eager": build_hf_eager,
            "deepspeed-autoep": build_autoep,
            "megablocks-dmoe": build_megablocks_dmoe,
            "dense-swiglu": build_dense,
        }
    return {
        **common,
        "megablocks-dmoe": build_megablocks_dmoe,
        "ds-moe-cap1.0": lambda *a: build_ds_moe(*a, drop_tokens=True),
        "ds-moe-dropless": lambda *a: build_ds_moe(*a, drop_tokens=False),
        "dense-gelu": build_dense,
    }


# ----------------------------------------------------------------------------------------------------------------
# Driver


def print_profile(
    fn: Callable, x: torch.Tensor, params: tuple[torch.Tensor, ...], iters: int, title: str, rows: int = 18
) -> None:
    """Where the time goes: ``iters`` more forward + backward steps under torch.profiler
    (``profiling.kernels.profile_steps``: kernels per step, GPU busy vs wall, idle gaps, top ops by self time)."""
    from profiling.kernels import profile_steps

    def step():  # time_fwd_bwd's step, without its syncs: the profile's wall is the steps' own
        for t in (x, *params):
            t.grad = None
        fwd_bwd(fn, x)

    print("\n".join(profile_steps(step, iters, x.device.type == "cuda", title, rows)), flush=True)


def run_one(cfg: BenchConfig, name: str, builder: Callable, args, device, dtype) -> dict:
    """Build, time and free one contender; a failure becomes {"error": ...}."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bench = x = None
    try:
        bench = builder(cfg, device, dtype, args.seed)
        x = bench.x if bench.x is not None else make_input(cfg.T, cfg.H, device, dtype, args.seed + 1)
        params = tuple(p for p in bench.module.parameters() if p.requires_grad)
        times = time_fwd_bwd(bench.fn, x, args.iters, warmup=args.warmup, params=params)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        result = {"times_ms": times, "peak_gib": peak}
        print(f"  {cfg.name:<16} {name:<17} median {statistics.median(times):9.3f} ms", flush=True)
        if args.profile:
            print_profile(bench.fn, x, params, args.profile, f"{cfg.name} {name}", args.profile_rows)
    except Exception as error:  # ImportError, OOM, unsupported: report and go on
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        reason = reason[:200]
        print(f"  {cfg.name:<16} {name:<17} FAILED {reason}", flush=True)
        if args.verbose:
            import traceback

            traceback.print_exc()
        result = {"error": reason}
    del bench, x
    free_memory(device)
    return result


def summarize(runs: list[dict], flops: float) -> dict:
    ok = [r for r in runs if "times_ms" in r]
    if not ok:
        errors = sorted({r["error"] for r in runs})
        return {"error": "; ".join(errors)}
    every = [t for r in ok for t in r["times_ms"]]
    median = statistics.median(every)
    return {
        "median_ms": median,
        "min_ms": min(every),
        "max_ms": max(every),
        "run_medians_ms": [statistics.median(r["times_ms"]) for r in ok],
        "tflops": flops / (median * 1e-3) / 1e12,
        "peak_gib": max((r["peak_gib"] for r in ok if r["peak_gib"] is not None), default=None),
        "failed_runs": len(runs) - len(ok),
    }


def markdown_table(configs: list[BenchConfig], summary: dict, repeats: int) -> str:
    head = ["config", "contender", "median ms", "spread ms (min–max)"]
    if repeats > 1:
        head.append("per-run medians ms")
    head += ["TFLOP/s", "time / dense", "peak GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for cfg in configs:
        rows = summary[cfg.name]
        dense = next((s for n, s in rows.items() if n.startswith("dense") and "median_ms" in s), None)
        for name, s in rows.items():
            if "error" in s:
                cells = [cfg.name, name, f"n/a ({s['error']})", ""] + ([""] if repeats > 1 else []) + ["", "", ""]
            else:
                cells = [cfg.name, name, f"{s['median_ms']:.3f}", f"{s['min_ms']:.3f}–{s['max_ms']:.3f}"]
                if repeats > 1:
                    cells.append(" / ".join(f"{m:.3f}" for m in s["run_medians_ms"]))
                ratio = f"{s['median_ms'] / dense['median_ms']:.2f}x" if dense else "n/a"
                peak = f"{s['peak_gib']:.1f}" if s["peak_gib"] is not None else ""
                cells += [f"{s['tflops']:.1f}" if s["tflops"] >= 0.1 else f"{s['tflops']:.4f}", ratio, peak]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": str(dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }
    for pkg in ("deepspeed", "megablocks", "transformers", "grouped_gemm"):
        with contextlib.suppress(Exception):
            env[pkg] = getattr(__import__(pkg), "__version__", "installed")
    return env


def notes_text(args) -> str:
    return "\n".join(
        [
            f"Forward + backward of one block, loss = out.float().square().mean(); {args.warmup} warm-up iterations, "
            f"{args.iters} timed per run, {args.repeats} run(s); CUDA-event time per iteration.",
            "TFLOP/s = expert-matmul FLOPs / median time, FLOPs = 3 * 2 * T * k * H * F * (3 SwiGLU | 2 GELU); "
            "router FLOPs ignored. `time / dense` = median / median of the dense MLP of equal FLOPs "
            "(T*k tokens, width F).",
            "ds-moe rows compute on [E, capacity, H] buffers: cap1.0 drops overflow tokens (about k*T rows computed), "
            "dropless pads every expert to the busiest one (more than k*T rows); TFLOP/s still counts k*T useful rows.",
        ]
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Configs (T, H, F, E, k): "
        + "; ".join(f"{c.name} {c.activation} ({c.T}, {c.H}, {c.F}, {c.E}, {c.k})" for c in CONFIGS.values()),
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        default=list(CONFIGS),
        choices=list(CONFIGS),
        metavar="NAME",
        help=f"subset of configs (default: all): {', '.join(CONFIGS)}",
    )
    parser.add_argument(
        "--contenders",
        nargs="+",
        default=None,
        metavar="NAME",
        help="only contenders whose name contains one of these strings (dense rows always run)",
    )
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per contender and run (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up iterations (default 3)")
    parser.add_argument("--repeats", type=int, default=1, help="run the whole table R times (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"tiny sizes {SMOKE_SIZES} to test the plumbing (e.g. --device cpu --dtype float32)",
    )
    parser.add_argument("--markdown", metavar="PATH", help="also write the table as Markdown")
    parser.add_argument("--json", metavar="PATH", help="also write the raw numbers as JSON")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of failing contenders")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, profile N more steps of each contender and print its top ops (torch.profiler)",
    )
    parser.add_argument("--profile-rows", type=int, default=18, help="rows of each profile table (default 18)")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--iters and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU visible; for the CPU plumbing test use --smoke --device cpu --dtype float32")
        device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    configs = [CONFIGS[n] for n in args.configs]
    if args.smoke:
        configs = [replace(c, name=f"{c.name}[smoke]", **SMOKE_SIZES) for c in configs]

    env = environment(device, dtype)
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    raw: dict[str, dict[str, list[dict]]] = {c.name: {} for c in configs}
    for repeat in range(args.repeats):
        print(f"run {repeat + 1}/{args.repeats}", flush=True)
        for cfg in configs:
            for name, builder in contenders_for(cfg).items():
                if args.contenders and not name.startswith("dense") and not any(s in name for s in args.contenders):
                    continue
                raw[cfg.name].setdefault(name, []).append(run_one(cfg, name, builder, args, device, dtype))

    summary = {
        cfg.name: {name: summarize(runs, cfg.flops()) for name, runs in raw[cfg.name].items()} for cfg in configs
    }
    table = markdown_table(configs, summary, args.repeats)
    notes = notes_text(args)
    print()
    print(table)
    print()
    print(notes)

    if args.markdown:
        shapes = "\n".join(f"- `{c.name}`: {c.activation}, T={c.T} H={c.H} F={c.F} E={c.E} k={c.k}" for c in configs)
        command = "python benchmarks/layer_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
        text = (
            f"# MoE layer benchmark\n\nCommand: `{command}`\n\nEnvironment: "
            + ", ".join(f"{k} {v}" for k, v in env.items())
            + f"\n\nConfigs (T tokens, H hidden, F expert ffn, E experts, k top-k):\n{shapes}\n\n{table}\n\n"
            + notes.replace("\n", "\n\n")
            + "\n"
        )
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text)
        print(f"\nwrote {args.markdown}")
    if args.json:
        payload = {
            "environment": env,
            "args": vars(args),
            "configs": [asdict(c) | {"flops": c.flops()} for c in configs],
            "summary": summary,
            "runs": raw,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
