"""Corpus files -> webdataset tar shards of token documents, plus manifest.json.

Inputs: .jsonl / .jsonl.gz (one document per line, `text_field`), .parquet (column
`text_field`), .txt (one document per file), and a directory written by the `datasets` library's
`save_to_disk` (a Dataset, or a DatasetDict: its split `split`, default "train"; read with
`load_from_disk`, memory-mapped Arrow; column `text_field`). Each input is a unit of work: a
file, or one contiguous part of a saved dataset per Arrow file of its split. Each unit is
tokenized by one worker process and written to its own shards `<source>-<unit:05d>-<part:04d>.tar`,
so shard names do not depend on the number of workers. Crash safety:

* everything is written in a work directory beside the output, `.<out>.partial`, which is
  renamed to `<out>` when complete: a failed run (an error, a bad record, Ctrl-C, a kill)
  leaves no output directory, or the previous complete one untouched. Re-running an existing
  output starts the work directory from hard links of its files;
* a unit's shards are written to a temporary directory beside them and moved into place when
  the unit is complete, then a small record `.done/<unit>.json` is committed (atomically); a
  re-run skips the units that have one for the same input and settings (tokenizer, text field,
  EOS/BOS, shard size, source name) and redoes the others;
* manifest.json is written last, from the records, only when every unit is done; just
  before it, a copy of the tokenizer as tokenizer.json (checkpoints trained on the data carry it).

A corpus without a single document with text (no documents, or only empty ones) is refused:
nothing is written, so it cannot be mistaken for a source.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
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
from ouro_train.utils.atomic import (
    atomic_write_bytes,
    atomic_write_text,
    fsync_dir,
    is_temporary,
    temporary_sibling,
)

DONE_DIR = ".done"
MANIFEST = "manifest.json"


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
    split: str | None = None  # of a saved DatasetDict input (None: "train"); a saved Dataset has none


@dataclass(frozen=True)
class DatasetPart:
    """Rows [start, stop) of a dataset saved with `datasets` (`save_to_disk`), the split `split` of
    a DatasetDict (None: a Dataset): part `index` of `count`, one per Arrow file of the split. A
    unit of work like one input file; `str()` names it in messages and in its done-record."""

    path: Path
    split: str | None
    index: int
    count: int
    start: int
    stop: int
    fingerprint: str = field(default="", compare=False)
    columns: tuple[str, ...] = field(default=(), compare=False)

    @property
    def where(self) -> str:
        return f"{self.path}" + (f" (split {self.split!r})" if self.split is not None else "")

    def __str__(self) -> str:
        return f"{self.where} part {self.index + 1}/{self.count}"

    def rows(self):
        """This part of the split, memory-mapped (no copy)."""
        dataset, _ = open_saved_dataset(self.path, self.split)
        return dataset.select(range(self.start, self.stop))


Input = Path | DatasetPart


def is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def open_saved_dataset(path: Path, split: str | None):
    """(the Dataset, split name or None) saved at `path` by `Dataset.save_to_disk` or, with splits,
    `DatasetDict.save_to_disk` (its split `split`, default "train"). Memory-mapped Arrow."""
    if not is_saved_dataset(path):
        raise DataError(
            f"{path}: a directory, but not a dataset saved with the `datasets` library's save_to_disk "
            "(no state.json or dataset_dict.json); pass files (.jsonl, .jsonl.gz, .parquet, .txt) or a saved dataset"
        )
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # a damaged or foreign directory: say which
        raise DataError(f"{path}: not a readable saved dataset ({type(error).__name__}: {error})") from error
    if isinstance(loaded, datasets.DatasetDict):
        name = "train" if split is None else split
        if name not in loaded:
            raise DataError(f"{path}: no split {name!r} (splits: {list(loaded)}); pass --split")
        return loaded[name], name
    if split is not None and (loaded.split is None or str(loaded.split) != split):  # (it may name its split)
        raise DataError(
            f"{path}: a saved Dataset, which has no splits, so --split {split!r} does not apply; "
            "drop --split, or pass the directory of the DatasetDict it was split from"
        )
    return loaded, None


def dataset_parts(path: Path, split: str | None) -> list[DatasetPart]:
    """A saved dataset as units of work: contiguous row ranges, one per Arrow file of the split
    (a function of the saved dataset alone, so shard names do not depend on the workers)."""
    dataset, name = open_saved_dataset(path, split)
    count = max(1, len(dataset.cache_files))
    rows = dataset.num_rows
    bounds = [index * rows // count for index in range(count + 1)]
    fingerprint = getattr(dataset, "_fingerprint", "")  # changes when the saved data does
    columns = tuple(dataset.column_names)
    return [
        DatasetPart(path, name, index, count, bounds[index], bounds[index + 1], fingerprint, columns)
        for index in range(count)
    ]


def input_key(source: Input) -> str:
    """What a done-record says it was made from; a re-run redoes a unit whose key differs."""
    if isinstance(source, DatasetPart):
        return f"{source} rows {source.start}:{source.stop} fingerprint {source.fingerprint}"
    return str(source)


def _missing_column(part: DatasetPart, column: str, option: str) -> DataError:
    return DataError(f"{part.where}: no column {column!r} (columns: {list(part.columns)}){option}")


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


def read_documents(path: Input, text_field: str) -> Iterator[str]:
    """Documents of one input; a record without the field is an error naming file and line."""
    if isinstance(path, DatasetPart):
        if text_field not in path.columns:
            raise _missing_column(path, text_field, "; pass --text-field")
        table = path.rows().select_columns([text_field]).with_format("arrow")
        for batch in table.iter(batch_size=4096):
            yield from (str(text) for text in batch.column(0).to_pylist() if text is not None)
        return
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
        raise DataError(
            f"{path}: unsupported input type; use .jsonl, .jsonl.gz, .parquet, .txt or a saved dataset's directory"
        )


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


def tokenize_file(file_index: int, path: Input | str, options: TokenizeOptions) -> dict:
    """Worker: one unit (an input file or a part of a saved dataset) -> its shards and its
    done-record in `options.out_dir` (the work directory), and returns the record:
    {"input", "shards": [shard entries], "text_documents": documents with any non-blank text}.
    The shards are written to a temporary directory and moved beside the others only when the
    whole unit is tokenized; a failure (an exception, Ctrl-C) removes it."""
    source = Path(path) if isinstance(path, str) else path
    tokenizer, info = tokenizer_info(options.tokenizer_path, options)
    dtype = dtype_for_vocab(info.vocab_size)
    out_dir = Path(options.out_dir)
    staging = temporary_sibling(out_dir / f"{file_index:05d}")
    staging.mkdir()
    try:
        shards, text_documents = _tokenize_into(staging, file_index, source, options, tokenizer, info, dtype)
        for shard in shards:
            os.replace(staging / shard.name, out_dir / shard.name)
        if shards:
            fsync_dir(out_dir)  # the renames are durable before the record that says they happened
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    record = {
        "input": input_key(source),
        "settings": record_settings(options, info),
        "shards": [asdict(s) for s in shards],
        "text_documents": text_documents,
    }
    _commit_json(_done_record(out_dir, file_index), record)
    return record


def record_settings(options: TokenizeOptions, info: TokenizerInfo) -> dict:
    """What, besides the input, decides a unit's shards: a re-run with other settings (another
    tokenizer, text field, EOS/BOS policy, shard size or source name) redoes the unit."""
    return {
        "source": options.source,
        "tokenizer_sha256": info.sha256,
        "text_field": options.text_field,
        "append_eos": info.append_eos,
        "eos_id": info.eos_id,
        "bos_id": info.bos_id,
        "tokens_per_shard": options.tokens_per_shard,
    }


def _tokenize_into(
    staging: Path, file_index: int, source: Input, options: TokenizeOptions, tokenizer, info: TokenizerInfo, dtype: str
) -> tuple[list[ShardInfo], int]:
    shards: list[ShardInfo] = []
    pending: list[np.ndarray] = []
    pending_tokens = 0

    def flush() -> None:
        nonlocal pending, pending_tokens
        if pending:
            name = f"{options.source}-{file_index:05d}-{len(shards):04d}.tar"
            shards.append(_write_shard(staging, name, pending, dtype, None))
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

    for text in read_documents(source, options.text_field):
        texts.append(text)
        text_documents += bool(text.strip())
        if len(texts) >= options.batch_documents:
            encode(texts)
            texts = []
    encode(texts)
    flush()
    return shards, text_documents


def expand_inputs(patterns: list[str], split: str | None = None) -> list[Input]:
    """Files and saved datasets (directories) named by paths or globs, in order; a saved dataset
    becomes its parts (`dataset_parts`)."""
    import glob

    inputs: list[Input] = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern, recursive=True))
        if not matched:
            raise DataError(f"input {pattern!r} matches no file")
        for match in matched:
            path = Path(match)
            inputs.extend(dataset_parts(path, split) if path.is_dir() else [path])
    return inputs


def work_directory(out_dir: Path) -> Path:
    """Where `tokenize` writes `out_dir` until it is complete (hidden, beside it)."""
    return out_dir.with_name(f".{out_dir.name}.partial")


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # a filesystem without hard links
        shutil.copy2(source, target)


def _open_work_directory(out_dir: Path) -> Path:
    """The work directory of `out_dir`: the one a failed run left (resumed), else a new one,
    holding hard links of what `out_dir` has when that is an earlier tokenize output."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a directory; choose another --out")
    work = work_directory(out_dir)
    if work.is_dir():
        for directory in (work, work / DONE_DIR):  # what a killed run was writing
            for entry in directory.glob(".*") if directory.is_dir() else ():
                if is_temporary(entry.name) and entry.is_dir():
                    shutil.rmtree(entry)
                elif is_temporary(entry.name):
                    entry.unlink()
    elif out_dir.is_dir() and any(out_dir.iterdir()):
        if not ((out_dir / MANIFEST).is_file() or (out_dir / DONE_DIR).is_dir()):
            raise DataError(
                f"{out_dir}: exists and is not a directory written by `ouro-data tokenize` (no {MANIFEST}); "
                "choose another --out (tokenize replaces the directory when it is complete)"
            )
        staging = temporary_sibling(work)
        try:
            shutil.copytree(
                out_dir,
                staging,
                symlinks=True,
                copy_function=_link_or_copy,
                ignore=lambda _, names: [n for n in names if is_temporary(n)],
            )
            os.replace(staging, work)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    else:
        work.parent.mkdir(parents=True, exist_ok=True)
        work.mkdir()
    (work / DONE_DIR).mkdir(exist_ok=True)
    return work


def _move_into_place(work: Path, out_dir: Path) -> None:
    """Rename the complete work directory to `out_dir` (an earlier one is replaced)."""
    if out_dir.is_dir():
        previous = temporary_sibling(out_dir)
        os.rename(out_dir, previous)
        try:
            os.rename(work, out_dir)
        except BaseException:
            os.rename(previous, out_dir)
            raise
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.rename(work, out_dir)
    fsync_dir(out_dir.parent)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """On a failure or a stop: kill the workers rather than wait for their inputs (what they were
    writing stays in the work directory's temporaries, which the next run removes). Without this,
    a SIGTERM'd tokenize left its workers running, orphaned, after the command had exited."""
    if hasattr(pool, "kill_workers"):  # Python >= 3.14
        pool.kill_workers()
    else:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
    pool.shutdown(wait=True, cancel_futures=True)


def tokenize(inputs: list[str], options: TokenizeOptions, workers: int = 1, progress: bool = True) -> Manifest:
    files = expand_inputs(inputs, options.split)
    for part in files:  # before any work: a saved dataset without the column
        if isinstance(part, DatasetPart) and part.index == 0 and options.text_field not in part.columns:
            raise _missing_column(part, options.text_field, "; pass --text-field")
    _, info = tokenizer_info(options.tokenizer_path, options)  # fail fast, before any worker starts
    out_dir = Path(options.out_dir).resolve()  # a symlinked --out: its target is replaced
    work = _open_work_directory(out_dir)
    work_options = replace(options, out_dir=str(work))
    settings = record_settings(options, info)
    records: dict[int, dict] = {}
    todo = []
    for index, path in enumerate(files):
        done = _done_record(work, index)
        if done.is_file():
            record = json.loads(done.read_text())
            if (
                record["input"] == input_key(path)
                and record.get("settings", settings) == settings  # (records from before settings: as they were)
                and all((work / s["name"]).is_file() for s in record["shards"])
            ):
                records[index] = record
                continue
        todo.append((index, path))
    bar = tqdm(
        total=len(files),
        initial=len(records),
        desc=f"tokenize {options.source}",
        unit="input",
        disable=not progress,
    )
    try:
        if workers <= 1:
            for index, path in todo:
                records[index] = tokenize_file(index, path, work_options)
                bar.update(1)
        else:
            pool = ProcessPoolExecutor(max_workers=workers)
            try:
                futures = {pool.submit(tokenize_file, index, path, work_options): index for index, path in todo}
                for future in as_completed(futures):
                    records[futures[future]] = future.result()
                    bar.update(1)
            except BaseException:
                _stop_workers(pool)
                raise
            pool.shutdown()
    except DataError as error:
        kept = f"; what is finished is kept in {work} ({len(records)} of {len(files)} inputs): the same command goes on"
        raise DataError(f"{error} (nothing was written to {out_dir}{kept if records else ''})") from error
    finally:
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
        shutil.rmtree(work, ignore_errors=True)
        what = "no documents" if manifest.documents == 0 else f"{manifest.documents} documents, all empty"
        raise DataError(
            f"input {' '.join(inputs)} ({len(files)} input{'s' * (len(files) != 1)}): {what}; nothing to train "
            f"on, so no manifest was written in {out_dir}. Check the input files and --text-field "
            f"({options.text_field!r})"
        )
    copy_tokenizer(options.tokenizer_path, work, info.sha256)
    manifest.save(work)
    _move_into_place(work, out_dir)
    return manifest


def copy_tokenizer(tokenizer_path: str | Path, out_dir: Path, sha256: str) -> Path:
    """tokenizer.json beside the manifest (before it is written), so that a data directory carries
    its tokenizer and the checkpoints trained on it can copy it (checkpoint/training_tokenizer.py)."""
    from ouro_train.data.manifest import file_sha256

    target = Path(out_dir) / "tokenizer.json"
    if target.is_file() and file_sha256(target) == sha256:
        return target
    data = Path(tokenizer_path).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(f"{tokenizer_path}: changed while tokenizing (sha256 differs); run the command again")
    atomic_write_bytes(target, data)
    return target
