"""Chat data -> ChatML token documents with a loss mask on assistant turns.

Input: jsonl, one conversation per line: {"messages": [{"role": "system|user|assistant",
"content": "...", "reasoning": "..." (optional)}]}, or a dataset saved with the `datasets`
library's `save_to_disk` with such a `messages` column (a DatasetDict: its split `split`, default
"train"). Rendering (what Ouro's SFT uses):

    <|im_start|>{role}\\n{content}<|im_end|>\\n     for every message
    <|endoftext|>                                  after the conversation (document separator)

Loss mask = 1 on the tokens an assistant turn produces: its content (with its reasoning as
`<think>\\n...\\n</think>\\n` before the content when `thinking="keep"`), its `<|im_end|>` and
the newline after it. The `<|im_start|>assistant\\n` header, other roles and EOS are 0.
Special tokens are inserted by id, never by parsing text, so user text containing
"<|im_end|>" cannot forge a turn boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ouro_train.data.manifest import DataError, Manifest, dtype_for_vocab
from ouro_train.data.tokenize import (
    DatasetPart,
    Input,
    TokenizeOptions,
    _missing_column,
    _write_shard,
    copy_tokenizer,
    expand_inputs,
    iter_jsonl,
    tokenizer_info,
)

ROLES = ("system", "user", "assistant")


@dataclass
class ChatTokens:
    im_start: int
    im_end: int
    eos: int
    think: int | None
    end_think: int | None


def special_ids(tokenizer, need_thinking: bool, where: str) -> ChatTokens:
    def get(token: str, required: bool = True) -> int | None:
        token_id = tokenizer.token_to_id(token)
        if token_id is None and required:
            raise DataError(f"{where}: tokenizer has no {token!r} token, needed for ChatML SFT data")
        return token_id

    return ChatTokens(
        get("<|im_start|>"),
        get("<|im_end|>"),
        get("<|endoftext|>"),
        get("<think>", need_thinking),
        get("</think>", need_thinking),
    )


def render_conversation(
    tokenizer, messages: list[dict], ids: ChatTokens, thinking: str = "keep", where: str = "conversation"
) -> tuple[np.ndarray, np.ndarray]:
    """-> (token ids, loss mask) of one conversation."""
    if thinking not in ("keep", "drop"):
        raise DataError(f"thinking must be 'keep' or 'drop', got {thinking!r}")
    tokens: list[int] = []
    mask: list[int] = []

    def text(value: str, in_loss: bool) -> None:
        encoded = tokenizer.encode(value, add_special_tokens=False).ids  # specials as plain text (see below)
        tokens.extend(encoded)
        mask.extend([int(in_loss)] * len(encoded))

    def special(token_id: int, in_loss: bool) -> None:
        tokens.append(token_id)
        mask.append(int(in_loss))

    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    # A user can type "<|im_end|>": it must stay text, not end the turn.
    previous, tokenizer.encode_special_tokens = tokenizer.encode_special_tokens, True
    try:
        _render(messages, ids, thinking, where, text, special)
    finally:
        tokenizer.encode_special_tokens = previous
    return np.asarray(tokens, dtype=np.uint32), np.asarray(mask, dtype=np.uint8)


def _render(messages, ids: ChatTokens, thinking: str, where: str, text, special) -> None:
    if not any(m.get("role") == "assistant" for m in messages if isinstance(m, dict)):
        raise DataError(f"{where}: no assistant turn, so nothing would be trained on")
    for number, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {number} needs role in {ROLES} and string content, got {message!r:.80}")
        assistant = role == "assistant"
        special(ids.im_start, False)
        text(f"{role}\n", False)
        reasoning = message.get("reasoning")
        if assistant and reasoning and thinking == "keep":
            if ids.think is None or ids.end_think is None:
                raise DataError(f"{where}: reasoning present but the tokenizer lacks <think>/</think>")
            special(ids.think, True)
            text(f"\n{reasoning}\n", True)
            special(ids.end_think, True)
            text("\n", True)
        text(message["content"], assistant)
        special(ids.im_end, assistant)
        text("\n", assistant)
    special(ids.eos, False)


def read_conversations(path: Input):
    """("where", messages) of every conversation of one input (a jsonl file or a saved dataset's part)."""
    if isinstance(path, DatasetPart):
        if "messages" not in path.columns:
            raise _missing_column(path, "messages", "")
        row = path.start
        for batch in path.rows().select_columns(["messages"]).iter(batch_size=1024):
            for messages in batch["messages"]:
                yield f"{path.where} row {row}", messages
                row += 1
        return
    for where, record in iter_jsonl(path):
        if "messages" not in record:
            raise DataError(f"{where}: no 'messages' field")
        yield where, record["messages"]


def build_sft_shards(
    inputs: list[str],
    tokenizer_path: str,
    out_dir: str,
    source: str,
    thinking: str = "keep",
    documents_per_shard: int = 10_000,
    split: str | None = None,
):
    """Conversations -> SFT shards (tokens + mask members) and a manifest of kind "sft"."""
    options = TokenizeOptions(source=source, tokenizer_path=tokenizer_path, out_dir=out_dir)
    tokenizer, info = tokenizer_info(tokenizer_path, options)
    ids = special_ids(
        tokenizer,
        need_thinking=thinking == "keep" and tokenizer.token_to_id("<think>") is not None,
        where=tokenizer_path,
    )
    dtype = dtype_for_vocab(info.vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards, docs, masks = [], [], []

    def flush() -> None:
        if docs:
            shards.append(_write_shard(out, f"{source}-{len(shards):05d}.tar", docs, dtype, masks))
            docs.clear()
            masks.clear()

    for path in expand_inputs(inputs, split):
        for where, messages in read_conversations(path):
            tokens, mask = render_conversation(tokenizer, messages, ids, thinking, where)
            docs.append(tokens)
            masks.append(mask)
            if len(docs) >= documents_per_shard:
                flush()
    flush()
    manifest = Manifest(source=source, tokenizer=info, dtype=dtype, kind="sft", shards=shards)
    copy_tokenizer(tokenizer_path, out, info.sha256)
    manifest.save(out)
    return manifest
