"""The optimizer both engines step (the single process one, train/engine.py, and the DeepSpeed
one, parallel/engine.py): torch's AdamW with a skip flag (`SkippableAdamW`, made by
`build_optimizer` over decayed and undecayed parameter groups with optim.fused's kernel), the
gradient norm both clip by (`squared_norm`), and an overflow in the optimizer's arithmetic turned
into a TrainingDiverged (`optimizer_overflow_is_divergence`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from ouro_train.config.schema import OptimConfig
from ouro_train.optim.guard import TrainingDiverged


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linears, embedding, head); none on norms and biases.
    The paper states decay 0.1 but not its scope: this split is the common one (our choice)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            # A ZeRO-3 partition (a model built under zero.Init) holds an empty 1-d tensor: its shape is ds_shape.
            (decay if len(getattr(param, "ds_shape", param.shape)) >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def squared_norm(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """sum ||t||^2 over `tensors` as a 0-d fp32 tensor on `device` (one foreach kernel, no host sync)."""
    if not tensors:
        return torch.zeros((), device=device)
    return torch.stack(torch._foreach_norm([t.detach().float() for t in tensors])).pow(2).sum().to(device)


@contextlib.contextmanager
def optimizer_overflow_is_divergence():
    """A learning rate or moment too large for the optimizer's arithmetic (torch raises "value
    cannot be converted to type float without overflow") is a divergence (exit status 3, the
    guard's message and rollback command), not a traceback. The guard's update check skips such
    steps before they get here; this is the net under it."""
    try:
        yield
    except RuntimeError as error:
        if "overflow" not in str(error):
            raise
        raise TrainingDiverged(
            f"the optimizer overflowed ({error}): the learning rate or the Adam moments are out of float range",
            "optimizer_overflow",
        ) from error


class SkippableAdamW(torch.optim.AdamW):
    """torch's AdamW whose update the stability guard can cancel: while `skip` is set, `step()`
    changes nothing (no weight, moment or step-count update). DeepSpeed's ZeRO optimizers call
    the inner optimizer's `step()` (once per sub-group under ZeRO-3), so the flag works the same
    under every engine; the trainer sets it before the boundary step and clears it after.
    `before_step`: called as an update starts (the DeepSpeed engine reads ZeRO's gradient norm
    there, before the update's kernels are queued)."""

    skip = False
    before_step: Callable[[], None] | None = None

    @torch.no_grad()
    def step(self, closure=None):
        if self.skip:
            return None
        if self.before_step is not None:
            self.before_step()
        return super().step(closure)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> SkippableAdamW:
    """A SkippableAdamW over `parameter_groups` with optim.fused's kernel (`implementation`;
    `use_implementation` re-applies it after a state load)."""
    # torch's AdamW also under DeepSpeed, which would otherwise build its fused/CPU Adam op (a C++ build);
    # torch's own fused kernel (optim.fused) runs on CPU and CUDA alike.
    return SkippableAdamW(
        parameter_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        **implementation(cfg.fused),
    )


def implementation(fused: bool) -> dict:
    """The AdamW kernel settings of a parameter group (optim.fused)."""
    return {"fused": True, "foreach": None} if fused else {"fused": None, "foreach": True}


def use_implementation(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """After loading a state dict (which brings its saver's settings): this run's kernel, with the
    step counters where it keeps them (fused: on the parameter's device; foreach: on the CPU)."""
    for group in optimizer.param_groups:
        group.update(implementation(fused))
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if torch.is_tensor(state.get("step")):
                device = param.device if fused else torch.device("cpu")
                state["step"] = state["step"].to(device=device, dtype=torch.float32)
