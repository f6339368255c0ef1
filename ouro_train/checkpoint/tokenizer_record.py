"""The tokenizer a checkpoint (or an `ouro-import` / `ouro-upcycle` output) records, as a byte
copy of tokenizer.json beside tokenizer_info.json (`TokenizerRecord`, written by `write_record`,
read by `read_record`, carried on by `copy_record`), and the tokenizer of a model directory with the
ids generation needs (`ModelTokenizer`), which model_tokenizer.py's `load_model_tokenizer` reads
from such a directory, an `ouro-export` output or a Hugging Face model directory (hf_tokenizer.py),
and training_tokenizer.py finds for a training run.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from ouro_train.checkpoint.errors import CheckpointError
from ouro_train.utils.atomic import atomic_write_text

TOKENIZER = "tokenizer.json"
TOKENIZER_INFO = "tokenizer_info.json"
FORMAT = "ouro-tokenizer/1"
EOS_TOKEN, IM_END_TOKEN = "<|endoftext|>", "<|im_end|>"

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' and message['reasoning'] is defined and message['reasoning'] %}"
    "{{- '<think>\\n' + message['reasoning'] + '\\n</think>\\n' }}"
    "{%- endif %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass
class TokenizerRecord:
    """What tokenizer_info.json holds: {"format": "ouro-tokenizer/1", "name", "sha256" (of
    tokenizer.json), "vocab_size", "bos_id", "eos_ids", "pad_id", "chat_template", "source",
    "file"}. `file`: "tokenizer.json" (a byte copy of the tokenizer the training data was tokenized
    with, its `sha256` checked on every read: a copy that does not match fails naming the file), or
    None when the directory holds no copy (shards tokenized before tokenizers were copied beside
    them; then `sha256` is the data's, what a tokenizer given with --tokenizer must match)."""

    sha256: str
    vocab_size: int
    eos_ids: list[int]
    bos_id: int | None = None
    pad_id: int | None = None
    chat_template: str | None = None
    name: str = ""
    source: str = ""
    file: str | None = TOKENIZER
    format: str = FORMAT


@dataclass
class ModelTokenizer:
    """A model directory's tokenizer and the ids generation needs."""

    tokenizer: Tokenizer
    eos_ids: list[int]
    bos_id: int | None = None
    pad_id: int | None = None
    chat_template: str | None = None
    path: Path | None = None  # the tokenizer.json it was read from
    sha256: str = ""
    name: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def is_chat(self) -> bool:
        return self.chat_template is not None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokenizer.id_to_token(token_id)


def file_sha256(path: Path) -> str:
    from ouro_train.data.manifest import file_sha256 as digest

    return digest(path)


def read_tokenizer_file(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises its own exception types
        raise CheckpointError(f"{path}: not a readable tokenizer.json ({error})") from error


def chat_eos_ids(tokenizer: Tokenizer, eos_ids: list[int]) -> list[int]:
    """A chat model's turn ends at <|im_end|> as well as at the document EOS."""
    im_end = tokenizer.token_to_id(IM_END_TOKEN)
    if im_end is None:
        raise CheckpointError(f"the tokenizer has no {IM_END_TOKEN!r} token, which a ChatML chat model needs")
    return eos_ids + ([im_end] if im_end not in eos_ids else [])


# --- reading -----------------------------------------------------------------------------------


def read_record(directory: Path) -> TokenizerRecord | None:
    file = Path(directory) / TOKENIZER_INFO
    if not file.is_file():
        return None
    try:
        raw = json.loads(file.read_text())
        if raw.get("format") != FORMAT:
            raise CheckpointError(f"{file}: format {raw.get('format')!r}, expected {FORMAT!r}")
        return TokenizerRecord(**raw)
    except (OSError, json.JSONDecodeError, TypeError) as error:
        raise CheckpointError(f"{file}: unreadable ({error}); restore it or pass --tokenizer PATH") from error


# --- writing -----------------------------------------------------------------------------------


def check_vocab_fits(model_tokenizer: ModelTokenizer, model_vocab_size: int, where: Path) -> None:
    if model_tokenizer.vocab_size > model_vocab_size:
        raise CheckpointError(
            f"{where}: the tokenizer ({model_tokenizer.path}) has {model_tokenizer.vocab_size} ids but the model's "
            f"vocab_size is {model_vocab_size}; ids past {model_vocab_size - 1} have no embedding: give the "
            "tokenizer this model was trained with"
        )


def write_record(directory: Path, model_tokenizer: ModelTokenizer, source: str = "") -> TokenizerRecord:
    """tokenizer.json (a byte copy) + tokenizer_info.json into a checkpoint-like directory. A
    checkpoint is written in a temporary directory and renamed into place whole (store.py), so the
    copy is part of the same commit as the weights."""
    directory = Path(directory)
    assert model_tokenizer.path is not None
    shutil.copyfile(model_tokenizer.path, directory / TOKENIZER)
    record = TokenizerRecord(
        sha256=file_sha256(directory / TOKENIZER),
        vocab_size=model_tokenizer.vocab_size,
        eos_ids=model_tokenizer.eos_ids,
        bos_id=model_tokenizer.bos_id,
        pad_id=model_tokenizer.pad_id,
        chat_template=model_tokenizer.chat_template,
        name=model_tokenizer.name,
        source=source or str(model_tokenizer.path),
    )
    if model_tokenizer.sha256 and record.sha256 != model_tokenizer.sha256:
        raise CheckpointError(f"{directory / TOKENIZER}: the copy's sha256 is not the original's; retry")
    atomic_write_text(directory / TOKENIZER_INFO, json.dumps(asdict(record), indent=1) + "\n")
    return record


def copy_record(source: Path, target: Path) -> bool:
    """Carry a directory's tokenizer (tokenizer.json + tokenizer_info.json) into another (upcycle)."""
    if not (Path(source) / TOKENIZER_INFO).is_file():
        return False
    for name in (TOKENIZER, TOKENIZER_INFO):
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(target) / name)
    return True


def prompt_ids(model_tokenizer: ModelTokenizer, text: str) -> list[int]:
    """The ids a model is prompted with for `text`: its BOS first where training prepended one
    (`ouro-data tokenize --bos-token`, recorded as bos_id), then the text with no special tokens
    from the tokenizer itself (training encodes with add_special_tokens=False). ouro-generate
    feeds this; an exported tokenizer.json's post-processor adds exactly the same (hf_tokenizer_json)."""
    ids = model_tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    return ([model_tokenizer.bos_id] if model_tokenizer.bos_id is not None else []) + ids
