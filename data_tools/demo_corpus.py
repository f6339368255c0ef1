"""The embedded demo corpus: the Python documentation that ships with every Python.

`pydoc_data.topics.topics` maps ~90 help topics to their text (~465 KB): real prose and code
that no one here wrote, available offline on any machine with a standard library.
"""

from __future__ import annotations

import hashlib


def demo_documents() -> list[str]:
    from pydoc_data.topics import topics

    docs = (topics[key].strip() for key in sorted(topics))
    return [doc for doc in docs if doc]


def corpus_fingerprint(docs: list[str]) -> str:
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(doc.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def split_documents(docs: list[str], val_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """Deterministic split: every k-th document (k = round(1 / val_fraction)) is held out."""
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to split, got {len(docs)}")
    every = max(2, round(1 / val_fraction))
    val = [doc for i, doc in enumerate(docs) if i % every == every - 1] or [docs[-1]]
    held = set(id(doc) for doc in val)
    train = [doc for doc in docs if id(doc) not in held]
    return train, val
