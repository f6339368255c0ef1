"""Config errors are the project's: `ouro-train` (its main, in process) answers an unknown key, a wrong
type or an unknown recipe with exit 2 and one line naming the key and the closest valid one, never
hydra's `+key` advice; `--help` describes the command and the schema's main keys; a dry run and a
refused command leave no files; `ouro-pipeline` names an unknown key and the closest valid one."""

import dataclasses
import re

import pytest

from ouro_train.cli import pipeline
from ouro_train.cli import train as cli
from ouro_train.config.schema import ConfigError, TrainConfig
from ouro_train.config.store import compose_config


def refused(capsys, *argv: str) -> str:
    """Run ouro-train's main in process: it must exit 2 with one error line; -> that line."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(argv))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "+" not in err.replace("+train", "") and "To append" not in err and "HYDRA_FULL_ERROR" not in err
    return lines[0]


@pytest.mark.parametrize("override", ["train.stepz=5", "+train.stepz=5"])
def test_an_unknown_key_with_or_without_plus_names_the_closest_key(capsys, tmp_path, monkeypatch, override):
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, "model=tiny", override, "dry_run=true", f"run_dir={tmp_path / 'run'}")
    assert "'train.stepz'" in line and "did you mean 'train.steps'?" in line and "+train" not in line
    assert list(tmp_path.iterdir()) == []  # refused: no run directory, no .hydra, no train.log


def test_a_wrong_type_names_the_key_and_the_expected_type(capsys):
    line = refused(capsys, "train.steps=abc", "dry_run=true")
    assert "'train.steps'" in line and "'abc'" in line and "expected an integer or null (int | None)" in line
    assert "expected a number (float)" in refused(capsys, "optim.lr=fast", "dry_run=true")
    assert "expected true or false (bool)" in refused(capsys, "dry_run=maybe")


def test_an_unknown_recipe_names_the_group_and_lists_its_options(capsys):
    line = refused(capsys, "model=tinyy", "dry_run=true")
    assert "model=tinyy" in line and "'model' group" in line and "did you mean model=tiny?" in line
    assert "(available: demo, mano, ouro_1p4b, ouro_2p6b, tiny)" in line
    line = refused(capsys, "stagee=warmup", "dry_run=true")  # a misspelt group is a key nobody has
    assert "did you mean 'stage'?" in line


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+model.hidden=64"], "did you mean 'model.hidden_size'?"),
        (["trian.steps=3"], "config key 'trian' is not a field of Config or a recipe group; did you mean 'train'?"),
        (["data.sources=[{name: a, path: b, weight: x}]"], "'data.sources', its 'weight': got 'x', expected a number"),
        (["train=5"], "config key 'train' is a section (TrainConfig), not a value"),
        (["train.steps"], "override 'train.steps' is not key=value"),
        (["+stage=warmup"], "the recipe already has a 'stage' choice; select one with stage=OPTION"),
        (["run_dir=${nope}"], "config key 'run_dir': cannot be resolved"),
    ],
)
def test_composition_errors_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_config(overrides)


def test_a_known_key_with_plus_and_a_group_set_to_null_compose():
    assert compose_config(["+train.steps=5", "stage=warmup", "stage=null"]).train.steps == 5


def test_help_describes_the_command_and_the_schemas_main_keys(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("`ouro-train`: train one stage of a looped language model")
    steps = next(f for f in dataclasses.fields(TrainConfig) if f.name == "steps")
    line = next(x for x in out.splitlines() if x.strip().startswith("train.steps="))
    assert line.split()[0] == "train.steps=null" and line.endswith(steps.metadata["help"])
    groups = ("model=demo | mano | ouro_1p4b | ouro_2p6b | tiny", "stage=", "data=", "parallel=")
    assert all(f"\n  {text}" in out for text in groups) and "run_dir=runs/tiny" in out
    for section in ("model", "data", "train", "optim", "schedule", "objective", "parallel", "checkpoint", "guard"):
        assert f"\n{section}: " in out
    assert "hydra" not in out.lower()
    cli.main(["--config-name", "demo", "--help"])  # that recipe's values
    assert "train.steps=500 " in capsys.readouterr().out


def test_a_dry_run_writes_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli.main(["model=tiny", "dry_run=true", f"run_dir={tmp_path / 'run'}"])
    assert "parameters: 1,418,497" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_a_bad_option_is_refused(capsys):
    assert "unknown option '--cfg'" in refused(capsys, "--cfg", "job")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["dry_runn=true"], "unknown key 'dry_runn'; did you mean 'dry_run'?"),
        (["nprocs=2"], "unknown key 'nprocs'; did you mean 'nproc'?"),
        (["+foo=1"], "unknown key 'foo'"),
        (["trian.steps=3"], "unknown key 'trian.steps'; did you mean 'train'?"),
        (["+train.stepz=3"], "config key 'train.stepz' is not a field of TrainConfig; did you mean 'train.steps'?"),
        (["model.hiden=3"], "did you mean 'model.hidden_size'?"),
    ],
)
def test_pipeline_unknown_keys_name_the_closest_valid_key(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        pipeline.parse(["pipeline=demo", *argv])


def test_pipeline_keys_take_a_plus_and_its_main_says_did_you_mean(capsys):
    options, overrides = pipeline.parse(["pipeline=demo", "+nproc=2", "sft:train.seed=5", "model=demo"])
    assert options.nproc == 2 and overrides == ["sft:train.seed=5", "model=demo"]
    assert pipeline.main(["pipeline=demo", "dry_run=true", "dry_runn=true"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'dry_run'?" in err and "+dry_runn" not in err


def test_a_run_refused_after_its_run_dir_was_made_leaves_none(capsys, tmp_path, monkeypatch):
    """Bad input found once training started (a missing shard manifest): exit 2, the run directory
    it made (with config.yaml) removed; one that existed before is kept."""
    monkeypatch.chdir(tmp_path)
    missing = f"data.sources=[{{name: docs, path: {tmp_path / 'nowhere'}}}]"
    args = ["data.source=shards", missing, "logging.wandb=false", f"run_dir={tmp_path / 'run'}"]
    assert "nowhere/manifest.json: no manifest" in refused(capsys, *args)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "run").mkdir()
    refused(capsys, *args)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]


def test_a_window_longer_than_the_demo_corpus_names_the_keys(capsys, tmp_path, monkeypatch):
    """seq_len 4096 on the embedded corpus: its 5% validation split is shorter than one window (a
    plain ValueError from inside the data loader, found on the first GPU run of ouro-train)."""
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, "model=tiny", "train.seq_len=4096", "logging.wandb=false", f"run_dir={tmp_path / 'run'}")
    assert "'train.seq_len'" in line and "validation split" in line and "data.val_fraction=0.05" in line, line
    assert "fewer than one window of 4097" in line, line
