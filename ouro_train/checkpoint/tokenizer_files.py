"""The tokenizer that goes with a model's weights: recorded in checkpoints, written beside exports.

Three kinds of model directory carry one, and `load_model_tokenizer(path)` reads any of them:

* a checkpoint (`<run_dir>/checkpoints/step_N`) or an `ouro-import` / `ouro-upcycle` output:
      tokenizer.json          a byte copy of the tokenizer the training data was tokenized with
      tokenizer_info.json     {"format": "ouro-tokenizer/1", "name", "sha256" (of tokenizer.json),
                               "vocab_size", "bos_id", "eos_ids", "pad_id", "chat_template", "source"}
  A checkpoint is written in a temporary directory and renamed into place whole (store.py), so
  the copy is part of the same commit as the weights. `sha256` is checked on every read: a copy
  that does not match fails naming the file. A checkpoint whose data directory held no
  tokenizer.json (shards tokenized before tokenizers were copied beside them) records
  tokenizer_info.json with "file": null and the data's sha256, so that `--tokenizer PATH` can be
  checked against it.
* an `ouro-export` output (the Hugging Face layout): tokenizer.json (the training tokenizer, whose
  post-processor prepends the BOS training prepended, so that `tokenizer(text)` prompts the model
  as ouro-generate does), tokenizer_config.json (bos / eos / pad tokens, model_input_names, the
  ChatML `chat_template` of a chat model), special_tokens_map.json and
  generation_config.json (bos / eos / pad ids; eos is a list for a chat model: <|endoftext|> and
  <|im_end|> both end a turn).
* any Hugging Face model directory with a tokenizer.json (what `ouro-import` reads).

What a checkpoint records comes from the training data: the demo tokenizer (cached by
`load_or_train_demo_tokenizer`; EOS <|endoftext|>, no BOS) or the first training source's
manifest (its EOS / BOS ids, and `tokenizer.json` beside the manifest, which `ouro-data
tokenize` / `ouro-data sft` write). Training on SFT shards (manifest kind "sft") makes a chat
model: the ChatML template the SFT data was rendered with, and <|im_end|> as a second EOS.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from ouro_train.checkpoint.store import CheckpointError
from ouro_train.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

TOKENIZER = "tokenizer.json"
TOKENIZER_INFO = "tokenizer_info.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
FORMAT = "ouro-tokenizer/1"
EOS_TOKEN, IM_END_TOKEN = "<|endoftext|>", "<|im_end|>"

# ChatML exactly as ouro_train/data/sft.py renders a conversation for SFT (the <|endoftext|> it
# appends after the whole conversation is a document separator, not part of a turn).
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
    """What tokenizer_info.json holds. `file`: "tokenizer.json", or None when the directory
    holds no copy (then `sha256` is what a tokenizer given with --tokenizer must match)."""

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


def _read_tokenizer(path: Path) -> Tokenizer:
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
        return _from_record(record, _read_tokenizer(file), file)
    if (directory / TOKENIZER).is_file():
        return _from_hf_dir(directory)
    raise CheckpointError(
        f"{directory}: no tokenizer found (no {TOKENIZER}, no {TOKENIZER_INFO}); it was written before "
        "checkpoints carried their tokenizer: pass --tokenizer PATH (the tokenizer.json the training data was "
        "tokenized with)"
    )


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
    tokenizer = _read_tokenizer(path)
    eos = tokenizer.token_to_id(EOS_TOKEN)
    if eos is None:
        raise CheckpointError(f"--tokenizer {path}: has no {EOS_TOKEN!r} token to end a document")
    return ModelTokenizer(tokenizer, [eos], path=path, sha256=file_sha256(path), name=path.stem)


def _token_id(tokenizer: Tokenizer, token, where: Path, key: str) -> int | None:
    if isinstance(token, dict):  # an AddedToken as transformers writes it
        token = token.get("content")
    if token is None:
        return None
    found = tokenizer.token_to_id(str(token))
    if found is None:
        raise CheckpointError(f"{where}: {key} {token!r} is not in the tokenizer's vocabulary")
    return found


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file}: unreadable ({error})") from error


def _from_hf_dir(directory: Path) -> ModelTokenizer:
    """generation_config.json's ids first (what generate() uses), then config.json's, then the
    tokens named in tokenizer_config.json / special_tokens_map.json."""
    file = directory / TOKENIZER
    tokenizer = _read_tokenizer(file)
    generation = _read_json(directory / GENERATION_CONFIG)
    model = _read_json(directory / "config.json")
    tok_cfg = _read_json(directory / TOKENIZER_CONFIG)
    special = _read_json(directory / SPECIAL_TOKENS_MAP)
    named = lambda key: _token_id(tokenizer, tok_cfg.get(key, special.get(key)), directory, key)  # noqa: E731

    def pick(key: str):
        for source in (generation, model):
            if source.get(key) is not None:
                return source[key]
        return None

    eos_ids = _ids(pick("eos_token_id")) or _ids(named("eos_token"))
    if not eos_ids:
        eos = tokenizer.token_to_id(EOS_TOKEN)
        eos_ids = [eos] if eos is not None else []
    bos = pick("bos_token_id")
    bos_id = int(bos[0] if isinstance(bos, list) else bos) if bos is not None else named("bos_token")
    pad = pick("pad_token_id")
    pad_id = int(pad[0] if isinstance(pad, list) else pad) if pad is not None else named("pad_token")
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text()
    vocab = tokenizer.get_vocab_size()
    bad = [i for i in [*eos_ids, bos_id, pad_id] if i is not None and not 0 <= i < vocab]
    if bad:
        raise CheckpointError(f"{directory}: special token ids {bad} are outside the tokenizer's {vocab} ids")
    return ModelTokenizer(
        tokenizer=tokenizer,
        eos_ids=eos_ids,
        bos_id=bos_id,
        pad_id=pad_id,
        chat_template=template,
        path=file,
        sha256=file_sha256(file),
        name=directory.name,
    )


# --- writing -----------------------------------------------------------------------------------


def check_vocab_fits(model_tokenizer: ModelTokenizer, model_vocab_size: int, where: Path) -> None:
    if model_tokenizer.vocab_size > model_vocab_size:
        raise CheckpointError(
            f"{where}: the tokenizer ({model_tokenizer.path}) has {model_tokenizer.vocab_size} ids but the model's "
            f"vocab_size is {model_vocab_size}; ids past {model_vocab_size - 1} have no embedding: give the "
            "tokenizer this model was trained with"
        )


def write_record(directory: Path, model_tokenizer: ModelTokenizer, source: str = "") -> TokenizerRecord:
    """tokenizer.json (a byte copy) + tokenizer_info.json into a checkpoint-like directory."""
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


def hf_tokenizer_json(model_tokenizer: ModelTokenizer) -> str | None:
    """The exported tokenizer.json's text, or None where the training tokenizer's file already
    encodes as `prompt_ids` does (then it is copied byte for byte). Hugging Face users call
    `tokenizer(text)`, which applies the post-processor: with a BOS, a TemplateProcessing
    "<bos> $A" (pair "<bos> $A <bos> $B", as transformers writes for add_bos_token), so that they
    prompt the model as it was trained and as ouro-generate does; without one, a post-processor
    that adds nothing. Only `post_processor` changes: the vocabulary, merges and added tokens stay."""
    tokenizer, bos_id = model_tokenizer.tokenizer, model_tokenizer.bos_id
    probe = "a b"
    if tokenizer.encode(probe).ids == prompt_ids(model_tokenizer, probe):
        return None
    from tokenizers import processors

    bos = model_tokenizer.token(bos_id)
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0" if bos is not None else "$A:0",
        pair=f"{bos}:0 $A:0 {bos}:1 $B:1" if bos is not None else "$A:0 $B:1",
        special_tokens=[(bos, bos_id)] if bos is not None else [],
    )
    assert model_tokenizer.path is not None
    raw = json.loads(Path(model_tokenizer.path).read_text(encoding="utf-8"))
    raw["post_processor"] = json.loads(copy.to_str())["post_processor"]
    text = json.dumps(raw, ensure_ascii=False, indent=2)
    if Tokenizer.from_str(text).encode(probe).ids != prompt_ids(model_tokenizer, probe):  # never expected
        raise CheckpointError(f"{model_tokenizer.path}: could not give the exported tokenizer a BOS post-processor")
    return text


def write_hf_files(directory: Path, model_tokenizer: ModelTokenizer, max_length: int) -> None:
    """The Hugging Face tokenizer files: what AutoTokenizer and generate() read.
    `tokenizer(text, return_tensors="pt")` gives input_ids (BOS first where training prepended
    one, see hf_tokenizer_json) and attention_mask only (model_input_names), which is what
    `model.generate(**inputs)` accepts: transformers 4's default adds token_type_ids, which it
    refuses. (apply_chat_template encodes without the post-processor, as the SFT data was.)"""
    directory = Path(directory)
    assert model_tokenizer.path is not None
    text = hf_tokenizer_json(model_tokenizer)
    if text is None:
        shutil.copyfile(model_tokenizer.path, directory / TOKENIZER)
    else:
        atomic_write_text(directory / TOKENIZER, text)
    token = model_tokenizer.token
    # transformers takes one eos token; for a chat model the one that ends an assistant turn.
    eos_token = token(model_tokenizer.eos_ids[-1]) if model_tokenizer.eos_ids else None
    specials = {
        "bos_token": token(model_tokenizer.bos_id),
        "eos_token": eos_token,
        "pad_token": token(model_tokenizer.pad_id),
    }
    added = model_tokenizer.tokenizer.get_added_tokens_decoder()
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "unk_token": None,
        # transformers 5 rebuilds the post-processor from these two when they are given: the same
        # template as tokenizer.json's, which readers that do not (the tokenizers library) apply.
        "add_bos_token": model_tokenizer.bos_id is not None,
        "add_eos_token": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "additional_special_tokens": [t.content for i, t in sorted(added.items()) if t.special],
        "added_tokens_decoder": {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "rstrip": t.rstrip,
                "normalized": t.normalized,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(added.items())
        },
    }
    if model_tokenizer.chat_template is not None:
        tokenizer_config["chat_template"] = model_tokenizer.chat_template
    special_map = {k: v for k, v in specials.items() if v is not None}
    special_map["additional_special_tokens"] = tokenizer_config["additional_special_tokens"]
    atomic_write_text(directory / TOKENIZER_CONFIG, json.dumps(tokenizer_config, indent=2) + "\n")
    atomic_write_text(directory / SPECIAL_TOKENS_MAP, json.dumps(special_map, indent=2) + "\n")
    atomic_write_text(directory / GENERATION_CONFIG, json.dumps(generation_config(model_tokenizer), indent=2) + "\n")


def generation_config(model_tokenizer: ModelTokenizer) -> dict:
    eos = model_tokenizer.eos_ids
    return {
        "bos_token_id": model_tokenizer.bos_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": model_tokenizer.pad_id,
        "do_sample": False,
        "transformers_version": "4.55.0",
    }


# --- what a training run records ---------------------------------------------------------------


def training_tokenizer(cfg) -> tuple[ModelTokenizer | None, TokenizerRecord | None]:
    """The tokenizer a stage's data was tokenized with: (its ModelTokenizer, None) when the file is
    at hand, (None, a record without a file) when only the manifest's sha256 is known."""
    from ouro_train.data.manifest import load_manifest

    data = cfg.data
    if data.source == "demo":
        from ouro_train.data.tokenizer import EOS_ID, demo_tokenizer_path

        path = demo_tokenizer_path(data.tokenizer_vocab_size, data.cache_dir)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the demo tokenizer is not in the cache")
        return ModelTokenizer(_read_tokenizer(path), [EOS_ID], path=path, sha256=file_sha256(path), name="demo"), None
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
    tokenizer = _read_tokenizer(file)
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
    """Into a checkpoint being written (its temporary directory): the training tokenizer. Only
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
