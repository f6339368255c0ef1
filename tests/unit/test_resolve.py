"""Validation checks and never changes the config; what start-up derives is in one `Resolved`."""

import copy
import dataclasses

import pytest

from ouro_train.config.resolve import Resolved, resolve
from ouro_train.config.schema import Config, ConfigError, TrainConfig
from ouro_train.config.store import compose_config


def test_validation_leaves_the_config_as_written():
    cfg = compose_config(["stage=warmup", "data=stage1", "model=ouro_1p4b"])
    assert cfg.train.steps is None and cfg.train.global_batch_size is None  # as the recipe wrote them
    before = copy.deepcopy(cfg)
    cfg.validate()
    resolved = resolve(cfg, dp_size=8, lr=1e-4)
    assert cfg == before
    assert resolved.steps == -(-cfg.train.tokens // cfg.train.global_batch_tokens)
    assert resolved.global_batch_rows == cfg.train.global_batch_tokens // cfg.train.seq_len
    assert resolved.grad_accum_steps * cfg.train.micro_batch_size * 8 == resolved.global_batch_rows
    assert resolved.lr == 1e-4 and cfg.optim.lr != 1e-4


def test_accumulation_follows_the_data_parallel_size():
    cfg = Config(train=TrainConfig(global_batch_size=16, micro_batch_size=2))
    assert [resolve(cfg, dp).grad_accum_steps for dp in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert {resolve(cfg, dp).global_batch_rows for dp in (1, 2, 4, 8)} == {16}
    assert resolve(Config(train=TrainConfig(grad_accum_steps=3, micro_batch_size=2)), 2).global_batch_rows == 12
    with pytest.raises(ConfigError, match="train.global_batch_size.*16 sequences.*3 data-parallel"):
        resolve(cfg, 3)


@pytest.mark.parametrize(
    ("train", "key"),
    [
        ({"tokens": 1000, "global_batch_tokens": 100, "steps": 5}, "train.steps"),
        ({"global_batch_tokens": 256, "global_batch_size": 2}, "train.global_batch_size"),
    ],
)
def test_two_ways_to_say_one_thing_is_an_error(train, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'.*set only one"):
        TrainConfig(**train)


def test_steps_default_and_from_tokens():
    assert TrainConfig().total_steps == 100
    assert TrainConfig(steps=7).total_steps == 7
    assert TrainConfig(tokens=1001, global_batch_tokens=1000, seq_len=100).total_steps == 2


@pytest.fixture
def resolutions(monkeypatch) -> list:
    """Every `Resolved` made from here on (by `resolve`, a `dataclasses.replace` of one, or a direct
    construction), whatever name the module that made it imported: counted at the class itself."""
    made = []
    original = Resolved.__init__

    def counting(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(Resolved, "__init__", counting)
    return made


def test_the_count_sees_every_way_of_making_one(resolutions):
    from ouro_train.config import resolve as module

    resolved = module.resolve(Config())
    dataclasses.replace(resolved, lr=1.0)
    assert len(resolutions) == 2


def test_a_stage_and_a_dry_run_resolve_once(tmp_path, monkeypatch, resolutions, capsys):
    """`resolve` runs once per start: run_stage (after the hand-off or rollback learning rate is
    known) and the dry run hand their one `Resolved` to every reader (data, model, engine, trainer,
    checkpointer), which never derive their own and so cannot disagree."""
    from cli_runs import TINY

    from ouro_train.train.stage import dry_run, run_stage

    monkeypatch.setenv("OURO_CACHE_DIR", str(tmp_path / "cache"))
    cfg = compose_config([*TINY, "train.steps=2", "train.eval_every=0", f"run_dir={tmp_path / 'run'}"])
    run_stage(cfg)
    assert len(resolutions) == 1, [f"{r}" for r in resolutions]
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()  # the stage ran to its end
    resolutions.clear()
    dry_run(cfg)
    assert len(resolutions) == 1
