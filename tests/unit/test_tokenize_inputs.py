"""`ouro-data tokenize` / `sft` inputs saved with the `datasets` library (`save_to_disk`), and a
tokenize that fails mid-way: no output directory, no partial shard; the re-run finishes it."""

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import datasets
import pytest

from data_tools.cli import main as ouro_data
from ouro_train.data.manifest import DataError, load_manifest
from ouro_train.data.source import ShardReader
from ouro_train.data.tokenize import TokenizeOptions, tokenize, work_directory
from ouro_train.data.tokenizer import save_tokenizer, train_bpe_tokenizer
from ouro_train.utils.atomic import is_temporary

TEXTS = [f"document {i}: " + "loop model token exit gate " * (i % 5) + "héllo 数据" for i in range(23)]
CHAT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    tokenizer = train_bpe_tokenizer(TEXTS, vocab_size=300)
    return save_tokenizer(tokenizer, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def token_stream(out: Path) -> list[list[int]]:
    """Every document's tokens, in manifest order."""
    manifest = load_manifest(out)
    docs = []
    for shard in manifest.shards:
        reader = ShardReader(out / shard.name, shard.documents, manifest.dtype, manifest.tokenizer.vocab_size, False)
        docs += [reader.read(i)[0].tolist() for i in range(shard.documents)]
    return docs


def run(inputs, tokenizer_file, out: Path, workers: int = 1, **extra) -> list[list[int]]:
    options = TokenizeOptions("s", str(tokenizer_file), str(out), tokens_per_shard=40, **extra)
    tokenize([str(p) for p in inputs], options, workers=workers, progress=False)
    return token_stream(out)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_saved_dataset_and_dataset_dict_tokenize_like_jsonl(tmp_path, tokenizer_file):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"body": t, "id": i} for i, t in enumerate(TEXTS)])
    expected = run([jsonl], tokenizer_file, tmp_path / "from_jsonl", text_field="body")
    assert len(expected) == len(TEXTS)

    dataset = datasets.Dataset.from_dict({"id": list(range(len(TEXTS))), "body": TEXTS})
    dataset.save_to_disk(str(tmp_path / "plain"), num_shards=3)  # three Arrow files: three units of work
    held_out = datasets.Dataset.from_dict({"id": [0], "body": ["held out"]})
    datasets.DatasetDict({"train": dataset, "validation": held_out}).save_to_disk(str(tmp_path / "dict"))

    plain = run([tmp_path / "plain"], tokenizer_file, tmp_path / "p1", text_field="body")
    assert plain == expected
    assert len({s.name.rsplit("-", 1)[0] for s in load_manifest(tmp_path / "p1").shards}) == 3
    # Two worker processes, one part each: the same shards, byte for byte.
    run([tmp_path / "plain"], tokenizer_file, tmp_path / "p2", workers=2, text_field="body")
    assert snapshot(tmp_path / "p1") == snapshot(tmp_path / "p2")

    assert run([tmp_path / "dict"], tokenizer_file, tmp_path / "d", text_field="body") == expected  # "train"
    validation = run([tmp_path / "dict"], tokenizer_file, tmp_path / "v", text_field="body", split="validation")
    held_out_jsonl = write_jsonl(tmp_path / "held_out.jsonl", [{"body": "held out"}])
    assert validation == run([held_out_jsonl], tokenizer_file, tmp_path / "hj", text_field="body")
    # A jsonl file and a saved dataset in one command: file order, as for files.
    both = run([jsonl, tmp_path / "plain"], tokenizer_file, tmp_path / "both", text_field="body")
    assert both == expected + expected


def test_sft_reads_a_saved_dataset_like_jsonl(tmp_path, tokenizer_file):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    chat_tokenizer = tmp_path / "chat.json"
    tokenizer.save(str(chat_tokenizer))
    conversations = [[CHAT[0] | {"content": f"{i}+{i}?"}, CHAT[1] | {"content": str(2 * i)}] for i in range(7)]
    jsonl = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in conversations])
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"messages": conversations})}).save_to_disk(
        str(tmp_path / "chat_dict")
    )
    common = ["--source", "chat", "--tokenizer", str(chat_tokenizer)]
    assert ouro_data(["sft", str(jsonl), "--out", str(tmp_path / "j"), *common]) == 0
    assert ouro_data(["sft", str(tmp_path / "chat_dict"), "--out", str(tmp_path / "d"), *common]) == 0
    assert snapshot(tmp_path / "j") == snapshot(tmp_path / "d")


def test_a_missing_split_or_column_is_a_clear_error(tmp_path, tokenizer_file, capsys):
    dataset = datasets.Dataset.from_dict({"content": ["a", "b"], "id": [1, 2]})
    datasets.DatasetDict({"train": dataset, "test": dataset}).save_to_disk(str(tmp_path / "dict"))
    dataset.save_to_disk(str(tmp_path / "plain"))
    (tmp_path / "not_a_dataset").mkdir()
    capsys.readouterr()  # (save_to_disk's progress bars)
    out = tmp_path / "out"
    common = ["--source", "s", "--tokenizer", str(tokenizer_file), "--out", str(out)]
    dd, plain = tmp_path / "dict", tmp_path / "plain"
    columns = "(columns: ['content', 'id']); pass --text-field"
    cases = [
        ([str(dd), "--split", "validation"], f"{dd}: no split 'validation' (splits: ['train', 'test']); pass --split"),
        ([str(dd), "--split", "test"], f"{dd} (split 'test'): no column 'text' {columns}"),
        ([str(plain)], f"{plain}: no column 'text' {columns}"),
        ([str(plain), "--split", "test"], f"{plain}: a saved Dataset, which has no splits, so --split 'test'"),
        ([str(tmp_path / "not_a_dataset")], "not_a_dataset: a directory, but not a dataset saved with"),
    ]
    for argv, expected in cases:
        assert ouro_data(["tokenize", *argv, *common]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err, err
        assert not out.exists() and not work_directory(out).exists()
    assert ouro_data(["sft", str(tmp_path / "dict"), *common]) == 2
    assert "no column 'messages' (columns: ['content', 'id'])" in capsys.readouterr().err
    assert ouro_data(["tokenize", str(tmp_path / "dict"), "--text-field", "content", *common]) == 0


def test_a_failed_tokenize_leaves_no_output_and_the_rerun_matches_a_clean_run(tmp_path, tokenizer_file, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    for index in range(3):
        write_jsonl(raw / f"part{index}.jsonl", [{"text": t} for t in TEXTS[index::3]])
    good = (raw / "part1.jsonl").read_text()
    lines = good.splitlines(keepends=True)
    (raw / "part1.jsonl").write_text("".join(lines[:5]) + "{not json\n" + "".join(lines[5:]))
    out, clean = tmp_path / "out", tmp_path / "clean"
    work = work_directory(out.resolve())

    # A malformed record in the second file, after it has written shards (40 tokens per shard).
    with pytest.raises(
        DataError, match=r"part1.jsonl:6: not valid JSON .*\(nothing was written to .*out; what is finished is kept"
    ):
        run([raw / "*.jsonl"], tokenizer_file, out)
    assert not out.exists()
    kept = sorted(p.name for p in work.iterdir())
    assert kept == [".done"] + sorted(n for n in kept if n.startswith("s-00000-")) and len(kept) > 2  # file 0 only
    assert os.listdir(work / ".done") == ["00000.json"]
    first = work / kept[1]
    mtime = first.stat().st_mtime_ns

    # Ctrl-C while the third file is written (the second one fixed): still no output directory.
    (raw / "part1.jsonl").write_text(good)
    import ouro_train.data.tokenize as module

    real_write_shard = module._write_shard

    def interrupted(out_dir, name, *args):
        if name.startswith("s-00002-0001"):
            raise KeyboardInterrupt
        return real_write_shard(out_dir, name, *args)

    monkeypatch.setattr(module, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run([raw / "*.jsonl"], tokenizer_file, out)
    monkeypatch.undo()
    assert not out.exists()
    assert not [p for p in work.rglob("*") if is_temporary(p.name) or p.name.startswith("s-00002-")]
    assert sorted(os.listdir(work / ".done")) == ["00000.json", "00001.json"]
    # What a kill (no cleanup) leaves: a staging directory with a partial shard, a half-written record.
    (work / ".00002.999-deadbeef.tmp").mkdir()
    (work / ".00002.999-deadbeef.tmp" / "s-00002-0000.tar").write_bytes(b"partial")
    (work / ".done" / ".00002.json.999-cafe.tmp").write_text("{")

    resumed = run([raw / "*.jsonl"], tokenizer_file, out)
    assert not work.exists() and (out / first.name).stat().st_mtime_ns == mtime  # file 0 was not redone
    assert resumed == run([raw / "*.jsonl"], tokenizer_file, clean)
    assert snapshot(out) == snapshot(clean)  # same shards, done-records, manifest, tokenizer
    assert not [p for p in out.rglob("*") if is_temporary(p.name)]

    # A failed re-run over a complete output leaves it as it was; the fixed one adds the new file.
    before = snapshot(out)
    write_jsonl(raw / "part3.jsonl", [{"text": "fine"}, {"body": "no text field"}])
    with pytest.raises(DataError, match=r"part3.jsonl:2: no field 'text'"):
        run([raw / "*.jsonl"], tokenizer_file, out)
    assert snapshot(out) == before
    write_jsonl(raw / "part3.jsonl", [{"text": "fine"}, {"text": "now"}])
    added = run([raw / "*.jsonl"], tokenizer_file, out)
    assert added[:-2] == resumed and added[-2:] == run([raw / "part3.jsonl"], tokenizer_file, tmp_path / "3")
    assert (out / first.name).stat().st_mtime_ns == mtime and not work.exists()
    # Other settings (here: no EOS) redo every input; none of the earlier shards is reused.
    assert run([raw / "*.jsonl"], tokenizer_file, out, append_eos=False) == [doc[:-1] for doc in added]


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="the stalled workers are monkeypatched")
def test_sigterm_stops_tokenize_and_its_workers_and_writes_nothing(tmp_path, tokenizer_file, monkeypatch, capsys):
    import ouro_train.data.tokenize as module

    raw = tmp_path / "raw"
    raw.mkdir()
    for index in range(2):
        write_jsonl(raw / f"part{index}.jsonl", [{"text": t} for t in TEXTS[index::2]])
    parent, pids = os.getpid(), tmp_path / "pids"
    real_write_shard = module._write_shard

    def stalled(out_dir, name, *args):  # in the two worker processes: the second one asks for a stop
        if os.getpid() != parent:
            with pids.open("a") as f:
                f.write(f"{os.getpid()}\n")
            if name.startswith("s-00001-"):
                os.kill(parent, signal.SIGTERM)
            time.sleep(60)
        return real_write_shard(out_dir, name, *args)

    monkeypatch.setattr(module, "_write_shard", stalled)
    out = tmp_path / "out"
    argv = ["tokenize", str(raw / "*.jsonl"), "--source", "s", "--tokenizer", str(tokenizer_file), "--out", str(out)]
    handler, started = signal.getsignal(signal.SIGTERM), time.monotonic()
    assert ouro_data([*argv, "--workers", "2"]) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 30  # the workers were not waited for
    assert "ouro-data tokenize: stopped; nothing was written to" in capsys.readouterr().err
    assert not out.exists() and signal.getsignal(signal.SIGTERM) == handler
    for pid in {int(line) for line in pids.read_text().split()}:
        assert not Path(f"/proc/{pid}").exists()  # killed and reaped: no orphan goes on writing
    monkeypatch.undo()
    assert ouro_data(argv) == 0 and load_manifest(out).documents == len(TEXTS)
