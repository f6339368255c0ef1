"""`make repro-mano` at a seconds-long size: data, the three models trained through the ouro-train
CLI (a few steps each), evaluation by length, by step and at the Q-exit, and the report."""

import json

import pytest
from cli_runs import cli_env

pytestmark = pytest.mark.slow  # three ouro-train subprocesses


def test_repro_mano_end_to_end(tmp_path, monkeypatch):
    from data_tools import repro_mano

    for key, value in cli_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    tiny = ["train.steps=3", "train.global_batch_size=8", "train.micro_batch_size=8", "schedule.warmup_steps=1"]
    tiny += ["train.eval_batches=1", "train.log_every=1", "mano_flat_deep:model.num_layers=3"]
    args = ["--run-dir", str(run_dir), "--max-ops", "3", "--train-samples", "200", "--test-per-length", "4"]
    args += ["--jobs", "3"]  # three subprocesses side by side: their start-up (imports) dominates
    assert repro_mano.main([*args, *tiny]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    models = report["models"]
    assert list(models) == ["mano_flat", "mano_looped", "mano_flat_deep"]
    assert [(m["layers"], m["steps"]) for m in models.values()] == [(2, 1), (2, 4), (3, 1)]
    # Same parameters for the flat and looped models; the same tokens for all three.
    assert models["mano_flat"]["parameters"] == models["mano_looped"]["parameters"]
    assert {m["train"]["tokens"] for m in models.values()} == {3 * 8 * 12}  # steps x rows x (2 L + 6)
    looped = models["mano_looped"]
    assert len(looped["per_step"]) == 4 and all(len(accs) == 3 for accs in looped["per_step"])
    assert looped["counts"] == [4, 4, 4] and all(1 <= s <= 4 for s in looped["exit_mean_step"])
    assert all(0 <= a <= 1 for m in models.values() for accs in m["per_step"] for a in accs)
    text = (run_dir / "report.md").read_text()
    assert "| mano_looped | 2⊗4 |" in text and "Q-exit q=0.5" in text and "best constant answer" in text
    assert len(json.loads((run_dir / "report.json").read_text())["best_constant_answer"]) == 3
    assert (run_dir / "accuracy.png").stat().st_size > 5000
