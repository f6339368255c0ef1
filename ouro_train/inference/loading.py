"""Loading a model to evaluate or generate with: `load_model` builds a LoopLM from a checkpoint
directory, an `ouro-import` weights directory (its model.safetensors carries the config) or a
Hugging Face Ouro directory (config.json, as `ouro-export` writes it), in the dtype and on the
device asked for (the torch kernels on CPU).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ouro_train.checkpoint.errors import CheckpointError
from ouro_train.checkpoint.hf import DTYPES, import_hf
from ouro_train.config.schema import ModelConfig
from ouro_train.model.looplm import LoopLM


def load_model(path: Path, dtype: str = "float32", device: str = "cpu") -> LoopLM:
    """A LoopLM from a checkpoint directory, an `ouro-import` weights directory (its
    model.safetensors carries the config) or a Hugging Face Ouro directory (config.json)."""
    from ouro_train.checkpoint.weights import WEIGHTS, read_weights

    path = Path(path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if path.is_dir() and (path / "config.json").is_file() and not _has_saved_config(path / WEIGHTS):
        imported = import_hf(path)
        cfg, state = imported.cfg, imported.state
    else:
        state, raw = read_weights(path)
        if not raw:
            raise CheckpointError(
                f"{path}: the weights carry no model config; is it a checkpoint written by ouro-train?"
            )
        cfg = ModelConfig(**raw)
    if torch.device(device).type == "cpu" and cfg.kernels != "torch":
        cfg = dataclasses.replace(cfg, kernels="torch")  # Triton kernels need a GPU outside the interpreter
    with torch.device("meta"):
        model = LoopLM(cfg, seed=0)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not match its model config: {str(error).splitlines()[0]}") from error
    model.init_buffers(device)
    return model.to(device=device, dtype=DTYPES[dtype]).eval()


def _has_saved_config(file: Path) -> bool:
    """Ours (the model config in the safetensors metadata) rather than a Hugging Face export."""
    if not file.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return "model_config" in (f.metadata() or {})
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"{file}: unreadable ({error}); the file is truncated or corrupt") from error
