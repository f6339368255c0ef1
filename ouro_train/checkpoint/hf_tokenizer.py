"""The Hugging Face tokenizer files of a model directory: read from one (`read_hf_tokenizer`,
what `ouro-import` and model_tokenizer.py take from a directory with no tokenizer_info.json)
and written into an `ouro-export` output (`write_hf_files`): tokenizer.json (the training
tokenizer, whose post-processor prepends the BOS training prepended, so that `tokenizer(text)`
prompts the model as ouro-generate does: `hf_tokenizer_json`), tokenizer_config.json (bos / eos /
pad tokens, model_input_names, the ChatML `chat_template` of a chat model),
special_tokens_map.json and generation_config.json (bos / eos / pad ids; eos is a list for a
chat model: <|endoftext|> and <|im_end|> both end a turn: `generation_config`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer

from ouro_train.checkpoint.errors import CheckpointError
from ouro_train.checkpoint.tokenizer_record import (
    EOS_TOKEN,
    TOKENIZER,
    ModelTokenizer,
    file_sha256,
    prompt_ids,
    read_tokenizer_file,
)
from ouro_train.utils.atomic import atomic_write_text

TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"


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


def read_hf_tokenizer(directory: Path) -> ModelTokenizer:
    """generation_config.json's ids first (what generate() uses), then config.json's, then the
    tokens named in tokenizer_config.json / special_tokens_map.json."""
    file = directory / TOKENIZER
    tokenizer = read_tokenizer_file(file)
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
