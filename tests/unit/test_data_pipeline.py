import json
import os
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ouro_train.data.loader import LoaderState, ShardedLoader
from ouro_train.data.manifest import DataError, file_sha256, load_manifest
from ouro_train.data.mixture import Mixture
from ouro_train.data.source import ShardReader, TokenSource
from ouro_train.data.tokenize import TokenizeOptions, tokenize

WORDS = "alpha beta gamma delta loop model token step exit gate layer norm héllo wörld 数据".split()


def make_docs(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return [f"doc{seed}-{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for i in range(count)]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(make_docs(0, 200), trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def build_source(
    tmp_path: Path, tokenizer_file: Path, name: str, docs_per_file=(30, 25, 20), tokens_per_shard: int = 300
) -> tuple[Path, list[str]]:
    raw = tmp_path / f"raw-{name}"
    raw.mkdir()
    all_docs = []
    for index, count in enumerate(docs_per_file):
        docs = make_docs(zlib.crc32(f"{name}-{index}".encode()) % 1000, count)
        write_jsonl(raw / f"part{index}.jsonl", docs)
        all_docs += docs
    out = tmp_path / name
    tokenize(
        [str(raw / "*.jsonl")],
        TokenizeOptions(
            source=name,
            tokenizer_path=str(tokenizer_file),
            out_dir=str(out),
            tokens_per_shard=tokens_per_shard,
        ),
        progress=False,
    )
    return out, all_docs


@pytest.fixture()
def source_dir(tmp_path, tokenizer_file):
    return build_source(tmp_path, tokenizer_file, "web")


def test_text_to_shards_round_trip(source_dir, tokenizer_file):
    from tokenizers import Tokenizer

    out, docs = source_dir
    manifest = load_manifest(out)
    assert manifest.documents == len(docs) and len(manifest.shards) > 3  # several shards per file
    tok = Tokenizer.from_file(str(tokenizer_file))
    decoded = []
    for shard in manifest.shards:
        reader = ShardReader(out / shard.name, shard.documents, manifest.dtype, manifest.tokenizer.vocab_size, False)
        assert reader.lengths().sum() == shard.tokens
        for i in range(shard.documents):
            tokens, _ = reader.read(i)
            assert tokens[-1] == manifest.tokenizer.eos_id
            decoded.append(tok.decode(tokens[:-1].tolist()))
    assert decoded == docs  # file order, then document order within each shard


def test_windows_cover_every_token_exactly_once_per_epoch(source_dir):
    out, _ = source_dir
    seq = 16
    src = TokenSource("web", out, seq_len=seq, seed=7, model_vocab_size=320)
    total = src.epoch_tokens
    seen = {}
    for j in range(total // seq + 1):
        w = src.window(j)
        for d, p in zip(w.doc_index[:-1], w.position[:-1]):
            if d < src.epoch_documents:  # epoch 0 only
                seen[(d, p)] = seen.get((d, p), 0) + 1
    assert sum(seen.values()) == total and set(seen.values()) == {1}
    # Same (seed, sample) -> same window in a fresh instance; the next epoch has another order.
    again = TokenSource("web", out, seq_len=seq, seed=7, model_vocab_size=320)
    np.testing.assert_array_equal(again.window(5).tokens, src.window(5).tokens)
    epoch1 = [src.window(j).tokens for j in range(total // seq + 1, 2 * (total // seq))]
    epoch0 = [src.window(j).tokens for j in range(0, total // seq - 1)]
    assert not all(np.array_equal(a, b) for a, b in zip(epoch0, epoch1))


def test_mixture_meets_weights_over_every_prefix():
    mixture = Mixture(["a", "b", "c"], [0.6, 0.3, 0.1])
    counts = [0, 0, 0]
    for n in range(1, 501):
        mixture.assign(counts, 1)
        for c, w in zip(counts, mixture.weights):
            assert abs(c - w * n) <= 1
    with pytest.raises(DataError, match="do not sum to a positive"):
        Mixture(["a", "b"], [0.0, 0.0])
    with pytest.raises(DataError, match="weight -1"):
        Mixture(["a", "b"], [1.0, -1.0])


def loader(sources, dp_rank=0, dp_size=1, state=None, workers=0, global_batch=8, micro=2):
    return ShardedLoader(
        sources,
        [0.75, 0.25],
        global_batch_size=global_batch,
        micro_batch_size=micro,
        dp_rank=dp_rank,
        dp_size=dp_size,
        num_workers=workers,
        state=state,
    )


def global_batches(sources, dp_size, steps, state=None, workers=0):
    """The global batches as seen by all ranks together: rank 0's rows first, then rank 1's..."""
    ranks = [loader(sources, r, dp_size, state=state, workers=workers) for r in range(dp_size)]
    per_rank_micro = 8 // dp_size // 2
    out = []
    for _ in range(steps):
        rows = [torch.cat([next(ld)["input_ids"] for _ in range(per_rank_micro)]) for ld in ranks]
        out.append(torch.cat(rows))
    return out, ranks[0]


@pytest.fixture()
def two_sources(tmp_path, tokenizer_file):
    web, _ = build_source(tmp_path, tokenizer_file, "web")
    code, _ = build_source(tmp_path, tokenizer_file, "code", docs_per_file=(15,))
    return [TokenSource("web", web, 16, 3, 320), TokenSource("code", code, 16, 3, 320)]


def test_same_global_batches_for_world_sizes_1_2_4_and_after_restart(two_sources):
    reference, _ = global_batches(two_sources, 1, 6)
    for dp in (2, 4):
        batches, _ = global_batches(two_sources, dp, 6)
        for a, b in zip(reference, batches):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Interrupt after 3 steps on 2 ranks, resume on 4 ranks from the saved position.
    first, rank0 = global_batches(two_sources, 2, 3)
    state = rank0.state_dict()
    assert state["next_batch"] == 3 and sum(state["samples"].values()) == 24
    resumed, _ = global_batches(two_sources, 4, 3, state=LoaderState(state["next_batch"], state["samples"]))
    for a, b in zip(reference, first + resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # 0.75 / 0.25 of 48 rows
    assert rank0.report()["web"]["samples"] + rank0.report()["code"]["samples"] == 24


def test_multiworker_loader_matches_single_process(two_sources):
    single, _ = global_batches(two_sources, 1, 5)
    multi, _ = global_batches(two_sources, 1, 5, workers=2)
    for a, b in zip(single, multi):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_packed_batch_boundaries(two_sources):
    batch = next(loader(two_sources))
    ids, labels, docs, pos = batch["input_ids"], batch["labels"], batch["doc_ids"], batch["position_ids"]
    assert ids.shape == labels.shape == docs.shape == pos.shape == (2, 16)
    new_doc = docs[:, 1:] != docs[:, :-1]
    assert (pos[:, 1:][new_doc] == 0).all()  # positions restart at every document start
    assert (pos[:, 1:][~new_doc] == pos[:, :-1][~new_doc] + 1).all()
    assert (labels[:, :-1][new_doc] == -100).all()  # no label across a document boundary
    assert (labels[:, :-1][~new_doc] == ids[:, 1:][~new_doc]).all()


def test_missing_truncated_and_foreign_shards_fail_clearly(source_dir):
    out, _ = source_dir
    manifest = load_manifest(out)
    victim = out / manifest.shards[1].name
    data = victim.read_bytes()
    # Cut inside the last member's data: the tar still indexes, with the right member count.
    victim.write_bytes(data[: len(data) - 1024 - 100])
    src = TokenSource("web", out, 16, 0, 320)
    with pytest.raises(DataError, match=f"{victim.name}: .* truncated or corrupt"):
        for j in range(src.epoch_tokens // 16 + 1):
            src.window(j)
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=victim.name):
        ShardReader(victim, manifest.shards[1].documents, manifest.dtype, 320, False)  # no size known: index check
    victim.unlink()
    with pytest.raises(DataError, match=f"{victim.name}: shard listed in the manifest is missing"):
        TokenSource("web", out, 16, 0, 320)


def test_vocabulary_checks_and_empty_source(source_dir, tmp_path):
    out, _ = source_dir
    with pytest.raises(DataError, match="raise model.vocab_size"):
        TokenSource("web", out, 16, 0, model_vocab_size=100)
    raw = json.loads((out / "manifest.json").read_text())
    raw["shards"] = []
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="has no tokens"):
        TokenSource("empty", empty, 16, 0, 320)
    with pytest.raises(DataError, match="no manifest"):
        TokenSource("none", tmp_path / "nowhere", 16, 0, 320)


def test_token_id_beyond_vocab_in_a_shard_is_caught(source_dir):
    out, _ = source_dir
    manifest = load_manifest(out)
    shard = manifest.shards[0]
    reader = ShardReader(out / shard.name, shard.documents, manifest.dtype, vocab_size=5, with_mask=False)
    with pytest.raises(DataError, match="token id .* >= vocabulary size 5"):
        reader.read(0)


def test_tokenize_skips_finished_files_and_recovers_from_interruption(tmp_path, tokenizer_file):
    out, _ = build_source(tmp_path, tokenizer_file, "web")
    manifest = load_manifest(out)
    first = out / manifest.shards[0].name
    mtime = first.stat().st_mtime_ns
    # Simulate a crash while file 2 was being written: its record is gone, a temp file is left.
    os.remove(out / ".done" / "00002.json")
    (out / ".web-00002-0000.tar.tmp-999").write_bytes(b"partial")
    options = TokenizeOptions(source="web", tokenizer_path=str(tokenizer_file), out_dir=str(out), tokens_per_shard=300)
    again = tokenize([str(tmp_path / "raw-web" / "*.jsonl")], options, progress=False)
    assert first.stat().st_mtime_ns == mtime  # file 0 was not redone
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in manifest.shards]


def test_tokenize_bad_inputs(tmp_path, tokenizer_file):
    bad = write_jsonl(tmp_path / "bad.jsonl", ["fine"])
    with bad.open("a") as f:
        f.write(json.dumps({"content": "oops"}) + "\n")
    options = TokenizeOptions(source="s", tokenizer_path=str(tokenizer_file), out_dir=str(tmp_path / "o"))
    with pytest.raises(DataError, match=r"bad.jsonl:2: no field 'text'"):
        tokenize([str(bad)], options, progress=False)
    with pytest.raises(DataError, match="matches no file"):
        tokenize([str(tmp_path / "none*.jsonl")], options, progress=False)
    missing_tok = TokenizeOptions(source="s", tokenizer_path=str(tmp_path / "nope.json"), out_dir=str(tmp_path / "o"))
    with pytest.raises(DataError, match="nope.json: tokenizer file not found"):
        tokenize([str(bad)], missing_tok, progress=False)


def test_a_mixture_of_different_tokenizers_is_refused(tmp_path, tokenizer_file):
    from tokenizers import Tokenizer

    from ouro_train.data.build import check_same_tokenizer

    web, _ = build_source(tmp_path, tokenizer_file, "web")
    other_tok = tmp_path / "other.json"
    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.add_tokens(["<extra>"])  # a different tokenizer file, hence another sha256
    tok.save(str(other_tok))
    code, _ = build_source(tmp_path, other_tok, "code", docs_per_file=(5,))
    sources = [TokenSource("web", web, 16, 0, 512), TokenSource("code", code, 16, 0, 512)]
    with pytest.raises(DataError, match="source 'code' .* re-tokenize them with one tokenizer"):
        check_same_tokenizer(sources)


def test_parquet_and_txt_inputs_with_two_worker_processes(tmp_path, tokenizer_file):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(7, 12)
    pq.write_table(pa.table({"body": docs[:8]}), tmp_path / "a.parquet")
    for i, doc in enumerate(docs[8:]):
        (tmp_path / f"t{i}.txt").write_text(doc)
    options = TokenizeOptions(
        source="mixed", tokenizer_path=str(tokenizer_file), out_dir=str(tmp_path / "out"), text_field="body"
    )
    manifest = tokenize([str(tmp_path / "a.parquet"), str(tmp_path / "t*.txt")], options, workers=2, progress=False)
    assert manifest.documents == 12 and len(manifest.shards) == 5  # one shard per input file here
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    decoded = []
    for shard in manifest.shards:
        reader = ShardReader(tmp_path / "out" / shard.name, shard.documents, manifest.dtype, 320, False)
        decoded += [tok.decode(reader.read(i)[0][:-1].tolist()) for i in range(shard.documents)]
    assert decoded == docs  # input order is kept whatever the worker finishing order


# --- shard checksums at first open, missing shards, empty corpora ---------------------------------


def flip_low_bit_of_a_token(shard: Path) -> int:
    """Flip the lowest bit of the first token of the shard's second document, in place (size,
    tar headers and document count unchanged: only the sha256 can tell). -> its byte offset."""
    import tarfile

    with tarfile.open(shard) as tar:
        members = [m for m in tar.getmembers() if ".tokens." in m.name]
    offset = members[1].offset_data
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0x01
    shard.write_bytes(bytes(data))
    return offset


def read_every_window(src: TokenSource) -> list[np.ndarray]:
    return [src.window(j).tokens for j in range(src.epoch_tokens // src.seq_len + 1)]


def test_a_flipped_bit_in_a_shard_fails_at_first_open_naming_the_shard(source_dir, monkeypatch):
    import ouro_train.data.source as source_module

    out, _ = source_dir
    manifest = load_manifest(out)
    # An intact source passes, and each shard is hashed once per process even when the reader
    # cache closes and reopens it (max_open_shards=1).
    hashed = []
    real_verify = source_module.verify_sha256
    monkeypatch.setattr(
        source_module, "verify_sha256", lambda path, sha: (hashed.append(path.name), real_verify(path, sha))
    )
    intact = read_every_window(TokenSource("web", out, 16, 0, 320, max_open_shards=1))
    assert sorted(hashed) == sorted(s.name for s in manifest.shards)
    monkeypatch.setattr(source_module, "verify_sha256", real_verify)

    victim = out / manifest.shards[2].name
    flip_low_bit_of_a_token(victim)
    with pytest.raises(DataError) as error:
        read_every_window(TokenSource("web", out, 16, 0, 320))
    message = str(error.value)
    assert str(victim) in message and manifest.shards[2].sha256 in message
    assert file_sha256(victim) in message and "Re-copy it" in message and "ouro-data tokenize" in message
    # The way out for trusted storage: the flipped token is read silently (what the check prevents).
    unchecked = read_every_window(TokenSource("web", out, 16, 0, 320, verify_checksums=False))
    differing = [j for j, (a, b) in enumerate(zip(intact, unchecked)) if not np.array_equal(a, b)]
    assert 1 <= len(differing) <= 2  # the one token, in one window (or two: windows share an edge)


def test_a_corrupt_shard_fails_in_loader_worker_processes_too(two_sources):
    web = two_sources[0]
    victim = web.directory / web.manifest.shards[0].name
    flip_low_bit_of_a_token(victim)
    fresh = [TokenSource(s.name, s.directory, 16, 3, 320) for s in two_sources]
    with pytest.raises(DataError, match=f"{victim.name}: sha256 .* but the manifest says"):
        global_batches(fresh, 1, 5, workers=2)


def test_a_shard_missing_at_first_open_is_named(source_dir):
    out, _ = source_dir
    manifest = load_manifest(out)
    checked = TokenSource("web", out, 16, 0, 320)
    unchecked = TokenSource("web", out, 16, 0, 320, verify_checksums=False)
    victim = out / manifest.shards[0].name
    victim.unlink()  # after the sources were built (their manifest check saw it)
    for src in (checked, unchecked):
        with pytest.raises(DataError, match=f"{victim}: shard is missing; restore it"):
            read_every_window(src)


def test_data_verify_checksums_reaches_the_sources(source_dir):
    from ouro_train.config.resolve import resolve
    from ouro_train.config.store import compose_config
    from ouro_train.data.build import build_data

    out, _ = source_dir
    base = ["data.source=shards", f"data.sources=[{{name: web, path: {out}, weight: 1.0}}]", "model.vocab_size=320"]
    for flag, expected in (([], True), (["data.verify_checksums=false"], False)):
        cfg = compose_config(base + flag)
        train, _ = build_data(cfg, resolve(cfg))
        assert [s.verify_checksums for s in train.sources] == [expected]


@pytest.mark.parametrize("kind", ["no documents", "blank lines", "empty texts", "empty txt"])
def test_tokenize_refuses_an_empty_corpus(tmp_path, tokenizer_file, kind, capsys):
    from data_tools.cli import main as ouro_data

    raw = tmp_path / "raw"
    raw.mkdir()
    if kind == "no documents":
        (raw / "a.jsonl").write_text("")
    elif kind == "blank lines":
        (raw / "a.jsonl").write_text("\n  \n\n")
    elif kind == "empty texts":
        write_jsonl(raw / "a.jsonl", ["", "   ", "\n"])
        write_jsonl(raw / "b.jsonl", [""])
    else:
        (raw / "a.txt").write_text("")
    out = tmp_path / "out"
    pattern = str(raw / "*")
    code = ouro_data(["tokenize", pattern, "--source", "s", "--tokenizer", str(tokenizer_file), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"input {pattern}" in err and "nothing to train on, so no manifest was written" in err
    assert not (out / "manifest.json").exists()
    assert not out.exists() and not (tmp_path / ".out.partial").exists()  # nothing written at all
    # One document with text among empty ones is a corpus (the empty ones stay: EOS only).
    write_jsonl(raw / "c.jsonl", ["some text"])
    manifest = tokenize([pattern], TokenizeOptions("s", str(tokenizer_file), str(out)), progress=False)
    assert manifest.documents >= 1 and (out / "manifest.json").is_file()
