import json
import logging

import numpy as np
import pytest

from data_tools.cli import main as ouro_data
from ouro_train.data.demo_corpus import corpus_fingerprint, demo_documents, split_documents
from ouro_train.data.tokenizer import (
    EOS_ID,
    IM_END_ID,
    IM_START_ID,
    SPECIAL_TOKENS,
    demo_tokenizer_path,
    encode_documents,
    load_or_train_demo_tokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
)

NON_ASCII = "naïve café — 数据 🙂\ttabs\n\nand  spaces, trailing space "


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(demo_documents()[:30], vocab_size=600)


def test_special_token_ids(tokenizer):
    assert SPECIAL_TOKENS == ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (EOS_ID, IM_START_ID, IM_END_ID) == (0, 1, 2)


def test_byte_level_round_trip_is_exact(tokenizer):
    docs = demo_documents()
    # Training documents, one the tokenizer never saw, and characters absent from the corpus.
    for text in docs[:3] + docs[-2:] + [NON_ASCII, " leading space", "x"]:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids) == text


def test_demo_corpus():
    docs = demo_documents()
    assert len(docs) > 50 and sum(map(len, docs)) > 400_000  # the stdlib's pydoc topics
    assert all(doc == doc.strip() and doc for doc in docs) and len(set(docs)) == len(docs)
    assert corpus_fingerprint(docs) == corpus_fingerprint(demo_documents())
    assert corpus_fingerprint(["ab", "c"]) != corpus_fingerprint(["a", "bc"])


@pytest.mark.parametrize("n, fraction", [(79, 0.05), (78, 0.05), (2, 0.05), (3, 0.99), (10, 0.3)])
def test_split_is_deterministic_and_disjoint(n, fraction):
    docs = [f"doc {i}" for i in range(n)]
    train, val = split_documents(docs, fraction)
    assert train and val and not set(train) & set(val) and sorted(train + val) == sorted(docs)
    assert split_documents(docs, fraction) == (train, val)
    assert len(val) == min(n - 1, max(1, round(n * fraction)))


def test_split_rejects_bad_arguments():
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(["a", "b"], 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        split_documents(["a"], 0.5)


def test_demo_tokenizer_is_cached_and_a_corrupt_cache_is_replaced(tmp_path, monkeypatch, caplog):
    first = load_or_train_demo_tokenizer(300, cache_dir=tmp_path)
    path = demo_tokenizer_path(300, tmp_path)
    assert path.is_file() and path.name.startswith("tokenizer-")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    import ouro_train.data.tokenizer as module

    monkeypatch.setattr(module, "train_bpe_tokenizer", lambda *a, **k: pytest.fail("retrained despite cache"))
    assert load_or_train_demo_tokenizer(300, cache_dir=tmp_path).get_vocab() == first.get_vocab()
    monkeypatch.undo()
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        again = load_or_train_demo_tokenizer(300, cache_dir=tmp_path)
    assert str(path) in caplog.text
    assert again.get_vocab() == first.get_vocab()
    assert json.loads(path.read_text())  # replaced by a whole file


def test_cache_dir_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OURO_CACHE_DIR", str(tmp_path))
    assert demo_tokenizer_path(300).parent == tmp_path
    assert demo_tokenizer_path(300) != demo_tokenizer_path(400)


def test_load_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"half": ')
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_encode_documents_appends_eos(tokenizer):
    encoded = encode_documents(tokenizer, ["a b", "c", NON_ASCII])
    assert all(e.dtype == np.uint32 and e[-1] == EOS_ID for e in encoded)
    assert max(int(e.max()) for e in encoded) < tokenizer.get_vocab_size()
    assert tokenizer.decode(encoded[2][:-1].tolist()) == NON_ASCII
    assert [len(e) for e in encode_documents(tokenizer, ["a b", "c"], append_eos=False)] == [
        len(e) - 1 for e in encoded[:2]
    ]


def test_cli_train_tokenizer_on_jsonl_and_txt(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"body": f"line {i} of text"}) for i in range(50)))
    (tmp_path / "d.txt").write_text("a whole text file is one document")
    out = tmp_path / "tok.json"
    argv = ["train-tokenizer", "--out", str(out), "--vocab-size", "300", "--text-field", "body"]
    assert ouro_data(argv + ["--input", str(corpus), str(tmp_path / "d.txt")]) == 0
    printed = capsys.readouterr().out
    assert "51 documents" in printed and str(out) in printed
    tok = load_tokenizer(out)
    assert tok.get_vocab_size() <= 300 and tok.token_to_id("<|endoftext|>") == EOS_ID


def test_cli_errors_are_one_line(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text field"}) + "\n")
    assert ouro_data(["train-tokenizer", "--out", str(tmp_path / "t.json"), "--input", str(corpus)]) == 2
    assert "c.jsonl:2: no field 'text'" in capsys.readouterr().err
    for argv in (
        ["train-tokenizer"],  # --out missing
        ["train-tokenizer", "--out", str(tmp_path / "t.json"), "--vocab-size", "many"],
        ["train-tokenizer", "--out", str(tmp_path / "t.json"), "--vocab-size", "10"],
        ["train-tokenizer", "--out", str(tmp_path), "--input", str(corpus), "--text-field", "body"],
        ["train-tokenizer", "--out", str(tmp_path / "t.json"), "--input", str(tmp_path / "missing*.jsonl")],
    ):
        assert ouro_data(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "t.json").exists()


def test_cli_demo_tokenizer_prints_the_cached_path(tmp_path, capsys):
    assert ouro_data(["demo-tokenizer", "--vocab-size", "300", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(demo_tokenizer_path(300, tmp_path))
    assert load_tokenizer(demo_tokenizer_path(300, tmp_path)).get_vocab_size() <= 300


def test_special_token_text_inside_a_document_stays_text(tokenizer):
    (encoded,) = encode_documents(tokenizer, ["before <|endoftext|> after"])
    assert list(encoded).count(EOS_ID) == 1 and encoded[-1] == EOS_ID
    assert tokenizer.decode(encoded[:-1].tolist()) == "before <|endoftext|> after"
