"""ouro-export / ouro-import fidelity: config fields this model cannot compute are refused, tied
embeddings are untied, and the tokenizer (ids, files, chat template) travels with the weights."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import jinja2
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import randomized, tiny_config
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ouro_train.checkpoint.errors import CheckpointError
from ouro_train.checkpoint.model_tokenizer import load_model_tokenizer
from ouro_train.checkpoint.tokenizer_record import (
    CHATML_TEMPLATE,
    TOKENIZER,
    TOKENIZER_INFO,
    ModelTokenizer,
    prompt_ids,
    write_record,
)
from ouro_train.checkpoint.training_tokenizer import save_checkpoint_tokenizer
from ouro_train.checkpoint.weights import WEIGHTS, save_weights
from ouro_train.cli.interop import export_main, import_main
from ouro_train.data.sft import build_sft_shards, render_conversation, special_ids

# Ids that differ from the 1 / 2 ouro-export used to write whatever the tokenizer.
SPECIALS = ["<|im_start|>", "<|im_end|>", "<pad>", "<think>", "</think>", "<s>", "<|endoftext|>"]
IM_END, PAD, BOS, EOS = 1, 2, 5, 6
TEXT = "def add(a, b):\n    return a + b  # <|im_end|> stays text"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4", "reasoning": "two and two"},
]


def make_tokenizer(path: Path, vocab_size: int = 300) -> Path:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(["def add(a, b): return a + b", "the quick brown fox"] * 20, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def make_checkpoint(directory: Path, tokenizer_file: Path | None, chat: bool = True, vocab_size: int = 320) -> Path:
    """A checkpoint-like directory: weights (+ the tokenizer as a training run records it)."""
    cfg = tiny_config(vocab_size=vocab_size)
    directory.mkdir(parents=True)
    save_weights(randomized(cfg).state_dict(), directory / WEIGHTS, cfg)
    if tokenizer_file is not None:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        eos_ids = [EOS, IM_END] if chat else [EOS]
        template = CHATML_TEMPLATE if chat else None
        write_record(directory, ModelTokenizer(tokenizer, eos_ids, BOS, PAD, template, path=tokenizer_file))
    return directory


def hf_dir(tmp_path: Path, tokenizer_file: Path, **config_changes) -> Path:
    """An exported (Hugging Face layout) directory whose config.json is then changed."""
    out = tmp_path / "hf"
    assert export_main([str(make_checkpoint(tmp_path / "ckpt", tokenizer_file)), str(out), "--dtype", "float32"]) == 0
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | config_changes))
    return out


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, 'rope_scaling={"type": "linear"'),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' scaling"),
        ({"hidden_act": "gelu"}, 'hidden_act="gelu"'),
        ({"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window=true"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "layer 1: 'sliding_attention'"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"mlp_bias": True}, "mlp_bias=true"),
    ],
)
def test_config_fields_this_model_cannot_compute_are_refused(tmp_path, tokenizer_file, capsys, change, named):
    source = hf_dir(tmp_path, tokenizer_file, **change)
    assert import_main([str(source), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert named in err and "is not supported" in err and "ouro-import takes only" in err
    assert not (tmp_path / "out" / WEIGHTS).exists()


def test_harmless_fields_are_ignored_and_recorded(tmp_path, tokenizer_file, capsys):
    # A Qwen2-style sliding_window size with use_sliding_window false is unused (as in the reference).
    change = {"sliding_window": 4096, "use_sliding_window": False, "early_exit_threshold": 0.9, "hidden_act": "swish"}
    source = hf_dir(tmp_path, tokenizer_file, **change, rope_scaling={"rope_type": "default"}, foo_unknown=1)
    assert import_main([str(source), str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "imported_from.json").read_text())
    assert record["ignored"]["sliding_window"] == 4096 and record["ignored"]["early_exit_threshold"] == 0.9
    assert "ignored (no effect" in capsys.readouterr().out


def test_tied_embeddings_are_untied_at_import(tmp_path, tokenizer_file, capsys):
    source = hf_dir(tmp_path, tokenizer_file, tie_word_embeddings=True)
    weights = load_file(source / "model.safetensors")
    head = weights.pop("lm_head.weight")
    save_file(weights, str(source / "model.safetensors"))
    assert import_main([str(source), str(tmp_path / "out")]) == 0
    assert "untied" in capsys.readouterr().out
    imported = load_file(tmp_path / "out" / WEIGHTS)
    assert torch.equal(imported["lm_head.weight"], imported["model.embed_tokens.weight"])
    assert not torch.equal(imported["lm_head.weight"], head)
    # Both tensors present and different under tie_word_embeddings: ambiguous, refused.
    save_file(weights | {"lm_head.weight": head}, str(source / "model.safetensors"))
    assert import_main([str(source), str(tmp_path / "out2")]) == 2
    assert "differs from its model.embed_tokens.weight" in capsys.readouterr().err


def test_export_writes_the_tokenizer_ids_and_files(tmp_path, tokenizer_file):
    out = hf_dir(tmp_path, tokenizer_file)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (BOS, [EOS, IM_END], PAD)
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (BOS, [EOS, IM_END])
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"]) == ("<s>", "<|im_end|>", "<pad>")
    assert tok_cfg["chat_template"] == CHATML_TEMPLATE and tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    # What tokenizer(text, return_tensors="pt") returns is what model.generate(**...) accepts (no token_type_ids).
    assert tok_cfg["model_input_names"] == ["input_ids", "attention_mask"] and tok_cfg["add_bos_token"] is True
    special_map = json.loads((out / "special_tokens_map.json").read_text())
    assert special_map["eos_token"] == "<|im_end|>" and "<think>" in special_map["additional_special_tokens"]
    # The training tokenizer, with a post-processor that prepends the BOS training prepended.
    exported, original = json.loads((out / TOKENIZER).read_text()), json.loads(tokenizer_file.read_text())
    assert original["post_processor"] is None and exported["post_processor"]["type"] == "TemplateProcessing"
    assert {k: v for k, v in exported.items() if k != "post_processor"} == {
        k: v for k, v in original.items() if k != "post_processor"
    }


def test_export_import_round_trip_keeps_the_tokenizer(tmp_path, tokenizer_file):
    out = hf_dir(tmp_path, tokenizer_file)
    assert import_main([str(out), str(tmp_path / "imported")]) == 0
    assert (tmp_path / "imported" / TOKENIZER_INFO).is_file()
    want = Tokenizer.from_file(str(tokenizer_file)).encode(TEXT).ids
    for directory in (tmp_path / "ckpt", out, tmp_path / "imported", tmp_path / "imported" / WEIGHTS):
        found = load_model_tokenizer(directory)
        assert found.tokenizer.encode(TEXT, add_special_tokens=False).ids == want
        # Prompted alike from every directory: one BOS, whether or not the file's post-processor adds it.
        assert prompt_ids(found, TEXT) == [BOS, *want]
        assert found.tokenizer.encode(TEXT).ids == (want if directory == tmp_path / "ckpt" else [BOS, *want])
        assert (found.bos_id, found.eos_ids, found.pad_id, found.is_chat) == (BOS, [EOS, IM_END], PAD, True)
    # ... and again through a second export of the imported weights.
    assert export_main([str(tmp_path / "imported"), str(tmp_path / "again")]) == 0
    assert load_model_tokenizer(tmp_path / "again").eos_ids == [EOS, IM_END]


def test_the_chat_template_renders_what_sft_trained_on(tokenizer_file):
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    trained, _ = render_conversation(tokenizer, CONVERSATION, special_ids(tokenizer, True, "t"))
    template = jinja2.Environment().from_string(CHATML_TEMPLATE)
    text = template.render(messages=CONVERSATION)
    # The template is text with the specials written out; SFT ends the document with <|endoftext|>.
    assert tokenizer.encode(text, add_special_tokens=False).ids == trained.tolist()[:-1]
    prompt = (
        jinja2.Environment().from_string(CHATML_TEMPLATE).render(messages=CONVERSATION[:2], add_generation_prompt=1)
    )
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_a_tokenizer_bigger_than_the_vocabulary_is_refused(tmp_path, tokenizer_file, capsys):
    checkpoint = make_checkpoint(tmp_path / "ckpt", tokenizer_file, vocab_size=64)
    assert export_main([str(checkpoint), str(tmp_path / "hf")]) == 2
    size = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    assert size > 64
    err = capsys.readouterr().err
    assert f"{checkpoint}: the tokenizer" in err and f"has {size} ids but the model's vocab_size is 64" in err


def test_a_checkpoint_without_a_tokenizer(tmp_path, tokenizer_file, capsys):
    checkpoint = make_checkpoint(tmp_path / "old", None)
    assert export_main([str(checkpoint), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert f"{checkpoint}: no tokenizer found" in err and "--tokenizer PATH" in err
    # A bare tokenizer.json: EOS <|endoftext|>, no BOS; --chat adds the template and <|im_end|>.
    assert export_main([str(checkpoint), str(tmp_path / "hf"), "--tokenizer", str(tokenizer_file), "--chat"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (None, [EOS, IM_END])
    assert load_model_tokenizer(tmp_path / "hf").is_chat
    # Weights only, on request: no tokenizer files left behind, null ids.
    assert export_main([str(checkpoint), str(tmp_path / "hf"), "--no-tokenizer"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] is None and not (tmp_path / "hf" / TOKENIZER).exists()


def test_a_corrupt_tokenizer_copy_is_refused(tmp_path, tokenizer_file):
    checkpoint = make_checkpoint(tmp_path / "ckpt", tokenizer_file)
    (checkpoint / TOKENIZER).write_bytes((checkpoint / TOKENIZER).read_bytes().replace(b"quick", b"quack"))
    with pytest.raises(CheckpointError, match="sha256 .* but .*tokenizer_info.json records .*corrupt"):
        load_model_tokenizer(checkpoint)


def test_a_checkpoint_of_sft_shards_records_a_chat_tokenizer(tmp_path, tokenizer_file):
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    build_sft_shards([str(chats)], str(tokenizer_file), str(tmp_path / "sft"), source="chat")
    assert (tmp_path / "sft" / TOKENIZER).read_bytes() == tokenizer_file.read_bytes()  # copied beside the manifest
    cfg = SimpleNamespace(data=SimpleNamespace(source="shards", sources=[SimpleNamespace(path=str(tmp_path / "sft"))]))
    (tmp_path / "ckpt").mkdir()
    save_checkpoint_tokenizer(tmp_path / "ckpt", cfg)
    found = load_model_tokenizer(tmp_path / "ckpt")
    assert (found.eos_ids, found.bos_id, found.chat_template) == ([EOS, IM_END], None, CHATML_TEMPLATE)

    # Data tokenized before tokenizers were copied beside it: only the sha256 is recorded, and
    # --tokenizer must match it.
    (tmp_path / "sft" / TOKENIZER).unlink()
    (tmp_path / "old").mkdir()
    save_checkpoint_tokenizer(tmp_path / "old", cfg)
    assert not (tmp_path / "old" / TOKENIZER).exists()
    with pytest.raises(CheckpointError, match="holds no copy of its tokenizer .* pass --tokenizer PATH"):
        load_model_tokenizer(tmp_path / "old")
    assert load_model_tokenizer(tmp_path / "old", tokenizer=tokenizer_file).eos_ids == [EOS, IM_END]
    other = make_tokenizer(tmp_path / "other" / "tokenizer.json", vocab_size=290)
    with pytest.raises(CheckpointError, match="the model was trained with another tokenizer"):
        load_model_tokenizer(tmp_path / "old", tokenizer=other)
