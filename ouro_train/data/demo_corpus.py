"""The embedded demo corpus: the Python documentation that ships with every Python.

`pydoc_data.topics.topics` maps ~80 help topics to their text (~465 KB): real prose and code
that no one here wrote, available offline on any machine with a standard library.
"""

from __future__ import annotations

import hashlib


def demo_documents() -> list[str]:
    from pydoc_data.topics import topics

    docs: list[str] = []
    seen: set[str] = set()
    for key in sorted(topics):
        doc = topics[key].strip()
        # Some topics share one text (3.11: 'if' and 'else'); a copy in both splits would leak
        # training text into validation, so keep only the first.
        if doc and doc not in seen:
            seen.add(doc)
            docs.append(doc)
    return docs


def corpus_fingerprint(docs: list[str]) -> str:
    digest = hashlib.sha256()
    for doc in docs:
        # Length-prefixed, so ["ab", "c"] and ["a", "bc"] hash differently.
        data = doc.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def split_documents(docs: list[str], val_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """Deterministic split: round(len * val_fraction) documents, evenly spaced, are held out."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to split into train and validation, got {len(docs)}")
    n = len(docs)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    # The last document of each of n_val equal stretches: spread over the corpus, never the same
    # index twice, and independent of the text (so duplicates cannot confuse it).
    val_index = {(i + 1) * n // n_val - 1 for i in range(n_val)}
    train = [doc for i, doc in enumerate(docs) if i not in val_index]
    val = [doc for i, doc in enumerate(docs) if i in val_index]
    return train, val
