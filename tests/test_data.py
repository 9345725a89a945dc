import json

import pytest
import torch

from c2r.data import EMBEDDED_MAX_BYTES, BatchSampler, ByteTokenizer, DataConfig, load_corpus, user_documents
from c2r.run_setup import check_same_corpus, check_splits_fit


def test_embedded_corpus_is_real_text_with_disjoint_validation_files():
    corpus = load_corpus(DataConfig(max_bytes=600_000, val_every=10))
    assert corpus.num_documents >= 20
    assert len(corpus.train) > 100_000 and len(corpus.val) > 10_000
    text = ByteTokenizer().decode(corpus.train[:5000])
    assert "def " in text or "import " in text
    # Held out by file: a validation window is not a substring of the training text.
    probe = bytes(corpus.val[1000:1200])
    assert probe not in bytes(corpus.train)


def test_user_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 200)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " * 30}) for i in range(5)))
    corpus = load_corpus(DataConfig(path=str(tmp_path)))
    assert corpus.num_documents == 6
    assert len(corpus.val) > 0 and len(corpus.train) > len(corpus.val)
    sampler = BatchSampler(corpus.train, 16, 4, seed=0)
    x, y = sampler.batch_at(3)
    assert torch.equal(x, sampler.batch_at(3)[0]) and not torch.equal(x, sampler.batch_at(4)[0])
    assert x.shape == y.shape == (4, 16)
    assert (x[:, 1:] == y[:, :-1]).all()


def test_bad_user_data_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(DataConfig(path=str(tmp_path / "missing")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a string field 'text'"):
        load_corpus(DataConfig(path=str(bad)))
    bad.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_corpus(DataConfig(path=str(bad)))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match="no text files"):
        load_corpus(DataConfig(path=str(empty)))


def test_jsonl_keeps_unicode_line_separators_inside_texts_and_a_byte_order_mark_is_not_text(tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028 / U+2029 / U+0085 as they are; only "\n" ends a JSONL line.
    texts = ["line a\u2028line b", "para\u2029next\u0085end", "plain"]
    (tmp_path / "u.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts) + "\r\n")
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello")
    (tmp_path / "notes.md").mkdir()  # a directory named like a text file is skipped
    (tmp_path / "UPPER.TXT").write_text("shouting")
    assert sorted(user_documents(tmp_path)) == sorted([*texts, "hello", "shouting"])


def test_a_user_corpus_is_not_cut_to_the_embedded_corpus_size(tmp_path):
    (tmp_path / "big.txt").write_bytes(b"a" * (EMBEDDED_MAX_BYTES + 100_000))
    corpus = load_corpus(DataConfig(path=str(tmp_path)))
    assert len(corpus.train) + len(corpus.val) == EMBEDDED_MAX_BYTES + 100_000
    corpus = load_corpus(DataConfig(path=str(tmp_path), max_bytes=1000))  # a cap the user sets still applies
    assert len(corpus.train) + len(corpus.val) == 1000


@pytest.mark.parametrize(
    "options,message",
    [
        ({"val_every": -3}, r"data.val_every \(-3\) must be >= 2"),
        ({"val_every": 1}, r"data.val_every \(1\) must be >= 2"),
        ({"val_every": 0}, r"data.val_every \(0\) must be >= 2"),
        ({"max_bytes": 0}, r"data.max_bytes \(0\) must be >= 1, or null for no cap"),
    ],
)
def test_data_settings_that_would_leak_or_empty_a_split_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**options)


def test_a_split_too_short_for_the_model_says_which_split_and_what_would_fix_it(tmp_path):
    (tmp_path / "small.txt").write_text("x" * 2000)
    corpus = load_corpus(DataConfig(path=str(tmp_path / "small.txt")))
    check_splits_fit(corpus, 20, 64)  # fits
    with pytest.raises(ValueError) as error:
        check_splits_fit(corpus, 20, 128)
    assert str(error.value) == (
        f"the validation split of {tmp_path / 'small.txt'} has 100 tokens, too few for one window of "
        "model.block_size 128 + 1; validation holds out the last 1/20 (data.val_every) of its text, as it has under "
        "40 documents: give more text, or lower data.val_every or model.block_size"
    )
    with pytest.raises(ValueError, match=r"the training split of .* has 1900 tokens, too few .*model.block_size 4096"):
        check_splits_fit(corpus, 20, 4096)


def corpus_check_worker(rank, world, differ):
    import numpy as np

    from c2r.data import Corpus

    tokens = np.arange(1000, dtype=np.uint8)
    if differ and rank == 1:
        tokens[500] += 1  # same length, one token different: a node with another copy of the files
    try:
        check_same_corpus(Corpus(train=tokens, val=tokens[:100], source="my_corpus/", num_documents=3))
    except ValueError as error:
        return str(error)
    return None


def test_ranks_that_loaded_different_text_are_refused(tmp_path):
    from tests.distributed import run_distributed

    assert run_distributed(corpus_check_worker, 2, tmp_path / "same", False) == [None, None]
    messages = run_distributed(corpus_check_worker, 2, tmp_path / "other", True)
    expected = (
        "ranks [1] loaded another text than rank 0 from my_corpus/ (rank 1: 1000 training and 100 validation "
        "tokens, rank 0: 1000 and 100, or the same counts of other tokens): every node needs the same data (the "
        "same Python for the embedded corpus, the same --data files)"
    )
    assert messages == [expected, expected]
