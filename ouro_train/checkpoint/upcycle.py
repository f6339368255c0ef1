"""Grow an N-layer LoopLM to 2N layers by duplicating its layers (how Ouro-2.6B came from the
1.4B trunk at the start of stable phase 2).

`stack` (default):  [1..N, 1..N]. With R/2 recurrent steps the 2N-layer model applies the same
                    4N layer uses as N layers x R steps did; only the shared final norm between
                    the two halves is missing, so the loss barely moves.
`interleave`:       [1, 1, 2, 2, ..., N, N].
Embeddings, final norm, LM head and exit gate are copied unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from ouro_train.checkpoint.optimizer_state import OPTIMIZER, read_optimizer_state, save_optimizer_state
from ouro_train.checkpoint.store import TRAIN_STATE, read_train_state_if_any
from ouro_train.checkpoint.tokenizer_record import copy_record
from ouro_train.checkpoint.weights import WEIGHTS, save_weights
from ouro_train.config.schema import ModelConfig
from ouro_train.utils.atomic import atomic_path, remove_stale_temporaries

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def layer_order(num_layers: int, order: str) -> list[int]:
    """Source layer of each of the 2N new layers."""
    if order == "stack":
        return list(range(num_layers)) * 2
    if order == "interleave":
        return [i for i in range(num_layers) for _ in range(2)]
    raise ValueError(f"order {order!r}: choose stack or interleave")


def upcycle_config(cfg: ModelConfig, order: str, recurrent_steps: int | None = None) -> ModelConfig:
    steps = recurrent_steps if recurrent_steps is not None else max(1, cfg.recurrent_steps // 2)
    return dataclasses.replace(cfg, name=f"{cfg.name}_x2_{order}", num_layers=2 * cfg.num_layers, recurrent_steps=steps)


def upcycle_state_dict(state: dict[str, torch.Tensor], num_layers: int, order: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _LAYER.match(key)
        if match:
            by_layer.setdefault(int(match.group(1)), {})[match.group(2)] = value
        else:
            out[key] = value.clone()
    if sorted(by_layer) != list(range(num_layers)):
        raise ValueError(f"weights hold layers {sorted(by_layer)}, expected 0..{num_layers - 1}")
    for new, source in enumerate(layer_order(num_layers, order)):
        for name, value in by_layer[source].items():
            out[f"model.layers.{new}.{name}"] = value.clone()
    return out


def upcycle_optimizer_state(state: dict[str, torch.Tensor], num_layers: int, order: str) -> dict[str, torch.Tensor]:
    """Duplicate Adam moments (`exp_avg.<name>`, `exp_avg_sq.<name>`, see optimizer_state.py) with
    their layers, so the grown model continues with the optimizer of the trunk it came from."""
    out: dict[str, torch.Tensor] = {}
    for kind in ("exp_avg", "exp_avg_sq"):
        prefix = f"{kind}."
        part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        out |= {f"{prefix}{k}": v for k, v in upcycle_state_dict(part, num_layers, order).items()}
    out["step"] = state["step"].clone()
    return out


def write_upcycled(
    checkpoint: Path, out: Path, state: dict, source: ModelConfig, target: ModelConfig, order: str, optimizer: str
) -> None:
    """The grown weights (+ duplicated Adam moments, + the source's train state: its next learning
    rate and data position, for the next stage's hand-off), committed by one rename."""

    moments = None
    if optimizer == "duplicate":
        moments = upcycle_optimizer_state(read_optimizer_state(checkpoint), source.num_layers, order)
    previous = read_train_state_if_any(checkpoint)
    record = {
        "upcycled_from": str(checkpoint),
        "order": order,
        "optimizer": optimizer,
        "layers": [source.num_layers, target.num_layers],
        "recurrent_steps": [source.recurrent_steps, target.recurrent_steps],
        "next_lr": previous.get("next_lr"),
        "loader": previous.get("loader"),
        "tokens": previous.get("tokens"),
    }
    remove_stale_temporaries(out)  # left by an upcycle that was killed
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:  # replaces an earlier output; a failure removes the temporary
        tmp.mkdir()
        save_weights(upcycle_state_dict(state, source.num_layers, order), tmp / WEIGHTS, target)
        if moments is not None:
            save_optimizer_state(moments, tmp / OPTIMIZER)
        (tmp / TRAIN_STATE).write_text(json.dumps(record, indent=1) + "\n")
        copy_record(checkpoint if checkpoint.is_dir() else checkpoint.parent, tmp)  # its tokenizer, if recorded
