"""`make repro-depth` at a seconds-long size: data for two seeds, the three models of each trained
through the ouro-train CLI (a few steps each), evaluation by hops, by step and at the Q-exit, the
verdict per seed, and the report."""

import json

import pytest
from cli_runs import cli_env

pytestmark = pytest.mark.slow  # six ouro-train subprocesses


def test_repro_depth_end_to_end(tmp_path, monkeypatch):
    from data_tools import repro_depth

    for key, value in cli_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    tiny = ["train.steps=2", "train.global_batch_size=8", "train.micro_batch_size=8", "schedule.warmup_steps=1"]
    tiny += ["train.eval_batches=1", "train.log_every=1", "depth_flat_deep:model.num_layers=3"]
    args = ["--run-dir", str(run_dir), "--chains", "2", "--depth", "3", "--train-samples", "100"]
    args += ["--test-per-hop", "4", "--seeds", "0", "1", "--jobs", "3"]
    assert repro_depth.main([*args, *tiny]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert list(report["seeds"]) == ["0", "1"]
    for seed, entry in report["seeds"].items():
        models = entry["models"]
        assert list(models) == ["depth_flat", "depth_looped", "depth_flat_deep"]
        assert [(m["layers"], m["steps"]) for m in models.values()] == [(1, 1), (1, 4), (3, 1)]
        assert models["depth_flat"]["parameters"] == models["depth_looped"]["parameters"]
        assert {m["train"]["tokens"] for m in models.values()} == {2 * 8 * 23}  # steps x rows x (3 C H + 5)
        looped = models["depth_looped"]
        assert looped["hops"] == [1, 2, 3] and looped["counts"] == [4, 4, 4] and len(looped["per_step"]) == 4
        assert all(1 <= s <= 4 for s in looped["exit_mean_step"])
        assert entry["data"]["seed"] == int(seed)
        # Two steps of training solve nothing: the verdict says so rather than claiming the loop works.
        assert entry["verdict"]["holds"] is False and entry["verdict"]["why"]
    assert report["holds"] is False
    # The two seeds trained on different data.
    first, second = (json.loads((run_dir / f"seed_{s}" / "data" / "chains.json").read_text()) for s in (0, 1))
    assert first["seed"] == 0 and second["seed"] == 1
    text = (run_dir / "report.md").read_text()
    assert "| depth_looped | 1⊗4 |" in text and "Q-exit q=0.5" in text and "## Seed 1" in text
    assert "Verdict: the target does not hold in 2 seed(s)" in text
    assert (run_dir / "accuracy.png").stat().st_size > 5000


def test_the_verdict_reads_the_table():
    from data_tools.repro_depth import Settings, verdict

    def model(per_step):
        return {"hops": [1, 2, 3], "per_step": per_step}

    results = {
        "depth_flat": model([[1.0, 0.4, 0.35]]),
        "depth_looped": model([[0.9, 0.35, 0.3], [1.0, 0.7, 0.4], [1.0, 0.95, 0.5], [1.0, 0.97, 0.6]]),
        "depth_flat_deep": model([[1.0, 0.93, 0.5]]),
    }
    found = verdict(results, Settings())
    assert found["h_star"] == 2 and found["holds"] is True
    assert found["lead"] == pytest.approx(0.57) and found["rise"] == pytest.approx(0.62)
    results["depth_looped"]["per_step"][-1][1] = 0.5  # 10 points over the flat twin: short of 15
    assert verdict(results, Settings())["holds"] is False
    results["depth_flat_deep"]["per_step"] = [[0.5, 0.4, 0.3]]
    assert verdict(results, Settings())["h_star"] is None
