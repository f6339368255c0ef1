"""Every shipped recipe loads and validates; the 1.4B and 2.6B dry runs give OURO_SPEC's table."""

from pathlib import Path

import pytest

from ouro_train.config import ConfigError
from ouro_train.config.store import RECIPES_DIR, compose_config
from ouro_train.pipeline.dry_run import describe
from ouro_train.pipeline.plan import plan
from ouro_train.pipeline.spec import load_pipeline

PIPELINES = sorted(p.stem for p in (RECIPES_DIR / "pipeline").glob("*.yaml"))

# OURO_SPEC "Training stages": tokens, seq len, batch tokens, LR (peak / final), R, beta, theta.
SPEC = {
    "warmup": (20e9, 4096, 4 * 2**20, 3e-4, None, 8, 0.1, 1e4),
    "stable1": (2.98e12, 4096, 8 * 2**20, 3e-4, None, 8, 0.1, 1e4),
    "stable2": (3e12, 4096, 8 * 2**20, 3e-4, None, 4, 0.05, 1e4),
    "ct_anneal": (1.4e12, 16384, 8 * 2**20, 3e-4, 3e-5, 4, 0.05, 4e4),
    "longct": (20e9, 65536, 8 * 2**20, 3e-5, None, 4, 0.05, 1e6),
    "midtrain": (300e9, 32768, 8 * 2**20, 3e-5, 1e-5, 4, 0.05, 1e6),
    "sft": (66e9, 32768, 2 * 2**20, 2e-5, 2e-6, 4, 0.05, 1e6),
}


def test_every_shipped_pipeline_plans(tmp_path):
    assert {"demo", "ouro_1p4b", "ouro_2p6b"} <= set(PIPELINES)
    for name in PIPELINES:
        spec = load_pipeline(name)
        planned = plan(spec, tmp_path / name, [])
        assert [p.spec.name for p in planned] == [s.name for s in spec.stages]


@pytest.mark.parametrize("pipeline", ["ouro_1p4b", "ouro_2p6b"])
def test_the_released_pipelines_follow_the_stage_table(tmp_path, pipeline):
    planned = {p.spec.name: p for p in plan(load_pipeline(pipeline), tmp_path, [])}
    layers = 24
    for name, (tokens, seq, batch, lr, final, steps, beta, theta) in SPEC.items():
        cfg = planned[name].cfg
        if pipeline == "ouro_2p6b" and name not in ("warmup", "stable1"):
            layers = 48
        assert cfg.model.num_layers == layers, name
        assert cfg.train.seq_len == seq and cfg.train.global_batch_rows * seq == batch, name
        assert abs(cfg.train.total_steps * batch - tokens) <= batch, name
        assert cfg.optim.lr == lr and cfg.model.recurrent_steps == steps, name
        assert cfg.objective.beta == beta and cfg.model.rope_theta == theta, name
        assert cfg.schedule.kind == ("constant" if final is None else "cosine"), name
        if final is not None:
            assert cfg.schedule.final_lr == final, name
        assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.weight_decay, cfg.optim.grad_clip) == (0.9, 0.95, 0.1, 1.0)
    assert "upcycle" in planned if pipeline == "ouro_2p6b" else "upcycle" not in planned
    # Each stage starts from the final checkpoint of the one before.
    assert planned["stable1"].input == planned["warmup"].output
    assert planned["sft"].cfg.checkpoint.init_optimizer is False
    assert planned["stable2"].cfg.checkpoint.init_data_position is True


def test_dry_run_table_shows_every_stage(tmp_path, capsys):
    spec = load_pipeline("ouro_2p6b")
    text = describe(spec, plan(spec, tmp_path, []), world_size=256, nproc=8)
    for expected in (
        "warmup",
        "ouro_1p4b 24x8",
        "upcycle stack",
        "-> 48x4",
        "ouro_2p6b 48x4",
        "65.5K",
        "1.4T",
        "0.0003->3e-05 cosine kept",
        "40000",
        "1e+06",
        "--nproc-per-node=8",
    ):
        assert expected in text, expected


def test_unknown_keys_and_bad_references_are_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: [{name: a, overides: [stage=warmup]}]\n")
    with pytest.raises(ConfigError, match="overides"):
        load_pipeline(str(bad))
    bad.write_text("name: x\nstages: [{name: a}, {name: b, from_stage: c}]\n")
    with pytest.raises(ConfigError, match="from_stage='c'"):
        load_pipeline(str(bad))
    with pytest.raises(ConfigError, match="shipped: .*demo"):
        load_pipeline("no_such_pipeline")
    with pytest.raises(ConfigError, match="stage warmup: .*train.no_such_key"):
        plan(load_pipeline("ouro_1p4b"), tmp_path, ["train.no_such_key=1"])


def test_a_stage_given_the_wrong_model_after_upcycling_is_refused(tmp_path):
    spec = load_pipeline("ouro_2p6b")
    spec.stages[3].overrides = [o for o in spec.stages[3].overrides if not o.startswith("model=")]
    with pytest.raises(ConfigError, match="model=ouro_2p6b"):
        plan(spec, tmp_path, [])


def test_stage_recipes_alone_need_their_input():
    for stage in ("stable1", "ct_anneal"):
        with pytest.raises(ConfigError, match="init_from"):
            compose_config([f"stage={stage}"])
    assert compose_config(["stage=warmup", "model=ouro_1p4b"]).stage_name == "warmup"
    assert Path(RECIPES_DIR / "stage" / "sft.yaml").is_file()
