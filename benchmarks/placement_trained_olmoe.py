"""A routing trace from a *trained* tiny OLMoE on real text, for benchmarks/placement_load.py.

The random OLMoE row of that benchmark has an untrained router on random token ids, whose per-expert loads drift
from batch to batch; a user's trace comes from a trained model on real text. This makes one, on the CPU, in a few
minutes, with our own code (the README's "Your own Hugging Face MoE model" path):

1. a byte-level BPE tokenizer (vocabulary 1024) trained on the demo corpus's training files (the embedded Python
   standard library source, `c2r.data`; every 20th file is validation and is not seen), and a tiny OLMoE config
   (64 experts, top-8, 4 layers, hidden 128: the random row's shape, vocabulary aside);
2. `c2r-train --hf-model` on one CPU rank (the deepspeed launcher, gloo) for ``steps`` steps of 16 x 128 tokens;
3. `c2r-export-hf` back to a Hugging Face checkpoint;
4. its routing recorded through `profiling.hf_hooks.trace_hf_model` on the corpus's *validation* text (files the
   model never trained on): ``batches`` batches of 32 windows of 128 tokens at seeded random offsets (as training
   draws them), one trace step per batch.

Everything is cached under ``out`` (delete it to redo); the training log is ``out/train.log``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

VOCAB = 1024


def _model_dir(out: Path) -> Path:
    """Step 1: tokenizer + config (random weights: c2r-train initialises them from the config alone)."""
    import tokenizers
    import transformers

    from c2r.data import DataConfig

    model = out / "model"
    if (model / "config.json").exists():
        return model
    config = DataConfig(max_bytes=2_000_000)
    docs = [p.read_text(encoding="utf-8", errors="replace") for p in _train_files(config)]
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(docs, tokenizers.trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<eos>"]))
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="<eos>").save_pretrained(
        model
    )
    transformers.OlmoeConfig(
        num_hidden_layers=4, num_experts=64, num_experts_per_tok=8, hidden_size=128, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, norm_topk_prob=False, pad_token_id=0,
        eos_token_id=1, bos_token_id=None,
    ).save_pretrained(model)  # fmt: skip
    return model


def _train_files(config) -> list[Path]:
    """The training files of the embedded corpus as `c2r.data.load_corpus` splits it (every val_every-th held out),
    up to ``max_bytes``: the tokenizer never sees validation text either."""
    from c2r.data import stdlib_files

    files, size = [], 0
    for file in stdlib_files():
        if size >= config.max_bytes:
            break
        files.append(file)
        size += len(file.read_text(encoding="utf-8", errors="replace"))
    return [f for i, f in enumerate(files) if i % config.val_every]


def _train(model: Path, out: Path, steps: int) -> Path:
    """Steps 2 and 3: train on one CPU rank, export. Returns the exported model directory."""
    exported = out / "hf"
    if (exported / "config.json").exists():
        return exported
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        str(bin_dir / "deepspeed"), "--num_gpus", "1", "--master_port", "29731", "--module", "c2r.train",
        "--hf-model", str(model), "--ep-size", "1", "--steps", str(steps), "--out", str(out / "run"),
        "--set", "model.block_size=128", "--set", "train.batch_size=16", "--set", f"train.eval_every={steps}",
        "--set", "train.overwrite=true",
    ]  # fmt: skip
    with open(out / "train.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    subprocess.run([str(bin_dir / "c2r-export-hf"), str(out / "run"), "--out", str(exported)], check=True, env=env)
    return exported


def trained_olmoe_traces(trace_dir: Path, work: Path, steps: int = 300, batches: int = 10) -> None:
    """Steps 1-4 (module docstring); ``trace_dir`` gets the trace, ``work`` the cache."""
    import torch
    import transformers

    from c2r.data import DataConfig, HFTokenizer, load_corpus
    from profiling.hf_hooks import trace_hf_model
    from profiling.trace import TraceConfig

    work.mkdir(parents=True, exist_ok=True)
    exported = _train(_model_dir(work), work, steps)
    corpus = load_corpus(DataConfig(max_bytes=2_000_000), HFTokenizer(exported))
    # windows at seeded random offsets, as c2r-train's sampler draws them: each batch a mix of files, not one file
    # (consecutive text would make every batch a different topic, a drift no training step sees)
    seq, rows = 128, 32  # the trained sequence length; 32 windows a batch: a window's tokens route alike (one text)
    starts = np.random.default_rng(0).integers(0, len(corpus.val) - seq, batches * rows)
    windows = np.stack([np.asarray(corpus.val[s : s + seq], dtype=np.int64) for s in starts])
    val = torch.from_numpy(windows).view(batches, rows, seq)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    trace_hf_model(
        model, trace_dir, list(val), TraceConfig(shard_rows=1 << 16), source=f"tiny OLMoE trained {steps} steps"
    )
