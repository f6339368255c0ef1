"""ouro_train/checkpoint/optimizer_state.py reaches into DeepSpeed's private ZeRO internals: a
DeepSpeed without one of them fails loudly, naming the installed and the supported version, and
start-up warns when the installed version is not the one pinned."""

import re
from pathlib import Path
from types import SimpleNamespace

import deepspeed
import pytest
import torch

from ouro_train.checkpoint import optimizer_state
from ouro_train.checkpoint.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[2]


def test_the_supported_version_is_the_pinned_one():
    pins = re.findall(r"^deepspeed==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert pins == [optimizer_state.SUPPORTED_DEEPSPEED]


def test_the_installed_deepspeed_has_the_internals_we_use():
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for name in ("_get_fp32_opt_state_partition", "_get_param_partition_rank"):
        assert hasattr(DeepSpeedZeroOptimizer_Stage3, name), name
    assert hasattr(DeepSpeedZeroOptimizer, "_lazy_init_hp_params_optimizer_state")


class Stage3WithoutPartitionRank:
    """A ZeRO-3 optimizer of a DeepSpeed that lacks `_get_param_partition_rank`."""

    def _get_fp32_opt_state_partition(self, param, release_swap_buffers, optim_state_key=None):
        return torch.zeros(4), None


def test_a_missing_partition_rank_fails_loudly_instead_of_assuming_rank_0(monkeypatch):
    monkeypatch.setattr(deepspeed, "__version__", "9.9.9")
    param = SimpleNamespace(_z3_optimizer=Stage3WithoutPartitionRank(), ds_tensor=torch.zeros(4))
    with pytest.raises(CheckpointError) as error:
        optimizer_state._set_zero3_state(param, torch.ones(8), "exp_avg")
    message = str(error.value)
    assert "DeepSpeed 9.9.9 has no Stage3WithoutPartitionRank._get_param_partition_rank" in message
    assert f"deepspeed=={optimizer_state.SUPPORTED_DEEPSPEED}" in message


def test_a_missing_zero_1_2_link_step_fails_loudly():
    with pytest.raises(CheckpointError, match="_lazy_init_hp_params_optimizer_state"):
        optimizer_state._relink_zero_states(SimpleNamespace(), stage=1)
    optimizer_state._relink_zero_states(SimpleNamespace(), stage=3)  # ZeRO-3 has no link step


def test_start_up_warns_about_another_deepspeed_version(monkeypatch, recwarn):
    optimizer_state.check_deepspeed_version()
    assert not [w for w in recwarn if "DeepSpeed" in str(w.message)]
    monkeypatch.setattr(deepspeed, "__version__", "9.9.9")
    with pytest.warns(UserWarning, match=r"DeepSpeed 9\.9\.9 is installed; ouro_train supports .*constraints\.txt"):
        optimizer_state.check_deepspeed_version()
