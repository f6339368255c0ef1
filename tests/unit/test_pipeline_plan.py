"""`ouro-pipeline ... dry_run=true`: the plan says what it assumes (world size, TP x DP, ZeRO,
micro-batch, recomputation, memory against a budget, GPU-hours and wall time at a stated
throughput), refuses layouts and data that cannot work, honours start_at / stop_after; and
`launch=slurm dry_run=true` prints one chained sbatch line per remaining stage."""

import re
from pathlib import Path

import pytest

from ouro_train.cli.pipeline import main, parse
from ouro_train.config.store import compose_config
from ouro_train.pipeline import slurm
from ouro_train.pipeline.commands import train_args
from ouro_train.pipeline.cost import MEASURED, stage_throughput
from ouro_train.pipeline.plan import plan
from ouro_train.pipeline.spec import load_pipeline

TINY = Path(__file__).resolve().parents[1] / "slurm" / "pipeline_tiny.yaml"  # stages first (200 steps), second (10)


def dry_run(capsys, tmp_path, *args: str) -> tuple[int, str, str]:
    code = main([f"pipeline={TINY}", f"run_dir={tmp_path / 'run'}", "dry_run=true", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_rows_name_their_layout_budget_and_gpu_time(tmp_path, capsys):
    assert parse(["pipeline=x", "plan_gpu_memory_gb=141", "plan_tokens_per_gpu_s=64"])[0].plan_gpu_memory_gb == 141
    code, out, err = dry_run(
        capsys,
        tmp_path,
        "world_size=2",
        "plan_gpu_memory_gb=141",
        "plan_tokens_per_gpu_s=64",
        "second:parallel.activation_checkpointing=layer",
        "second:train.micro_batch_size=1",
    )
    assert code == 0, err
    assert "plan at world_size=2 GPUs (world_size=N), budget 141 GiB per GPU" in out
    # stage world TP x DP ZeRO micro recompute mem GiB tok/s how GPU-hours wall (the second table's rows)
    first = [r for r in out.splitlines() if r.startswith("first ") and "GiB" in r][0].split()
    second = [r for r in out.splitlines() if r.startswith("second ") and "GiB" in r][0].split()
    assert first[1:7] == ["2", "1", "x", "2", "0", "2"] and first[7] == "none"
    assert second[6] == "1" and second[7] == "layer"
    # 200 steps x 2 data-parallel ranks x 2 rows x 32 tokens = 25,600 tokens at 64 tokens/s:
    # 400 GPU-seconds = 0.11 GPU-hours, 200 s wall
    assert first[-5:] == ["64", "given", "0.11", "3", "min"], first
    assert "at 64 tokens/s per GPU for every stage (plan_tokens_per_gpu_s, given)" in out


def test_the_default_throughput_is_the_measured_figure_scaled_by_flops(tmp_path):
    measured = compose_config(["model=ouro_1p4b", "train.seq_len=4096"])
    assert stage_throughput(measured).how == "measured"
    assert stage_throughput(measured).tokens_per_gpu_s == MEASURED.tokens_per_gpu_s == 11427
    looped_twice = compose_config(["model=ouro_1p4b", "train.seq_len=4096", "model.recurrent_steps=8"])
    derived = stage_throughput(looped_twice)
    assert derived.how == "derived" and derived.tokens_per_gpu_s == pytest.approx(11427 / 2)  # twice the FLOPs
    assert stage_throughput(looped_twice, given=5000.0).tokens_per_gpu_s == 5000.0


def test_impossible_layouts_and_missing_data_root_fail_the_dry_run_naming_stage_and_key(tmp_path, capsys):
    code, _, err = dry_run(capsys, tmp_path, "second:parallel.tensor_parallel=2", "world_size=1")
    assert code == 2 and "stage second: parallel.tensor_parallel=2 is larger than world_size=1" in err
    code, _, err = dry_run(capsys, tmp_path, "second:parallel.tensor_parallel=2", "world_size=3")
    assert code == 2 and "stage second: parallel.tensor_parallel=2 does not divide world_size=3" in err
    # stop_after=first leaves the TP-2 stage out: the same command plans only stage first
    code, out, err = dry_run(capsys, tmp_path, "second:parallel.tensor_parallel=2", "world_size=1", "stop_after=first")
    assert code == 0, err
    assert "pipeline tiny: 1 stages" in out and "second" not in out
    missing = tmp_path / "no_shards"
    code, _, err = dry_run(capsys, tmp_path, "second:data=stage1", f"data_root={missing}")
    assert code == 2 and f"stage second: data_root={missing}" in err and "is not a directory" in err
    missing.mkdir()
    assert dry_run(capsys, tmp_path, "second:data=stage1", f"data_root={missing}", "world_size=4")[0] == 0
    code, out, _ = dry_run(capsys, tmp_path, "second:data=stage1", "start_at=second", f"data_root={tmp_path / 'x'}")
    assert code == 2
    assert dry_run(capsys, tmp_path, "second:data=stage1", "stop_after=first", f"data_root={tmp_path / 'x'}")[0] == 0


def test_slurm_dry_run_prints_one_chained_sbatch_line_per_remaining_stage(tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "grow.yaml"
    recipe.write_text(
        TINY.read_text().split("stages:")[0]
        + "stages:\n  - {name: first, overrides: [train.steps=4]}\n  - {name: grow, kind: upcycle}\n"
        + "  - {name: second, overrides: [train.steps=4, model.num_layers=4, model.recurrent_steps=2]}\n"
    )
    run_dir = tmp_path / "run"
    args = [f"pipeline={recipe}", f"run_dir={run_dir}", "launch=slurm", "dry_run=true", "sbatch=--time=1:00:00 -p gpu"]
    assert main([*args, "train.seed=7"]) == 0
    out = capsys.readouterr().out
    jobs = re.findall(r"^job(\d)=\$\((sbatch .*)\)  # (\w+)$", out, re.M)
    assert [(n, name) for n, _, name in jobs] == [("1", "first"), ("2", "grow"), ("3", "second")]
    lines = [line for _, line, _ in jobs]
    assert "--dependency" not in lines[0]
    assert "--dependency=afterok:$job1 " in lines[1] and "--dependency=afterok:$job2 " in lines[2]
    planned = {p.spec.name: p for p in plan(load_pipeline(str(recipe)), run_dir, ["train.seed=7"])}
    for name, line in (("first", lines[0]), ("second", lines[2])):
        assert f"--job-name=tiny-{name} " in line and " --time=1:00:00 -p gpu " in line
        # exactly the arguments the runner gives ouro-train locally, after launch/slurm.sbatch
        script, tail = line.split(" ", 1)[1].split("slurm.sbatch ", 1)
        assert tail.split(" ") == train_args(load_pipeline(str(recipe)), planned[name])
    assert "checkpoint.init_from=" + str(planned["grow"].output) in lines[2]
    assert "start_at=grow stop_after=grow train.seed=7" in lines[1] and "--nodes=1" in lines[1]
    assert "nothing submitted" in out

    # start_at: the stages before it are not submitted; its missing input is a warning here
    assert main([*args, "start_at=grow"]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"# (\w+)$", out, re.M) == ["grow", "second"] and "job1=$(sbatch --parsable --job-name" in out
    assert "# warning: stage grow starts from" in out
    # a finished stage is not submitted again: the first remaining one has no dependency
    monkeypatch.setattr(slurm, "stage_done", lambda stage: stage.spec.name == "first")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert re.findall(r"# (\w+)$", out, re.M) == ["grow", "second"] and "warning" not in out
    assert "--dependency" not in out.splitlines()[1] and "--dependency=afterok:$job1 " in out.splitlines()[2]
