"""DeepSpeed's engine files go through torch's weights-only unpickler (checkpoint/safety.py).

Each hostile file below is a valid torch zip whose data.pkl was written opcode by opcode: if a
full unpickler ran it, `posix.system("touch <marker>")` would create the marker file. The ways
of naming that global are the ones a string scan of the pickle missed (names stored in the memo
and fetched back before STACK_GLOBAL, names as SHORT_BINSTRING / BINSTRING) plus a plain GLOBAL;
the places the call sits are the top level, the argument of an allowed class's REDUCE, the state
of an allowed object's BUILD, and a tensor's storage record.
"""

import multiprocessing
import os
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
from hostile_pickles import SHAPES, SPELLINGS, hostile_file

from ouro_train.checkpoint.errors import CheckpointError
from ouro_train.checkpoint.safety import FORCE, FORCE_NOT, restricted_loads, verify_engine_files

CASES = [(spelling, shape) for shape in SHAPES for spelling in SPELLINGS]
REFUSED = {
    "global": "posix.system",
    "memo": "STACK_GLOBAL",
    "short_binstring": "STACK_GLOBAL",
    "binstring": "BINSTRING",
}


@pytest.mark.parametrize("spelling,shape", CASES)
def test_each_payload_runs_under_a_full_unpickler(tmp_path, spelling, shape):
    """The premise: these files do run code when loaded the way DeepSpeed 0.19.8 loads them."""
    path, marker = hostile_file(tmp_path, spelling, shape)
    try:
        torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - some fail after the payload ran (e.g. a storage location of 0)
        pass
    assert marker.exists()


@pytest.mark.parametrize("spelling,shape", CASES)
def test_the_check_refuses_each_file_and_names_it(tmp_path, spelling, shape):
    path, marker = hostile_file(tmp_path / "state", spelling, shape)
    with pytest.raises(CheckpointError) as refused:
        verify_engine_files(tmp_path / "state")
    message = str(refused.value)
    assert str(path) in message and REFUSED[spelling] in message
    assert "checkpoint.trust_engine_files=true" in message and "earlier checkpoint" in message
    assert not marker.exists()


@pytest.mark.parametrize("spelling,shape", CASES)
def test_a_full_load_inside_restricted_loads_is_weights_only(tmp_path, spelling, shape):
    """What DeepSpeed does (torch.load(weights_only=False)) runs the weights-only unpickler in the block."""
    path, marker = hostile_file(tmp_path, spelling, shape)
    with pytest.raises(CheckpointError) as refused, restricted_loads(tmp_path):
        torch.load(str(path), map_location="cpu", weights_only=False)
    message = str(refused.value)
    assert message.startswith(f"{path}: refused by torch's weights-only unpickler") and REFUSED[spelling] in message
    assert "checkpoint.trust_engine_files=true" in message
    assert not marker.exists()


def _full_load(path: str) -> None:
    torch.load(path, map_location="cpu", weights_only=False)


def test_the_restriction_reaches_forked_workers(tmp_path):
    """ds_to_universal unpickles in ProcessPoolExecutor workers, forked inside the block."""
    path, marker = hostile_file(tmp_path, "global", "top_level")
    context = multiprocessing.get_context("fork")
    with pytest.raises(CheckpointError, match="posix.system"), restricted_loads(tmp_path):
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            pool.submit(_full_load, str(path)).result()
    assert not marker.exists()


def test_deepspeed_value_classes_and_tensors_load(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {
        "module": OrderedDict(w=torch.ones(2, 3), b=torch.zeros(3, dtype=torch.bfloat16)),
        "param": torch.nn.Parameter(torch.ones(2)),
        "shapes": [OrderedDict(w=torch.Size([2, 3]))],
        "scaler": LossScaler(1.0),
        "stage": ZeroStageEnum.optimizer_states,
        "slices": [{"w": fragment_address(numel=6, start=0)}],
        "names": {"a", "b"},
        "ds_version": "0.19.8",
        "step": 3,
    }
    (tmp_path / "state").mkdir()
    torch.save(state, tmp_path / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    verify_engine_files(tmp_path / "state")
    with restricted_loads(tmp_path):
        loaded = torch.load(tmp_path / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    assert loaded["stage"] is ZeroStageEnum.optimizer_states and loaded["slices"][0]["w"].numel == 6
    assert loaded["scaler"].cur_scale == 1.0 and torch.equal(loaded["module"]["w"], state["module"]["w"])


def test_the_switch_is_set_in_the_block_and_restored(tmp_path, monkeypatch):
    monkeypatch.setenv(FORCE_NOT, "1")  # torch refuses both at once: unset inside the block
    monkeypatch.delenv(FORCE, raising=False)
    with restricted_loads(tmp_path):
        assert os.environ[FORCE] == "1" and FORCE_NOT not in os.environ
    assert FORCE not in os.environ and os.environ[FORCE_NOT] == "1"
    path, _ = hostile_file(tmp_path, "global", "top_level")
    with pytest.raises(CheckpointError), restricted_loads(tmp_path):
        torch.load(path, weights_only=False)
    assert FORCE not in os.environ and os.environ[FORCE_NOT] == "1"


def test_a_truncated_file_is_named(tmp_path):
    torch.save({"w": torch.ones(100)}, tmp_path / "a.pt")
    data = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "a.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="a.pt: not a readable torch checkpoint"):
        verify_engine_files(tmp_path)
