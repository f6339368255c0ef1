"""The two CLIs end to end, as a user runs them (subprocesses, tiny sizes)."""

import json
import subprocess
from pathlib import Path

import pytest
from cli_runs import TINY, run_cli

pytestmark = pytest.mark.slow  # CLI subprocesses


def run(program: str, *args: str, cache: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli(cache, *args, program=program, check=check)


def test_demo_data_training_writes_metrics_and_plot(tmp_path):
    out = run(
        "ouro-train",
        "--config-name",
        "demo",
        f"run_dir={tmp_path / 'run'}",
        *TINY,
        "logging.plot=true",  # the default, which TINY turns off for speed
        "train.micro_batch_size=4",
        "train.eval_batches=2",
        "train.steps=6",
        "train.log_every=3",
        "schedule.warmup_steps=2",
        cache=tmp_path,
    )
    assert "step 6 | loss" in out.stdout and "eval step 6" in out.stdout
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert {"ce_step1", "ce_step4", "p_step4", "entropy", "grad_norm", "lr", "tokens_per_s"} <= set(lines[0])
    assert (tmp_path / "run" / "loss_per_step.png").stat().st_size > 1000
    # The resolved, typed config this run trained with; hydra leaves nothing (no .hydra/, no train.log).
    from omegaconf import OmegaConf

    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.train.steps == 6 and saved.model.name == "demo" and saved.run_dir == str(tmp_path / "run")
    assert not (tmp_path / "run" / ".hydra").exists() and not (tmp_path / "run" / "train.log").exists()


def test_tokenizer_that_does_not_fit_the_model_fails_fast(tmp_path):
    out = run(
        "ouro-train",
        f"run_dir={tmp_path}",
        "data.tokenizer_vocab_size=600",
        "model.vocab_size=512",
        cache=tmp_path,
        check=False,
    )
    assert out.returncode == 2 and "'model.vocab_size'" in out.stderr and "600" in out.stderr


# The shards' own 400-token tokenizer, 64-token rows: 3 steps x 2 rows x 64 tokens = 384 tokens.
SHARDS_RUN = ["model.vocab_size=400", "train.steps=3", "train.micro_batch_size=2", "train.seq_len=64"]
SHARDS_RUN += ["train.eval_batches=1", "logging.progress_bar=false"]


def test_shards_to_training(tmp_path):
    tok = tmp_path / "tok.json"
    run("ouro-data", "train-tokenizer", "--out", str(tok), "--vocab-size", "400", cache=tmp_path)
    corpus = tmp_path / "corpus.jsonl"
    from ouro_train.data.demo_corpus import demo_documents

    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in demo_documents()[:20]))
    run(
        "ouro-data",
        "tokenize",
        str(corpus),
        "--source",
        "docs",
        "--tokenizer",
        str(tok),
        "--out",
        str(tmp_path / "shards"),
        "--tokens-per-shard",
        "5000",
        cache=tmp_path,
    )
    source = f"{{name: docs, path: {tmp_path / 'shards'}, weight: 1.0}}"
    out = run(
        "ouro-train",
        f"run_dir={tmp_path / 'run'}",
        "data.source=shards",
        f"data.sources=[{source}]",
        f"data.eval_sources=[{source}]",
        *SHARDS_RUN,
        cache=tmp_path,
    )
    assert "step 3 | loss" in out.stdout and "eval step 3" in out.stdout
    assert "data docs: 384 tokens seen (6 samples" in out.stdout  # 3 steps x 2 rows x 64 tokens
    missing = f"{{name: docs, path: {tmp_path / 'nowhere'}, weight: 1.0}}"
    bad = run(
        "ouro-train",
        f"run_dir={tmp_path / 'run2'}",
        "data.source=shards",
        f"data.sources=[{missing}]",
        cache=tmp_path,
        check=False,
    )
    assert bad.returncode == 2 and "nowhere/manifest.json: no manifest" in bad.stderr
