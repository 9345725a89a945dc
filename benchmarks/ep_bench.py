"""One expert-parallel MoE layer, forward + backward, on N ranks: c2r's dispatch modes and placements side by side
with MegaBlocks' and DeepSpeed's own expert parallelism.

What it measures: per contender, the wall time of ``out = layer(x); (out.float() * g).sum().backward()`` on every
rank (CUDA events on GPUs, the host clock on CPUs), after warm-up, in ``--rounds`` rounds of ``--iters`` steps; a
step's time is the slowest rank's. Reported per contender: ms (median over all steps, min-max, each round's median),
token copies sent per token and cross-rank bytes per token (what the dispatch reported), the ranks' expert load
max/mean ((token, expert) pairs each rank computes: the step waits for the busiest), all-to-all time (every
exchange, forward and backward, timed by the dispatcher's observer) and its share of the step, host syncs in one
forward (torch's CUDA sync debug mode; 0 on CPUs), peak memory (CUDA only).

Routing: ``synthetic`` feeds every contender that accepts a routing the same structured routing
(placement/synthetic.py: Zipf popularity, clustered co-activation, so that placement matters); ``router`` lets each
layer route with its own top-k router (c2r's, MegaBlocks', DeepSpeed's gate; DeepSpeed's top-2 without its default
Gumbel sampling of the second expert, so that every contender routes top-k). The planned placement is planned by
placement's planner (Mt-KaHyPar, or ``--plan-method``) from a separate synthetic sample of the same structure (at
most ``--plan-tokens`` tokens, seed 1; the measured routing uses seed 0); the capped one is planned the same way
under a load cap (every rank's load on the sample at most 1.10 x the mean, as ``c2r-place plan --max-load 1.10``);
the replicated one keeps the planned homes and adds 2 replica slots per rank for the sample's hottest experts (the
skewed-load case replication is for: placement/replicate.py); the balanced one gives every expert a partner copy (P
= 2E, as ``c2r-place plan --replicas 2E``) and dispatches with ``copy_choice="balanced"`` (shares that level the
ranks per batch: c2r/parallel/replicas.py). Only the layouts a requested contender uses are planned, on rank 0 (the
seconds each took go to stderr). These plans are made from the synthetic routing, so their rows run under
``synthetic`` routing only (under ``router`` they are reported as skipped, with the reason). A planner that fails
stops the run in one line when ``--plan-method`` was given; without it, ep_bench warns on stderr, plans with the
greedy method and says so in the table's plan column.

Output: each row is printed as it completes (``row | ...`` on stdout, flushed) and ``--json`` is rewritten after
every contender (``"complete": false`` until the end), so a run cut short keeps what it measured; the whole table is
printed at the end. With ``--gpus-per-node`` below the world size, "inter-node KiB/token" is what crosses nodes; on
per-node rows "copies/token" and "remote KiB/token" add both stages (the network hop and the hop within the node),
so compare their inter-node column with the other modes'.

Contenders (``--contenders``, default all):
    c2r-{per-expert,per-rank,per-node}-{contiguous,planned,capped,replicated,balanced}   (per-node: nodes of
                        --gpus-per-node ranks)
    c2r-{per-expert,per-rank}-{contiguous,planned}-overlap{2,4}   the same in 2 or 4 token chunks whose exchanges
                        overlap the expert compute (c2r/parallel/overlap.py); their all-to-all time is the exposed
                        part only (the waits), so "a2a ms" there is what compute did not hide
    single-device       the layer with all E experts on each rank, its own tokens only (no expert parallelism)
    raw-all-to-all      four all_to_all_single of T*k rows (what per-expert dispatch moves per step), evenly split
    megablocks-dmoe-ep  megablocks.layers.dmoe.dMoE with expert_parallel_group (GPU only)
    deepspeed-moe-ep    deepspeed.moe.layer.MoE with ep_size N, drop_tokens=False, top2_2nd_expert_sampling=False
                        (its own gate: router routing only)
A contender that cannot run here (no GPU, a package missing, a routing it cannot take) is reported as skipped with the
reason.

Run on 2 GPUs (from the repository root):
    python -m torch.distributed.run --nproc_per_node 2 benchmarks/ep_bench.py --configs deepseek-like qwen3-like \\
        mixtral-like --rounds 3 --iters 30 --json ep_bench.json
Where one contender's time goes (kernels, GPU idle gaps, top ops), on one GPU or several:
    python -m torch.distributed.run --nproc_per_node 1 benchmarks/ep_bench.py --configs deepseek-like \
        --routing synthetic --contenders c2r-per-expert-contiguous c2r-per-rank-contiguous --profile 3
CPU smoke (gloo; what tests/test_ep_bench.py runs):
    python -m torch.distributed.run --nproc_per_node 2 benchmarks/ep_bench.py --device cpu --dtype float32 \\
        --configs tiny --rounds 1 --iters 2

Shape legend: the package legend (c2r/__init__.py): T tokens per rank, D hidden, F expert ffn, E experts, K top-k.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # c2r and placement from this checkout

from c2r.experts import ExpertConfig, ExpertShape, ExpertWeights, build_backend, resolve_expert_config  # noqa: E402
from c2r.experts.megablocks_backend import megablocks_unavailable_reason  # noqa: E402
from c2r.experts.slot_rows import count_keys  # noqa: E402
from c2r.moe import MoEConfig, MoELayer  # noqa: E402
from c2r.parallel import build_dispatcher, local_expert_weights, shard_experts  # noqa: E402
from c2r.routing import RouterConfig, RoutingResult  # noqa: E402
from placement.inputs import LayerRouting, routing_from_expert_ids  # noqa: E402
from placement.layout import ExpertLayout  # noqa: E402
from placement.methods import plan_layer, plan_placement  # noqa: E402
from placement.replicate import replicate_layer  # noqa: E402
from placement.synthetic import synthetic_expert_ids  # noqa: E402
from profiling.files import atomic_write_text  # noqa: E402
from profiling.host_syncs import count_host_syncs  # noqa: E402
from profiling.kernels import profile_steps  # noqa: E402

STRUCTURE_SEED = 11  # popularity and clusters of the synthetic routing; token draws vary by seed
C2R_CONTENDERS = [
    f"c2r-{mode}-{layout}"
    for layout in ("contiguous", "planned", "capped", "replicated", "balanced")
    for mode in ("per-expert", "per-rank", "per-node")
]
REPLICA_SLOTS_PER_RANK = 2  # the replicated layout: the planned homes + 2 replica slots per rank (P = E + 2 R)
REPLICA_TARGET = 1.05  # rank load max/mean the replicas aim for on the planning sample (c2r-place plan --max-load)
LOAD_CAP = 1.10  # the capped layout's rank load max/mean on the planning sample (c2r-place plan's default --max-load)
PLAN_LAYOUTS = ("planned", "capped", "replicated", "balanced")  # planned on rank 0 from a synthetic sample
DEFAULT_PLAN_METHOD = "kahypar"
# Planning tokens: on 8 ranks every layout planned on all 8 x 16384 tokens took 136 s (DeepSeek-like) and 195 s
# (Qwen3-like) of one CPU core; on 32768 tokens 2-4 s to plan, 8-9 s to cap, 11-16 s for E + 2R slots and 18-30 s for
# 2E, with plans as good on the measured routing (docs/benchmarks.md)
PLAN_TOKENS = 32768
OVERLAP_CHUNKS = (2, 4)  # c2r/parallel/overlap.py: per-expert and per-rank dispatch in C chunks
C2R_CONTENDERS += [
    f"c2r-{mode}-{layout}-overlap{chunks}"
    for layout in ("contiguous", "planned")
    for mode in ("per-expert", "per-rank")
    for chunks in OVERLAP_CHUNKS
]
CONTENDERS = [*C2R_CONTENDERS, "single-device", "raw-all-to-all", "megablocks-dmoe-ep", "deepspeed-moe-ep"]


@dataclass(frozen=True)
class EPConfig:
    name: str
    activation: str
    T: int  # tokens per rank
    D: int
    F: int
    E: int
    K: int


CONFIGS = {
    c.name: c
    for c in (
        EPConfig("deepseek-like", "gelu", T=16384, D=2048, F=1024, E=64, K=8),
        EPConfig("qwen3-like", "swiglu", T=16384, D=2048, F=768, E=128, K=8),
        EPConfig("mixtral-like", "swiglu", T=8192, D=4096, F=14336, E=8, K=2),
        EPConfig("tiny", "gelu", T=64, D=32, F=16, E=8, K=2),
        EPConfig("tiny-swiglu", "swiglu", T=64, D=32, F=16, E=16, K=4),
        # big enough rows that bandwidth shows beside latency on CPU ranks, small enough for a shared 2-core machine
        # (docs/scaling.md validates c2r-place simulate on it)
        EPConfig("cpu-small", "gelu", T=1024, D=256, F=64, E=16, K=4),
    )
}


class Skip(Exception):
    """A contender that cannot run here; the message says why."""


class ExchangeClock:
    """A dispatch observer: times every exchange (forward and backward) and keeps the last forward's counts."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list = []
        self.meta = None

    def start(self, name):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, begin):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.spans.append((begin, end))
        else:
            self.spans.append((time.perf_counter() - begin) * 1e3)

    def on_dispatch(self, meta):
        self.meta = meta

    def take_ms(self) -> float:
        """Total exchange time since the last call (after a device sync)."""
        total = sum(s[0].elapsed_time(s[1]) if self.cuda else s for s in self.spans)
        self.spans = []
        return total


@dataclass
class Contender:
    step: Callable[[torch.Tensor], torch.Tensor]  # x_TD -> out_TD
    params: list[torch.Tensor]  # gradients reset between steps
    clock: ExchangeClock | None = None
    info: dict = field(default_factory=dict)  # settings worth keeping in the row (e.g. DeepSpeed's gate)


# ---- routing and placement ---------------------------------------------------------------------------------------


def synthetic_routing(cfg: EPConfig, rank: int, world: int, device, seed: int) -> RoutingResult:
    """This rank's slice of one structured routing of world * T tokens (plain top-k: every slot valid)."""
    ids = synthetic_expert_ids(world * cfg.T, cfg.E, cfg.K, seed=seed, structure_seed=STRUCTURE_SEED)
    ids_TK = torch.from_numpy(ids[rank * cfg.T : (rank + 1) * cfg.T].astype("int64")).to(device)
    logits = torch.randn(cfg.T, cfg.K, generator=torch.Generator().manual_seed(seed + rank)).to(device)
    weights_TK = logits.softmax(-1).requires_grad_(True)  # a leaf: its gradient is the router's
    valid_TK = torch.ones_like(ids_TK, dtype=torch.bool)
    return RoutingResult(
        ids_TK, weights_TK, valid_TK, torch.zeros((), device=device), count_keys(ids_TK, valid_TK, cfg.E), fixed_k=True
    )


def plan_sample(cfg: EPConfig, world: int, max_tokens: int) -> LayerRouting:
    """The planning sample: min(world x T, ``max_tokens``) tokens of the benchmark's synthetic routing structure,
    drawn with seed 1 (the measured routing uses seed 0)."""
    ids = synthetic_expert_ids(min(world * cfg.T, max_tokens), cfg.E, cfg.K, seed=1, structure_seed=STRUCTURE_SEED)
    return routing_from_expert_ids(ids, cfg.E)


def plan_layouts(
    sample: LayerRouting, cfg: EPConfig, world: int, nodes: int, method: str, needed: set[str]
) -> tuple[dict[str, list | None], dict[str, float]]:
    """The ``needed`` layouts (of ``PLAN_LAYOUTS``) planned on ``sample`` with ``method``, as JSON, and the seconds
    each took. planned: the plan (with ``nodes`` > 1 the two-level one: nodes, then ranks); capped: the plan under
    ``LOAD_CAP``; replicated: the planned homes + ``REPLICA_SLOTS_PER_RANK`` replica slots per rank toward
    ``REPLICA_TARGET`` (as ``c2r-place plan --replicas``); balanced: the homes with 2E slots (every expert twice).
    Replicas are None on one rank (it holds every expert already)."""
    saved: dict[str, list | None] = {}
    seconds: dict[str, float] = {}
    homes = None
    if needed & {"planned", "replicated", "balanced"}:
        begin = time.perf_counter()
        homes = ExpertLayout(tuple(plan_layer(sample, world, nodes, method=method).tolist()), world)
        saved["planned"], seconds["planned"] = homes.to_json(), time.perf_counter() - begin
    if "capped" in needed:
        begin = time.perf_counter()
        capped = plan_placement([sample], world, nodes, method=method, max_load=LOAD_CAP, progress=False)[0]
        saved["capped"], seconds["capped"] = capped.to_json(), time.perf_counter() - begin
    for name, slots in (("replicated", cfg.E + REPLICA_SLOTS_PER_RANK * world), ("balanced", 2 * cfg.E)):
        if name in needed:
            begin = time.perf_counter()
            replicas = replicate_layer(sample, homes, slots, REPLICA_TARGET) if world > 1 else None
            saved[name], seconds[name] = replicas and replicas.to_json(), time.perf_counter() - begin
    return saved, seconds


def plan_on_rank0(cfg: EPConfig, world: int, nodes: int, needed: set[str], args) -> tuple[dict, str, str | None]:
    """(layouts as JSON, the method that planned them, the line that stops the run or None). A planner named with
    ``--plan-method`` that fails stops the run: its rows under another plan's name would mislead; the default one
    falls back to greedy (which needs no package), with a warning, and the label says so."""
    method = args.plan_method or DEFAULT_PLAN_METHOD
    sample = plan_sample(cfg, world, args.plan_tokens)
    try:
        saved, seconds = plan_layouts(sample, cfg, world, nodes, method, needed)
        used = method
    except Exception as error:  # e.g. mtkahypar missing on this machine
        why = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        if args.plan_method:
            return {}, method, f"ep_bench: --plan-method {method} failed on {cfg.name}: {why}"
        print(f"ep_bench: WARNING: the {method} planner failed on {cfg.name} ({why}); planning with greedy instead",
              file=sys.stderr, flush=True)  # fmt: skip
        saved, seconds = plan_layouts(sample, cfg, world, nodes, "greedy", needed)
        used = f"greedy ({method} failed)"
    took = ", ".join(f"{name} {s:.1f} s" for name, s in seconds.items())
    print(f"ep_bench: {cfg.name}: planned on {sample.num_tokens} synthetic tokens ({used}): {took}",
          file=sys.stderr, flush=True)  # fmt: skip
    return saved, used, None


def planned_layouts(cfg: EPConfig, world: int, nodes: int, needed: set[str], args) -> tuple[dict, str]:
    """The ``needed`` layouts (`plan_on_rank0`, broadcast to every rank) and the method that planned them."""
    box: list = [None]
    if dist.get_rank() == 0:
        box[0] = plan_on_rank0(cfg, world, nodes, needed, args)
    dist.broadcast_object_list(box, src=0)
    saved, used, failed = box[0]
    if failed:
        stop_run(failed)
    layouts = {name: data and ExpertLayout.from_json(data, world, cfg.E) for name, data in saved.items()}
    return layouts, used


def stop_run(line: str) -> None:
    """Every rank ends the run, rank 0 saying why in ``line`` (rc 2): what was measured before is in --json."""
    if dist.get_rank() == 0:
        print(line, file=sys.stderr, flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(2)


# ---- contenders --------------------------------------------------------------------------------------------------


def expert_weights(cfg: EPConfig, device, dtype, seed: int) -> ExpertWeights:
    torch.manual_seed(seed)
    with device:
        return ExpertWeights(cfg.E, cfg.D, cfg.F, cfg.activation).to(dtype)


def c2r_backend(cfg: EPConfig, device, dtype, name: str, local_experts: int):
    """``auto`` resolved as a layer computing ``local_experts`` experts of this shape resolves it."""
    config = ExpertConfig(activation=cfg.activation, backend=name)
    shape = ExpertShape(local_experts, cfg.D, cfg.F)
    config = resolve_expert_config(config, device, dtype, shape)
    return build_backend(config.backend, config)


def parse_c2r(name: str) -> tuple[str, str, int]:
    """``c2r-per-rank-planned-overlap2`` -> ("per-rank", "planned", 2); no ``-overlapN``: 1 chunk."""
    parts = name.split("-")  # c2r, per, MODE, LAYOUT[, overlapN]
    chunks = int(parts[4].removeprefix("overlap")) if len(parts) > 4 else 1
    return f"{parts[1]}-{parts[2]}", parts[3], chunks


def build_c2r(
    cfg, device, dtype, args, routing, mode: str, layout: ExpertLayout, chunks: int = 1, copy_choice: str = "rule"
) -> Contender:
    clock = ExchangeClock(device)
    if routing is None:  # c2r's own top-k router
        torch.manual_seed(args.seed)
        router = RouterConfig(check_finite=False, logits_dtype="input")
        moe = MoEConfig(
            num_experts=cfg.E,
            top_k=cfg.K,
            ffn_hidden_size=cfg.F,
            router=router,
            experts=ExpertConfig(activation=cfg.activation, backend=args.backend),
        )
        with device:
            layer = MoELayer(cfg.D, moe).to(dtype)
        shard_experts(
            layer,
            layout,
            mode=mode,
            observers=[clock],
            ranks_per_node=args.gpus_per_node,
            overlap_chunks=chunks,
            copy_choice=copy_choice,
        )
        return Contender(lambda x: layer(x)[0], list(layer.parameters()), clock)
    experts = local_expert_weights(expert_weights(cfg, device, dtype, args.seed), layout.local_experts(dist.get_rank()))
    dispatcher = build_dispatcher(
        mode, layout, None, clock, ranks_per_node=args.gpus_per_node, overlap_chunks=chunks, copy_choice=copy_choice
    )
    backend = c2r_backend(cfg, device, dtype, args.backend, experts.num_experts)
    return Contender(
        lambda x: dispatcher(x, routing, backend, experts), [*experts.parameters(), routing.weights_TK], clock
    )


def build_single_device(cfg, device, dtype, args, routing) -> Contender:
    if routing is None:
        torch.manual_seed(args.seed)
        moe = MoEConfig(
            num_experts=cfg.E,
            top_k=cfg.K,
            ffn_hidden_size=cfg.F,
            router=RouterConfig(check_finite=False, logits_dtype="input"),
            experts=ExpertConfig(activation=cfg.activation, backend=args.backend),
        )
        with device:
            layer = MoELayer(cfg.D, moe).to(dtype)
        return Contender(lambda x: layer(x)[0], list(layer.parameters()))
    experts = expert_weights(cfg, device, dtype, args.seed)
    backend = c2r_backend(cfg, device, dtype, args.backend, cfg.E)
    return Contender(lambda x: backend(x, routing, experts), [*experts.parameters(), routing.weights_TK])


def build_raw_all_to_all(cfg, device, dtype, args, routing) -> Contender:
    world = dist.get_world_size()
    rows = cfg.T * cfg.K // world * world
    buffer = torch.randn(rows, cfg.D, device=device).to(dtype)
    out = torch.empty_like(buffer)
    clock = ExchangeClock(device)

    def step(x):
        for _ in range(4):  # dispatch and combine, forward and backward
            handle = clock.start("all_to_all")
            dist.all_to_all_single(out, buffer)
            clock.stop(handle)
        return x * 1  # something to call backward on

    return Contender(step, [], clock)


class _FixedMegaBlocksRouter(nn.Module):
    """Hands MegaBlocks' dMoE the benchmark's routing: (scores [T, E], weights [T, K], expert ids [T, K])."""

    def __init__(self, routing: RoutingResult, num_experts: int, dtype):
        super().__init__()
        self.routing, self.num_experts, self.dtype = routing, num_experts, dtype

    def forward(self, x):
        T = self.routing.num_tokens
        scores = torch.full((T, self.num_experts), 1.0 / self.num_experts, device=x.device, dtype=self.dtype)
        return scores, self.routing.weights_TK.to(self.dtype), self.routing.expert_ids_TK


def build_megablocks_ep(cfg, device, dtype, args, routing) -> Contender:
    if device.type != "cuda":
        raise Skip("MegaBlocks needs a CUDA GPU")
    reason = megablocks_unavailable_reason()
    if reason:
        raise Skip(reason)
    from megablocks.layers import moe as mb_moe
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import dMoE

    torch.manual_seed(args.seed)
    glu = cfg.activation == "swiglu"
    extra = {"activation_fn": F.silu} if glu else {}
    margs = Arguments(
        mlp_type="glu" if glu else "mlp",
        mlp_impl="grouped",
        bf16=dtype == torch.bfloat16,
        fp16=False,
        moe_num_experts=cfg.E,
        moe_top_k=cfg.K,
        hidden_size=cfg.D,
        ffn_hidden_size=cfg.F,
        bias=False,
        return_bias=False,
        device=device,
        moe_expert_model_parallelism=True,
        expert_parallel_group=dist.group.WORLD,
        **extra,
    )
    layer = dMoE(margs).to(dtype)
    params = list(layer.parameters())
    if routing is not None:
        layer.router = _FixedMegaBlocksRouter(routing, cfg.E, dtype)
        params.append(routing.weights_TK)

    def step(x):
        out = layer(x.view(cfg.T, 1, cfg.D)).view(cfg.T, cfg.D)  # MegaBlocks wants [sl, bs, hs]
        mb_moe.clear_load_balancing_loss()
        return out

    return Contender(step, params)


class _SwiGLU(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate, self.up, self.down = (
            nn.Linear(d, f, bias=False),
            nn.Linear(d, f, bias=False),
            nn.Linear(f, d, bias=False),
        )

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def build_deepspeed_ep(cfg, device, dtype, args, routing) -> Contender:
    if routing is not None:
        raise Skip("DeepSpeed's MoE routes with its own gate: run with --routing router")
    try:
        import deepspeed
        from deepspeed.moe.layer import MoE

        from c2r.deepspeed.setup import release_shm_buffer
    except ImportError as error:
        raise Skip(f"deepspeed is not importable ({error})") from None
    # DeepSpeed's top-2 gate draws the second expert with Gumbel noise by default (top2_2nd_expert_sampling):
    # another routing each step, and other capacities, than the top-k every other contender runs
    deterministic = {"top2_2nd_expert_sampling": False}
    if "top2_2nd_expert_sampling" not in inspect.signature(MoE).parameters:
        if cfg.K == 2:
            raise Skip(f"deepspeed {deepspeed.__version__}'s MoE always samples its second expert (top-2)")
        deterministic = {}
    deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
    release_shm_buffer()  # on CPU ranks of one machine DeepSpeed maps a shared buffer a rank; don't leave its name
    torch.manual_seed(args.seed)
    with device:
        if cfg.activation == "swiglu":
            expert = _SwiGLU(cfg.D, cfg.F)
        else:
            expert = nn.Sequential(
                nn.Linear(cfg.D, cfg.F, bias=False), nn.GELU(approximate="tanh"), nn.Linear(cfg.F, cfg.D, bias=False)
            )
        layer = MoE(
            hidden_size=cfg.D,
            expert=expert.to(dtype),
            num_experts=cfg.E,
            ep_size=dist.get_world_size(),
            k=cfg.K,
            drop_tokens=False,
            use_rts=False,
            **deterministic,
        ).to(dtype)
    layer.set_deepspeed_parallelism()
    gate = layer.deepspeed_moe.gate
    info = {"k": gate.k, "drop_tokens": gate.drop_tokens, "top2_2nd_expert_sampling": gate.top2_2nd_expert_sampling}
    return Contender(lambda x: layer(x)[0], list(layer.parameters()), info={"deepspeed_gate": info})


def build(name: str, cfg, device, dtype, args, routing, layouts) -> Contender:
    if name.startswith("c2r-"):
        mode, layout, chunks = parse_c2r(name)
        if layout in PLAN_LAYOUTS and routing is None:
            raise Skip(f"the {layout} layout is planned from synthetic routing, not this router's: synthetic only")
        if layouts[layout] is None:
            raise Skip("replicas need 2+ ranks (one rank already holds every expert)")
        copy_choice = "balanced" if layout == "balanced" else "rule"
        return build_c2r(cfg, device, dtype, args, routing, mode, layouts[layout], chunks, copy_choice)
    builders = {
        "single-device": build_single_device,
        "raw-all-to-all": build_raw_all_to_all,
        "megablocks-dmoe-ep": build_megablocks_ep,
        "deepspeed-moe-ep": build_deepspeed_ep,
    }
    return builders[name](cfg, device, dtype, args, routing)


# ---- measuring ---------------------------------------------------------------------------------------------------


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reduce_over_ranks(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    """``values`` reduced over the ranks, on the device the backend reduces (NCCL takes no CPU tensors)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def max_over_ranks(values: list[float]) -> list[float]:
    return reduce_over_ranks(values, dist.ReduceOp.MAX)


def training_step(contender: Contender, x: torch.Tensor, grad_out: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of the contender's layer, gradients reset first."""

    def step():
        x.grad = None
        for p in contender.params:
            p.grad = None
        out = contender.step(x)
        (out.float() * grad_out).sum().backward()

    return step


def measure(contender: Contender, x: torch.Tensor, grad_out: torch.Tensor, args) -> dict:
    device = x.device
    step = training_step(contender, x, grad_out)

    for _ in range(args.warmup):
        step()
    sync(device)
    dist.barrier()
    with count_host_syncs(device) as syncs:
        out = contender.step(x)
    del out
    x.grad = None
    sync(device)  # the exchange clock reads CUDA events: they must have completed
    if contender.clock is not None:
        contender.clock.take_ms()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rounds, exchange_ms = [], []
    for _ in range(args.rounds):
        dist.barrier()
        times = []
        for _ in range(args.iters):
            if device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                step()
                end.record()
                times.append((begin, end))
            else:
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
        sync(device)
        ms = [b.elapsed_time(e) for b, e in times] if device.type == "cuda" else times
        rounds.append(max_over_ranks(ms))  # a step ends when its slowest rank does
        if contender.clock is not None:
            exchange_ms.append(contender.clock.take_ms() / args.iters)
    all_ms = [t for r in rounds for t in r]
    result = {
        "ms_median": statistics.median(all_ms),
        "ms_min": min(all_ms),
        "ms_max": max(all_ms),
        "round_medians": [statistics.median(r) for r in rounds],
        "host_syncs_per_forward": int(max_over_ranks([syncs.count])[0]),
        "peak_gib": max_over_ranks([torch.cuda.max_memory_allocated(device) / 2**30])[0]
        if device.type == "cuda"
        else None,
    }
    if exchange_ms:
        a2a = max_over_ranks([statistics.median(exchange_ms)])[0]
        result.update(all_to_all_ms=a2a, all_to_all_share=a2a / result["ms_median"])
    meta = contender.clock.meta if contender.clock is not None else None
    if meta is not None:
        result.update(sent_counts(meta, args.gpus_per_node))
    return result


def sent_counts(meta, gpus_per_node: int | None) -> dict:
    """What the last forward's dispatch sent, over all ranks: copies and remote bytes per token (per-node: both
    stages added), the ranks' expert load max/mean and, with nodes of ``gpus_per_node`` ranks, the copies and bytes
    per token that crossed nodes (per-node: its network stage alone)."""
    sent, world = sum(meta.send_splits), len(meta.send_splits)
    node_of = (lambda r: r // gpus_per_node) if gpus_per_node and gpus_per_node < world else None
    inter = sum(n for r, n in enumerate(meta.send_splits) if node_of and node_of(r) != node_of(meta.ep_rank))
    copies, remote, crossed, tokens = reduce_over_ranks(
        [sent, sent - meta.send_splits[meta.ep_rank], inter, meta.num_tokens]
    )
    # each rank's expert work: the (token, expert) pairs it computes; the step waits for the busiest rank
    load_R = [0.0] * world
    load_R[meta.ep_rank] = float(meta.tokens_per_local_expert_X.sum())
    load_R = reduce_over_ranks(load_R)
    counts = {
        "copies_per_token": copies / tokens,
        "remote_bytes_per_token": remote * meta.bytes_per_row / tokens,
        "rank_load_max_mean": max(load_R) / (sum(load_R) / len(load_R)),
    }
    if meta.mode == "per-node":
        counts["counts"] = "both stages"  # copies and remote bytes: the network hop and the hop within the node
    if node_of:
        counts.update(
            inter_node_copies_per_token=crossed / tokens,
            inter_node_bytes_per_token=crossed * meta.bytes_per_row / tokens,
        )
    return counts


def profile(contender: Contender, x: torch.Tensor, grad_out: torch.Tensor, title: str, row: dict, args) -> None:
    """``--profile N``: N more steps under torch.profiler, rank 0's tables on stderr; a failure lands in the row's
    ``profile_error``, beside its timings."""
    try:
        sync(x.device)
        dist.barrier()  # the ranks start together: their skew would show as idle time in the first exchange
        lines = profile_steps(
            training_step(contender, x, grad_out), args.profile, x.device.type == "cuda", title, args.profile_rows
        )
    except Exception as error:
        row["profile_error"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        lines = [f"--- profile: {title}: {row['profile_error']}"]
    if dist.get_rank() == 0:
        print("\n".join(lines), file=sys.stderr, flush=True)


# ---- report ------------------------------------------------------------------------------------------------------

COLUMNS = (
    "| config | routing | contender | plan | ms | min-max | rounds | copies/token | remote KiB/token "
    "| inter-node KiB/token | rank load max/mean | a2a ms | a2a share | host syncs/fwd | peak GiB |"
)


def fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, spec)


def table_row(r: dict) -> str:
    """One row of the markdown table (``COLUMNS``)."""
    head = f"| {r['config']} | {r['routing']} | {r['contender']} | {r.get('plan', '-')} |"
    if "skipped" in r or "error" in r:
        why = "skipped: " + r["skipped"] if "skipped" in r else "error: " + r["error"]
        return f"{head} {why} |" + " |" * 10
    return (
        f"{head} {r['ms_median']:.2f} | {r['ms_min']:.2f}-{r['ms_max']:.2f} | "
        f"{' / '.join(f'{m:.2f}' for m in r['round_medians'])} | {fmt(r.get('copies_per_token'), '.2f')} | "
        f"{fmt(r.get('remote_bytes_per_token'), '.1f', 1024)} | "
        f"{fmt(r.get('inter_node_bytes_per_token'), '.1f', 1024)} | "
        f"{fmt(r.get('rank_load_max_mean'), '.2f')} | {fmt(r.get('all_to_all_ms'), '.2f')} | "
        f"{fmt(r.get('all_to_all_share'), '.0%')} | {r['host_syncs_per_forward']} | {fmt(r['peak_gib'], '.2f')} |"
    )


def markdown(rows: list[dict], args) -> str:
    notes = [
        f"ms: median of {args.rounds} x {args.iters} steps (slowest rank), forward + backward; min-max; round medians",
        "per-node rows: copies/token and remote KiB/token add both stages (the network hop, then within the node); "
        "inter-node KiB/token (with --gpus-per-node) is what crosses nodes in every mode",
    ]
    return "\n".join([*notes, "", COLUMNS, "|---" * COLUMNS.count(" |") + "|", *map(table_row, rows)])


class Report:
    """Rank 0's rows: each printed as it completes (``row | ...``, flushed) and ``--json`` rewritten after each, so
    a run that a timeout or a hang cuts short keeps what it measured; `finish` prints the whole table."""

    def __init__(self, args, world: int, header: str):
        self.args, self.world, self.header = args, world, header
        self.rows: list[dict] = []
        self.plans: dict[str, str] = {}

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(f"row {table_row(row)}", flush=True)
        self.write_json(complete=False)

    def finish(self) -> None:
        print(self.header)
        print(markdown(self.rows, self.args), flush=True)
        self.write_json(complete=True)

    def write_json(self, complete: bool) -> None:
        if not self.args.json:
            return
        data = {"args": {k: str(v) for k, v in vars(self.args).items()}, "world": self.world, "complete": complete}
        data.update(plans=self.plans, rows=self.rows)
        atomic_write_text(self.args.json, json.dumps(data, indent=1))  # never half a file, whenever the run stops


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--configs", nargs="+", default=["deepseek-like", "qwen3-like", "mixtral-like"], choices=CONFIGS)
    p.add_argument("--contenders", nargs="+", default=CONTENDERS, choices=CONTENDERS)
    p.add_argument("--routing", nargs="+", default=["synthetic", "router"], choices=["synthetic", "router"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--backend", default="auto", help="c2r expert backend (auto, torch, megablocks)")
    p.add_argument(
        "--plan-method",
        help=f"placement planner method (placement/methods.py; default {DEFAULT_PLAN_METHOD}, falling back to greedy "
        "with a warning where it fails); named here, a failure stops the run",
    )
    p.add_argument(
        "--plan-tokens",
        type=int,
        default=PLAN_TOKENS,
        help=f"tokens of the synthetic planning sample (at most world x T; default {PLAN_TOKENS})",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the raw numbers here (rank 0)")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, N more steps of each contender under torch.profiler: rank 0's kernels per step, GPU "
        "busy vs wall, idle gaps and top ops, printed to stderr",
    )
    p.add_argument("--profile-rows", type=int, default=18, help="rows of each profile table (default 18)")
    p.add_argument(
        "--gpus-per-node",
        type=int,
        help="ranks per node for per-node dispatch and the planned placement (default: the launcher's local world "
        "size); e.g. 2 on 4 CPU ranks: two virtual nodes",
    )
    args = p.parse_args(argv)
    if args.plan_tokens < 1:
        p.error(f"--plan-tokens must be at least 1, got {args.plan_tokens}")
    return args


def run_contender(name: str, cfg: EPConfig, routing_kind: str, inputs: tuple, layouts: dict, plan: str, args) -> dict:
    """One row: the contender built and measured (and profiled with ``--profile``), or why it was skipped or broke."""
    x, grad_out, routing = inputs
    row = {"config": cfg.name, "routing": routing_kind, "contender": name, **asdict(cfg)}
    try:
        contender = build(name, cfg, x.device, x.dtype, args, routing, layouts)
        row.update(contender.info)
        row.update(measure(contender, x, grad_out, args))
        if args.profile:  # every rank runs the steps (they exchange); rank 0 prints its tables
            profile(contender, x, grad_out, f"{cfg.name} {routing_kind} {name}, rank 0", row, args)
    except Skip as why:
        row["skipped"] = str(why)
    except Exception as error:  # a contender that breaks is reported, the others still run
        row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
    layout = parse_c2r(name)[1] if name.startswith("c2r-") else None
    if layout in PLAN_LAYOUTS and "skipped" not in row:
        row["plan"] = f"{plan}, --max-load {LOAD_CAP}" if layout == "capped" else plan
    if layouts.get(layout) and "skipped" not in row:  # what c2r-place simulate needs
        row["expert_to_rank"] = layouts[layout].to_json()
        row["gpus_per_node"] = args.gpus_per_node
    return row


def run_config(cfg: EPConfig, args, device, dtype, report: Report | None) -> None:
    """Every routing x contender of one config; rows to ``report`` (rank 0) as they complete."""
    rank, world = dist.get_rank(), dist.get_world_size()
    nodes = world // args.gpus_per_node if args.gpus_per_node else 1
    layouts, plan = {"contiguous": ExpertLayout.contiguous(cfg.E, world)}, "-"
    # only what a contender will run: each layout costs seconds to minutes of one CPU core at 8 ranks
    needed = {parse_c2r(n)[1] for n in args.contenders if n.startswith("c2r-")} & set(PLAN_LAYOUTS)
    if needed and "synthetic" in args.routing:
        planned, plan = planned_layouts(cfg, world, nodes, needed, args)
        layouts.update(planned)
        if report:
            report.plans[cfg.name] = plan
    x = torch.randn(cfg.T, cfg.D, generator=torch.Generator().manual_seed(100 + rank)).to(device, dtype)
    x.requires_grad_(True)
    grad_out = torch.randn(cfg.T, cfg.D, generator=torch.Generator().manual_seed(200 + rank)).to(device)
    for routing_kind in args.routing:
        routing = synthetic_routing(cfg, rank, world, device, args.seed) if routing_kind == "synthetic" else None
        for name in args.contenders:
            row = run_contender(name, cfg, routing_kind, (x, grad_out, routing), layouts, plan, args)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if report:
                print(f"{cfg.name} {routing_kind} {name}: "
                      + (row.get("skipped") or row.get("error") or f"{row['ms_median']:.2f} ms"),
                      file=sys.stderr, flush=True)  # fmt: skip
                report.add(row)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "ep_bench: --device cuda but no CUDA GPU is visible; use --device cpu --dtype float32 for the smoke run"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, local_rank) if args.device == "cuda" else torch.device("cpu")
    for cfg in (CONFIGS[name] for name in args.configs):
        if cfg.E % world:
            sys.exit(f"ep_bench: {cfg.name} has {cfg.E} experts, not divisible by {world} ranks")
    header = (
        f"ep_bench: {world} ranks, {device.type} {args.dtype}, torch {torch.__version__}, "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
    )
    report = Report(args, world, header) if rank == 0 else None
    if report:
        print(header, flush=True)
    for cfg in (CONFIGS[name] for name in args.configs):
        run_config(cfg, args, device, getattr(torch, args.dtype), report)
    if report:
        report.finish()
    dist.barrier()
    dist.destroy_process_group()
    # Skip the interpreter's teardown: on CPU ranks it sometimes aborted there ("terminate called without an active
    # exception") after the table was printed, turning a finished run into a failed one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
