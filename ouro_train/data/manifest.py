"""The manifest of a tokenized source: one directory of webdataset tar shards plus manifest.json.

Layout written by `ouro-data tokenize` (and `ouro-data sft`):

    <dir>/manifest.json
    <dir>/tokenizer.json          a copy of the tokenizer (sha256 = the manifest's), for the checkpoints
    <dir>/<source>-000000.tar     one sample per document, key = 9-digit document index:
        <key>.tokens.u16|u32      token ids, raw little-endian (dtype named by the extension)
        <key>.mask.u8             SFT only: 1 where the token is in the loss (assistant turns)

The manifest records the tokenizer (name, sha256 of its JSON, vocabulary size, EOS/BOS
policy) and per shard the document and token counts, the largest token id and the sha256,
so that a loader can refuse a source that does not fit the model before reading a byte of it,
and check each shard's bytes (`verify_sha256`) the first time a process opens it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ouro_train.utils.atomic import atomic_write_text

FORMAT = "ouro-shards/1"
MANIFEST = "manifest.json"


class DataError(ValueError):
    """Bad input data; the message names the file or source and what to do."""


@dataclass
class TokenizerInfo:
    name: str
    sha256: str
    vocab_size: int
    eos_id: int
    bos_id: int | None = None
    append_eos: bool = True
    prepend_bos: bool = False


@dataclass
class ShardInfo:
    name: str
    documents: int
    tokens: int
    max_token_id: int
    sha256: str
    bytes: int  # file size: a truncated shard is caught by a stat, before any read


@dataclass
class Manifest:
    source: str
    tokenizer: TokenizerInfo
    dtype: str  # "uint16" or "uint32"
    kind: str = "pretrain"  # or "sft" (documents carry a loss mask)
    shards: list[ShardInfo] = field(default_factory=list)
    format: str = FORMAT

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def max_token_id(self) -> int:
        return max((s.max_token_id for s in self.shards), default=-1)

    def to_json(self) -> str:
        record = asdict(self)
        record["documents"], record["tokens"] = self.documents, self.tokens
        return json.dumps(record, indent=1)

    def save(self, directory: str | Path) -> Path:
        """Atomic: a reader sees the old manifest or the new one, never half of one."""
        return atomic_write_text(Path(directory) / MANIFEST, self.to_json())


def token_extension(dtype: str) -> str:
    return {"uint16": "tokens.u16", "uint32": "tokens.u32"}[dtype]


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def file_sha256(path: str | Path) -> str:
    """Streamed (no whole-file copy in memory); hashlib releases the GIL while it hashes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    """Raise DataError when the file's sha256 is not the manifest's (a bad copy, a flipped bit)."""
    try:
        found = file_sha256(path)
    except FileNotFoundError as error:
        raise DataError(f"{path}: shard is missing; restore it or re-run `ouro-data tokenize`") from error
    if found != expected:
        raise DataError(
            f"{path}: sha256 {found} but the manifest says {expected}; the shard is corrupt (a bad copy or "
            "flipped bits). Re-copy it from where it was made, or delete it and re-run `ouro-data tokenize` "
            "for this source (finished shards are skipped)"
        )


def load_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no manifest; is {directory} a directory written by `ouro-data tokenize`?")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise DataError(f"{path}: format {raw.get('format')!r}, expected {FORMAT!r}; re-run `ouro-data tokenize`")
        return Manifest(
            source=raw["source"],
            tokenizer=TokenizerInfo(**raw["tokenizer"]),
            dtype=raw["dtype"],
            kind=raw.get("kind", "pretrain"),
            shards=[ShardInfo(**s) for s in raw["shards"]],
        )
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DataError(f"{path}: corrupt manifest ({error}); re-run `ouro-data tokenize` for this source") from error


def check_fits_model(manifest: Manifest, directory: str | Path, model_vocab_size: int) -> None:
    """Fail fast when the source cannot feed a model with `model_vocab_size` embeddings."""
    where = Path(directory) / MANIFEST
    if manifest.tokenizer.vocab_size > model_vocab_size:
        raise DataError(
            f"{where}: tokenizer {manifest.tokenizer.name!r} has {manifest.tokenizer.vocab_size} ids but the model's "
            f"vocabulary is {model_vocab_size}; raise model.vocab_size or re-tokenize with a smaller tokenizer"
        )
    if manifest.max_token_id >= model_vocab_size:
        raise DataError(
            f"{where}: token id {manifest.max_token_id} is out of range for model.vocab_size={model_vocab_size}"
        )
    for shard in manifest.shards:
        if not (Path(directory) / shard.name).is_file():
            raise DataError(
                f"{Path(directory) / shard.name}: shard listed in the manifest is missing; "
                "restore it or re-run `ouro-data tokenize` (finished shards are skipped)"
            )
    if manifest.tokens == 0:
        raise DataError(f"{where}: source {manifest.source!r} has no tokens; remove it from the mixture")
