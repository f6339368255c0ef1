"""train.precision=bf16_loop, applied from outside the model: LoopLM-aware mixed precision.

Every linear of the shared decoder layers runs R times per forward. Under plain autocast each use
casts the fp32 weight to bf16 (and its backward casts the bf16 weight gradient back), and autograd
sums the R weight gradients one add at a time. Here, per linear:

- a bf16 compute copy (`weight_bf16`, a non-persistent buffer) is refreshed when the fp32 master
  changed (after any optimizer step, a checkpoint load, an in-place write), in one multi-tensor
  copy for all layers, at the start of the LoopLM's forward: once per optimizer step, not 2R times
  per micro-batch;
- each use's weight gradient is accumulated by its GEMM into one fp32 buffer (`weight_grad_acc`;
  kernels/shared_linear.py), handed to autograd as the master's gradient once per micro-batch.

Everything else is as with `bf16`: autocast around the step, fp32 masters, fp32 gradients and
Adam moments, the norms, gate and head as autocast runs them. (Eager autocast caches its casts
within a forward, so it casts each weight once per micro-batch in forward and once in backward;
compiled layers cast at every use, 2R times.) Memory: 2 bytes per shared weight (the bf16 copy)
plus 4 (the accumulator) more than `bf16`. The buffers are not in the state dict, so checkpoints
are those of `bf16`. Under tensor parallel the same holds per weight shard: megatron-core's
column- and row-parallel linears become `LoopColumnParallel` / `LoopRowParallel`
(parallel/tensor_parallel.py), megatron's own collectives around this GEMM (with sequence
parallelism and compiled layers too). Not with ZeRO-3 (partitioned masters, gathered per call):
the config refuses it. With `layer` checkpointing and compiled layers, the checkpoint goes around
the compiled layer (parallel/checkpointing.py apply_compile says why).

train.precision=fp8 is bf16_loop with the shared linears' forward and input-gradient GEMMs in
float8 (kernels/shared_linear.py `shared_linear_fp8`): the same refresh also quantises each weight
(e4m3, one scale per weight) into two float8 copies, (out, in) for the forward and (in, out) for
the input gradient, so each weight is quantised once per optimizer step, not at each of its R uses.
The weight gradients stay as bf16_loop's (fp32 accumulation of bf16 operands). Memory: 2 bytes
per shared weight more than bf16_loop.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ouro_train.config.schema import ConfigError
from ouro_train.kernels.shared_linear import E4M3, hand_over_grads, shared_linear, shared_linear_fp8, to_float8
from ouro_train.model.looplm import LoopLM

# The class each kind of shared linear becomes under bf16_loop / fp8 (its class swapped in place:
# the same parameter, state-dict keys and hooks). parallel/tensor_parallel.py adds megatron-core's
# column- and row-parallel linears when it is imported (it needs megatron; this module does not).
LOOP_CLASSES: dict[type, type] = {}


def shared_linears(model: LoopLM) -> list[nn.Module]:
    """The linears of the decoder layers, which every recurrent step reuses: plain `nn.Linear`, or
    the tensor-parallel ones, before or after `LoopPrecision` swapped their class."""
    kinds = (*LOOP_CLASSES, *LOOP_CLASSES.values(), LoopLinearFP8)
    return [m for layer in model.model.layers for m in layer.modules() if type(m) in kinds]


def loop_linear(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T for shared linear `m` in training (grad mode), on its weight as held here (a
    tensor-parallel shard included): from the compute copies the LoopLM's forward refreshed (also
    in a recomputation under activation checkpointing, which runs with grad enabled), the weight
    gradient accumulated into `m.weight_grad_acc`; fp8 (`m.loop_fp8`) runs its GEMMs in float8."""
    if not m.weight.requires_grad:
        return F.linear(x.to(torch.bfloat16), m.weight_bf16)  # frozen (stage II): no weight gradient
    if m.loop_fp8:
        return shared_linear_fp8(
            x, m.weight_bf16, m.weight_grad_acc, m.weight_fp8, m.weight_fp8_t, m.weight_fp8_scale_inv
        )
    return shared_linear(x, m.weight_bf16, m.weight_grad_acc)


class LoopLinear(nn.Linear):
    """A shared linear under bf16_loop. `LoopPrecision` turns each plain `nn.Linear` of the decoder
    layers into one in place (its class swapped: the same parameter, state-dict keys and hooks), so
    that every layer runs the same code: torch.compile makes one graph for all layers, where a
    per-module forward (a bound partial, say) would be guarded by its id and recompiled per layer."""

    weight_bf16: torch.Tensor
    weight_grad_acc: torch.Tensor
    loop_fp8: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Without grad (evaluation): a plain linear of the master, which is right even when no
        # forward refreshed the copy (inference calling the recurrent step directly).
        if not torch.is_grad_enabled():
            return F.linear(x, self.weight)
        return loop_linear(self, x)


class LoopLinearFP8(LoopLinear):
    """A shared linear under train.precision=fp8: `LoopLinear` whose trained forward runs its GEMMs
    in float8 from the copies the refresh made (`weight_fp8`, `weight_fp8_t`, `weight_fp8_scale_inv`)."""

    weight_fp8: torch.Tensor
    weight_fp8_t: torch.Tensor
    weight_fp8_scale_inv: torch.Tensor


LOOP_CLASSES[nn.Linear] = LoopLinear


class LoopPrecision:
    """The hooks of one model: `refresh` (LoopLM forward pre-hook) and `attach` (embedding forward
    hook, where the accumulated gradients re-enter autograd). `fp8`: train.precision=fp8."""

    def __init__(self, model: LoopLM, fp8: bool = False) -> None:
        self.fp8 = fp8
        self.linears = shared_linears(model)
        if not self.linears:
            raise ValueError("train.precision=bf16_loop: the model has no plain nn.Linear in its decoder layers")
        for module in self.linears:
            if module.bias is not None:
                raise ValueError("train.precision=bf16_loop: the shared linears have no bias in Ouro; this one does")
            weight = module.weight
            module.register_buffer("weight_bf16", torch.empty_like(weight, dtype=torch.bfloat16), persistent=False)
            module.register_buffer("weight_grad_acc", torch.zeros_like(weight, dtype=torch.float32), persistent=False)
            if fp8:
                module.register_buffer("weight_fp8", torch.empty_like(weight, dtype=E4M3), persistent=False)
                # Its own row-major (in, out) storage: its .t() is the column-major operand cuBLAS's
                # float8 GEMM takes (empty_like of weight.t() would keep weight's layout).
                transposed = torch.empty(weight.shape[1], weight.shape[0], dtype=E4M3, device=weight.device)
                module.register_buffer("weight_fp8_t", transposed, persistent=False)
                module.register_buffer("weight_fp8_scale_inv", torch.ones((), device=weight.device), persistent=False)
            # Non-persistent buffers: state-dict keys are unchanged.
            module.loop_fp8 = fp8
            if type(module) in LOOP_CLASSES:
                module.__class__ = LoopLinearFP8 if fp8 and type(module) is nn.Linear else LOOP_CLASSES[type(module)]
        self.versions: list[int | None] = [None] * len(self.linears)
        self.stale = True
        self.refreshes = 0  # compute copies made (each one multi-tensor copy); tests read it
        self.quantised = 0  # weights quantised to float8 (fp8), counted for the tests
        # Every optimizer step marks the copies stale: torch's fused AdamW updates the weights
        # without bumping their version counters, and DeepSpeed's ZeRO writes them through flat
        # buffers. A global hook, so it fires under any engine (the optimizer is built later).
        this = weakref.ref(self)
        hook = register_optimizer_step_post_hook(lambda *_: this() and this().invalidate())
        weakref.finalize(self, hook.remove)  # gone with its model
        model.register_forward_pre_hook(self.refresh)
        model.model.embed_tokens.register_forward_hook(self.attach)

    def refresh(self, module: nn.Module, args) -> None:
        training = torch.is_grad_enabled()
        with torch.no_grad():
            stale = [i for i, m in enumerate(self.linears) if self.stale or m.weight._version != self.versions[i]]
            self.stale = False
            if stale:
                torch._foreach_copy_(
                    [self.linears[i].weight_bf16 for i in stale], [self.linears[i].weight for i in stale]
                )
                for i in stale:
                    self.versions[i] = self.linears[i].weight._version
                    if self.fp8:
                        self._quantise(self.linears[i])
                self.refreshes += 1
            if training:
                self._zero_accumulators()

    def _quantise(self, m: LoopLinearFP8) -> None:
        weight_fp8, scale_inv = to_float8(m.weight, E4M3)
        m.weight_fp8.copy_(weight_fp8)
        m.weight_fp8_t.copy_(weight_fp8.t())
        m.weight_fp8_scale_inv.copy_(scale_inv)
        self.quantised += 1

    def invalidate(self) -> None:
        """The masters changed (an optimizer step, a checkpoint loaded): refresh at the next forward.
        An in-place write to a weight (load_state_dict's copy_) is seen by its version counter too."""
        self.stale = True

    def _zero_accumulators(self) -> None:
        reuse = []
        for m in self.linears:
            grad = m.weight.grad
            if grad is not None and grad.data_ptr() == m.weight_grad_acc.data_ptr():
                # Autograd took the last buffer as the gradient itself: start a new one.
                m.weight_grad_acc = torch.zeros_like(m.weight_grad_acc)
            else:
                reuse.append(m.weight_grad_acc)
        torch._foreach_zero_(reuse)

    def attach(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        trained = [m for m in self.linears if m.weight.requires_grad]
        if not trained:
            return output
        return hand_over_grads(output, [m.weight for m in trained], [m.weight_grad_acc for m in trained])


def check_fp8_device(device: str) -> None:
    """train.precision=fp8 needs float8 GEMMs: a CPU (torch's reference kernels, for tests) or a
    GPU of compute capability 8.9 or more (Ada, Hopper, Blackwell). Else a ConfigError."""
    if not device.startswith("cuda"):
        return
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    if (major, minor) < (8, 9):
        raise ConfigError(
            f"train.precision: fp8 needs float8 GEMMs, which {torch.cuda.get_device_name(torch.device(device))} "
            f"(compute capability {major}.{minor}) lacks (8.9+: H100, H200, L40, RTX 4090); use "
            "train.precision=bf16_loop"
        )


def apply_loop_precision(model: LoopLM, fp8: bool = False) -> LoopLM:
    """Install bf16_loop (`fp8`: train.precision=fp8) on `model` (in place; before activation
    checkpointing and compile, after tensor parallel). Returns the model, with its `LoopPrecision`
    as `model.loop_precision`; a model that has one already is returned as it is (a second would
    refresh and hand over twice), unless it was made for the other precision (a ValueError)."""
    current = getattr(model, "loop_precision", None)
    if current is None:
        model.loop_precision = LoopPrecision(model, fp8=fp8)
    elif current.fp8 != fp8:
        raise ValueError(
            f"the model's shared linears are set up for train.precision={'fp8' if current.fp8 else 'bf16_loop'}; "
            "build a new model for another precision"
        )
    return model
