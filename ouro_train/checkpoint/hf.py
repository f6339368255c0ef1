"""Hugging Face interop in the layout of the released Ouro checkpoints (ByteDance/Ouro-1.4B/2.6B).

`export_hf` writes `model.safetensors` (reference key names, no renaming needed) and a
`config.json` with the released fields; `import_hf` reads such a directory (single file or a
sharded `model.safetensors.index.json`) back into a ModelConfig and a state dict.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ouro_train.checkpoint.store import CheckpointError
from ouro_train.checkpoint.weights import read_safetensors
from ouro_train.config.schema import ModelConfig

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def hf_config(cfg: ModelConfig, dtype: str) -> dict:
    return {
        "architectures": ["OuroForCausalLM"],
        "model_type": "ouro",
        "auto_map": {
            "AutoConfig": "configuration_ouro.OuroConfig",
            "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM",
        },
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "layer_types": ["full_attention"] * cfg.num_layers,
        "sliding_window": None,
        "use_sliding_window": False,
        "max_window_layers": cfg.num_layers,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "total_ut_steps": cfg.recurrent_steps,
        "early_exit_threshold": 1.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "vocab_size": cfg.vocab_size,
        "initializer_range": cfg.init_std,
        "use_cache": True,
    }


def export_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: Path, dtype: str = "bfloat16") -> Path:
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in state.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=2) + "\n")
    return out_dir


def _config_from_hf(raw: dict, where: Path) -> ModelConfig:
    if raw.get("model_type") != "ouro":
        raise CheckpointError(f"{where}: model_type {raw.get('model_type')!r} is not 'ouro'")
    try:
        return ModelConfig(
            name=where.parent.name,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=raw["num_attention_heads"],
            num_kv_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
            head_dim=raw.get("head_dim"),
            intermediate_size=raw["intermediate_size"],
            recurrent_steps=raw.get("total_ut_steps", 4),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            init_std=float(raw.get("initializer_range", 0.02)),
            max_position_embeddings=raw.get("max_position_embeddings", 65536),
        )
    except KeyError as error:
        raise CheckpointError(f"{where}: missing field {error} of an Ouro config") from error


def import_hf(directory: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """-> (model config, state dict in the file's dtype, that dtype's name)."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: not found; is {directory} a Hugging Face model directory?")
    cfg = _config_from_hf(json.loads(config_file.read_text()), config_file)
    index = directory / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: weight file missing")
        state |= read_safetensors(path)[0]
    dtype = next(iter(state.values())).dtype
    return cfg, state, {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))
