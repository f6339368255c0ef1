"""One source as an endless, deterministic stream of tokens, read by random access.

Epoch e of a source is its documents in a shuffled order that depends only on (seed, source,
e): shards in a permuted order, and the documents of each shard permuted within it (two levels,
so the order needs O(shards + documents of one shard) memory and reads stay local). Epochs
are concatenated, and sample j of the source is the window of tokens [j*S, j*S + S + 1) of that
concatenation (S inputs plus one label). Consequences:

* every token is an input exactly once per epoch, none dropped or duplicated (windows tile
  the stream; a window may cross into the next epoch);
* sample j is a pure function of (seed, source, j): the position of a source is one integer,
  and any rank can read any sample without reading the others (Megatron's GPTDataset idea, over
  webdataset shards read with `wids`).

Each shard's sha256 is checked against the manifest the first time this source opens it in a
process (`verify_checksums`, data.verify_checksums): a corrupt copy fails with the shard's name
instead of training on altered tokens. The hash reads the whole shard once per process that
opens it (loader workers included): ~1-1.3 s per GB on one core from the page cache, bounded by
the storage's read speed otherwise.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ouro_train.data.manifest import (
    DataError,
    Manifest,
    check_fits_model,
    load_manifest,
    token_extension,
    verify_sha256,
)


@dataclass
class Window:
    """S + 1 tokens of one source and where each came from."""

    tokens: np.ndarray  # (S+1,) int64
    doc_index: np.ndarray  # (S+1,) global document number in the concatenated stream (epoch-aware)
    position: np.ndarray  # (S+1,) position of the token inside its document
    mask: np.ndarray | None  # (S+1,) uint8 loss mask (SFT sources), else None


class ShardReader:
    """Random access to the documents of one tar shard (wids: mmap plus a tar index)."""

    def __init__(
        self,
        path: Path,
        documents: int,
        dtype: str,
        vocab_size: int,
        with_mask: bool,
        expected_bytes: int | None = None,
        expected_sha256: str | None = None,
        max_token_id: int | None = None,
    ) -> None:
        """`expected_bytes`: checked by a stat; `expected_sha256`: the whole file is hashed first.
        `max_token_id`: the shard's largest id when it is known (its documents checked once by
        `check_token_ids`), bounded by `vocab_size` here instead of every document at `read`."""
        from wids.wids import IndexedTarSamples

        self.path = path
        if expected_bytes is not None and path.is_file() and path.stat().st_size != expected_bytes:
            raise DataError(
                f"{path}: {path.stat().st_size} bytes but the manifest says {expected_bytes}; the shard "
                "is truncated or corrupt, delete it and re-run `ouro-data tokenize`"
            )
        if expected_sha256 is not None:
            verify_sha256(path, expected_sha256)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.extension = "." + token_extension(dtype)  # wids keys members by ".ext"
        self.vocab_size = vocab_size
        self.with_mask = with_mask
        try:
            self.samples = IndexedTarSamples(path=str(path), use_mmap=True)
        except FileNotFoundError as error:
            raise DataError(f"{path}: shard is missing; restore it or re-run `ouro-data tokenize`") from error
        except Exception as error:  # wids raises assorted errors (and asserts) on broken tars
            raise DataError(
                f"{path}: cannot index the tar ({error!r}); the shard is corrupt or truncated, "
                "delete it and re-run `ouro-data tokenize`"
            ) from error
        if len(self.samples) != documents:
            raise DataError(
                f"{path}: holds {len(self.samples)} documents but the manifest says {documents}; "
                "the shard is truncated or corrupt, delete it and re-run `ouro-data tokenize`"
            )
        self.max_token_id = max_token_id
        if max_token_id is not None and max_token_id >= vocab_size:
            raise DataError(
                f"{path}: has token id {max_token_id} >= vocabulary size {vocab_size}; "
                "the shard does not match its manifest"
            )

    def lengths(self) -> np.ndarray:
        """Tokens per document, from the tar headers alone (the wids index keeps each member's
        size), so locating a token never reads the documents before it."""
        by_index = self.samples.reader.by_index  # [(name, offset, size)] per tar member
        lengths = np.zeros(len(self.samples), dtype=np.int64)
        for doc, members in enumerate(self.samples.samples):
            for member in members:
                name, _, size = by_index[member]
                if name.endswith(self.extension):
                    lengths[doc] = size // self.dtype.itemsize
                    break
            else:
                raise DataError(
                    f"{self.path}: document {doc} has no {self.extension} member; "
                    "the shard was not written by `ouro-data tokenize` with this manifest"
                )
        return lengths

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        sample = self.samples[index]
        if self.extension not in sample:
            raise DataError(f"{self.path}: document {sample.get('__key__')} has no {self.extension} member")
        tokens = np.frombuffer(sample[self.extension].getbuffer(), dtype=self.dtype)
        if self.max_token_id is None:  # ids not checked at open: check this document's
            self._check_ids(tokens, sample["__key__"])
        mask = None
        if self.with_mask:
            if ".mask.u8" not in sample:
                raise DataError(f"{self.path}: SFT document {sample['__key__']} has no .mask.u8 member")
            mask = np.frombuffer(sample[".mask.u8"].getbuffer(), dtype=np.uint8)
        return tokens, mask

    def check_token_ids(self) -> int:
        """Bound every document's ids by the vocabulary, once, and skip that check in `read`
        from then on. -> the shard's largest id (-1 when empty). A pass over the token bytes in
        place (the mmap), next to the sha256's over the whole file."""
        reader = self.samples.reader
        largest = -1
        for members in self.samples.samples:
            for member in members:
                name, offset, size = reader.by_index[member]
                if name.endswith(self.extension) and size >= self.dtype.itemsize:
                    count = size // self.dtype.itemsize
                    tokens = np.frombuffer(reader.mmapped_file, self.dtype, count=count, offset=offset + 512)
                    self._check_ids(tokens, name.removesuffix(self.extension))
                    largest = max(largest, int(tokens.max()))
        self.max_token_id = largest
        return largest

    def _check_ids(self, tokens: np.ndarray, key: str) -> None:
        if tokens.size and int(tokens.max()) >= self.vocab_size:
            raise DataError(
                f"{self.path}: document {key} has token id {int(tokens.max())} >= "
                f"vocabulary size {self.vocab_size}; the shard does not match its manifest"
            )


def _seed_for(seed: int, source: str, epoch: int, shard: int = -1) -> list[int]:
    # A stable numeric key (Python's hash() is salted per process).
    return [seed, zlib.crc32(source.encode()), epoch, shard + 1]


class TokenSource:
    def __init__(
        self,
        name: str,
        directory: str | Path,
        seq_len: int,
        seed: int,
        model_vocab_size: int,
        max_open_shards: int = 16,
        verify_checksums: bool = True,
    ) -> None:
        self.name = name
        self.directory = Path(directory)
        self.manifest: Manifest = load_manifest(self.directory)
        check_fits_model(self.manifest, self.directory, model_vocab_size)
        self.seq_len = seq_len
        self.seed = seed
        self.with_mask = self.manifest.kind == "sft"
        self.shard_tokens = np.array([s.tokens for s in self.manifest.shards], dtype=np.int64)
        self.shard_documents = np.array([s.documents for s in self.manifest.shards], dtype=np.int64)
        self.epoch_tokens = int(self.shard_tokens.sum())
        self.epoch_documents = self.manifest.documents
        self._lengths: dict[int, np.ndarray] = {}
        self.verify_checksums = verify_checksums
        # Shards whose sha256 and token ids this process has checked, with their largest id: once
        # each, however often the reader cache below closes and reopens them. (A loader worker
        # gets its own copy.)
        self._verified: dict[int, int] = {}
        # Per-instance caches (a class-level lru_cache would keep every instance alive).
        self._reader = lru_cache(maxsize=max_open_shards)(self._open)
        self._shard_order = lru_cache(maxsize=4)(self._compute_shard_order)
        self._document_order = lru_cache(maxsize=64)(self._compute_document_order)

    # --- the permuted order of one epoch -------------------------------------------------
    def _compute_shard_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (shard ids in this epoch's order, token offset and document count before each)."""
        order = np.random.default_rng(_seed_for(self.seed, self.name, epoch)).permutation(len(self.manifest.shards))
        token_starts = np.concatenate([[0], np.cumsum(self.shard_tokens[order])[:-1]])
        doc_starts = np.concatenate([[0], np.cumsum(self.shard_documents[order])[:-1]])
        return order, token_starts, doc_starts

    def _document_lengths(self, shard: int) -> np.ndarray:
        if shard not in self._lengths:
            reader = self._reader(shard)
            self._lengths[shard] = reader.lengths()
            if int(self._lengths[shard].sum()) != self.manifest.shards[shard].tokens:
                raise DataError(
                    f"{reader.path}: documents hold {int(self._lengths[shard].sum())} tokens but the "
                    f"manifest says {self.manifest.shards[shard].tokens}; re-run `ouro-data tokenize`"
                )
        return self._lengths[shard]

    def _compute_document_order(self, epoch: int, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (document ids of `shard` in this epoch's order, token offset of each in the shard)."""
        lengths = self._document_lengths(shard)
        order = np.random.default_rng(_seed_for(self.seed, self.name, epoch, shard)).permutation(len(lengths))
        return order, np.concatenate([[0], np.cumsum(lengths[order])[:-1]])

    def _open(self, shard: int) -> ShardReader:
        info = self.manifest.shards[shard]
        verify = self.verify_checksums and shard not in self._verified
        reader = ShardReader(
            self.directory / info.name,
            info.documents,
            self.manifest.dtype,
            self.manifest.tokenizer.vocab_size,
            self.with_mask,
            expected_bytes=info.bytes,
            expected_sha256=info.sha256 if verify else None,
            max_token_id=self._verified.get(shard),
        )
        if verify:
            # With the bytes proven, every id is bounded once here rather than in each window read;
            # without verify_checksums, `read` checks each document it returns (bytes unproven).
            self._verified[shard] = reader.check_token_ids()
        return reader

    # --- reading ----------------------------------------------------------------------------
    def _locate(self, offset: int) -> tuple[int, int, int, int, int]:
        """Stream offset -> (epoch, shard, document, offset in document, doc number in epoch)."""
        epoch, in_epoch = divmod(offset, self.epoch_tokens)
        order, starts, doc_counts_before = self._shard_order(epoch)
        # side="right": the last shard starting at or before the offset, which passes over
        # empty shards (they share their start with the next one). Likewise for documents.
        slot = int(np.searchsorted(starts, in_epoch, side="right")) - 1
        shard = int(order[slot])
        doc_order, doc_starts = self._document_order(epoch, shard)
        within = in_epoch - int(starts[slot])
        rank = int(np.searchsorted(doc_starts, within, side="right")) - 1
        return (
            epoch,
            shard,
            int(doc_order[rank]),
            within - int(doc_starts[rank]),
            int(doc_counts_before[slot]) + rank,
        )

    def window(self, sample: int, token_offset: int = 0) -> Window:
        """Tokens [o + sample*S, o + sample*S + S + 1) of the endless stream (o: `token_offset`),
        with their documents."""
        need = self.seq_len + 1
        offset = token_offset + sample * self.seq_len
        tokens, docs, positions, masks = [], [], [], []
        while need > 0:
            epoch, shard, document, start, number = self._locate(offset)
            doc_tokens, doc_mask = self._reader(shard).read(document)
            take = min(need, len(doc_tokens) - start)
            tokens.append(doc_tokens[start : start + take])
            docs.append(np.full(take, epoch * self.epoch_documents + number, dtype=np.int64))
            positions.append(np.arange(start, start + take, dtype=np.int64))
            if doc_mask is not None:
                masks.append(doc_mask[start : start + take])
            need -= take
            offset += take
        return Window(
            tokens=np.concatenate(tokens).astype(np.int64),
            doc_index=np.concatenate(docs),
            position=np.concatenate(positions),
            mask=np.concatenate(masks) if self.with_mask else None,
        )

    def epochs_seen(self, samples: int) -> float:
        return samples * self.seq_len / self.epoch_tokens
