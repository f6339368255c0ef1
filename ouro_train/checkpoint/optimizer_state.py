"""The optimizer's Adam moments as one layout-free file, for handing a stage to the next.

`optimizer.safetensors` holds, per parameter name (the reference key names of model.safetensors),
the full fp32 `exp_avg.<name>` and `exp_avg_sq.<name>`, and the Adam `step`. It is gathered from
whatever the engine shards (ZeRO 1/2/3 through DeepSpeed's public `safe_get_full_optimizer_state`,
tensor-parallel slices by all-gather) and set back the same way (`safe_set_full_optimizer_state`),
so a stage can start with the previous stage's optimizer at any world size, and `ouro-upcycle`
can duplicate the moments with the layers. It is written with the final checkpoint of a stage
(what a next stage starts from), not with every periodic save: for 2.6B it is 21 GB.

Setting moments before the first step under ZeRO, and ZeRO-3's slice of them, reach into
DeepSpeed's private optimizer internals (`_deepspeed_internal`), written against
SUPPORTED_DEEPSPEED; `check_deepspeed_version` compares at start-up.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ouro_train.checkpoint.errors import CheckpointError
from ouro_train.checkpoint.weights import _gather_tensor_parallel, process_rank, read_safetensors

OPTIMIZER = "optimizer.safetensors"
KEYS = ("exp_avg", "exp_avg_sq")
# The DeepSpeed whose private ZeRO internals this module uses (constraints.txt pins the same).
SUPPORTED_DEEPSPEED = "0.19.8"


def check_deepspeed_version() -> None:
    """Start-up, when ZeRO is used: warn if the installed DeepSpeed is not SUPPORTED_DEEPSPEED.

    A warning, not an error: training itself goes through DeepSpeed's public API, and only the
    optimizer hand-off between stages uses the private internals, each of which fails loudly
    (`_deepspeed_internal`) when it is missing. The warning covers what such a check cannot see
    (an internal that kept its name and changed its meaning) and names the version to install;
    refusing to train at all would block a DeepSpeed upgrade for a bug fix that matters more."""
    import deepspeed

    if deepspeed.__version__ != SUPPORTED_DEEPSPEED:
        warnings.warn(
            f"DeepSpeed {deepspeed.__version__} is installed; ouro_train supports {SUPPORTED_DEEPSPEED} "
            "(pinned in constraints.txt). ZeRO's optimizer hand-off between stages "
            "(ouro_train/checkpoint/optimizer_state.py) uses DeepSpeed internals of that version: "
            f"pip install deepspeed=={SUPPORTED_DEEPSPEED}",
            stacklevel=2,
        )


def _deepspeed_internal(owner, name: str):
    """A private attribute of DeepSpeed's ZeRO optimizer (or of a parameter it manages) that this
    module relies on; missing, an error naming the installed and the supported DeepSpeed."""
    try:
        return getattr(owner, name)
    except AttributeError:
        import deepspeed

        raise CheckpointError(
            f"DeepSpeed {deepspeed.__version__} has no {type(owner).__name__}.{name}, which "
            "ouro_train/checkpoint/optimizer_state.py uses to read and set ZeRO optimizer state; it is "
            f"written against DeepSpeed {SUPPORTED_DEEPSPEED} (pinned in constraints.txt): "
            f"pip install deepspeed=={SUPPORTED_DEEPSPEED} (or, to start a stage without the previous "
            "stage's optimizer, set checkpoint.init_optimizer=false)"
        ) from None


def _torch_optimizer(engine) -> torch.optim.Optimizer | None:
    """The plain torch optimizer when the engine has no ZeRO (local engine, DeepSpeed stage 0)."""
    if engine.kind == "deepspeed":
        if engine.stage > 0:
            return None
        optimizer = engine.optimizer
        return (
            getattr(optimizer, "optimizer", optimizer)
            if not isinstance(optimizer, torch.optim.Optimizer)
            else optimizer
        )
    return engine.optimizer


def _adam_step(engine) -> float:
    optimizer = _torch_optimizer(engine)
    inner = optimizer if optimizer is not None else getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():
        if "step" in state:
            return float(state["step"])
    return 0.0


def full_optimizer_state(engine) -> dict[str, torch.Tensor] | None:
    """Every rank calls this (collectives inside); rank 0 gets the layout-free state, others None."""
    from deepspeed.utils import safe_get_full_optimizer_state

    module: nn.Module = engine.module
    optimizer = _torch_optimizer(engine)
    if optimizer is None:
        _relink_zero_states(engine.optimizer, engine.stage)
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        for key in KEYS:
            if optimizer is not None:
                value = optimizer.state.get(param, {}).get(key)
                value = torch.zeros_like(param) if value is None else value.detach()
            else:
                value = safe_get_full_optimizer_state(param, key)
                value = (
                    torch.zeros_like(param)
                    if value is None
                    else value.reshape(param.ds_shape if hasattr(param, "ds_shape") else param.shape)
                )
            value = _gather_tensor_parallel(value, param)
            if process_rank() == 0:
                out[f"{key}.{name}"] = value.to("cpu", torch.float32).contiguous()
    if process_rank() != 0:
        return None
    out["step"] = torch.tensor([_adam_step(engine)], dtype=torch.float64)
    return out


def save_optimizer_state(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file(state, str(path))


def read_optimizer_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    path = checkpoint / OPTIMIZER
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; the optimizer is handed to a next stage from a stage's final checkpoint (or an "
            "ouro-upcycle output): start from such a checkpoint, or set checkpoint.init_optimizer=false"
        )
    return read_safetensors(path)[0]


def load_optimizer_state(engine, state: dict[str, torch.Tensor], where: Path) -> None:
    """Every rank: set the moments and step of `engine`'s optimizer from a full state."""
    from deepspeed.utils import safe_set_full_optimizer_state

    from ouro_train.optim.optimizer import use_implementation

    module: nn.Module = engine.module
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    missing = [n for n in names if f"exp_avg.{n}" not in state or f"exp_avg_sq.{n}" not in state]
    if missing:
        raise CheckpointError(
            f"{where / OPTIMIZER}: no moments for {missing[:4]}; it was saved for another model: set "
            "checkpoint.init_optimizer=false to start with a fresh optimizer"
        )
    step = torch.tensor(float(state["step"].item()))
    optimizer = _torch_optimizer(engine)
    if optimizer is None:
        _create_zero_states(engine.optimizer, engine.stage)
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        local_shape = tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)
        for key in KEYS:
            full = state[f"{key}.{name}"]
            value = _shard_tensor_parallel(full, param)
            if tuple(value.shape) != local_shape:
                raise CheckpointError(
                    f"{where / OPTIMIZER}: {key}.{name} has shape {tuple(full.shape)}, this model's parameter "
                    f"{local_shape}; set checkpoint.init_optimizer=false to start with a fresh optimizer"
                )
            value = value.to(param.device, torch.float32)
            if optimizer is not None:
                optimizer.state.setdefault(param, {})[key] = value.clone()
                optimizer.state[param]["step"] = step.clone()
            else:
                if hasattr(param, "ds_id"):
                    _set_zero3_state(param, value, key)
                else:
                    safe_set_full_optimizer_state(param, value, key)
    inner = optimizer
    if optimizer is None:
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        for param_state in inner.state.values():
            param_state["step"] = step.clone()  # one tensor each: torch's Adam increments in place
    # The step counters where this run's AdamW kernel keeps them (fused: on the parameters' device).
    use_implementation(inner, bool(inner.param_groups[0].get("fused")))


def _set_zero3_state(param: nn.Parameter, value: torch.Tensor, key: str) -> None:
    """This rank's slice of a full ZeRO-3 optimizer state. DeepSpeed's set_full_hp_param (0.19.8)
    offsets by the *unpadded* length of this rank's partition, which is wrong for the last rank
    when the parameter does not divide evenly; the offset is the padded partition size x rank."""
    optimizer = _deepspeed_internal(param, "_z3_optimizer")
    partition = _deepspeed_internal(optimizer, "_get_fp32_opt_state_partition")
    target, _ = partition(param, release_swap_buffers=False, optim_state_key=key)
    rank = _deepspeed_internal(optimizer, "_get_param_partition_rank")(param)
    flat = value.reshape(-1)
    start = param.ds_tensor.numel() * rank
    count = max(0, min(target.numel(), flat.numel() - start))  # the last partition may be padding only
    target.data[:count].copy_(flat[start : start + count])


def _create_zero_states(zero_optimizer, stage: int) -> None:
    """torch's Adam creates its state at the first step, and DeepSpeed ZeRO 1/2 link their
    per-parameter views of it only then; a fresh engine has neither. Create zero moments for each
    flat fp32 partition (ZeRO 1/2/3) and let DeepSpeed link them, so values can be set before a step."""
    inner = zero_optimizer.optimizer
    flats = _deepspeed_internal(
        zero_optimizer, "fp32_partitioned_groups_flat" if stage == 3 else "single_partition_of_fp32_groups"
    )
    for flat in flats:
        state = inner.state[flat]  # a defaultdict: {} when never stepped
        state.setdefault("step", torch.tensor(0.0))
        for key in KEYS:
            state.setdefault(key, torch.zeros_like(flat))
    _relink_zero_states(zero_optimizer, stage)


def _relink_zero_states(zero_optimizer, stage: int) -> None:
    """ZeRO 1/2 (deepspeed 0.19.8) link each parameter's view of the Adam state once, right after
    the first parameter group's first step, before the other groups have any state: the parameters
    of our second group (norms, biases) are left without `exp_avg`. Linking again fixes that.
    ZeRO-3 has no such link step."""
    if stage == 3:
        return
    link = _deepspeed_internal(zero_optimizer, "_lazy_init_hp_params_optimizer_state")
    _deepspeed_internal(zero_optimizer, "_hp_optimizer_states_linked")
    zero_optimizer._hp_optimizer_states_linked = False
    link()


def _shard_tensor_parallel(full: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    from megatron.core import parallel_state

    size = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    return full.chunk(size, dim=param.partition_dim)[rank]
