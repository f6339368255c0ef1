"""The demo pipeline's data, built with the same tools a user runs on a real corpus:

    <out>/pretrain, pretrain_val   `ouro-data tokenize` of the embedded corpus (Python docs),
                                   split into training and held-out documents
    <out>/sft, sft_val             `ouro-data sft` of chat-formatted samples: a user asks about
                                   a documentation topic; the assistant reasons briefly (<think>)
                                   and answers with the topic's opening text (loss on the answer)

Idempotent: a directory whose manifest exists is kept (the tools commit manifests last).
"""

from __future__ import annotations

import json
from pathlib import Path

from ouro_train.data.demo_corpus import demo_documents, split_documents
from ouro_train.data.tokenizer import demo_tokenizer_path, load_or_train_demo_tokenizer


def demo_conversations() -> list[tuple[str, dict]]:
    """(topic text, conversation) for every documentation topic, in corpus order."""
    from pydoc_data.topics import topics

    by_text: dict[str, str] = {}
    for key in sorted(topics):
        by_text.setdefault(topics[key].strip(), key)
    out = []
    for text in demo_documents():
        key = by_text[text]
        answer = text[:600].rsplit(" ", 1)[0] if len(text) > 600 else text
        out.append(
            (
                text,
                {
                    "messages": [
                        {"role": "user", "content": f"What does the Python reference say about `{key}`?"},
                        {
                            "role": "assistant",
                            "reasoning": f"The question is about the topic `{key}`; quote its opening.",
                            "content": answer,
                        },
                    ]
                },
            )
        )
    return out


def build_demo_shards(out: Path, vocab_size: int, cache_dir: str | None = None) -> Path:
    from ouro_train.data.sft import build_sft_shards
    from ouro_train.data.tokenize import TokenizeOptions, tokenize

    out = Path(out)
    load_or_train_demo_tokenizer(vocab_size, cache_dir=cache_dir)
    tokenizer = str(demo_tokenizer_path(vocab_size, cache_dir))
    train_docs, val_docs = split_documents(demo_documents())
    held_out = set(val_docs)
    conversations = demo_conversations()
    jobs = {
        "pretrain": [{"text": t} for t in train_docs],
        "pretrain_val": [{"text": t} for t in val_docs],
        "sft": [c for t, c in conversations if t not in held_out],
        "sft_val": [c for t, c in conversations if t in held_out],
    }
    for name, records in jobs.items():
        target = out / name
        if (target / "manifest.json").is_file():
            continue
        source = out / "jsonl" / f"{name}.jsonl"
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text("".join(json.dumps(r) + "\n" for r in records))
        if name.startswith("sft"):
            build_sft_shards([str(source)], tokenizer, str(target), source=f"demo_{name}")
        else:
            options = TokenizeOptions(source=f"demo_{name}", tokenizer_path=tokenizer, out_dir=str(target))
            tokenize([str(source)], options, progress=False)
        print(f"[pipeline] demo data: {len(records)} records -> {target}", flush=True)
    return out
