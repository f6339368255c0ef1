"""`ouro-pipeline`'s command line: typed pipeline keys (OmegaConf), hydra overrides for every stage
or one (`STAGE:key=value`), and the recipe's `${run_dir}` interpolation."""

import pytest

from ouro_train.cli.pipeline import main, parse
from ouro_train.config.schema import ConfigError
from ouro_train.pipeline.plan import plan
from ouro_train.pipeline.spec import load_pipeline


def test_pipeline_keys_are_typed_and_the_rest_are_stage_overrides():
    argv = ["pipeline=demo", "nproc=2", "dry_run=yes", "world_size=16", "train.seed=3", "sft:train.seed=5"]
    options, overrides = parse(argv)
    assert (options.pipeline, options.nproc, options.dry_run, options.world_size) == ("demo", 2, True, 16)
    assert isinstance(options.nproc, int) and options.dry_run is True
    assert (options.run_dir, options.start_at, options.stop_after) == (None, None, None)
    assert overrides == ["train.seed=3", "sft:train.seed=5"]
    assert parse(["pipeline=demo"])[0].dry_run is False


def test_a_per_stage_override_reaches_that_stage_only(tmp_path):
    planned = {p.spec.name: p for p in plan(load_pipeline("demo"), tmp_path, ["train.seed=3", "sft:train.seed=5"])}
    assert planned["sft"].cfg.train.seed == 5
    assert {p.cfg.train.seed for name, p in planned.items() if p.cfg is not None and name != "sft"} == {3}
    # The recipe's ${run_dir} is the run directory the stages are planned in.
    assert planned["warmup"].cfg.data_root == str(tmp_path / "data")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["pipeline=demo", "nproc=two"], "nproc: .*'two'"),
        (["pipeline=demo", "dry_run=maybe"], "dry_run: .*'maybe'"),
        (["nproc=2"], "pipeline=NAME is required"),
        (["pipeline=demo", "dry_run"], "argument 'dry_run': expected key=value"),
    ],
)
def test_a_bad_pipeline_key_fails_with_its_name(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse(argv)


def test_a_wrong_override_key_fails_with_its_name_and_stage(tmp_path):
    spec = load_pipeline("demo")
    with pytest.raises(ConfigError, match="stage sft: .*train.no_such_key"):
        plan(spec, tmp_path, ["sft:train.no_such_key=1"])
    with pytest.raises(ConfigError, match="no stage 'nostage'; the stages are warmup, stable1"):
        plan(spec, tmp_path, ["nostage:train.seed=1"])


def test_the_dry_run_shows_the_resolved_run_dir(tmp_path, capsys):
    assert main(["pipeline=demo", "dry_run=true", f"run_dir={tmp_path / 'run'}"]) == 0
    assert f"data_root={tmp_path / 'run' / 'data'}" in capsys.readouterr().out
    assert main(["pipeline=demo", "nproc=x"]) == 2
    assert "nproc" in capsys.readouterr().err


def test_recipe_interpolations_and_the_old_template(tmp_path):
    recipe = tmp_path / "p.yaml"
    recipe.write_text("name: p\noverrides: ['data_root={run_dir}/data']\nstages: [{name: a}]\n")
    with pytest.raises(ConfigError, match=r"write \$\{run_dir\}"):
        load_pipeline(str(recipe))
    recipe.write_text("name: p\noverrides: ['data_root=${nope}/data']\nstages: [{name: a}]\n")
    with pytest.raises(ConfigError, match="pipeline p: overrides.*nope"):
        plan(load_pipeline(str(recipe)), tmp_path, [])


def test_a_recipe_that_is_not_yaml_fails_naming_the_file_and_line(tmp_path, capsys):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("name: p\nstages: [{name: a}\n")  # unclosed bracket
    with pytest.raises(ConfigError, match=rf"{recipe}: not valid YAML: .*line 2"):
        load_pipeline(str(recipe))
    assert main([f"pipeline={recipe}", "dry_run=true"]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" in err and "Traceback" not in err
