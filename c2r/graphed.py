"""Small fixed-shape device loops replayed from CUDA graphs: the host issues one replay instead of every kernel.

Why: a loop of a few dozen tiny kernels per layer forward (the router's batch balancing, the balanced copy shares)
costs the host one launch per kernel, and at 8k tokens a step the ~1B model's forward is bound by those launches
(docs/gpu_runs.md). A CUDA graph per (function, input shapes and dtypes, static arguments, device), captured at its
first use and shared by every layer of that shape, computes exactly what the eager loop computes (tests/test_gpu.py).
Where the inputs are not on the current GPU, a capture is already running, the graph cache is full (varying shapes)
or the capture fails (a warning, once per key), the function runs eagerly: correct, only slower.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

MAX_GRAPHS = 32  # distinct keys kept (a few shapes per model); more run eagerly


class GraphedFunction:
    """``fn(*inputs, **static)`` captured once in a CUDA graph for inputs of these shapes and dtypes, replayed."""

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], static: dict):
        device = inputs[0].device
        self.fn = functools.partial(fn, **static)
        with torch.cuda.device(device):  # the capture stream and every kernel on this GPU
            self.inputs = tuple(x.detach().clone() for x in inputs)  # real values: the warm-up runs on them
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graphs asks
                self.fn(*self.inputs)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: another thread's CUDA calls (a data loader, NCCL's) do not break this capture
            with torch.cuda.graph(self.graph, stream=torch.cuda.Stream(device), capture_error_mode="thread_local"):
                self.output = self.fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for buffer, x in zip(self.inputs, inputs):
            buffer.copy_(x)
        self.graph.replay()
        return self.output.clone()  # the next replay (another layer) overwrites the graph's output


_GRAPHS: dict[tuple, GraphedFunction | None] = {}  # None: capture failed for that key; the eager call runs instead


def graphed_call(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor, **static) -> torch.Tensor:
    """``fn(*inputs, **static)``, from a CUDA graph where every input is on the current GPU (module docstring);
    ``static``: hashable arguments that select the graph (loop counts, sizes)."""
    inputs = tuple(x.detach() for x in inputs)  # a graph's input buffers must not join an autograd graph
    device = inputs[0].device
    on_current_gpu = device.type == "cuda" and device.index == torch.cuda.current_device()
    if not on_current_gpu or any(x.device != device for x in inputs) or torch.cuda.is_current_stream_capturing():
        return fn(*inputs, **static)
    key = (fn, tuple((tuple(x.shape), x.dtype) for x in inputs), tuple(sorted(static.items())), device)
    if key not in _GRAPHS and len(_GRAPHS) < MAX_GRAPHS:
        try:
            _GRAPHS[key] = GraphedFunction(fn, inputs, static)
        except RuntimeError as error:  # a CUDA build or mode that refuses graphs: correct, only slower
            log.warning("%s: CUDA graph capture failed (%s); running eagerly", fn.__name__, error)
            _GRAPHS[key] = None
    graphed = _GRAPHS.get(key)
    return fn(*inputs, **static) if graphed is None else graphed(*inputs)
