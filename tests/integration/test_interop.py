"""Checkpoint weights <-> the released Ouro Hugging Face layout, and weights-only starts."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from cli_runs import TINY, run_cli
from safetensors.torch import load_file
from tokenizers import Tokenizer

from ouro_train.checkpoint.model_tokenizer import load_model_tokenizer
from ouro_train.cli.infer import eval_main, generate_main

pytestmark = pytest.mark.slow  # CLI subprocesses

TRAIN = [*TINY, "train.steps=2"]


def run(tmp: Path, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli(tmp, *args, program=program, check=check)


def generated_json(capsys, model: Path) -> dict:
    argv = [str(model), "--prompt", "def f(x):", "--max-new-tokens", "12", "--exit", "q:0.5", "--json"]
    assert generate_main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_export_import_round_trip_and_init_from(tmp_path, capsys):
    run(tmp_path, "ouro-train", f"run_dir={tmp_path / 'run'}", *TRAIN)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    original = load_file(checkpoint / "model.safetensors")
    assert "model.layers.1.input_layernorm_2.weight" in original and "lm_head.weight" in original

    # The checkpoint carries the tokenizer it was trained with (the cached demo tokenizer).
    (cached,) = (tmp_path / "cache").glob("tokenizer-*.json")
    assert (checkpoint / "tokenizer.json").read_bytes() == cached.read_bytes()
    assert json.loads((checkpoint / "tokenizer_info.json").read_text())["eos_ids"] == [0]

    run(tmp_path, "ouro-export", str(checkpoint), str(tmp_path / "hf32"), "--dtype", "float32")
    config = json.loads((tmp_path / "hf32" / "config.json").read_text())
    assert config["model_type"] == "ouro" and config["total_ut_steps"] == 4 and config["num_hidden_layers"] == 2
    assert config["architectures"] == ["OuroForCausalLM"] and config["tie_word_embeddings"] is False
    # The demo tokenizer's ids (EOS <|endoftext|> = 0, no BOS), not the released model's 1 / 2.
    assert (config["bos_token_id"], config["eos_token_id"]) == (None, 0)
    assert json.loads((tmp_path / "hf32" / "generation_config.json").read_text())["eos_token_id"] == 0
    assert (tmp_path / "hf32" / "tokenizer_config.json").is_file() and (tmp_path / "hf32" / "tokenizer.json").is_file()
    run(tmp_path, "ouro-import", str(tmp_path / "hf32"), str(tmp_path / "imported32"))
    text = "def f(x):\n    return x + 1\n"
    want = Tokenizer.from_file(str(cached)).encode(text).ids
    assert load_model_tokenizer(tmp_path / "imported32").tokenizer.encode(text).ids == want
    imported = load_file(tmp_path / "imported32" / "model.safetensors")
    assert imported.keys() == original.keys()
    assert all(torch.equal(imported[k], original[k]) for k in original)  # fp32: bit exact

    # ouro-generate gives the same tokens on the checkpoint, its export and the re-import (fp32),
    # with the real early exit; ouro-eval reads the same directories.
    generated = {
        name: generated_json(capsys, tmp_path / name if name != "checkpoint" else checkpoint)
        for name in ("checkpoint", "hf32", "imported32")
    }
    assert generated["checkpoint"] == generated["hf32"] == generated["imported32"]
    assert 1 <= len(generated["checkpoint"]["tokens"]) <= 12 and all(
        1 <= e <= 4 for e in generated["checkpoint"]["exit_steps"]
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"text": text * 3}) + "\n" + json.dumps({"text": "import os\nprint(os.sep)"}) + "\n")
    assert (
        eval_main([str(tmp_path / "hf32"), "--prompts", str(prompts), "--out", str(tmp_path / "eval"), "--q", "0.5,1"])
        == 0
    )
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["documents"] == 2 and [r["exit"] for r in result["runs"][:3]] == ["all", "q:0.5", "q:1"]

    run(tmp_path, "ouro-export", str(checkpoint), str(tmp_path / "hf16"))  # bfloat16, as released
    run(tmp_path, "ouro-import", str(tmp_path / "hf16"), str(tmp_path / "imported16"))
    run(tmp_path, "ouro-export", str(tmp_path / "imported16"), str(tmp_path / "hf16again"))
    first, second = (
        load_file(tmp_path / "hf16" / "model.safetensors"),
        load_file(tmp_path / "hf16again" / "model.safetensors"),
    )
    assert all(first[k].dtype == torch.bfloat16 and torch.equal(first[k], second[k]) for k in first)
    assert all(torch.equal(first[k], original[k].to(torch.bfloat16)) for k in first)

    started = run(
        tmp_path,
        "ouro-train",
        f"run_dir={tmp_path / 'stage2'}",
        f"checkpoint.init_from={tmp_path / 'imported32'}",
        *TRAIN,
    )
    assert "initialised weights from" in started.stdout
    step1 = json.loads((tmp_path / "stage2" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    fresh = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert step1 < fresh  # starts from trained weights, not from scratch


def test_weights_that_do_not_fit_the_model_are_refused(tmp_path):
    run(tmp_path, "ouro-train", f"run_dir={tmp_path / 'run'}", *TRAIN)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    bad = run(
        tmp_path,
        "ouro-train",
        f"run_dir={tmp_path / 'other'}",
        f"checkpoint.init_from={checkpoint}",
        "model.num_layers=3",
        *TRAIN,
        check=False,
    )
    assert bad.returncode == 2 and "weights do not fit this model" in bad.stderr and "model.layers.2" in bad.stderr
    (tmp_path / "notouro").mkdir()
    (tmp_path / "notouro" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    foreign = run(tmp_path, "ouro-import", str(tmp_path / "notouro"), str(tmp_path / "x"), check=False)
    assert foreign.returncode == 2 and "model_type 'llama' is not 'ouro'" in foreign.stderr


def test_upcycle_cli_writes_weights_a_bigger_model_trains_from(tmp_path):
    run(tmp_path, "ouro-train", f"run_dir={tmp_path / 'run'}", *TRAIN)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    plan = run(tmp_path, "ouro-upcycle", str(checkpoint), "--dry-run")
    assert "2 layers x 4 steps -> 4 layers x 2 steps" in plan.stdout and not (tmp_path / "up").exists()
    out = run(tmp_path, "ouro-upcycle", str(checkpoint), str(tmp_path / "up"), "--order", "interleave")
    assert (tmp_path / "up" / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()
    assert "model.num_layers=4 model.recurrent_steps=2" in out.stdout

    # Moments are duplicated with their layers (interleave: new layers 2i and 2i+1 <- layer i),
    # and the next stage takes them, the learning rate and the data position from the output.
    source = load_file(str(checkpoint / "optimizer.safetensors"))
    moments = load_file(str(tmp_path / "up" / "optimizer.safetensors"))
    key = "model.layers.{}.mlp.up_proj.weight"
    for kind in ("exp_avg", "exp_avg_sq"):
        assert torch.count_nonzero(source[f"{kind}.{key.format(1)}"]) > 0
        for new, old in ((0, 0), (1, 0), (2, 1), (3, 1)):
            assert torch.equal(moments[f"{kind}.{key.format(new)}"], source[f"{kind}.{key.format(old)}"])
        assert torch.equal(moments[f"{kind}.lm_head.weight"], source[f"{kind}.lm_head.weight"])
    assert moments["step"].item() == source["step"].item() == 2
    carried = run(
        tmp_path,
        "ouro-train",
        f"run_dir={tmp_path / 'stage2b'}",
        f"checkpoint.init_from={tmp_path / 'up'}",
        "checkpoint.init_optimizer=true",
        "checkpoint.init_schedule=keep",
        "checkpoint.init_data_position=true",
        "model.num_layers=4",
        "model.recurrent_steps=2",
        *TRAIN,
    )
    assert "weights, optimizer, learning rate" in carried.stdout and "data position {'demo': 2}" in carried.stdout
    assert "step 2 | loss" in carried.stdout  # the bigger model trains (a weights-only start: test above)
    reset = run(tmp_path, "ouro-upcycle", str(checkpoint), str(tmp_path / "up2"), "--optimizer", "reset")
    assert "optimizer moments: reset" in reset.stdout and not (tmp_path / "up2" / "optimizer.safetensors").exists()
