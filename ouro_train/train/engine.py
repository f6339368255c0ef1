"""The single-process training engine.

It has the surface of a DeepSpeed engine (`engine(batch)`, `backward`, `step` with gradient
accumulation boundaries, `get_global_grad_norm`), so the trainer drives a DeepSpeed ZeRO
engine the same way once `ouro_train.parallel` builds one. Losses reaching `backward` are
already normalised by the loss tokens of the whole step, so nothing here rescales them
(with DeepSpeed that means `scale_wrt_gas=False`).

No host sync of its own: the gradient norm is handed to the trainer as a device tensor
(`boundary_grad_norm`), read with the step's other figures in the trainer's one host read, and
given back to `step`, which clips by it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from ouro_train.optim.optimizer import optimizer_overflow_is_divergence, squared_norm, use_implementation


def trained_numel(model: nn.Module, tensor_parallel: int = 1) -> int:
    """Elements of the trained parameters of the whole model, whatever this rank holds of them (a
    ZeRO-3 partition knows the size of what it partitions; a tensor-parallel shard, partitioned or
    not, is one of `tensor_parallel`)."""
    return sum(
        getattr(p, "ds_numel", p.numel()) * (tensor_parallel if getattr(p, "tensor_model_parallel", False) else 1)
        for p in model.parameters()
        if p.requires_grad
    )


class Engine(Protocol):
    """What the trainer and the checkpointer drive: `LocalEngine` (one process) or
    `ouro_train.parallel.engine.DeepSpeedEngine` (ZeRO 0-3, tensor parallel). `kind` names the
    checkpoint layout it writes ("local": engine/engine.pt; "deepspeed": DeepSpeed's files)."""

    kind: ClassVar[Literal["local", "deepspeed"]]
    module: nn.Module
    dp_size: int
    world_size: int  # every rank that must agree on a step boundary (tensor- and data-parallel)
    update_skipped: bool

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def is_gradient_accumulation_boundary(self) -> bool: ...

    def set_lr(self, lr: float) -> None: ...

    def boundary_grad_norm(self) -> torch.Tensor | None:
        """At the accumulation boundary, after its backward: the global gradient norm the update
        will be judged and clipped by, 0-d on the device, without a host sync (the trainer reads it
        in its one host read and passes the value to `step`). None where the engine measures it
        inside its own step (DeepSpeed ZeRO 1-3)."""
        ...

    def step(self, skip: bool = False, grad_norm: float | None = None) -> None:
        """After every micro-batch. `grad_norm`: the host value of `boundary_grad_norm()` at the
        boundary, where the caller read it (else the engine reads it itself)."""
        ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def get_global_grad_norm(self) -> float | None: ...

    def param_norm_sq_share(self) -> torch.Tensor:
        """This rank's share of ||w||^2 over the trained parameters: 0-d, on the device, such that
        `all_reduce_sum` over the data-parallel ranks gives the whole model's (no host sync here:
        the trainer sends it with the step's loss totals, in the same all-reduce)."""
        ...

    def save_checkpoint(self, directory: Path) -> None: ...


class LocalEngine:
    """The `Engine` of a single process: plain torch, gradient accumulation and clipping here."""

    kind: ClassVar[Literal["local"]] = "local"

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float, grad_accum_steps: int
    ) -> None:
        self.module = model
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.grad_accum_steps = grad_accum_steps
        self.micro_steps = 0
        self.global_steps = 0
        self.dp_size = 1
        self.world_size = 1
        self._grad_norm: float | None = None
        self._norm_tensor: torch.Tensor | None = None
        self._norm_at = -1  # the micro-step it was measured at
        self.update_skipped = False

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum_steps == 0

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _trained(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def boundary_grad_norm(self) -> torch.Tensor:
        """See `Engine.boundary_grad_norm`: torch's clip_grad_norm_ norm (`get_total_norm`)."""
        trained = self._trained()
        grads = [p.grad for p in trained if p.grad is not None]
        # No gradient at all: torch gives a CPU zero; the trainer reads it with device tensors.
        norm = get_total_norm(grads) if grads else torch.zeros((), device=trained[0].device)
        self._norm_tensor, self._norm_at = norm, self.micro_steps
        return norm

    def step(self, skip: bool = False, grad_norm: float | None = None) -> None:
        """Called after every micro-batch; updates the weights on accumulation boundaries, unless
        `skip` (the guard's verdict) or the gradient norm is not finite. `update_skipped` says which.
        Clipping is torch's clip_grad_norm_ in its two halves: the norm (`boundary_grad_norm`, read
        by the trainer with its other figures: `grad_norm`) and the scaling by it, on the device."""
        if self.is_gradient_accumulation_boundary():
            # The norm measured at this micro-step (by the trainer), else measured now.
            fresh = self._norm_tensor is not None and self._norm_at == self.micro_steps
            norm = self._norm_tensor if fresh else self.boundary_grad_norm()
            self._grad_norm = grad_norm if fresh and grad_norm is not None else float(norm)
            self.update_skipped = skip or not math.isfinite(self._grad_norm)
            if not self.update_skipped:
                if self.grad_clip > 0:
                    clip_grads_with_norm_(self._trained(), self.grad_clip, norm)
                with optimizer_overflow_is_divergence():
                    self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._norm_tensor = None
            self.global_steps += 1
        self.micro_steps += 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over data-parallel ranks: one rank here."""
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Max over every rank: one rank here."""
        return tensor

    def get_global_grad_norm(self) -> float | None:
        """Norm of the gradient before clipping at the last optimizer step."""
        return self._grad_norm

    def param_norm_sq_share(self) -> torch.Tensor:
        params = [p for p in self.module.parameters() if p.requires_grad]
        return squared_norm(params, params[0].device if params else torch.device("cpu"))

    def state_dict(self) -> dict:
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "micro_steps": self.micro_steps,
            "global_steps": self.global_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        fused = bool(self.optimizer.param_groups[0].get("fused"))
        self.optimizer.load_state_dict(state["optimizer"])
        use_implementation(self.optimizer, fused)
        self.micro_steps = state["micro_steps"]
        self.global_steps = state["global_steps"]

    def save_checkpoint(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), directory / "engine.pt")

    def load_checkpoint(self, directory: Path) -> None:
        from ouro_train.checkpoint.errors import CheckpointError

        path = directory / "engine.pt"
        if not path.is_file():
            raise CheckpointError(
                f"{path}: missing; this checkpoint was not written by a single-process run "
                "(relaunch with the layout that saved it)"
            )
        from ouro_train.checkpoint.safety import safe_torch_load

        # weights_only: a checkpoint holds tensors and numbers, never code to run.
        self.load_state_dict(safe_torch_load(path, mmap=False))
