"""What a stage runs with, derived in one place from the config as the user wrote it.

The config (schema.py) is what the recipe and the command line say and is never changed after
validation. Some quantities depend on more than the config: the accumulation steps on the
data-parallel size of the launch, the peak learning rate on the previous stage (a hand-off with
`checkpoint.init_schedule=keep` continues its LR). `resolve` computes them once at start-up into a
frozen `Resolved`, which the trainer, the data loaders, the DeepSpeed config, the checkpoints and
the dry run read, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from ouro_train.config.schema import Config, ConfigError


@dataclass(frozen=True)
class Resolved:
    steps: int  # optimizer steps of the stage (train.steps or train.tokens / global_batch_tokens)
    micro_batch_size: int  # sequences per rank per forward pass
    grad_accum_steps: int  # forward passes per optimizer step
    dp_size: int  # data-parallel ranks
    seq_len: int
    lr: float  # peak learning rate: optim.lr, or the previous stage's next LR (init_schedule=keep)

    @property
    def global_batch_rows(self) -> int:
        """Sequences per optimizer step over all data-parallel ranks."""
        return self.micro_batch_size * self.grad_accum_steps * self.dp_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_rows * self.seq_len


def accumulation_steps(cfg: Config, dp_size: int) -> int:
    """Forward passes per optimizer step at `dp_size` data-parallel ranks: from the global batch
    when the recipe fixes one (the same batches at any world size), else train.grad_accum_steps."""
    train = cfg.train
    rows = train.global_batch_rows
    if rows is None:
        return train.grad_accum_steps
    key = "train.global_batch_tokens" if train.global_batch_tokens is not None else "train.global_batch_size"
    per_pass = train.micro_batch_size * dp_size
    if rows % per_pass:
        raise ConfigError(
            f"config key '{key}': {rows} sequences per step do not split into {dp_size} data-parallel ranks x "
            f"micro-batches of {train.micro_batch_size}; choose a global batch divisible by {per_pass} or change "
            "train.micro_batch_size"
        )
    accum = rows // per_pass
    if train.grad_accum_steps not in (1, accum):
        raise ConfigError(
            f"config key 'train.grad_accum_steps': {train.grad_accum_steps} disagrees with {key} at data parallel "
            f"{dp_size} (which needs {accum}); set only one of them"
        )
    return accum


def resolve(cfg: Config, dp_size: int = 1, lr: float | None = None) -> Resolved:
    """The quantities a stage runs with at `dp_size` data-parallel ranks; `lr`: the peak learning
    rate handed over by the previous stage (None: optim.lr). Reads `cfg`, changes nothing."""
    return Resolved(
        steps=cfg.train.total_steps,
        micro_batch_size=cfg.train.micro_batch_size,
        grad_accum_steps=accumulation_steps(cfg, dp_size),
        dp_size=dp_size,
        seq_len=cfg.train.seq_len,
        lr=cfg.optim.lr if lr is None else float(lr),
    )
