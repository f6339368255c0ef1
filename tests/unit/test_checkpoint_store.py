import json

import pytest
import torch

from ouro_train.checkpoint.errors import CheckpointError
from ouro_train.checkpoint.store import (
    TRAIN_STATE,
    apply_retention,
    commit,
    complete_checkpoints,
    find_latest,
    temporary_dir,
)


def fake_save(root, step, healthy=True):
    """A checkpoint as one process writes it, with tiny files in place of the real ones."""
    tmp = temporary_dir(root, step)
    (tmp / "engine").mkdir(parents=True)
    (tmp / "rng").mkdir()
    torch.save({"w": torch.ones(64)}, tmp / "engine" / "engine.pt")
    torch.save({"torch": torch.zeros(4)}, tmp / "rng" / "rank_00000.pt")
    (tmp / TRAIN_STATE).write_text(json.dumps({"step": step, "world_size": 1, "healthy": healthy}))
    return commit(root, tmp, step)


def test_commit_renames_then_moves_latest(tmp_path):
    assert find_latest(tmp_path) is None
    first = fake_save(tmp_path, 10)
    assert find_latest(tmp_path) == first and (tmp_path / "latest").read_text() == "step_00000010"
    # An interrupted save: the temporary directory exists, nothing else changed.
    (temporary_dir(tmp_path, 20) / "engine").mkdir(parents=True)
    assert find_latest(tmp_path) == first
    assert complete_checkpoints(tmp_path) == [first]


def test_missing_latest_pointer_falls_back_to_newest_complete(tmp_path):
    fake_save(tmp_path, 5)
    newest = fake_save(tmp_path, 7)
    (tmp_path / "latest").unlink()
    assert find_latest(tmp_path) == newest


def test_retention_keeps_last_k_and_every_mth(tmp_path):
    for step in (100, 200, 300, 400, 500, 600):
        fake_save(tmp_path, step)
    (temporary_dir(tmp_path, 700) / "engine").mkdir(parents=True)  # leftover of a killed save
    removed = apply_retention(tmp_path, keep_last=2, keep_every=300)
    kept = [p.name for p in complete_checkpoints(tmp_path)]
    assert kept == ["step_00000300", "step_00000500", "step_00000600"]
    assert sorted(p.name for p in removed) == ["step_00000100", "step_00000200", "step_00000400"]
    assert not temporary_dir(tmp_path, 700).exists()


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (
            lambda c: (c / "engine" / "engine.pt").write_bytes((c / "engine" / "engine.pt").read_bytes()[:200]),
            "engine.pt",
        ),
        (lambda c: (c / TRAIN_STATE).write_text('{"step": 7, "wor'), TRAIN_STATE),
        (lambda c: (c / "rng" / "rank_00000.pt").unlink(), "rng"),
    ],
    ids=["truncated-engine-file", "corrupt-train-state", "missing-rank-file"],
)
def test_a_broken_newest_checkpoint_is_passed_over_with_a_warning_naming_it(tmp_path, capsys, damage, named):
    older = fake_save(tmp_path, 5)
    newest = fake_save(tmp_path, 7)
    damage(newest)
    assert find_latest(tmp_path) == older
    err = capsys.readouterr().err
    assert f"skipping checkpoint {newest}" in err and named in err


def test_retention_never_deletes_the_newest_healthy_checkpoint(tmp_path):
    fake_save(tmp_path, 1)
    good = fake_save(tmp_path, 2)
    for step in (3, 4, 5):  # saved during a run of skipped (bad) steps
        fake_save(tmp_path, step, healthy=False)
        apply_retention(tmp_path, keep_last=1, keep_every=0)
    assert [p.name for p in complete_checkpoints(tmp_path)] == [good.name, "step_00000005"]
    fake_save(tmp_path, 6)  # healthy again: the old one may go
    apply_retention(tmp_path, keep_last=1, keep_every=0)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000006"]


@pytest.mark.parametrize(
    ("saved", "now", "message"),
    [
        ((1, 1, 0, "local"), (2, 1, 1, "deepspeed"), "single-process engine"),
        ((2, 2, 1, "deepspeed"), (2, 1, 1, "deepspeed"), "tensor_parallel=2"),
        ((4, 2, 1, "deepspeed"), (2, 2, 1, "deepspeed"), "relaunch with 4 processes and parallel.tensor_parallel=2"),
        ((2, 1, 3, "deepspeed"), (4, 1, 1, "deepspeed"), "ZeRO-3 optimizer shards convert only to ZeRO-3"),
        ((2, 1, 0, "deepspeed"), (4, 1, 1, "deepspeed"), "only ZeRO 1/2/3 optimizer shards convert"),
    ],
)
def test_resume_at_an_unsupported_layout_names_the_way_out(tmp_path, saved, now, message):
    from ouro_train.checkpoint.manager import Checkpointer
    from ouro_train.config import Config
    from ouro_train.config.resolve import resolve

    with pytest.raises(CheckpointError, match=message) as error:
        Checkpointer(Config(), tmp_path, resolved=resolve(Config()))._load_elsewhere(tmp_path, None, saved, now)
    assert "checkpoint.init_from" in str(error.value)


def test_a_killed_universal_conversion_leaves_the_checkpoint_usable(tmp_path):
    from ouro_train.utils.atomic import temporary_sibling

    newest = fake_save(tmp_path, 7)
    leftover = temporary_sibling(newest / "universal") / "state"
    leftover.mkdir(parents=True)
    (leftover / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 truncated")  # killed mid-write
    assert find_latest(tmp_path) == newest
