"""Byte-level BPE tokenizers trained with `tokenizers`, and the cached demo tokenizer.

Special tokens mirror the SmolLM2 tokenizer Ouro uses: 0 <|endoftext|> (EOS), 1 <|im_start|>,
2 <|im_end|> (ChatML), and the thinking tokens 3 <think>, 4 </think>.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ouro_train.data.demo_corpus import corpus_fingerprint, demo_documents
from ouro_train.utils.atomic import atomic_path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
EOS_ID, IM_START_ID, IM_END_ID, THINK_ID, END_THINK_ID = range(5)

log = logging.getLogger(__name__)


def train_bpe_tokenizer(documents: list[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    minimum = 256 + len(SPECIAL_TOKENS)  # every byte, so any text round-trips, plus the specials
    if vocab_size < minimum:
        raise ValueError(
            f"vocab size {vocab_size} is too small: a byte-level BPE needs at least {minimum} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    if not documents:
        raise ValueError("no documents to train the tokenizer on; check the inputs")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,  # first, so they get ids 0..4
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> Path:
    """Atomic: a crash never leaves half a tokenizer under the final name."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory; give a file path such as {path / 'tokenizer.json'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary name unique per writer: two processes filling one cache never share one.
    with atomic_path(path) as tmp:
        tokenizer.save(str(tmp))
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer file not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:
        raise ValueError(f"{path}: not a readable tokenizer.json ({error}); delete it and retrain") from error


def default_cache_dir() -> Path:
    configured = os.environ.get("OURO_CACHE_DIR")  # an empty value counts as unset, not as "."
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "ouro-train"


def demo_tokenizer_path(vocab_size: int, cache_dir: str | Path | None = None) -> Path:
    import tokenizers

    key = f"{corpus_fingerprint(demo_documents())}:{vocab_size}:{tokenizers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / f"tokenizer-{digest}.json"


def load_or_train_demo_tokenizer(vocab_size: int = 4096, cache_dir: str | Path | None = None) -> Tokenizer:
    """The demo corpus's tokenizer, trained once and cached (keyed by corpus, size, library)."""
    path = demo_tokenizer_path(vocab_size, cache_dir)
    if path.is_file():
        try:
            return load_tokenizer(path)
        except ValueError as error:
            log.warning("%s; retraining", error)
    tokenizer = train_bpe_tokenizer(demo_documents(), vocab_size)
    save_tokenizer(tokenizer, path)
    return tokenizer


def encode_documents(tokenizer: Tokenizer, documents: list[str], append_eos: bool = True) -> list[np.ndarray]:
    eos = [EOS_ID] if append_eos else []
    # A document that contains the text "<|endoftext|>" must not end early: specials are text here.
    previous, tokenizer.encode_special_tokens = tokenizer.encode_special_tokens, True
    try:
        encoded = tokenizer.encode_batch(documents, add_special_tokens=False)
    finally:
        tokenizer.encode_special_tokens = previous
    return [np.asarray(e.ids + eos, dtype=np.uint32) for e in encoded]
