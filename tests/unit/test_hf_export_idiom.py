"""An ouro-export directory in the Hugging Face idiom: `tokenizer(text)` gives what ouro-generate
feeds the model (the BOS training prepended first, no token_type_ids), and
`model.generate(**tokenizer(text, return_tensors="pt"))` runs and continues as ouro-generate does.
Everything is read from local directories (no hub access)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import randomized, tiny_config
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ouro_train.checkpoint.model_tokenizer import load_model_tokenizer
from ouro_train.checkpoint.tokenizer_record import TOKENIZER, ModelTokenizer, write_record
from ouro_train.checkpoint.weights import WEIGHTS, save_weights
from ouro_train.cli.infer import _prompts, generate_main
from ouro_train.cli.interop import export_main, import_main
from ouro_train.inference.documents import jsonl_documents
from ouro_train.inference.loading import load_model

BOS, EOS = 1, 0
TEXT = "def add(a, b): return a + b"


def make_tokenizer(path: Path) -> Path:
    """Byte-level BPE with <|endoftext|> 0 and a BOS <s> 1, and no post-processor (as trained here)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290,
        special_tokens=["<|endoftext|>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(["def add(a, b): return a + b", "the quick brown fox"] * 20, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def exported(tmp: Path, bos: bool = True) -> tuple[Path, Path]:
    """(a checkpoint whose data prepended BOS, as `ouro-data tokenize --bos-token <s>` records it, its fp32 export)."""
    tokenizer_file = make_tokenizer(tmp / "tok" / TOKENIZER)
    cfg = tiny_config(vocab_size=300)
    checkpoint = tmp / "ckpt"
    checkpoint.mkdir()
    save_weights(randomized(cfg).state_dict(), checkpoint / WEIGHTS, cfg)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    write_record(checkpoint, ModelTokenizer(tokenizer, [EOS], BOS if bos else None, path=tokenizer_file))
    assert export_main([str(checkpoint), str(tmp / "hf"), "--dtype", "float32"]) == 0
    return checkpoint, tmp / "hf"


def generate_ids(checkpoint: Path) -> list[int]:
    """The prompt ids ouro-generate builds for TEXT (its own code path)."""
    args = SimpleNamespace(prompt=[TEXT], prompts=None, chat=False, system=None)
    (row,), _ = _prompts(args, load_model_tokenizer(checkpoint))
    return row


def generated_tokens(model: Path, capsys) -> list[int]:
    capsys.readouterr()  # what ran before
    assert generate_main([str(model), "--prompt", TEXT, "--max-new-tokens", "3", "--json"]) == 0
    return json.loads(capsys.readouterr().out)["tokens"]


def test_the_exported_tokenizer_encodes_what_ouro_generate_feeds(tmp_path, capsys):
    checkpoint, hf = exported(tmp_path)
    want = generate_ids(checkpoint)
    assert want[0] == BOS and want.count(BOS) == 1
    assert Tokenizer.from_file(str(hf / TOKENIZER)).encode(TEXT).ids == want
    # ouro-generate on the export (and on its ouro-import) prompts alike: no second BOS.
    assert generate_ids(hf) == want
    assert import_main([str(hf), str(tmp_path / "imported")]) == 0
    assert generate_ids(tmp_path / "imported") == want
    assert generated_tokens(hf, capsys) == generated_tokens(checkpoint, capsys)
    # ouro-eval's {"text": ...} documents start as training's did (BOS first), from either directory.
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    for directory in (checkpoint, hf):
        tok = load_model_tokenizer(directory)
        (doc,) = jsonl_documents(tmp_path / "docs.jsonl", tok.tokenizer, 1, 64, tok.bos_id)
        assert doc.tokens.tolist() == want
    # Exporting the import again leaves the tokenizer as it is (its post-processor already prepends BOS).
    assert export_main([str(tmp_path / "imported"), str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / TOKENIZER).read_bytes() == (hf / TOKENIZER).read_bytes()


def test_a_tokenizer_without_bos_is_exported_byte_for_byte(tmp_path):
    checkpoint, hf = exported(tmp_path, bos=False)
    assert (hf / TOKENIZER).read_bytes() == (tmp_path / "tok" / TOKENIZER).read_bytes()
    assert Tokenizer.from_file(str(hf / TOKENIZER)).encode(TEXT).ids == generate_ids(checkpoint)
    assert json.loads((hf / "tokenizer_config.json").read_text())["add_bos_token"] is False


# config.json keeps the released field `rope_scaling: null`, which transformers 5 calls deprecated.
@pytest.mark.filterwarnings("ignore:`rope_scaling` is deprecated:FutureWarning")
def test_generate_in_the_hf_idiom(tmp_path, capsys):
    import transformers  # a dev dependency (pyproject.toml); imported here, where it is used (~1 s)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    checkpoint, hf = exported(tmp_path)

    class ExportedLoopLM(transformers.PreTrainedModel, transformers.GenerationMixin):
        """The exported weights behind transformers' generate(), computed by LoopLM: the released
        modeling_ouro.py is written for transformers 4.55 and is not vendored (tests/parity/README.md).
        No KV cache: each new token recomputes the prefix (use_cache=False)."""

        config_class = transformers.PretrainedConfig

        def __init__(self, config, looplm):
            super().__init__(config)
            self.looplm = looplm

        def forward(self, input_ids, attention_mask=None, **kwargs):
            assert attention_mask is None or bool(attention_mask.all())  # one unpadded prompt
            with torch.no_grad():
                return CausalLMOutputWithPast(logits=self.looplm.logits(self.looplm(input_ids).hidden_states[-1]))

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf, local_files_only=True)
    inputs = tokenizer(TEXT, return_tensors="pt")
    assert sorted(inputs) == ["attention_mask", "input_ids"]  # no token_type_ids, which generate() refuses
    assert inputs["input_ids"][0].tolist() == generate_ids(checkpoint)  # BOS first
    config = transformers.PretrainedConfig.from_pretrained(hf, local_files_only=True)
    model = ExportedLoopLM(config, load_model(hf)).eval()
    model.generation_config = transformers.GenerationConfig.from_pretrained(hf, local_files_only=True)
    out = model.generate(**inputs, max_new_tokens=3, use_cache=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    # Greedy over all recurrent steps: what ouro-generate continues with (stopping at the same EOS).
    ours = generated_tokens(checkpoint, capsys)
    assert new[: len(ours)] == ours and len(ours) >= 1
