"""Consolidated model weights: the full single-device state dict, whatever the parallel layout.

Every checkpoint carries `model.safetensors` with the reference key names: gathered from ZeRO-3
partitions and tensor-parallel shards on rank 0. It is what export, weights-only
initialisation (a new stage, another world size) and upcycling read; no pickle is involved.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ouro_train.checkpoint.errors import CheckpointError
from ouro_train.config.schema import ModelConfig

WEIGHTS = "model.safetensors"


def _gather_tensor_parallel(tensor: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return tensor
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Every rank calls this (collectives inside); rank 0 gets fp32 CPU tensors, the others None."""
    rank = process_rank()
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id"):  # a ZeRO-3 partition: gather it for the duration of the read
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                tensor = param.data.detach().clone()
        else:
            tensor = param.detach()
        tensor = _gather_tensor_parallel(tensor, param)
        if rank == 0:
            out[name] = tensor.to("cpu", torch.float32).contiguous()
    return out if rank == 0 else None


def save_weights(state: dict[str, torch.Tensor], path: Path, model_cfg: ModelConfig) -> None:
    save_file(state, str(path), metadata={"model_config": json.dumps(dataclasses.asdict(model_cfg))})


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (state dict, the saved model config as a dict)."""
    file = path / WEIGHTS if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"{file}: no consolidated weights; is {path} a checkpoint written by ouro-train?")
    state, metadata = read_safetensors(file)
    return state, json.loads(metadata.get("model_config", "{}"))


def read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """-> (tensors, metadata) of a safetensors file; a truncated or corrupt one is a CheckpointError."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"{file}: unreadable ({error}); the file is truncated or corrupt") from error


def process_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def check_fits(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: Path) -> None:
    """Raise naming every key missing from `found`, every unexpected one and every shape mismatch."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if missing or unexpected or wrong:
        details = [
            f"missing {missing[:4]}" if missing else "",
            f"unexpected {unexpected[:4]}" if unexpected else "",
            "shape " + ", ".join(f"{k}: {tuple(found[k])} vs model {tuple(expected[k])}" for k in wrong[:4])
            if wrong
            else "",
        ]
        raise CheckpointError(
            f"{where}: weights do not fit this model ({'; '.join(d for d in details if d)}); "
            "check the model config (layers, hidden size, vocab) against the checkpoint's"
        )


def load_into(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Strict load into a plain (not yet parallelized) model, naming every mismatch."""
    expected = model.state_dict()
    check_fits({k: v.shape for k, v in expected.items()}, {k: v.shape for k, v in state.items()}, where)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def _shape(param: nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))  # a ZeRO-3 partition records its full shape


def parameter_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Each parameter's full shape (what a SafetensorsWeights source checks the file against)."""
    return {name: _shape(param) for name, param in model.named_parameters()}


class SafetensorsWeights:
    """A checkpoint's consolidated weights read lazily, one tensor (or one slice of it) at a time,
    so that a rank never loads the whole model to take its shard (ouro_train.parallel.materialize).
    `expected`: the model's parameter shapes by name; a file that does not fit fails here, with
    load_into's message."""

    def __init__(self, path: Path, expected: dict[str, tuple[int, ...]]) -> None:
        file = path / WEIGHTS if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(f"{file}: no consolidated weights; is {path} a checkpoint written by ouro-train?")
        self.file = file
        try:
            self.handle = safe_open(str(file), framework="pt")
            found = {key: tuple(self.handle.get_slice(key).get_shape()) for key in self.handle.keys()}
        except Exception as error:  # safetensors raises its own error types
            raise CheckpointError(f"{file}: unreadable ({error}); the file is truncated or corrupt") from error
        check_fits(expected, found, path)

    def get(self, name: str, dim: int | None = None, rank: int = 0, parts: int = 1) -> torch.Tensor:
        """fp32: the whole tensor `name`, or the `rank`-th of `parts` equal slices along `dim`."""
        try:
            if dim is None:
                return self.handle.get_tensor(name).float()
            tensor_slice = self.handle.get_slice(name)
            size = tensor_slice.get_shape()[dim] // parts
            index = [slice(None)] * len(tensor_slice.get_shape())
            index[dim] = slice(rank * size, (rank + 1) * size)
            return tensor_slice[tuple(index)].float()
        except Exception as error:
            raise CheckpointError(
                f"{self.file}: unreadable tensor {name} ({error}); the file is truncated or corrupt"
            ) from error
