"""Corpus files -> webdataset tar shards of token documents, plus manifest.json.

Inputs: .jsonl / .jsonl.gz (one document per line, `text_field`), .parquet (column
`text_field`), .txt (one document per file). Each input file is tokenized by one worker
process and written to its own shards `<source>-<file:05d>-<part:04d>.tar`, so shard names do
not depend on the number of workers. Crash safety:

* a shard is written under a temporary name and renamed when complete: a final name always
  means a whole shard;
* when all shards of an input file are written, a small record `.done/<file>.json` is
  committed (atomically); a re-run skips files that have one and redoes the others;
* manifest.json is written last, from the records, only when every input file is done; just
  before it, a copy of the tokenizer as tokenizer.json (checkpoints trained on the data carry it).

A corpus without a single document with text (no documents, or only empty ones) is refused:
no manifest is written, so it cannot be mistaken for a source.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ouro_train.data.manifest import (
    DataError,
    Manifest,
    ShardInfo,
    TokenizerInfo,
    dtype_for_vocab,
    token_extension,
)
from ouro_train.utils.atomic import atomic_write_bytes, atomic_write_text

DONE_DIR = ".done"


@dataclass
class TokenizeOptions:
    source: str
    tokenizer_path: str
    out_dir: str
    text_field: str = "text"
    tokens_per_shard: int = 50_000_000
    append_eos: bool = True
    eos_token: str = "<|endoftext|>"
    bos_token: str | None = None
    batch_documents: int = 512


def iter_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """("file:line", record) for every non-empty line of a .jsonl(.gz) file; bad JSON names the line."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{line_number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: not valid JSON ({error.msg})") from error


def read_documents(path: Path, text_field: str) -> Iterator[str]:
    """Documents of one input file; a record without the field is an error naming file and line."""
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        for where, record in iter_jsonl(path):
            if text_field not in record:
                raise DataError(f"{where}: no field {text_field!r} (fields: {sorted(record)}); pass --text-field")
            yield str(record[text_field])
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        if text_field not in table.schema_arrow.names:
            raise DataError(
                f"{path}: no column {text_field!r} (columns: {table.schema_arrow.names}); pass --text-field"
            )
        for batch in table.iter_batches(columns=[text_field], batch_size=4096):
            yield from (str(text) for text in batch.column(0).to_pylist() if text is not None)
    elif name.endswith(".txt"):
        yield path.read_text(encoding="utf-8")
    else:
        raise DataError(f"{path}: unsupported input type; use .jsonl, .jsonl.gz, .parquet or .txt")


def tokenizer_info(tokenizer_path: str, options: TokenizeOptions):
    from tokenizers import Tokenizer

    path = Path(tokenizer_path)
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file not found (a Hugging Face tokenizer.json)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:
        raise DataError(f"{path}: not a readable tokenizer.json ({error})") from error
    # Text is text: a document containing the string "<|endoftext|>" must not become an EOS id
    # (special tokens are inserted by id, by this tool, where the format says so).
    tokenizer.encode_special_tokens = True
    eos_id = tokenizer.token_to_id(options.eos_token)
    if eos_id is None:
        raise DataError(f"{path}: has no EOS token {options.eos_token!r}; pass --eos-token")
    bos_id = None
    if options.bos_token is not None:
        bos_id = tokenizer.token_to_id(options.bos_token)
        if bos_id is None:
            raise DataError(f"{path}: has no BOS token {options.bos_token!r}")
    info = TokenizerInfo(
        name=path.parent.name if path.name == "tokenizer.json" else path.stem,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        vocab_size=tokenizer.get_vocab_size(),
        eos_id=eos_id,
        bos_id=bos_id,
        append_eos=options.append_eos,
        prepend_bos=bos_id is not None,
    )
    return tokenizer, info


def _write_shard(
    out_dir: Path, name: str, docs: list[np.ndarray], dtype: str, masks: list[np.ndarray] | None
) -> ShardInfo:
    """Write one tar atomically; returns its manifest entry."""
    import webdataset as wds

    extension = token_extension(dtype)
    buffer = io.BytesIO()
    # A fixed mtime makes shards byte-reproducible: the same input gives the same sha256.
    with wds.TarWriter(buffer, mtime=0) as writer:
        for index, tokens in enumerate(docs):
            sample = {
                "__key__": f"{index:09d}",
                extension: tokens.astype(np.dtype(dtype).newbyteorder("<")).tobytes(),
            }
            if masks is not None:
                sample["mask.u8"] = masks[index].astype(np.uint8).tobytes()
            writer.write(sample)
    data = buffer.getvalue()
    # Durable: the done-record written after it says the shard exists, so it must survive a crash.
    atomic_write_bytes(out_dir / name, data, durable=True)
    return ShardInfo(
        name=name,
        documents=len(docs),
        tokens=int(sum(len(d) for d in docs)),
        max_token_id=int(max((int(d.max()) for d in docs if d.size), default=-1)),
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
    )


def _done_record(out_dir: Path, file_index: int) -> Path:
    return out_dir / DONE_DIR / f"{file_index:05d}.json"


def _commit_json(path: Path, record: dict) -> None:
    atomic_write_text(path, json.dumps(record))


def tokenize_file(file_index: int, path: str, options: TokenizeOptions) -> dict:
    """Worker: one input file -> its shards and its done-record, which it returns:
    {"input", "shards": [shard entries], "text_documents": documents with any non-blank text}."""
    tokenizer, info = tokenizer_info(options.tokenizer_path, options)
    dtype = dtype_for_vocab(info.vocab_size)
    out_dir = Path(options.out_dir)
    shards: list[ShardInfo] = []
    pending: list[np.ndarray] = []
    pending_tokens = 0

    def flush() -> None:
        nonlocal pending, pending_tokens
        if pending:
            name = f"{options.source}-{file_index:05d}-{len(shards):04d}.tar"
            shards.append(_write_shard(out_dir, name, pending, dtype, None))
            pending, pending_tokens = [], 0

    texts: list[str] = []
    text_documents = 0

    def encode(batch: list[str]) -> None:
        nonlocal pending_tokens
        for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
            ids = encoding.ids
            if info.prepend_bos:
                ids = [info.bos_id] + ids
            if info.append_eos:
                ids = ids + [info.eos_id]
            pending.append(np.asarray(ids, dtype=np.uint32))
            pending_tokens += len(ids)
            if pending_tokens >= options.tokens_per_shard:
                flush()

    for text in read_documents(Path(path), options.text_field):
        texts.append(text)
        text_documents += bool(text.strip())
        if len(texts) >= options.batch_documents:
            encode(texts)
            texts = []
    encode(texts)
    flush()
    record = {"input": str(path), "shards": [asdict(s) for s in shards], "text_documents": text_documents}
    _commit_json(_done_record(out_dir, file_index), record)
    return record


def expand_inputs(patterns: list[str]) -> list[Path]:
    import glob

    files: list[Path] = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern, recursive=True))
        if not matched:
            raise DataError(f"input {pattern!r} matches no file")
        files.extend(Path(m) for m in matched)
    return files


def tokenize(inputs: list[str], options: TokenizeOptions, workers: int = 1, progress: bool = True) -> Manifest:
    files = expand_inputs(inputs)
    _, info = tokenizer_info(options.tokenizer_path, options)  # fail fast, before any worker starts
    out_dir = Path(options.out_dir)
    (out_dir / DONE_DIR).mkdir(parents=True, exist_ok=True)
    records: dict[int, dict] = {}
    todo = []
    for index, path in enumerate(files):
        done = _done_record(out_dir, index)
        if done.is_file():
            record = json.loads(done.read_text())
            if record["input"] == str(path) and all((out_dir / s["name"]).is_file() for s in record["shards"]):
                records[index] = record
                continue
        todo.append((index, path))
    bar = tqdm(
        total=len(files),
        initial=len(records),
        desc=f"tokenize {options.source}",
        unit="file",
        disable=not progress,
    )
    if workers <= 1:
        for index, path in todo:
            records[index] = tokenize_file(index, str(path), options)
            bar.update(1)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(tokenize_file, index, str(path), options): index for index, path in todo}
            for future in as_completed(futures):
                records[futures[future]] = future.result()
                bar.update(1)
    bar.close()
    manifest = Manifest(
        source=options.source,
        tokenizer=info,
        dtype=dtype_for_vocab(info.vocab_size),
        shards=[ShardInfo(**entry) for index in sorted(records) for entry in records[index]["shards"]],
    )
    # (A done-record written before text_documents was counted: its documents count as text.)
    with_text = sum(r.get("text_documents", sum(s["documents"] for s in r["shards"])) for r in records.values())
    if with_text == 0:
        what = "no documents" if manifest.documents == 0 else f"{manifest.documents} documents, all empty"
        raise DataError(
            f"input {' '.join(inputs)} ({len(files)} file{'s' * (len(files) != 1)}): {what}; nothing to train "
            f"on, so no manifest was written in {out_dir}. Check the input files and --text-field "
            f"({options.text_field!r})"
        )
    copy_tokenizer(options.tokenizer_path, out_dir, info.sha256)
    manifest.save(out_dir)
    return manifest


def copy_tokenizer(tokenizer_path: str | Path, out_dir: Path, sha256: str) -> Path:
    """tokenizer.json beside the manifest (before it is written), so that a data directory carries
    its tokenizer and the checkpoints trained on it can copy it (checkpoint/tokenizer_files.py)."""
    from ouro_train.data.manifest import file_sha256

    target = Path(out_dir) / "tokenizer.json"
    if target.is_file() and file_sha256(target) == sha256:
        return target
    data = Path(tokenizer_path).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(f"{tokenizer_path}: changed while tokenizing (sha256 differs); run the command again")
    atomic_write_bytes(target, data)
    return target
