"""Validation checks and never changes the config; what start-up derives is in one `Resolved`."""

import copy

import pytest

from ouro_train.config.resolve import resolve
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
