"""ouro_train/utils/atomic.py: the target is whole (old or new), never half; temporaries are cleaned up."""

import pytest

from ouro_train.utils.atomic import atomic_path, atomic_write_bytes, atomic_write_text


def test_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    atomic_write_text(target, "new", durable=True)
    assert target.read_text() == "new"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_directory_replaces_an_existing_one(tmp_path):
    target = tmp_path / "out"
    (target / "stale").mkdir(parents=True)
    with atomic_path(target) as tmp:
        (tmp / "weights").mkdir(parents=True)
    assert [p.name for p in target.iterdir()] == ["weights"]
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "partial").write_text("x")
        raise RuntimeError("disk full")
    assert [p.name for p in target.iterdir()] == ["weights"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_temporaries_of_one_target_are_removed_and_recognised(tmp_path):
    from ouro_train.utils.atomic import is_temporary, remove_stale_temporaries, temporary_sibling

    target = tmp_path / "universal"
    left = temporary_sibling(target)
    (left / "zero").mkdir(parents=True)
    other = temporary_sibling(tmp_path / "latest")
    other.write_text("x")
    assert is_temporary(left.name) and not is_temporary(target.name)
    remove_stale_temporaries(target)
    assert not left.exists() and other.exists()  # only the target's own leftovers
