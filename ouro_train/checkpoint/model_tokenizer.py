"""Reading the tokenizer of any model directory: `load_model_tokenizer(path)` -> a `ModelTokenizer`
(tokenizer_record.py: the tokenizer and the ids generation needs) of a checkpoint or an
`ouro-import` / `ouro-upcycle` output (the copy its tokenizer_info.json records, checked against
the recorded sha256), of an `ouro-export` output or any Hugging Face model directory with a
tokenizer.json (hf_tokenizer.py's `read_hf_tokenizer`), or the tokenizer a CLI's --tokenizer
gives (checked against the directory's record where it has one). It stands above both
tokenizer_record.py and hf_tokenizer.py, which builds on tokenizer_record.py.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from ouro_train.checkpoint.errors import CheckpointError
from ouro_train.checkpoint.hf_tokenizer import read_hf_tokenizer
from ouro_train.checkpoint.tokenizer_record import (
    EOS_TOKEN,
    TOKENIZER,
    TOKENIZER_INFO,
    ModelTokenizer,
    TokenizerRecord,
    chat_eos_ids,
    file_sha256,
    read_record,
    read_tokenizer_file,
)


def load_model_tokenizer(path: Path, tokenizer: Path | None = None) -> ModelTokenizer:
    """The tokenizer of a model directory: a checkpoint, an `ouro-import` output or a Hugging Face
    directory (an `ouro-export` output). `path` may also name the directory's model.safetensors.

    `tokenizer` (what a CLI's --tokenizer gives: a tokenizer.json, or a directory holding one)
    supplies the tokenizer of a directory that has none; where the directory records the sha256 of
    its tokenizer, the given one must match it. Raises CheckpointError naming the directory and
    what to pass when no tokenizer is found."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    if not directory.is_dir():
        raise CheckpointError(f"{path}: no such model directory (a checkpoint, ouro-import or ouro-export output)")
    record = read_record(directory)
    if tokenizer is not None:
        given = _given_tokenizer(Path(tokenizer))
        if record is None:
            return given
        if given.sha256 != record.sha256:
            raise CheckpointError(
                f"--tokenizer {tokenizer}: sha256 {given.sha256[:12]}… but {directory / TOKENIZER_INFO} records "
                f"sha256 {record.sha256[:12]}… ({record.name or 'unnamed'}, from {record.source or '?'}); the model "
                "was trained with another tokenizer: pass that one (or none, where the directory holds a copy)"
            )
        found = _from_record(record, given.tokenizer, given.path)
        if record.file is None and record.chat_template is not None:  # the record could not look <|im_end|> up
            found.eos_ids = chat_eos_ids(found.tokenizer, found.eos_ids)
        return found
    if record is not None:
        if record.file is None:
            raise CheckpointError(
                f"{directory}: holds no copy of its tokenizer ({record.name or 'unnamed'}, sha256 "
                f"{record.sha256[:12]}…, from {record.source or '?'}: its data directory had no tokenizer.json); "
                "pass --tokenizer PATH with that tokenizer.json"
            )
        file = directory / record.file
        if not file.is_file():
            raise CheckpointError(f"{file}: missing, but {directory / TOKENIZER_INFO} names it; pass --tokenizer PATH")
        found = file_sha256(file)
        if found != record.sha256:
            raise CheckpointError(
                f"{file}: sha256 {found} but {directory / TOKENIZER_INFO} records {record.sha256}; the copy is "
                "corrupt: restore it, or pass --tokenizer PATH with the original"
            )
        return _from_record(record, read_tokenizer_file(file), file)
    if (directory / TOKENIZER).is_file():
        return read_hf_tokenizer(directory)
    raise CheckpointError(
        f"{directory}: no tokenizer found (no {TOKENIZER}, no {TOKENIZER_INFO}); it was written before "
        "checkpoints carried their tokenizer: pass --tokenizer PATH (the tokenizer.json the training data was "
        "tokenized with)"
    )


def _from_record(record: TokenizerRecord, tokenizer: Tokenizer, path: Path) -> ModelTokenizer:
    return ModelTokenizer(
        tokenizer=tokenizer,
        eos_ids=list(record.eos_ids),
        bos_id=record.bos_id,
        pad_id=record.pad_id,
        chat_template=record.chat_template,
        path=path,
        sha256=record.sha256,
        name=record.name,
    )


def _given_tokenizer(path: Path) -> ModelTokenizer:
    """--tokenizer: a Hugging Face directory (its ids and template), a checkpoint, or a bare
    tokenizer.json (EOS <|endoftext|>, no BOS, no chat template)."""
    if path.is_dir():
        return load_model_tokenizer(path)
    if not path.is_file():
        raise CheckpointError(f"--tokenizer {path}: not found (a tokenizer.json, or a directory holding one)")
    tokenizer = read_tokenizer_file(path)
    eos = tokenizer.token_to_id(EOS_TOKEN)
    if eos is None:
        raise CheckpointError(f"--tokenizer {path}: has no {EOS_TOKEN!r} token to end a document")
    return ModelTokenizer(tokenizer, [eos], path=path, sha256=file_sha256(path), name=path.stem)
