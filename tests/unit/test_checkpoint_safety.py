"""Engine files are checked before DeepSpeed unpickles them (it uses weights_only=False)."""

import os
from collections import OrderedDict

import pytest
import torch

from ouro_train.checkpoint.safety import pickle_globals, verify_engine_files
from ouro_train.checkpoint.store import CheckpointError


class RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless here; any callable could be named the same way


def test_tensors_and_deepspeed_value_classes_pass(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    torch.save(
        {"module": OrderedDict(w=torch.ones(2, 3)), "shape": torch.Size([2]), "scaler": LossScaler(1.0)},
        tmp_path / "mp_rank_00_model_states.pt",
    )
    verify_engine_files(tmp_path)
    assert "torch._utils._rebuild_tensor_v2" in pickle_globals(tmp_path / "mp_rank_00_model_states.pt")


def test_a_file_that_would_run_code_is_refused_without_running_it(tmp_path):
    (tmp_path / "sub").mkdir()
    torch.save({"state": torch.zeros(1), "payload": RunsCode()}, tmp_path / "sub" / "x.pt")
    with pytest.raises(CheckpointError, match="getcwd.*trust_engine_files=true"):
        verify_engine_files(tmp_path)


def test_a_truncated_file_is_named(tmp_path):
    torch.save({"w": torch.ones(100)}, tmp_path / "a.pt")
    data = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "a.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="a.pt: not a readable torch checkpoint"):
        verify_engine_files(tmp_path)
