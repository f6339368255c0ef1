"""The paths people type: ouro-generate, ouro-eval and ouro-export take a checkpoint, a run
directory, a pipeline stage directory or a checkpoints/ directory (its newest complete, usable
checkpoint, named in one line); a path that holds no model is refused naming it and what was expected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import randomized, tiny_config
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ouro_train.checkpoint.errors import CheckpointError
from ouro_train.checkpoint.hf import export_hf
from ouro_train.checkpoint.locate import resolve_model_path
from ouro_train.checkpoint.store import COMPLETE, LATEST, TRAIN_STATE, step_name
from ouro_train.checkpoint.tokenizer_record import ModelTokenizer, write_record
from ouro_train.checkpoint.weights import WEIGHTS, save_weights
from ouro_train.cli.infer import eval_main, generate_main
from ouro_train.cli.interop import export_main

CFG = tiny_config(vocab_size=300)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(["def f(x): return x", "the quick brown fox"] * 10, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def write_checkpoint(checkpoints: Path, step: int, tokenizer_file: Path, complete: bool = True) -> Path:
    """A checkpoint as store.py lays it out (weights seeded by the step, so each is told apart)."""
    directory = checkpoints / step_name(step)
    (directory / "engine").mkdir(parents=True)
    (directory / "rng").mkdir()
    torch.save({}, directory / "rng" / "rank_00000.pt")
    (directory / TRAIN_STATE).write_text(json.dumps({"step": step, "world_size": 1}))
    save_weights(randomized(CFG, seed=step).state_dict(), directory / WEIGHTS, CFG)
    write_record(directory, ModelTokenizer(Tokenizer.from_file(str(tokenizer_file)), [0], path=tokenizer_file))
    if complete:
        (directory / COMPLETE).write_text(str(step))
        (checkpoints / LATEST).write_text(step_name(step))
    return directory


@pytest.fixture
def run_dir(tmp_path, tokenizer_file) -> Path:
    """runs/try: step 10 and 20 complete, 30 never completed (killed mid-save)."""
    run = tmp_path / "runs" / "try"
    for step in (10, 20):
        write_checkpoint(run / "checkpoints", step, tokenizer_file)
    write_checkpoint(run / "checkpoints", 30, tokenizer_file, complete=False)
    return run


def test_run_stage_and_checkpoints_directories_mean_the_newest_complete_checkpoint(run_dir, tmp_path, tokenizer_file):
    newest = run_dir / "checkpoints" / "step_00000020"
    for given in (run_dir, run_dir / "checkpoints"):
        found, note = resolve_model_path(given)
        assert found == newest and note == f"using {newest} (newest complete checkpoint of {given})"
    # A pipeline stage's directory is that stage's run directory (pipeline/plan.py).
    sft = write_checkpoint(tmp_path / "runs" / "demo_pipeline" / "sft" / "checkpoints", 30, tokenizer_file)
    assert resolve_model_path(tmp_path / "runs" / "demo_pipeline" / "sft")[0] == sft
    # A directory holding weights itself is taken as given: a checkpoint (even an older one), an
    # ouro-import output, a weights file, an exported Hugging Face directory.
    older = run_dir / "checkpoints" / "step_00000010"
    assert resolve_model_path(older) == (older, None)
    assert resolve_model_path(older / WEIGHTS) == (older / WEIGHTS, None)
    hf = export_hf(randomized(CFG).state_dict(), CFG, tmp_path / "hf", "float32")
    assert resolve_model_path(hf) == (hf, None)


def test_a_broken_newest_checkpoint_is_passed_over(run_dir, capsys):
    newest = run_dir / "checkpoints" / "step_00000020"
    weights = (newest / WEIGHTS).read_bytes()
    (newest / WEIGHTS).write_bytes(weights[: len(weights) // 2])
    found, note = resolve_model_path(run_dir)
    assert found == run_dir / "checkpoints" / "step_00000010" and "step_00000010" in note
    assert f"skipping checkpoint {newest}" in capsys.readouterr().err


def test_paths_without_a_model_are_refused_naming_them(tmp_path, tokenizer_file):
    expected = "expected a checkpoint directory"
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nowhere'}: not found; {expected}"):
        resolve_model_path(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'empty'}: holds no checkpoint; {expected}"):
        resolve_model_path(tmp_path / "empty")
    # A run whose only save was interrupted.
    write_checkpoint(tmp_path / "killed" / "checkpoints", 10, tokenizer_file, complete=False)
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'killed' / 'checkpoints'}: no complete, usable checkpoint"):
        resolve_model_path(tmp_path / "killed")
    # A pipeline's run directory: its stages are named.
    pipeline = tmp_path / "pipeline"
    write_checkpoint(pipeline / "warmup" / "checkpoints", 10, tokenizer_file)
    (pipeline / "data").mkdir()
    with pytest.raises(CheckpointError, match="these stage directories do: warmup; name one"):
        resolve_model_path(pipeline)


def test_the_clis_take_a_run_directory_and_say_which_checkpoint(run_dir, tmp_path, capsys):
    newest = run_dir / "checkpoints" / "step_00000020"
    line = f"using {newest} (newest complete checkpoint of {run_dir})"
    argv = ["--prompt", "def f", "--max-new-tokens", "2", "--json"]
    assert generate_main([str(run_dir), *argv]) == 0
    out, err = capsys.readouterr()
    assert line in err.splitlines() and json.loads(out)["prompt"] == "def f"
    assert generate_main([str(newest), *argv]) == 0  # the same tokens as from the checkpoint named
    assert capsys.readouterr().out == out

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"text": "the quick brown fox"}) + "\n")
    assert eval_main([str(run_dir), "--prompts", str(prompts), "--out", str(tmp_path / "eval"), "--q", "1"]) == 0
    assert line in capsys.readouterr().err
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["source"]["model"] == str(newest)

    assert export_main([str(run_dir / "checkpoints"), str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    assert f"using {newest} (newest complete checkpoint of {run_dir / 'checkpoints'})" in capsys.readouterr().err
    exported, trained = load_file(tmp_path / "hf" / "model.safetensors"), load_file(newest / WEIGHTS)
    assert all(torch.equal(exported[k], trained[k]) for k in trained)


def test_the_clis_refuse_a_directory_without_a_model(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    for main, extra in (
        (generate_main, ["--prompt", "x"]),
        (eval_main, ["--prompts", "p.jsonl", "--out", str(tmp_path / "eval")]),
        (export_main, [str(tmp_path / "hf")]),
    ):
        assert main([str(tmp_path / "notes"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / 'notes'}: holds no checkpoint; expected a checkpoint directory")
        assert "tokenizer" not in err  # not the misleading "written before checkpoints carried their tokenizer"
