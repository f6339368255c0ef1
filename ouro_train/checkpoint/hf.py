"""Hugging Face interop in the layout of the released Ouro checkpoints (ByteDance/Ouro-1.4B/2.6B).

`export_hf` writes `model.safetensors` (reference key names, no renaming needed), a
`config.json` with the released fields, and the tokenizer's Hugging Face files with the
bos / eos / pad ids of that tokenizer (hf_tokenizer.py), so the directory is a model one can
load and generate with. `import_hf` reads such a directory (single file or a sharded
`model.safetensors.index.json`) back into a ModelConfig and a state dict, and refuses (naming
the field, its value and what is accepted) every config field whose value would make this
code compute other logits than the model described: hidden_act other than silu, any rope
scaling, sliding-window attention, attention / MLP biases (`check_supported`). A tied model
(tie_word_embeddings true) is imported untied: lm_head.weight := a copy of the embedding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ouro_train.checkpoint.errors import CheckpointError
from ouro_train.checkpoint.hf_tokenizer import (
    GENERATION_CONFIG,
    SPECIAL_TOKENS_MAP,
    TOKENIZER_CONFIG,
    generation_config,
    write_hf_files,
)
from ouro_train.checkpoint.tokenizer_record import TOKENIZER, ModelTokenizer, check_vocab_fits
from ouro_train.checkpoint.weights import read_safetensors
from ouro_train.config.schema import ModelConfig

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def hf_config(cfg: ModelConfig, dtype: str, tokenizer: ModelTokenizer | None = None) -> dict:
    """The released fields; bos / eos / pad ids from `tokenizer` (null without one)."""
    ids = generation_config(tokenizer) if tokenizer is not None else {}
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
        "bos_token_id": ids.get("bos_token_id"),
        "eos_token_id": ids.get("eos_token_id"),
        "pad_token_id": ids.get("pad_token_id"),
        "vocab_size": cfg.vocab_size,
        "initializer_range": cfg.init_std,
        "use_cache": True,
    }


def export_hf(
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: Path,
    dtype: str = "bfloat16",
    tokenizer: ModelTokenizer | None = None,
) -> Path:
    """model.safetensors + config.json, and with `tokenizer` its Hugging Face files
    (tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json).
    A tokenizer with more ids than the model's vocab_size is refused, naming both sizes."""
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    if tokenizer is not None:
        check_vocab_fits(tokenizer, cfg.vocab_size, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in state.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config(cfg, dtype, tokenizer), indent=2) + "\n")
    if tokenizer is not None:
        write_hf_files(out_dir, tokenizer, cfg.max_position_embeddings)
    else:  # files of an earlier export into this directory would describe another tokenizer
        for name in (TOKENIZER, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, GENERATION_CONFIG):
            (out_dir / name).unlink(missing_ok=True)
    return out_dir


# Fields whose other values change the math of a model this code does not implement: (field,
# the value this model has, what the other value would mean). Checked when present.
_MUST_BE = (
    ("attention_bias", False, "biases on the q/k/v/o projections"),
    ("mlp_bias", False, "biases on the MLP projections"),
    ("partial_rotary_factor", 1.0, "RoPE on only part of each head"),
    ("attn_logit_softcapping", None, "soft-capped attention logits"),
    ("final_logit_softcapping", None, "soft-capped output logits"),
)
# Fields read but without effect on this model's outputs; recorded in imported_from.json.
_IGNORED = ("early_exit_threshold", "sliding_window", "max_window_layers", "attention_dropout", "use_cache")


def _refuse(where: Path, key: str, value, why: str, accepted: str) -> CheckpointError:
    return CheckpointError(
        f"{where}: {key}={json.dumps(value)} is not supported: {why}. This code would compute other logits than "
        f"the model this config describes, so it is refused; ouro-import takes only {accepted}"
    )


def check_supported(raw: dict, where: Path) -> dict:
    """Refuse (CheckpointError naming the field, its value and what to do) every config field
    whose value changes the math of a model this code does not implement; -> the fields read and
    ignored because they change nothing here (recorded by ouro-import).

    Supported: hidden_act "silu" (or its alias "swish"), no rope scaling (rope_scaling null, or
    rope_type "default"), full causal attention in every layer (use_sliding_window false and
    layer_types all "full_attention"; a `sliding_window` size with use_sliding_window false is
    what Qwen2-style configs carry and is unused, as in the reference), no attention / MLP
    biases. tie_word_embeddings is handled with the weights (import_hf unties)."""
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise _refuse(where, "hidden_act", act, "the MLP here is SwiGLU with SiLU", "hidden_act 'silu'")
    theta = raw.get("rope_theta")
    for key in ("rope_scaling", "rope_parameters"):  # rope_parameters: the transformers v5 name
        scaling = raw.get(key)
        if scaling is None:
            continue
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if kind != "default":
            raise _refuse(
                where,
                key,
                scaling,
                f"RoPE here is unscaled (theta {theta}) at every position; {kind!r} scaling rotates positions "
                "differently",
                f"{key} null (or rope_type 'default')",
            )
    if raw.get("use_sliding_window"):
        raise _refuse(
            where,
            "use_sliding_window",
            True,
            f"layers from max_window_layers={raw.get('max_window_layers')} on would attend only to the last "
            f"sliding_window={raw.get('sliding_window')} tokens; attention here is full causal in every layer",
            "use_sliding_window false",
        )
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        other = {i: t for i, t in enumerate(layer_types) if t != "full_attention"}
        if other:
            first = next(iter(other))
            raise _refuse(
                where,
                "layer_types",
                layer_types,
                f"{len(other)} layer(s) are not 'full_attention' (layer {first}: {other[first]!r}); attention here is "
                "full causal in every layer",
                "layer_types of 'full_attention' only",
            )
        if "num_hidden_layers" in raw and len(layer_types) != raw["num_hidden_layers"]:
            raise CheckpointError(
                f"{where}: layer_types lists {len(layer_types)} layers but num_hidden_layers is "
                f"{raw['num_hidden_layers']}; the config is inconsistent: fix it"
            )
    for key, value, meaning in _MUST_BE:
        if key in raw and raw[key] != value:
            raise _refuse(where, key, raw[key], f"{meaning} do not exist in this model", f"{key} {json.dumps(value)}")
    return {key: raw[key] for key in _IGNORED if raw.get(key) is not None}


def _config_from_hf(raw: dict, where: Path) -> tuple[ModelConfig, dict]:
    """-> (the model config, the fields read and ignored); refuses what this model cannot compute."""
    if raw.get("model_type") != "ouro":
        raise CheckpointError(f"{where}: model_type {raw.get('model_type')!r} is not 'ouro'")
    ignored = check_supported(raw, where)
    theta = raw.get("rope_theta", (raw.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    try:
        cfg = ModelConfig(
            name=where.parent.name,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=raw["num_attention_heads"],
            num_kv_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
            head_dim=raw.get("head_dim"),
            intermediate_size=raw["intermediate_size"],
            recurrent_steps=raw.get("total_ut_steps", 4),
            rope_theta=float(theta),
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            init_std=float(raw.get("initializer_range", 0.02)),
            max_position_embeddings=raw.get("max_position_embeddings", 65536),
        )
    except KeyError as error:
        raise CheckpointError(f"{where}: missing field {error} of an Ouro config") from error
    return cfg, ignored


@dataclass
class HFImport:
    cfg: ModelConfig
    state: dict[str, torch.Tensor]  # in the file's dtype
    dtype: str  # that dtype's name
    untied: bool  # tie_word_embeddings: lm_head.weight is a copy of model.embed_tokens.weight
    ignored: dict  # config fields read and ignored (they change nothing here)


def import_hf(directory: Path) -> HFImport:
    """A Hugging Face Ouro directory -> config and weights, or a CheckpointError naming what does not fit."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: not found; is {directory} a Hugging Face model directory?")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file}: not valid JSON ({error})") from error
    cfg, ignored = _config_from_hf(raw, config_file)
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
    untied = False
    if raw.get("tie_word_embeddings", False):
        # Tied: the output head is the embedding. Stored untied here (training keeps separate copies).
        embed, head = state.get(EMBED), state.get(HEAD)
        if embed is None:
            raise CheckpointError(f"{directory}: tie_word_embeddings is true but there is no {EMBED}")
        if head is None:
            state[HEAD], untied = embed.clone(), True
        elif not torch.equal(head, embed):
            raise CheckpointError(
                f"{directory}: tie_word_embeddings is true but the file's {HEAD} differs from its {EMBED}; which one "
                "the model uses is ambiguous: fix tie_word_embeddings (false keeps both) or drop one tensor"
            )
    dtype = next(iter(state.values())).dtype
    name = {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))
    return HFImport(cfg, state, name, untied, ignored)
