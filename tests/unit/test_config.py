import subprocess
import sys
from pathlib import Path

import pytest

from ouro_train.config import ConfigError
from ouro_train.config.store import RECIPES_DIR, compose_config

MODEL_RECIPES = sorted(p.stem for p in (RECIPES_DIR / "model").glob("*.yaml"))
PRIMARY_RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def test_recipe_tree_is_where_the_cli_looks():
    assert {"tiny", "ouro_1p4b", "ouro_2p6b"} <= set(MODEL_RECIPES)
    assert "config" in PRIMARY_RECIPES


@pytest.mark.parametrize("model", MODEL_RECIPES)
def test_every_model_recipe_loads_and_validates(model):
    cfg = compose_config([f"model={model}"])
    assert cfg.model.name == model


@pytest.mark.parametrize("name", PRIMARY_RECIPES)
def test_every_primary_recipe_loads_and_validates(name):
    compose_config(config_name=name)


@pytest.mark.parametrize(
    "override, key",
    [
        ("+model.hidden=64", "model.hidden"),
        ("+trian.steps=3", "trian"),
        ("+optim.betas=1", "optim.betas"),
        ("model.recurrent_steps=0", "model.recurrent_steps"),
        ("model.num_heads=3", "model.num_heads"),
        ("optim.lr=-1", "optim.lr"),
        ("schedule.kind=linear_warmup", "schedule.kind"),
        ("train.precision=fp16", "train.precision"),
        ("schedule.warmup_steps=500", "schedule.warmup_steps"),
    ],
)
def test_bad_config_is_rejected_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}"):
        compose_config([override])


def test_unknown_key_without_plus_is_rejected_naming_the_closest_key():
    message = "'model.hiden' is not a field of ModelConfig; did you mean 'model.hidden_size'"
    with pytest.raises(ConfigError, match=message):
        compose_config(["model.hiden=64"])


@pytest.mark.slow
def test_cli_dry_run_prints_exact_counts_and_rejects_bad_keys(tmp_path: Path):
    cli = Path(sys.executable).with_name("ouro-train")
    out = subprocess.run(
        [cli, "model=ouro_2p6b", "dry_run=true", f"run_dir={tmp_path}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "parameters: 2,667,974,657" in out.stdout
    assert "FLOPs per token" in out.stdout
    bad = subprocess.run([cli, "+model.foo=1", f"run_dir={tmp_path}"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "config key 'model.foo' is not a field of ModelConfig" in bad.stderr
    assert "Traceback" not in bad.stderr
