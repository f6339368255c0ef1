"""Raising train.steps (or train.tokens) on resume continues the same run when only its length
changed and the schedule gives the steps already trained the same learning rates (constant
phases extend); otherwise the refusal prints the command that continues as a new stage."""

import shlex

import pytest

from ouro_train.checkpoint.config_hash import config_hash, training_config
from ouro_train.checkpoint.errors import CheckpointError
from ouro_train.checkpoint.manager import Checkpointer
from ouro_train.config import Config, ScheduleConfig, TrainConfig
from ouro_train.config.resolve import resolve


def config(steps: int, **schedule) -> Config:
    return Config(
        train=TrainConfig(steps=steps, micro_batch_size=2, seq_len=16),
        schedule=ScheduleConfig(**({"warmup_steps": 2} | schedule)),
    )


def saved_state(cfg: Config, step: int, final: bool = True) -> dict:
    resolved = resolve(cfg)
    return {
        "step": step,
        "final": final,
        "config": training_config(cfg, resolved),
        "config_hash": config_hash(cfg, resolved),
    }


def resume(tmp_path, before: Config, after: Config, step: int, final: bool = True) -> Checkpointer:
    checkpointer = Checkpointer(after, tmp_path / "run" / "checkpoints", resolved=resolve(after))
    checkpointer.check_compatible(tmp_path / "step", saved_state(before, step, final))
    return checkpointer


@pytest.mark.parametrize(
    "schedule",
    [{"kind": "constant"}, {"kind": "wsd", "decay_steps": 10}, {"kind": "wsd", "decay_fraction": 0.2}],
)
def test_a_longer_run_continues_while_its_schedule_is_constant(tmp_path, schedule):
    checkpointer = resume(tmp_path, config(20, **schedule), config(40, **schedule), step=8)
    assert checkpointer.extension.startswith("extending the run: train.steps 20 -> 40")
    assert resume(tmp_path, config(20), config(20), step=8).extension == ""  # nothing changed


@pytest.mark.parametrize(
    ("schedule", "step", "where"),
    [
        ({"kind": "cosine", "final_lr": 3e-5}, 8, "step 4:"),  # cosine depends on the length from warmup on
        ({"kind": "wsd", "decay_steps": 10}, 15, "step 11:"),  # its decay had started at step 11
        ({"kind": "wsd", "decay_fraction": 0.2}, 20, "step 17:"),  # finished: the decay moves with the length
    ],
)
def test_a_started_decay_refuses_with_the_command_that_continues_as_a_new_stage(tmp_path, schedule, step, where):
    with pytest.raises(CheckpointError) as refused:
        resume(tmp_path, config(20, **schedule), config(40, **schedule), step=step, final=step == 20)
    message = str(refused.value)
    assert f"train.steps 20 -> 40: at the new length the {schedule['kind']} schedule" in message
    assert where in message
    command = shlex.split(message.splitlines()[-1])
    assert command[0] == "ouro-train" and f"train.steps={40 - step}" in command
    assert f"checkpoint.init_from={tmp_path / 'step'}" in command
    assert {"checkpoint.init_schedule=keep", "checkpoint.init_data_position=true"} <= set(command)
    assert ("checkpoint.init_optimizer=true" in command) == (step == 20)  # only a final checkpoint has the moments
    assert f"run_dir={tmp_path / 'run'}-continued" in command


def test_another_change_with_the_length_is_still_refused(tmp_path):
    after = config(40)
    after.optim.weight_decay = 0.0
    with pytest.raises(CheckpointError, match="training config changed.*optim.weight_decay"):
        resume(tmp_path, config(20), after, step=8)


def test_the_printed_command_works_for_a_stage_that_counts_tokens(tmp_path):
    """Stage recipes give their length in train.tokens: the command sets train.tokens=null with its
    train.steps (one of the two, as the config requires)."""

    def by_tokens(tokens: int) -> Config:
        return Config(
            train=TrainConfig(tokens=tokens, global_batch_tokens=64, micro_batch_size=2, seq_len=16),
            schedule=ScheduleConfig(kind="cosine", warmup_steps=2),
        )

    with pytest.raises(CheckpointError) as refused:
        resume(tmp_path, by_tokens(64 * 20), by_tokens(64 * 40), step=8)
    command = shlex.split(str(refused.value).splitlines()[-1])
    assert "train.tokens=null" in command and "train.steps=32" in command
    overrides = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in command[1:] if "=" in a}
    continued = TrainConfig(
        tokens=None, steps=int(overrides["train.steps"]), global_batch_tokens=64, micro_batch_size=2, seq_len=16
    )
    assert continued.total_steps == 32  # the settings the command gives make a valid stage
