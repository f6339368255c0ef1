"""A pipeline stage's command holds each key once (the pipeline's overrides, then the stage's,
then the command line's, a later one replacing an earlier one in its place), and only where hydra
composes the same config from the merged overrides as from all of them in order."""

import dataclasses
import shlex

import pytest

from ouro_train.config.store import compose_config, recipe_groups
from ouro_train.pipeline.commands import stage_command, train_args
from ouro_train.pipeline.dry_run import describe
from ouro_train.pipeline.overrides import merge_overrides
from ouro_train.pipeline.plan import plan
from ouro_train.pipeline.spec import load_pipeline

GROUPS = ["model", "parallel", "stage", "data"]


def keys(overrides: list[str]) -> list[str]:
    return [text.partition("=")[0].lstrip("+~") for text in overrides]


def overrides_of(command: list[str]) -> list[str]:
    """The hydra overrides of a stage command: what follows --config-name NAME."""
    return command[command.index("--config-name") + 2 :]


@pytest.mark.parametrize("pipeline", ["ouro_1p4b", "ouro_2p6b"])
def test_every_stage_command_of_the_released_pipelines_holds_each_key_once(tmp_path, pipeline):
    spec = load_pipeline(pipeline)
    extra = ["data_root=.", "model.attention=sdpa", "stable2:optim.lr=1e-4", "checkpoint.resume=never"]
    planned = [p for p in plan(spec, tmp_path, extra) if p.cfg is not None]
    printed = describe(spec, planned, 8, 8).split("launch one stage alone (the runner runs exactly this):\n")[1]
    lines = dict(line.strip().split(": ", 1) for line in printed.splitlines())
    assert set(lines) == {p.spec.name for p in planned}
    for stage in planned:
        commands = {
            "args": ["--config-name", spec.config_name, *overrides_of(train_args(spec, stage))],
            "launched": stage_command(spec, stage, nproc=1),
            "launched by torchrun": stage_command(spec, stage, nproc=2),
            "printed": shlex.split(lines[stage.spec.name]),
        }
        for how, command in commands.items():
            found = keys(overrides_of(command))
            assert len(found) == len(set(found)), (stage.spec.name, how, command)
        found = overrides_of(commands["launched"])
        # the later value wins, in the first one's place
        assert keys(found)[:2] == ["model", "parallel"] and found[0] == f"model={stage.cfg.model.name}"
        assert "model.attention=sdpa" in found and "checkpoint.resume=auto" in found
        assert ("optim.lr=1e-4" in found) == (stage.spec.name == "stable2")


def test_the_2p6b_stages_take_the_grown_model_and_their_own_parallel_preset(tmp_path):
    planned = {p.spec.name: p for p in plan(load_pipeline("ouro_2p6b"), tmp_path, ["data_root=."])}
    assert planned["ct_anneal"].overrides[:4] == [
        "model=ouro_2p6b",
        "parallel=zero3",
        "train.precision=bf16",
        "model.attention=flash",
    ]
    assert planned["warmup"].overrides[:2] == ["model=ouro_1p4b", "parallel=zero1"]


@pytest.mark.parametrize(
    ("overrides", "merged"),
    [
        # a recipe choice: the last one, in the first one's place (hydra keeps the last choice)
        (
            ["model=a", "parallel=x", "model.attention=flash", "model=b"],
            ["model=b", "parallel=x", "model.attention=flash"],
        ),
        # a value: the last one, in the first one's place
        (["optim.lr=1", "train.steps=2", "optim.lr=3", "optim.lr=4"], ["optim.lr=4", "train.steps=2"]),
        (["data.sources=[a,b]", "data.sources=[c]"], ["data.sources=[c]"]),
        # the earlier form is kept: `+a=1 a=2` adds a and sets it, as `+a=2` does
        (["+a=1", "a=2"], ["+a=2"]),
        (["++a=1", "a=2"], ["++a=2"]),
        (["a=1", "++a=2"], ["a=2"]),
        # `a=1 +a=2` on a key the schema lacks fails either way (config/store.py check_overrides
        # rejects it; hydra: a exists, or cannot be set): left as written
        (["a=1", "+a=2"], ["a=1", "+a=2"]),
        # on a key the schema has, check_overrides drops the `+`: two assignments, the later wins
        (["optim.lr=1", "train.steps=2", "+optim.lr=3"], ["optim.lr=3", "train.steps=2"]),
        (["+optim.lr=1", "+optim.lr=3"], ["+optim.lr=3"]),
        # a dict for a group is a value merged into the node, not a choice: values set around it stay
        (
            ["model.num_layers=4", "model={num_layers: 8}", "model.num_layers=6"],
            ["model.num_layers=4", "model={num_layers: 8}", "model.num_layers=6"],
        ),
        (["model=a", "model={b: 1}", "model={c: 2}"], ["model=a", "model={b: 1}", "model={c: 2}"]),
        # a key inside or around it set in between: values are assigned in order
        (["train.x=1", "train=5", "train.x=2"], ["train.x=1", "train=5", "train.x=2"]),
        (["a.b=1", "a.b.c=2", "a.b=3"], ["a.b=1", "a.b.c=2", "a.b=3"]),
        (["a.b=1", "a.c=2", "a.b=3"], ["a.b=3", "a.c=2"]),
        # deletions, dicts (merged into the node), sweeps and `+group` (an added default) stay
        (["~a", "a=1", "a=2"], ["~a", "a=2"]),
        (["a={b:1}", "a={c:2}"], ["a={b:1}", "a={c:2}"]),
        (["x=1,2", "x=3"], ["x=1,2", "x=3"]),
        (["+stage=a", "stage=b"], ["+stage=a", "stage=b"]),
        (["stage=a", "stage=null", "stage=b"], ["stage=a", "stage=null", "stage=b"]),
        # a package is part of the key
        (["model@m=x", "model=y", "model@m=z"], ["model@m=z", "model=y"]),
    ],
)
def test_merge_overrides(overrides, merged):
    assert merge_overrides(overrides, GROUPS) == merged


def test_the_merged_overrides_compose_the_same_config():
    overrides = [
        "model=ouro_1p4b",
        "parallel=zero1",
        "model.attention=flash",
        "optim.lr=3e-3",
        "stage=warmup",
        "train.seq_len=256",
        "model=tiny",
        "parallel=single",
        "optim.lr=1e-4",
        "train.seq_len=128",
        "model.num_layers=2",
    ]
    merged = merge_overrides(overrides, list(recipe_groups()))
    assert merged == [
        "model=tiny",
        "parallel=single",
        "model.attention=flash",
        "optim.lr=1e-4",
        "stage=warmup",
        "train.seq_len=128",
        "model.num_layers=2",
    ]
    assert dataclasses.asdict(compose_config(merged)) == dataclasses.asdict(compose_config(overrides))


def test_a_later_plus_key_merges_into_the_plain_one_and_composes_the_same_config():
    # `+key` on a schema key composes as `key` (config/store.py check_overrides): held once
    overrides = ["model=tiny", "optim.lr=3e-3", "train.seq_len=128", "+optim.lr=1e-4", "++train.seq_len=64"]
    merged = merge_overrides(overrides, list(recipe_groups()))
    assert merged == ["model=tiny", "optim.lr=1e-4", "train.seq_len=64"]
    assert compose_config(merged).optim.lr == 1e-4
    assert dataclasses.asdict(compose_config(merged)) == dataclasses.asdict(compose_config(overrides))


def test_a_dict_for_a_group_keeps_the_values_set_around_it_in_order():
    # hydra merges `model={...}` into the node in order (a config value, not a recipe choice)
    overrides = ["model=tiny", "model.num_layers=4", "model={num_layers: 8}", "model.num_layers=6"]
    merged = merge_overrides(overrides, list(recipe_groups()))
    assert merged == overrides
    assert compose_config(merged).model.num_layers == 6
