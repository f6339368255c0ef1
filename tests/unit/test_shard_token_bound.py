"""Token ids are bounded by the vocabulary once per shard when its bytes are verified (sha256 at
first open, every document scanned with it), and per document read when they are not; a
manifest that understates its shard's largest id is caught either way."""

import numpy as np
import pytest

from ouro_train.data.manifest import DataError, Manifest, TokenizerInfo
from ouro_train.data.source import ShardReader, TokenSource
from ouro_train.data.tokenize import _write_shard

DOCS = [np.arange(start, start + 9, dtype=np.uint32) % 90 for start in range(0, 60, 6)]


def make_source(tmp_path, docs: list[np.ndarray], claimed_max: int | None = None):
    out = tmp_path / "src"
    out.mkdir()
    shard = _write_shard(out, "s-00000.tar", docs, "uint16", None)
    if claimed_max is not None:
        shard.max_token_id = claimed_max  # the manifest lies; the shard's sha256 stays right
    tokenizer = TokenizerInfo(name="t", sha256="0" * 64, vocab_size=100, eos_id=0)
    Manifest(source="s", tokenizer=tokenizer, dtype="uint16", shards=[shard]).save(out)
    return out


def read_all(source: TokenSource) -> None:
    for sample in range(source.epoch_tokens // source.seq_len):
        source.window(sample)


def count_checks(monkeypatch) -> list[str]:
    checked = []
    real = ShardReader._check_ids
    monkeypatch.setattr(
        ShardReader, "_check_ids", lambda self, tokens, key: (checked.append(key), real(self, tokens, key))
    )
    return checked


def test_a_verified_shard_is_checked_once_at_open_not_per_read(tmp_path, monkeypatch):
    out = make_source(tmp_path, DOCS)
    checked = count_checks(monkeypatch)
    source = TokenSource("s", out, seq_len=4, seed=0, model_vocab_size=100, max_open_shards=1)
    read_all(source)
    read_all(source)
    assert sorted(checked) == [f"{i:09d}" for i in range(len(DOCS))]  # each document once
    assert source._reader(0).max_token_id == max(int(d.max()) for d in DOCS)

    checked.clear()
    read_all(TokenSource("s", out, seq_len=4, seed=0, model_vocab_size=100, verify_checksums=False))
    assert len(checked) > len(DOCS)  # unverified bytes: every document read is checked


@pytest.mark.parametrize("verify", [True, False])
def test_ids_beyond_the_vocabulary_are_caught_though_the_manifest_understates_them(tmp_path, verify):
    docs = [*DOCS[:3], np.array([5, 150, 7], dtype=np.uint32), *DOCS[3:]]
    out = make_source(tmp_path, docs, claimed_max=50)
    source = TokenSource("s", out, seq_len=4, seed=0, model_vocab_size=200, verify_checksums=verify)
    with pytest.raises(DataError, match="s-00000.tar: document 000000003 has token id 150 >= vocabulary size 100"):
        read_all(source)


def test_a_known_largest_id_beyond_the_vocabulary_fails_at_open(tmp_path):
    out = make_source(tmp_path, DOCS)
    with pytest.raises(DataError, match="token id 95 >= vocabulary size 90; the shard does not match its manifest"):
        ShardReader(out / "s-00000.tar", len(DOCS), "uint16", 90, False, max_token_id=95)
