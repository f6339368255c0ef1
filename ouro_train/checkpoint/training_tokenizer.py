"""The tokenizer a training run's data was tokenized with (`training_tokenizer`: the demo
tokenizer or the first training source's manifest and the tokenizer.json beside it) and
`save_checkpoint_tokenizer`, which records it (tokenizer_record.py) in each checkpoint the run
saves.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from ouro_train.checkpoint.tokenizer_record import (
    CHATML_TEMPLATE,
    IM_END_TOKEN,
    TOKENIZER,
    TOKENIZER_INFO,
    ModelTokenizer,
    TokenizerRecord,
    chat_eos_ids,
    file_sha256,
    read_tokenizer_file,
    write_record,
)
from ouro_train.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)


def training_tokenizer(cfg) -> tuple[ModelTokenizer | None, TokenizerRecord | None]:
    """The tokenizer a stage's data was tokenized with: (its ModelTokenizer, None) when the file is
    at hand, (None, a record without a file) when only the manifest's sha256 is known.

    The demo tokenizer (cached by `load_or_train_demo_tokenizer`; EOS <|endoftext|>, no BOS), or the
    first training source's manifest (its EOS / BOS ids, and the `tokenizer.json` beside the
    manifest, which `ouro-data tokenize` / `ouro-data sft` write). Training on SFT shards (manifest
    kind "sft") makes a chat model: the ChatML template the SFT data was rendered with, and
    <|im_end|> as a second EOS."""
    from ouro_train.data.manifest import load_manifest

    data = cfg.data
    if data.source == "demo":
        from ouro_train.data.tokenizer import EOS_ID, demo_tokenizer_path

        path = demo_tokenizer_path(data.tokenizer_vocab_size, data.cache_dir)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the demo tokenizer is not in the cache")
        tokenizer = read_tokenizer_file(path)
        return ModelTokenizer(tokenizer, [EOS_ID], path=path, sha256=file_sha256(path), name="demo"), None
    manifests = [(Path(s.path), load_manifest(s.path)) for s in data.sources]
    directory, manifest = manifests[0]
    info = manifest.tokenizer
    chat = any(m.kind == "sft" for _, m in manifests)
    bos_id = info.bos_id if info.prepend_bos else None
    file = next((d / TOKENIZER for d, m in manifests if (d / TOKENIZER).is_file()), None)
    if file is None or file_sha256(file) != info.sha256:
        if file is not None:
            log.warning("%s: sha256 is not the manifest's; the checkpoint records no tokenizer copy", file)
        record = TokenizerRecord(
            sha256=info.sha256,
            vocab_size=info.vocab_size,
            eos_ids=[info.eos_id],
            bos_id=bos_id,
            chat_template=CHATML_TEMPLATE if chat else None,
            name=info.name,
            source=str(directory),
            file=None,
        )
        return None, record
    tokenizer = read_tokenizer_file(file)
    # Loss-masked (SFT-kind) data is a chat model's when its tokenizer has ChatML's <|im_end|>
    # (`ouro-data sft`); other masked data (`ouro-data synth mano`: the answer token only) is not.
    chat = chat and tokenizer.token_to_id(IM_END_TOKEN) is not None
    eos_ids = chat_eos_ids(tokenizer, [info.eos_id]) if chat else [info.eos_id]
    return (
        ModelTokenizer(
            tokenizer,
            eos_ids,
            bos_id=bos_id,
            chat_template=CHATML_TEMPLATE if chat else None,
            path=file,
            sha256=info.sha256,
            name=info.name,
        ),
        None,
    )


def save_checkpoint_tokenizer(directory: Path, cfg) -> None:
    """Into a checkpoint being written (its temporary directory): the training tokenizer, as
    tokenizer_record.py's record. Only
    OSError escapes (a full disk fails the save like any other write); a tokenizer that cannot be
    found is a warning, and the checkpoint is written without it (export then asks for --tokenizer)."""
    try:
        found, record = training_tokenizer(cfg)
        if found is not None:
            write_record(Path(directory), found)
        else:
            atomic_write_text(Path(directory) / TOKENIZER_INFO, json.dumps(asdict(record), indent=1) + "\n")
            _warn(
                f"{record.source}: no {TOKENIZER} beside the manifest (sha256 {record.sha256[:12]}…); the checkpoint "
                "records the tokenizer's sha256 only: `ouro-export --tokenizer PATH` then needs the file"
            )
    except OSError as error:
        if isinstance(error, FileNotFoundError):
            _warn(f"checkpoint saved without its tokenizer: {error}")
            return
        raise
    except Exception as error:  # never fail (or desynchronise the ranks of) a checkpoint for this
        _warn(f"checkpoint saved without its tokenizer: {type(error).__name__}: {error}")


_warned: set[str] = set()


def _warn(message: str) -> None:
    """Once per message and process (a run saves many checkpoints)."""
    if message in _warned:
        return
    _warned.add(message)
    log.warning(message)
    print(f"warning: {message}", file=sys.stderr, flush=True)
