"""How fast this GPU converts between bf16 and float32: the copies a ZeRO optimizer step makes every step.

For one flat tensor of ``--elements`` elements it times each way of converting (CUDA events, median of ``--iters``
after warm-up), prints ms, effective bandwidth (bytes read + written over time) and the kernel torch ran. The rows
that matter for c2r (docs/gpu_runs.md): torch's ``.to()``/``copy_`` from bf16 to float32 runs an unrolled,
unvectorised kernel, ``torch._foreach_copy_`` a vectorised multi-tensor one (c2r/deepspeed/fp32_grads.py uses it),
a triton kernel is the bound of a plain elementwise cast.

    source .device/setup.sh && python benchmarks/cast_copy_bench.py
"""

from __future__ import annotations

import argparse
import statistics

import torch


def triton_cast():
    """A plain triton elementwise cast ``dst[:] = src`` (the bound for this copy), or None without triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def cast(src, dst, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(dst + offsets, tl.load(src + offsets, mask=mask).to(dst.dtype.element_ty), mask=mask)

    def run(dst, src):
        cast[(triton.cdiv(src.numel(), 4096),)](src, dst, src.numel(), BLOCK=4096)

    return run


def kernel_name(fn) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages() if e.device_type.name == "CUDA"]
    return names[0] if names else "?"


def time_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, default=400 * 2**20, help="elements of the tensor (default 400 Mi)")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per row (default 20)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("cast_copy_bench.py measures a GPU's copy kernels; no CUDA device here")
    n = args.elements
    bf16 = torch.randn(n + 8, device="cuda").bfloat16()
    fp32 = torch.empty(n + 8, device="cuda")
    tri = triton_cast()
    rows = {
        "bf16 -> fp32, copy_": lambda: fp32[:n].copy_(bf16[:n]),
        "bf16 -> fp32, .to()": lambda: bf16[:n].to(torch.float32),
        "bf16 -> fp32, offset by 1 element": lambda: fp32[1 : n + 1].copy_(bf16[1 : n + 1]),
        "bf16 -> fp32, torch._foreach_copy_": lambda: torch._foreach_copy_([fp32[:n]], [bf16[:n]]),
        "fp32 -> bf16, copy_": lambda: bf16[:n].copy_(fp32[:n]),
        "fp32 -> bf16, offset by 1 element": lambda: bf16[1 : n + 1].copy_(fp32[1 : n + 1]),
        "fp32 -> bf16, torch._foreach_copy_": lambda: torch._foreach_copy_([bf16[:n]], [fp32[:n]]),
    }
    if tri is not None:
        rows["bf16 -> fp32, triton"] = lambda: tri(fp32[:n], bf16[:n])
        rows["fp32 -> bf16, triton"] = lambda: tri(bf16[:n], fp32[:n])
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {n:,} elements, median of {args.iters}")
    print(f"| {'copy':<36} | ms | TB/s | kernel |\n| --- | --- | --- | --- |")
    for name, fn in rows.items():
        ms = time_ms(fn, args.iters)
        print(f"| {name:<36} | {ms:.3f} | {n * 6 / ms / 1e9:.2f} | `{kernel_name(fn)[:70]}` |")


if __name__ == "__main__":
    main()
