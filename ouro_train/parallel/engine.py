"""The DeepSpeed engine behind the trainer's engine interface (see ouro_train/train/engine.py)."""

from __future__ import annotations

import math
import pickle
from contextlib import nullcontext
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.distributed as dist
from torch import nn

from ouro_train.config.resolve import Resolved
from ouro_train.config.schema import Config
from ouro_train.optim.optimizer import (
    build_optimizer,
    optimizer_overflow_is_divergence,
    squared_norm,
    use_implementation,
)


def deepspeed_config(cfg: Config, resolved: Resolved) -> dict:
    """DeepSpeed's config for this stage: the batch as start-up resolved it (at its data-parallel size)."""
    zero: dict = {"stage": cfg.parallel.zero_stage}
    if cfg.parallel.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if cfg.parallel.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": resolved.micro_batch_size,
        "gradient_accumulation_steps": resolved.grad_accum_steps,
        "train_batch_size": resolved.global_batch_rows,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        # DeepSpeed checks the exact optimizer type against those it tested; ours is torch's AdamW
        # with a skip flag (optim/optimizer.py SkippableAdamW), which changes nothing else.
        "zero_allow_untested_optimizer": True,
        # Mixed precision is torch autocast with fp32 parameters (train.precision); DeepSpeed's
        # own bf16 mode (bf16 weights, fp32 master copy) is a memory optimisation left off here.
        "bf16": {"enabled": False},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def tensor_parallel_grad_norm(model: nn.Module, tp_group) -> torch.Tensor:
    """L2 norm of all gradients, each tensor-parallel shard counted once and replicated
    parameters (norms, gate) counted once, not once per TP rank: 0-d on the device, no host sync."""
    device = next(model.parameters()).device
    grads = [(p.grad, getattr(p, "tensor_model_parallel", False)) for p in model.parameters() if p.grad is not None]
    sharded = squared_norm([g for g, is_shard in grads if is_shard], device)
    replicated = squared_norm([g for g, is_shard in grads if not is_shard], device)
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(sharded, group=tp_group)
    return (sharded + replicated).sqrt()


def zero3_partition(param: nn.Parameter) -> torch.Tensor:
    """The elements of a ZeRO-3 parameter this rank holds, without the last partition's padding
    (DeepSpeed allocates it with torch.empty: not zeros)."""
    size = param.ds_tensor.ds_numel
    rank = getattr(param, "ds_zero_partition_rank", None)
    if rank is None:
        rank = dist.get_rank(group=param.ds_process_group)
    valid = max(0, min(size, param.ds_numel - rank * size))
    return param.ds_tensor.narrow(0, 0, valid)


def share_fp32_master(zero_optimizer) -> int:
    """ZeRO-1/2 (deepspeed 0.19.8, stage_1_and_2.py) clone each rank's partition of the weights as
    the fp32 master the inner optimizer updates, then copy it back into the weights after every step.
    Ours are fp32 already (mixed precision is autocast, or bf16_loop's own copies), so the clone is
    a second copy of this rank's weights: 5.3 GiB for Ouro-1.4B on one H200, and a copy of them per
    step. Make each master the weights' own partition instead (the same storage: the optimizer
    updates the weights in place and DeepSpeed's copy-back copies a tensor onto itself, which torch
    skips), then relink DeepSpeed's per-parameter views of the master to it (what its universal
    checkpoints load into), and save copies of the masters (`_save_compact_masters`). Returns the
    bytes freed; 0, with a warning, where a DeepSpeed lacks these internals or a partition does not
    match its master (then nothing is changed)."""
    import warnings

    if getattr(zero_optimizer, "cpu_offload", False):
        return 0  # the master lives in host memory: no second copy on the device
    names = ("single_partition_of_fp32_groups", "parallel_partitioned_bit16_groups", "real_dp_process_group")
    internals = [getattr(zero_optimizer, name, None) for name in names]
    relink = getattr(zero_optimizer, "_link_all_hp_params", None)
    if None in internals or relink is None:
        warnings.warn(
            "this DeepSpeed's ZeRO-1/2 optimizer lacks the internals ouro_train uses to share the fp32 master "
            "with the fp32 weights: it keeps its own copy (4 bytes per parameter over data parallel)",
            stacklevel=2,
        )
        return 0
    masters, partitions, groups = internals
    own = [partitions[i][dist.get_rank(group=groups[i])] for i in range(len(masters))]
    if any((o.dtype, o.shape, o.device) != (m.dtype, m.shape, m.device) for o, m in zip(own, masters, strict=True)):
        warnings.warn(
            "a ZeRO-1/2 weight partition differs from its fp32 master in dtype, shape or device: DeepSpeed keeps "
            "its own copy of the master",
            stacklevel=2,
        )
        return 0
    freed = 0
    for master, weights in zip(masters, own, strict=True):
        if master.data_ptr() != weights.data_ptr():
            freed += master.numel() * master.element_size()
            master.data = weights.data
    relink()
    _save_compact_masters(zero_optimizer)
    return freed


def _save_compact_masters(zero_optimizer) -> None:
    """The masters are views into the flat weights of every rank now, and torch.save writes a view's
    whole storage: each rank's optimizer file would hold all the weights (dp times its share). Its
    state dict gets copies of the masters instead (made at save time: this rank's partition, once)."""
    from deepspeed.checkpoint.constants import SINGLE_PARTITION_OF_FP32_GROUPS

    plain = zero_optimizer.state_dict

    def state_dict(*args, **kwargs):
        state = plain(*args, **kwargs)
        state[SINGLE_PARTITION_OF_FP32_GROUPS] = [t.clone() for t in state[SINGLE_PARTITION_OF_FP32_GROUPS]]
        return state

    zero_optimizer.state_dict = state_dict


class DeepSpeedEngine:
    """Adapts deepspeed.DeepSpeedEngine to the `Engine` protocol the trainer uses (train/engine.py)."""

    kind: ClassVar[Literal["deepspeed"]] = "deepspeed"

    def __init__(self, model: nn.Module, cfg: Config, resolved: Resolved, mpu) -> None:
        import deepspeed

        self.dp_size = resolved.dp_size
        self.world_size = dist.get_world_size()
        self.dp_group = mpu.get_data_parallel_group() if mpu is not None else None
        self.tp_group = mpu.get_model_parallel_group() if mpu is not None else None
        self.stage = cfg.parallel.zero_stage
        self.verify_files = not cfg.checkpoint.trust_engine_files
        optimizer = build_optimizer(model, cfg.optim)
        self.inner_optimizer = optimizer
        from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

        from ouro_train.checkpoint.universal import universal_checkpoint_info

        # Saved with every checkpoint: what ds_to_universal needs to resume at another layout.
        trained = [name for name, param in model.named_parameters() if param.requires_grad]
        setattr(model, UNIVERSAL_CHECKPOINT_INFO, universal_checkpoint_info(cfg.model.vocab_size, trained))
        self.group_settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, resolved), mpu=mpu
        )
        self.module = self.engine.module
        # ZeRO-1/2: the fp32 master is the weights' own partition, not a copy of it.
        self.master_bytes_freed = share_fp32_master(self.optimizer) if self.stage in (1, 2) else 0
        self._grad_norm: float | None = None
        self._norm_tensor: torch.Tensor | None = None  # stage 0: boundary_grad_norm's
        self._zero_norm: float | None = None  # ZeRO 1-3: read as the inner optimizer starts
        self.update_skipped = False

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        # The trainer already normalised by the loss tokens of the whole step.
        self.engine.backward(loss, scale_wrt_gas=False)

    def is_gradient_accumulation_boundary(self) -> bool:
        return self.engine.is_gradient_accumulation_boundary()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def boundary_grad_norm(self) -> torch.Tensor | None:
        """See `Engine.boundary_grad_norm`. ZeRO stage 0 keeps no global norm; its gradients are
        already averaged over data parallel after the boundary's backward, so we measure them before
        the step clips them. ZeRO 1-3 measure their partitions inside the step: None."""
        if self.stage != 0:
            return None
        self._norm_tensor = tensor_parallel_grad_norm(self.module, self.tp_group)
        return self._norm_tensor

    def step(self, skip: bool = False, grad_norm: float | None = None) -> None:
        """After every micro-batch. At the boundary the update is skipped on `skip` (the guard's
        verdict, the same on every rank) or a non-finite global gradient norm: ZeRO 1/2/3 skip the
        latter themselves (DeepSpeed's overflow check, fp32 included, counted in `skipped_steps`);
        stage 0 judges `grad_norm` (`boundary_grad_norm`'s, as the trainer read it).
        `update_skipped` says whether it was skipped."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        own_norm = None
        if boundary and self.stage == 0:
            own_norm = grad_norm
            if own_norm is None:  # nobody read it: read it here
                norm = self._norm_tensor if self._norm_tensor is not None else self.boundary_grad_norm()
                own_norm = float(norm)
        skipped_before = self.engine.skipped_steps
        if boundary:
            skip = skip or (own_norm is not None and not math.isfinite(own_norm))
            self.inner_optimizer.skip = skip
            self._zero_norm = None
            if self.stage > 0:
                self.inner_optimizer.before_step = self._read_zero_norm
        try:
            with optimizer_overflow_is_divergence():
                self.engine.step()
        finally:
            self.inner_optimizer.skip = False
            self.inner_optimizer.before_step = None
        if boundary:
            norm = own_norm if own_norm is not None else self._zero_norm
            if norm is None:  # skipped before the inner optimizer ran: read after the step
                norm = self.engine.get_global_grad_norm()
            self._grad_norm = None if norm is None else float(norm)
            self.update_skipped = skip or self.engine.skipped_steps > skipped_before
            self._norm_tensor = None

    def _read_zero_norm(self) -> None:
        """The ZeRO optimizer's global gradient norm, read once its inner optimizer is called:
        measured, checked (DeepSpeed's own host read) and clipped by, and no update kernels queued
        yet, so this read waits for little. After the step, reading it would wait for the whole
        optimizer step (the GPU idle while the host then logs and fetches the next batch)."""
        if self._zero_norm is None:
            norm = getattr(self.optimizer, "_global_grad_norm", None)
            self._zero_norm = None if norm is None else float(norm)

    def get_global_grad_norm(self) -> float | None:
        return self._grad_norm

    def param_norm_sq_share(self) -> torch.Tensor:
        """See `Engine.param_norm_sq_share`. ZeRO-3 ranks hold disjoint partitions (`ds_tensor`):
        their squares add up over data parallel. Below ZeRO-3 every data-parallel rank holds the
        whole (or the whole TP shard of the) model: each sends 1/dp of it. Tensor-parallel shards
        are summed over the TP group here (an extra collective only when TP > 1); parameters
        replicated on the TP ranks count once."""
        trained = [p for p in self.module.parameters() if p.requires_grad]
        device = next(self.module.parameters()).device
        local = [zero3_partition(p) if hasattr(p, "ds_tensor") else p for p in trained]
        sharded = squared_norm(
            [t for p, t in zip(trained, local) if getattr(p, "tensor_model_parallel", False)], device
        )
        replicated = squared_norm(
            [t for p, t in zip(trained, local) if not getattr(p, "tensor_model_parallel", False)], device
        )
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            dist.all_reduce(sharded, group=self.tp_group)
        share = sharded + replicated
        return share if self.stage == 3 else share / self.dp_size

    def save_checkpoint(self, directory) -> None:
        """Every rank: model and optimizer shards in DeepSpeed's layout (tag `state`)."""
        self.engine.save_checkpoint(str(directory), tag="state", save_latest=False)

    def load_checkpoint(self, directory, universal: bool = False) -> None:
        """Every rank. `universal`: `directory` holds DeepSpeed's universal checkpoint (tag `state`),
        saved at another data-parallel size, ZeRO stage or tensor-parallel size."""
        from ouro_train.checkpoint.errors import CheckpointError
        from ouro_train.checkpoint.safety import failed_file, restricted_loads

        # Every torch.load DeepSpeed does in here (its checkpoint engine, the ZeRO optimizers'
        # universal loaders) runs torch's weights-only unpickler; trust_engine_files skips that.
        restriction = restricted_loads(Path(directory) / "state") if self.verify_files else nullcontext()
        config = self.engine._config
        config.load_universal_checkpoint = universal
        try:
            with restriction:
                path, _ = self.engine.load_checkpoint(
                    str(directory), tag="state", load_optimizer_states=True, load_lr_scheduler_states=False
                )
        except CheckpointError:  # refused by the weights-only unpickler, the file named
            raise
        except (OSError, RuntimeError, KeyError, ValueError, AssertionError, EOFError, pickle.UnpicklingError) as error:
            file = failed_file(error)
            raise CheckpointError(
                f"{directory}: DeepSpeed could not load it ({type(error).__name__}: {error}"
                + (f", reading {file}" if file else "")
                + "); a shard is missing or truncated, or it was saved by another model: resume from an earlier "
                "checkpoint"
            ) from error
        finally:
            config.load_universal_checkpoint = False
        if path is None:
            raise CheckpointError(f"{directory}: DeepSpeed found no checkpoint to load (tag 'state')")
        precision = getattr(self.module, "loop_precision", None)
        if precision is not None:  # the masters were written through ZeRO's flat buffers
            precision.invalidate()
        # The universal loader under ZeRO-3 (deepspeed 0.19.8) overwrites every parameter group's
        # hyperparameters with the first group's, giving norms and biases weight decay; ours are
        # set by the config, not by the checkpoint, so put them back (the LR is set every step).
        # It also gives every ZeRO-3 sub-group the same `step` tensor object, which torch's Adam then
        # increments once per sub-group per step (wrong bias correction): give each its own.
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        for group, settings in zip(inner.param_groups, self.group_settings, strict=True):
            group.update({k: v for k, v in settings.items() if k != "lr"})
        use_implementation(inner, bool(self.group_settings[0].get("fused")))
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Max over every rank of the world (tensor- and data-parallel)."""
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel group (TP ranks hold identical copies already)."""
        dist.all_reduce(tensor, group=self.dp_group)
        return tensor
