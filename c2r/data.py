"""Training text: an embedded real corpus that needs no download, or the user's own files; byte-level tokens, or a
Hugging Face model's own tokenizer (``c2r-train --hf-model``).

The embedded corpus is the Python standard library's own source, which every Python install ships. Files are split
into train and validation by file (every ``val_every``-th file in sorted order is held out), so validation text is
never seen in training, not even as a neighbouring window.
"""

from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".jsonl"}


EMBEDDED_MAX_BYTES = 8_000_000  # the embedded corpus's default size: the standard library has ~40 MB of source


@dataclass
class DataConfig:
    """Where the text comes from. ``path`` None means the embedded standard-library corpus.

    ``max_bytes`` caps the training and the validation tokens (bytes for the byte tokenizer); None: 8 MB of the
    embedded corpus, all of a ``--data`` path. ``val_every``: every ``val_every``-th document is validation (>= 2).
    """

    path: str | None = None
    max_bytes: int | None = None
    val_every: int = 20

    def __post_init__(self) -> None:
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError(f"data.max_bytes ({self.max_bytes}) must be >= 1, or null for no cap")
        if self.val_every < 2:  # 1 would hold out everything; a negative step would hold out training documents
            raise ValueError(
                f"data.val_every ({self.val_every}) must be >= 2 (every val_every-th document is held out)"
            )


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, lossless, no training needed."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, tokens) -> str:
        return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")

    def encode_documents(self, documents: list[str], progress: bool = False) -> np.ndarray:
        return self.encode("\n".join(documents))


class HFTokenizer:
    """A Hugging Face model's own tokenizer, read from its directory (tokenizer.json, or whatever files
    ``transformers.AutoTokenizer`` reads); nothing downloads. Documents are packed end to end, each followed by the
    end-of-sequence token (when the tokenizer has one), and the sampler cuts sequences of the run's length from
    that stream."""

    BATCH = 256  # documents per call to the (Rust, batched) tokenizer

    def __init__(self, model_dir: str | Path, vocab_size: int | None = None):
        import transformers

        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"no usable tokenizer in {str(model_dir)!r} (tokenizer.json and friends): {error}"
            ) from None
        self.vocab_size = len(self.tokenizer)
        if vocab_size is not None and self.vocab_size > vocab_size:
            raise ValueError(
                f"the tokenizer in {str(model_dir)!r} has {self.vocab_size} tokens, the model's vocabulary only "
                f"{vocab_size}"
            )
        self.eos_id = self.tokenizer.eos_token_id

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)

    def encode_documents(self, documents: list[str], progress: bool = False) -> np.ndarray:
        from tqdm.auto import tqdm

        eos = [] if self.eos_id is None else [self.eos_id]
        pieces = []
        with tqdm(total=len(documents), desc="tokenize", unit="doc", disable=not progress) as bar:
            for start in range(0, len(documents), self.BATCH):
                batch = documents[start : start + self.BATCH]
                for ids in self.tokenizer(batch, add_special_tokens=False)["input_ids"]:
                    pieces.append(np.asarray(ids + eos, dtype=np.int32))
                bar.update(len(batch))
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)

    def decode(self, tokens) -> str:
        return self.tokenizer.decode([int(t) for t in tokens])


@dataclass
class Corpus:
    train: np.ndarray  # tokens: uint8 bytes, or int32 ids of a Hugging Face tokenizer
    val: np.ndarray
    source: str
    num_documents: int


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "__pycache__" not in p.parts)


def user_documents(path: Path) -> list[str]:
    """Texts from a file or a directory of .txt/.md/.rst/.py files and .jsonl files (one {"text": ...} per line)."""
    if not path.exists():
        raise FileNotFoundError(f"--data path {str(path)!r} does not exist")
    if path.is_file():
        files = [path]
    else:  # a directory named like a text file is not one
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no text files ({', '.join(sorted(TEXT_SUFFIXES))}) under {str(path)!r}")
    documents = []
    for file in files:
        if file.suffix.lower() == ".jsonl":
            documents.extend(_jsonl_texts(file))
        else:
            documents.append(read_text_file(file))
    return documents


# Text may hold a stray undecodable byte (a Latin-1 character in a UTF-8 file); a file with NUL bytes, or where more
# than this share of the bytes do not decode, is binary (an executable, an archive, random bytes), and training on it
# would be silently meaningless.
MAX_UNDECODABLE_SHARE = 0.01


def read_text_file(file: Path) -> str:
    """The file's text, or a ValueError naming it when it is binary."""
    raw = file.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not text
    text = raw.decode("utf-8", errors="replace")
    undecodable = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    if b"\0" in raw or undecodable > MAX_UNDECODABLE_SHARE * max(1, len(raw)):
        raise ValueError(f"--data file {str(file)!r} is binary, not text (NUL bytes or undecodable UTF-8)")
    return text


def _jsonl_texts(file: Path) -> list[str]:
    texts = []
    # Lines end at "\n" only: str.splitlines() would also cut a JSON string at U+2028, U+2029 or U+0085, which
    # json.dumps(..., ensure_ascii=False) writes as they are.
    for line_no, line in enumerate(read_text_file(file).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{file}:{line_no}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{file}:{line_no}: expected an object with a string field 'text'")
        texts.append(record["text"])
    return texts


def load_corpus(config: DataConfig, tokenizer=None, progress: bool = False) -> Corpus:
    """The run's text as tokens (``tokenizer``: ByteTokenizer by default, or an HFTokenizer; ``progress``: show a
    bar while tokenizing, on one rank)."""
    if config.path is None:
        documents, source = [], f"python {sysconfig.get_python_version()} standard library source"
        size = 0
        limit = EMBEDDED_MAX_BYTES if config.max_bytes is None else config.max_bytes
        for file in stdlib_files():
            if size >= limit:
                break
            documents.append(file.read_text(encoding="utf-8", errors="replace"))
            size += len(documents[-1])
    else:
        documents, source = user_documents(Path(config.path)), config.path
    return split_documents(documents, config, source, tokenizer, progress)


def split_documents(
    documents: list[str], config: DataConfig, source: str, tokenizer=None, progress: bool = False
) -> Corpus:
    """Train and validation tokens; ``max_bytes`` caps each (in tokens, which for a byte tokenizer are bytes; the
    embedded corpus's default, 8 MB, is applied where it is read)."""
    tokenizer = tokenizer or ByteTokenizer()
    cap = slice(config.max_bytes)  # slice(None): everything
    if len(documents) >= 2 * config.val_every:
        val_docs = documents[:: config.val_every]
        train_docs = [d for i, d in enumerate(documents) if i % config.val_every]
        train, val = (tokenizer.encode_documents(docs, progress)[cap] for docs in (train_docs, val_docs))
    else:  # too few documents to hold whole ones out: hold out the tail instead
        tokens = tokenizer.encode_documents(documents, progress)[cap]
        cut = len(tokens) - max(len(tokens) // config.val_every, 1)
        train, val = tokens[:cut], tokens[cut:]
    return Corpus(train=train, val=val, source=source, num_documents=len(documents))


class BatchSampler:
    """Random windows of ``block_size + 1`` tokens: inputs are the first L, targets the last L.

    Each step draws one *global* batch of ``batch_size * micro_batches * world_size`` windows from (seed, step)
    and hands rank ``rank`` its ``micro_batches`` consecutive slices of ``batch_size``, one per micro-batch
    (gradient accumulation). So a resumed run sees exactly the batches it would have seen, and runs that split the
    same global batch differently (other world sizes, other micro-batch counts; c2r-place reshard scales the
    per-rank ``batch_size``) train on the same global batches. With one rank and one micro-batch it is the plain
    sampler of ``batch_size`` windows.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        micro_batches: int = 1,
    ):
        if len(tokens) <= block_size + 1:
            raise ValueError(f"text of {len(tokens)} tokens is too short for block_size {block_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the world of {world_size} ranks")
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.micro_batches = micro_batches

    def batch_at(
        self, step: int, device: torch.device | str = "cpu", micro: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``step``'s micro-batch ``micro`` of this rank: (inputs, targets), each [batch_size, block_size]."""
        if not 0 <= micro < self.micro_batches:
            raise ValueError(f"micro-batch {micro} is outside the step's {self.micro_batches}")
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        global_batch = self.batch_size * self.micro_batches * self.world_size
        starts = torch.randint(len(self.tokens) - self.block_size - 1, (global_batch,), generator=generator)
        first = (self.rank * self.micro_batches + micro) * self.batch_size
        mine = starts[first : first + self.batch_size]
        windows = torch.stack([self.tokens[s : s + self.block_size + 1] for s in mine.tolist()])
        if torch.device(device).type == "cuda":
            # From pinned memory without a wait: a pageable copy would make the host wait for the GPU to finish
            # the previous step before it could queue this one (c2r/step_reads.py).
            windows = windows.pin_memory().to(device, non_blocking=True)
            return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        return windows[:, :-1].to(device), windows[:, 1:].to(device)
