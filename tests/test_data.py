import json

import pytest
import torch

from c2r.data import BatchSampler, ByteTokenizer, DataConfig, load_corpus


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
