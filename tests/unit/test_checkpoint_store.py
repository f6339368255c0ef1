import json

import pytest

from ouro_train.checkpoint.store import (
    TRAIN_STATE,
    CheckpointError,
    apply_retention,
    commit,
    complete_checkpoints,
    find_latest,
    temporary_dir,
)


def fake_save(root, step):
    tmp = temporary_dir(root, step)
    (tmp / "engine").mkdir(parents=True)
    (tmp / TRAIN_STATE).write_text(json.dumps({"step": step}))
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
    ("saved", "now", "message"),
    [
        ((1, 1, 0, "local"), (2, 1, 1, "deepspeed"), "single-process engine"),
        ((2, 2, 1, "deepspeed"), (2, 1, 1, "deepspeed"), "tensor_parallel=2"),
        ((2, 1, 3, "deepspeed"), (4, 1, 1, "deepspeed"), "ZeRO-3 optimizer shards convert only to ZeRO-3"),
        ((2, 1, 0, "deepspeed"), (4, 1, 1, "deepspeed"), "only ZeRO 1/2/3 optimizer shards convert"),
    ],
)
def test_resume_at_an_unsupported_layout_names_the_way_out(tmp_path, saved, now, message):
    from ouro_train.checkpoint.manager import Checkpointer
    from ouro_train.config import Config

    with pytest.raises(CheckpointError, match=message) as error:
        Checkpointer(Config(), tmp_path)._load_elsewhere(tmp_path, None, saved, now)
    assert "checkpoint.init_from" in str(error.value)
