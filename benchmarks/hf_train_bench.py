"""Training throughput of real-size Hugging Face MoE layer shapes: c2r-train --hf-model vs DeepSpeed AutoEP vs HF eager.

For each model config (Qwen3-30B-A3B's and OLMoE-1B-7B's layer shapes, ``--layers`` decoder layers, random weights)
this writes a config-only model directory with a tiny tokenizer, then trains it for ``--steps`` steps on one device
under the deepspeed launcher, bf16 + ZeRO-2 (our default GPU DeepSpeed config), with each contender:

- ``c2r-auto``: ``python -m deepspeed.launcher.runner --num_gpus 1 --module c2r.train --hf-model DIR`` (expert
  backend auto: MegaBlocks on a GPU when it is installed, else torch); ``c2r-torch``: the same with
  ``--set model.moe.experts.backend=torch`` (torch._grouped_mm);
- ``autoep``: the Hugging Face model with DeepSpeed AutoEP (``expert_parallel`` enabled, ``autoep_size`` 1);
- ``hf-eager``: the plain Hugging Face model under the same DeepSpeed config (transformers' own experts).

Every contender starts from the same random weights (drawn once, saved with the config in bf16), gets the same
batches (c2r's batch sampler over the same tokenized text, seed 0), the same AdamW
(lr 2e-3, betas 0.9/0.95, weight decay 0.1, warm-up then cosine, gradient clipping 1.0), and the same timing window:
the training steps after ``--warmup`` steps, from a GPU with nothing queued to the wait for their last loss, with no
host sync in between (c2r-train reads each step's loss a step late), evaluations and checkpoints left out. c2r
reports that window in metrics.jsonl (``train_window_s``, windows of ``--warmup`` steps, each ending in a wait).
No contender trains a router balance loss (Hugging Face's is computed only with ``output_router_logits``; c2r-train's,
0.01 by default, is set to 0 here: on the OLMoE shape it moved c2r's loss 0.8 away). The one difference left: AutoEP
and HF eager decay every parameter (c2r: matrices only). ``train loss by window`` is each contender's loss curve, the
mean of each window of ``--warmup`` steps.

Vocabulary: the real one by default (151936 / 50304). At 2 layers the embedding and LM head are a large part of the
step (Qwen3: 2 x 151936 x 2048 = 0.62 B of ~1.9 B parameters, and the logits' cross-entropy), the same for every
contender; ``--vocab N`` shrinks it to see the MoE layers alone. The tokenizer is a tiny BPE trained on this
repository's README (ids below 2000), so the token ids cover only the start of the vocabulary; the costs do not
depend on which ids occur.

    python benchmarks/hf_train_bench.py --json out/hf_train_bench.json           # one GPU, both configs (~5 min)
    python benchmarks/hf_train_bench.py --smoke                                   # tiny shapes on the CPU (~1 min)

Contenders that fail are reported with their one-line error; the JSON is rewritten after every contender, so a run cut
short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONTENDERS = ("c2r-auto", "c2r-torch", "autoep", "hf-eager")
LR, BETAS, WEIGHT_DECAY, GRAD_CLIP, SEED = 2e-3, (0.9, 0.95), 0.1, 1.0, 0
TOKENIZER_VOCAB = 2000
# AutoEP's presets (DeepSpeed 0.19.8): qwen3_moe covers Qwen3-MoE; OLMoE has none, so the qwen3_moe preset with the
# model's own routing (softmax, top-k without renormalisation) and no shared expert is tried; if AutoEP refuses the
# model its error is reported.
AUTOEP = {
    "qwen3-30b-a3b-layers": {"preset_model": "qwen3_moe"},
    "olmoe-layers": {"preset_model": "qwen3_moe", "route_norm": False, "has_shared_experts": False},
}


def model_config(name: str, layers: int, vocab: int | None, smoke: bool):
    """The transformers config of ``name`` (real layer shapes; tiny ones with ``smoke``)."""
    import transformers

    if name == "qwen3-30b-a3b-layers":
        shape = dict(hidden_size=2048, num_experts=128, moe_intermediate_size=768, num_experts_per_tok=8)
        shape |= dict(num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936)
        if smoke:
            shape |= dict(hidden_size=64, num_experts=8, moe_intermediate_size=32, num_experts_per_tok=2)
            shape |= dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=TOKENIZER_VOCAB)
        if vocab:
            shape["vocab_size"] = vocab
        return transformers.Qwen3MoeConfig(
            **shape,
            intermediate_size=6144,  # the dense MLP's, unused: every layer is MoE (decoder_sparse_step 1)
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            num_hidden_layers=layers,
            max_position_embeddings=32768,
            tie_word_embeddings=False,
        )
    if name == "olmoe-layers":
        shape = dict(hidden_size=2048, num_experts=64, intermediate_size=1024, num_experts_per_tok=8)
        shape |= dict(num_attention_heads=16, num_key_value_heads=16, vocab_size=50304)
        if smoke:
            shape |= dict(hidden_size=64, num_experts=8, intermediate_size=32, num_experts_per_tok=2)
            shape |= dict(num_attention_heads=4, num_key_value_heads=4, vocab_size=TOKENIZER_VOCAB)
        if vocab:
            shape["vocab_size"] = vocab
        return transformers.OlmoeConfig(**shape, num_hidden_layers=layers, max_position_embeddings=4096)
    raise ValueError(f"unknown model config {name!r} (known: qwen3-30b-a3b-layers, olmoe-layers)")


def write_inputs(root: Path, configs: list[str], args) -> tuple[dict[str, Path], Path]:
    """A model directory per config (config, tokenizer and one set of random weights that every contender starts
    from) and the text every contender trains on."""
    import tokenizers
    import torch
    import transformers

    readme = (REPO / "README.md").read_text()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<unk>", "<eos>"])
    tok.train_from_iterator(readme.splitlines(), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    dirs = {}
    for name in configs:
        dirs[name] = root / name
        config = model_config(name, args.layers, args.vocab, args.smoke)
        config.save_pretrained(dirs[name])
        fast.save_pretrained(dirs[name])
        # One set of starting weights for every contender: drawn apart (c2r's own initialisation, HF's from_config)
        # the runs start from different random models, and at 12 steps the loss column then measures that
        # (0.31 apart on the Qwen3 shape; equal weights give equal losses). Saved in bf16, as the runs train.
        torch.manual_seed(SEED)
        model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
        model.save_pretrained(dirs[name])
        del model
    # Enough text that the held-out tail (c2r's validation split) holds a few sequences of the longest length.
    data = root / "data.txt"
    data.write_text(readme * max(1, math.ceil(2_000_000 / len(readme)) if not args.smoke else 2))
    return dirs, data


# ---------------------------------------------------------------------------------------------------------------------
# Contenders: each one process under the deepspeed launcher, one result dict back.
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    config: str
    contender: str
    steps_timed: int = 0
    tokens_per_s: float | None = None
    ms_per_step: float | None = None
    peak_gib: float | None = None
    final_loss: float | None = None
    window_losses: list[float] | None = None  # the mean loss of each window of --warmup steps: the loss curve
    rounds: int = 0
    error: str | None = None


def launcher(args, port: int) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(port)]


def c2r_command(args, model_dir: Path, data: Path, out: Path, backend: str, port: int) -> list[str]:
    sets = {
        "train.batch_size": args.batch_size,
        "model.block_size": args.seq_len,
        "train.eval_every": args.warmup,  # records at the warm-up's end and then every warmup steps: the window
        "train.eval_batches": 1,
        "train.warmup_steps": args.warmup,
        "train.save_every": 0,
        "train.save_every_minutes": 0,
        "train.save_last": "false",
        "train.seed": SEED,
        "model.moe.experts.backend": backend,
        # the same AdamW as the other contenders: c2r-train's default width scaling (hidden matrices at lr x 128 /
        # width, 1/16 at width 2048) would train slower and make the loss column compare unlike runs
        "train.lr_base_width": 0,
        # the same objective: the Hugging Face contenders train on the LM loss alone (their models' router loss is
        # computed only with output_router_logits), and c2r-train adds its routers' balance loss (0.01) by default;
        # on the OLMoE shape, whose random router sends every token to the same 8 of 64 experts, that loss moved
        # c2r's loss of steps 9-12 0.8 above Hugging Face's (7.150 vs 6.350; steps 5-8 7.708 vs 7.705)
        "model.moe.router.aux_loss_weight": 0,
    }
    cmd = [*launcher(args, port), "--module", "c2r.train", "--hf-model", str(model_dir), "--data", str(data)]
    cmd += ["--out", str(out), "--steps", str(args.steps), "--overwrite"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


def last_window_start(steps: int, every: int) -> int:
    """The first step (0-based) of the last window c2r-train averages its train loss over: it writes a record
    every ``every`` steps and at the last step (c2r/train.py), each with the mean loss of the steps since the
    previous one. The Hugging Face contenders report the mean of the same steps: like with like."""
    return (steps - 1) // every * every


def windows(losses: list[float], every: int) -> list[list[float]]:
    """Each step's loss grouped as c2r-train's metrics records average them (``last_window_start``): steps 1..every,
    every+1..2 every, ..., and the last window up to the last step."""
    return [losses[start : start + every] for start in range(0, len(losses), every)]


def c2r_result(out: Path, args) -> dict:
    """Tokens/s over the records after the warm-up's, from the run's metrics.jsonl."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = [r for r in records if r["step"] > args.warmup]
    if not timed:
        raise RuntimeError(f"no metrics record after step {args.warmup} in {out / 'metrics.jsonl'}")
    steps = timed[-1]["step"] - args.warmup
    seconds = sum(r["train_window_s"] for r in timed)
    return {
        "steps_timed": steps,
        "seconds": seconds,
        "peak_gib": max((r.get("peak_memory_gib", 0.0) for r in records), default=None) or None,
        "final_loss": timed[-1]["train_loss"],
        "window_losses": [r["train_loss"] for r in records],
    }


def worker_command(args, contender: str, config: str, model_dir: Path, data: Path, out: Path, port: int):
    cmd = [*launcher(args, port), str(Path(__file__).resolve()), "--worker", contender, "--configs", config]
    cmd += ["--worker-model", str(model_dir), "--worker-data", str(data), "--worker-out", str(out)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    return cmd + ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]


def one_line_error(text: str) -> str:
    """The most telling line of a failed process's output: the last error-looking line, else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error:" in line or line.startswith("c2r-train:"):
            return line[:300]
    return (lines[-1] if lines else "no output")[:300]


def run_contender(args, contender: str, config: str, model_dir: Path, data: Path, work: Path, port: int) -> dict:
    out = work / f"{config}-{contender}"
    if contender.startswith("c2r-"):
        cmd = c2r_command(args, model_dir, data, out, contender.removeprefix("c2r-"), port)
    else:
        cmd = worker_command(args, contender, config, model_dir, data, out, port)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(":"))
    env.pop("RANK", None)
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {args.timeout} s (--timeout)") from None
    if args.verbose:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
    if proc.returncode != 0:
        raise RuntimeError(one_line_error(proc.stdout + "\n" + proc.stderr))
    if contender.startswith("c2r-"):
        return c2r_result(out, args)
    return json.loads((out / "result.json").read_text())


def measure(args, contender: str, config: str, model_dir: Path, data: Path, work: Path, port: int) -> Result:
    result = Result(config, contender)
    rates, rounds = [], []
    for _ in range(args.rounds):
        try:
            rounds.append(run_contender(args, contender, config, model_dir, data, work, port))
        except Exception as error:  # a contender's failure is a result, not the end of the benchmark
            result.error = str(error).splitlines()[0] if str(error) else type(error).__name__
            break
        rates.append(rounds[-1]["steps_timed"] * args.batch_size * args.seq_len / rounds[-1]["seconds"])
    if rates:
        median = rounds[rates.index(statistics.median_low(rates))]
        result.steps_timed, result.rounds = median["steps_timed"], len(rates)
        result.tokens_per_s = statistics.median(rates)
        result.ms_per_step = 1000 * median["seconds"] / median["steps_timed"]
        result.peak_gib, result.final_loss = median["peak_gib"], median["final_loss"]
        result.window_losses = median.get("window_losses")
    return result


# ---------------------------------------------------------------------------------------------------------------------
# The AutoEP / HF eager worker (run under the launcher by this script itself).
# ---------------------------------------------------------------------------------------------------------------------


def worker(args) -> None:
    import deepspeed
    import torch
    import torch.nn.functional as F
    import transformers

    from c2r.data import BatchSampler, DataConfig, HFTokenizer, load_corpus
    from c2r.deepspeed import load_deepspeed_config
    from c2r.deepspeed.setup import release_shm_buffer
    from c2r.run_setup import TrainConfig, lr_at

    deepspeed.init_distributed()
    release_shm_buffer()
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    model_dir, out = Path(args.worker_model), Path(args.worker_out)
    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    corpus = load_corpus(DataConfig(path=args.worker_data), HFTokenizer(model_dir, vocab_size=config.vocab_size))
    batches = BatchSampler(corpus.train, args.seq_len, args.batch_size, seed=SEED)  # c2r's "global" sampler, 1 rank
    # the weights write_inputs saved (every contender's), in float32 on the device it trains on; DeepSpeed casts
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    model = model.to(device)

    ds_config = load_deepspeed_config(None, use_cuda, args.batch_size, GRAD_CLIP)
    # A client optimizer would hold the parameters AutoEP replaces: DeepSpeed builds torch's AdamW from the config.
    ds_config["optimizer"] = {
        "type": "AdamW",
        "params": {"lr": LR, "betas": list(BETAS), "weight_decay": WEIGHT_DECAY, "torch_adam": True},
    }
    if args.worker == "autoep":
        ds_config["expert_parallel"] = {"enabled": True, "autoep_size": 1, **AUTOEP[args.configs]}
        allow_string_registry_keys()
    tc = TrainConfig(steps=args.steps, lr=LR, warmup_steps=args.warmup)
    schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, tc) / LR)  # noqa: E731
    engine, _, _, _ = deepspeed.initialize(model=model, lr_scheduler=schedule, config=ds_config)
    engine.train()
    replaced = sum(type(m).__name__ == "AutoEPMoELayer" for m in engine.module.modules())
    if args.worker == "autoep" and replaced != config.num_hidden_layers:
        raise RuntimeError(f"AutoEP replaced {replaced} of {config.num_hidden_layers} MoE blocks")
    # Timed as c2r-train times its steps: no host sync inside the window (c2r reads each step's loss a step late,
    # c2r/step_reads.py), one wait for the GPU at its end; the losses are read after it.
    losses, started = [], None
    for step in range(args.steps):
        if step == args.warmup:
            if use_cuda:
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        idx_BS, targets_BS = batches.batch_at(step, device)
        logits = engine(input_ids=idx_BS, use_cache=False).logits  # (B, S, V)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets_BS.reshape(-1))
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    losses = torch.stack(losses).tolist()  # waits for the GPU: the window's end
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if use_cuda else None
    last = losses[last_window_start(args.steps, args.warmup) :]  # the steps c2r's last metrics record averages
    result = {
        "steps_timed": args.steps - args.warmup,
        "seconds": seconds,
        "peak_gib": peak,
        "final_loss": sum(last) / len(last),
        "window_losses": [sum(w) / len(w) for w in windows(losses, args.warmup)],
    }
    if int(os.environ.get("RANK", 0)) == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result))


def allow_string_registry_keys() -> None:
    """DeepSpeed 0.19.8's AutoEP Qwen3-MoE adapter calls ``registry.get(str(cls), default)`` on transformers'
    output-capture registry, whose ``get`` (transformers 5.24) takes a model instead: TypeError. Let it take both."""
    from transformers.utils import output_capturing

    registry_cls = type(output_capturing._CAN_RECORD_REGISTRY)
    model_get = registry_cls.get

    def get(self, key, *default):
        return dict.get(self, key, *default) if isinstance(key, str) else model_get(self, key)

    registry_cls.get = get


# ---------------------------------------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------------------------------------


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[Result]) -> str:
    rows = [
        "| config | contender | steps timed | tokens/s | ms/step | peak GiB | train loss, last window | "
        "train loss by window |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if r.error:
            rows.append(f"| {r.config} | {r.contender} | - | failed: {r.error.replace('|', '/')} | - | - | - | - |")
            continue
        curve = " / ".join(f"{x:.3f}" for x in r.window_losses or []) or "-"
        rows.append(
            f"| {r.config} | {r.contender} | {r.steps_timed} | {fmt(r.tokens_per_s, ',.0f')} | "
            f"{fmt(r.ms_per_step, '.1f')} | {fmt(r.peak_gib, '.1f')} | {fmt(r.final_loss, '.3f')} | {curve} |"
        )
    return "\n".join(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="qwen3-30b-a3b-layers,olmoe-layers", help="comma-separated model configs")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma-separated, of {', '.join(CONTENDERS)}")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (all MoE)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the model's own)")
    p.add_argument("--steps", type=int, default=12, help="training steps per run")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps first; must divide --steps")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=1, help="runs per contender; tokens/s is their median")
    p.add_argument("--timeout", type=int, default=240, help="seconds one contender's run may take")
    p.add_argument("--json", help="write the results here (after every contender)")
    p.add_argument("--work-dir", help="model directories and run outputs (default: a temporary directory)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script end to end")
    p.add_argument("--verbose", action="store_true", help="print each run's output tail")
    for name in ("--worker", "--worker-model", "--worker-data", "--worker-out", "--local_rank"):
        p.add_argument(name, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.batch_size, args.seq_len = 4, 2, 2, 32
    problems = []
    if args.warmup < 1 or args.steps <= args.warmup or args.steps % args.warmup:
        problems.append(f"--warmup ({args.warmup}) must be >= 1, below --steps ({args.steps}) and divide it")
    unknown = sorted(set(args.contenders.split(",")) - set(CONTENDERS))
    if unknown:
        problems.append(f"unknown contenders {unknown} (known: {', '.join(CONTENDERS)})")
    unknown = sorted(set(args.configs.split(",")) - set(AUTOEP))
    if unknown:
        problems.append(f"unknown configs {unknown} (known: {', '.join(AUTOEP)})")
    if problems:
        p.error("; ".join(problems))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    configs, contenders = args.configs.split(","), args.contenders.split(",")
    with tempfile.TemporaryDirectory(prefix="hf_train_bench_") as tmp:
        work = Path(args.work_dir or tmp)
        dirs, data = write_inputs(work, configs, args)
        results, port = [], 29500 + os.getpid() % 1000
        for config in configs:
            for contender in contenders:
                started = time.perf_counter()
                results.append(measure(args, contender, config, dirs[config], data, work, port))
                status = results[-1].error or f"{fmt(results[-1].tokens_per_s, ',.0f')} tokens/s"
                print(f"{config} {contender}: {status} ({time.perf_counter() - started:.0f} s)", flush=True)
                if args.json:
                    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.json).write_text(json.dumps(report(args, results), indent=1))
    print(
        f"\n{args.batch_size} x {args.seq_len} tokens per step, {args.layers} layers, one device, c2r's default "
        "DeepSpeed config (GPU: bf16 ZeRO-2; CPU: float32 ZeRO-2); train loss: the mean LM loss of steps "
        f"{last_window_start(args.steps, args.warmup) + 1}-{args.steps} for every contender\n"
    )
    print(table(results))
    return 0


def report(args, results: list[Result]) -> dict:
    settings = {k: v for k, v in vars(args).items() if not k.startswith("worker") and k != "json"}
    return {"settings": settings, "results": [asdict(r) for r in results]}


if __name__ == "__main__":
    raise SystemExit(main())
