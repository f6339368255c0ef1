"""The held-out documents `ouro-eval` scores: a `Document` is a token window and which of its
tokens are scored; `shard_documents` reads them from a shard directory written by `ouro-data`
(checked against its manifest), `jsonl_documents` from a jsonl of {"text": ...} (every token
scored) or {"messages": [...]} (ChatML, the assistant turns scored, as in SFT) lines;
`scored_targets` says which next-token predictions of a document count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class Document:
    tokens: torch.Tensor  # (n,) int64
    loss_mask: torch.Tensor | None  # (n,) bool: which tokens are predicted and scored (None: all)


def shard_documents(directory: Path, count: int, max_tokens: int, vocab_size: int) -> list[Document]:
    """The first `count` windows of at most `max_tokens` tokens (at least 2, with a scored token) of
    a shard directory's documents in order, a long document giving several consecutive windows
    (each scored from its own start); shards are checked against their manifest's sha256 first."""
    from ouro_train.data.manifest import check_fits_model, load_manifest
    from ouro_train.data.source import ShardReader

    manifest = load_manifest(directory)
    check_fits_model(manifest, directory, vocab_size)
    docs: list[Document] = []
    for info in manifest.shards:
        reader = ShardReader(
            Path(directory) / info.name,
            info.documents,
            manifest.dtype,
            manifest.tokenizer.vocab_size,
            manifest.kind == "sft",
            expected_bytes=info.bytes,
            expected_sha256=info.sha256,
        )
        for index in range(info.documents):
            tokens, mask = reader.read(index)
            for start in range(0, len(tokens), max_tokens):  # a long document: consecutive windows
                window = torch.from_numpy(tokens[start : start + max_tokens].astype(np.int64))
                loss = None if mask is None else torch.from_numpy(mask[start : start + max_tokens].astype(bool))
                if window.numel() >= 2 and (loss is None or loss[1:].any()):
                    docs.append(Document(window, loss))
                if len(docs) == count:
                    return docs
    if not docs:
        raise ValueError(f"{directory}: no document of 2 tokens or more")
    return docs


def jsonl_documents(path: Path, tokenizer, count: int, max_tokens: int, bos_id: int | None = None) -> list[Document]:
    """{"text": ...} lines (every token scored; `bos_id` first, where the model's pretraining data
    prepended one) or {"messages": [...]} (ChatML; the assistant turns scored, as in SFT). Text is
    encoded without the tokenizer's own specials, as the training data was (an exported
    tokenizer.json's post-processor adds a BOS)."""
    from ouro_train.data.sft import render_conversation, special_ids
    from ouro_train.data.tokenize import iter_jsonl

    docs: list[Document] = []
    chat = None
    for where, record in iter_jsonl(Path(path)):
        if "messages" in record:
            chat = chat or special_ids(tokenizer, False, str(path))
            tokens, mask = render_conversation(tokenizer, record["messages"], chat, where=where)
            doc = Document(
                torch.from_numpy(tokens[:max_tokens].astype(np.int64)), torch.from_numpy(mask[:max_tokens] > 0)
            )
        elif isinstance(record.get("text"), str):
            ids = ([bos_id] if bos_id is not None else []) + tokenizer.encode(
                record["text"], add_special_tokens=False
            ).ids
            doc = Document(torch.tensor(ids[:max_tokens], dtype=torch.long), None)
        else:
            raise ValueError(f"{where}: expected a 'text' string or a 'messages' list")
        if doc.tokens.numel() >= 2:
            docs.append(doc)
        if len(docs) == count:
            break
    if not docs:
        raise ValueError(f"{path}: no prompt of 2 tokens or more")
    return docs


def scored_targets(doc: Document) -> torch.Tensor:
    """(n-1,) bool: which next-token predictions are scored."""
    return torch.ones(doc.tokens.numel() - 1, dtype=torch.bool) if doc.loss_mask is None else doc.loss_mask[1:]
