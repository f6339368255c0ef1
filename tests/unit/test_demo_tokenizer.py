import json

import numpy as np
import pytest

from data_tools.cli import main as ouro_data
from data_tools.demo_corpus import demo_documents, split_documents
from data_tools.tokenizer import (
    EOS_ID,
    SPECIAL_TOKENS,
    demo_tokenizer_path,
    encode_documents,
    load_or_train_demo_tokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(demo_documents()[:30], vocab_size=600)


def test_special_token_ids(tokenizer):
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]


def test_byte_level_round_trip_is_exact(tokenizer):
    for text in demo_documents()[:5] + ["naïve café — 数据 🙂\ttabs\n\nand  spaces"]:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids) == text


def test_demo_corpus_and_split():
    docs = demo_documents()
    assert len(docs) > 50 and sum(map(len, docs)) > 400_000  # the stdlib's pydoc topics
    train, val = split_documents(docs, 0.05)
    assert train and val and not set(train) & set(val) and len(train) + len(val) == len(docs)
    assert split_documents(docs, 0.05) == (train, val)


def test_demo_tokenizer_is_cached_and_a_corrupt_cache_is_replaced(tmp_path, monkeypatch):
    first = load_or_train_demo_tokenizer(300, cache_dir=tmp_path)
    path = demo_tokenizer_path(300, tmp_path)
    assert path.is_file()
    import data_tools.tokenizer as module

    monkeypatch.setattr(module, "train_bpe_tokenizer", lambda *a, **k: pytest.fail("retrained despite cache"))
    assert load_or_train_demo_tokenizer(300, cache_dir=tmp_path).get_vocab() == first.get_vocab()
    monkeypatch.undo()
    path.write_text("{not json")
    again = load_or_train_demo_tokenizer(300, cache_dir=tmp_path)
    assert again.get_vocab() == first.get_vocab()
    assert json.loads(path.read_text())  # replaced by a whole file


def test_encode_documents_appends_eos(tokenizer):
    encoded = encode_documents(tokenizer, ["a b", "c"])
    assert all(e.dtype == np.uint32 and e[-1] == EOS_ID for e in encoded)
    assert max(int(e.max()) for e in encoded) < tokenizer.get_vocab_size()


def test_cli_train_tokenizer_and_errors(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"body": f"line {i} of text"}) for i in range(50)))
    (tmp_path / "d.txt").write_text("a whole text file is one document")
    out = tmp_path / "tok.json"
    assert (
        ouro_data(
            [
                "train-tokenizer",
                "--out",
                str(out),
                "--vocab-size",
                "300",
                "--input",
                str(corpus),
                str(tmp_path / "d.txt"),
                "--text-field",
                "body",
            ]
        )
        == 0
    )
    assert load_tokenizer(out).get_vocab_size() <= 300
    assert ouro_data(["train-tokenizer", "--out", str(out), "--input", str(corpus)]) == 2
    assert "c.jsonl:1: no field 'text'" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
