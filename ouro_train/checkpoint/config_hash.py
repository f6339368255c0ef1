"""What a checkpoint records of the training it belongs to, for a resume to compare: the part of
the config that defines the training itself (`training_config`, with the keys a resume may change,
RESUMABLE_CHANGES, left out) and its short sha256 (`config_hash`), written into every train state;
the Checkpointer (manager.py) refuses a resume whose hash differs, except for a change of length
only (LENGTH_KEYS) that the schedule allows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from ouro_train.config.resolve import Resolved
from ouro_train.config.schema import Config

# Keys that may change between a save and a resume without changing what is being trained.
RESUMABLE_CHANGES = (
    "run_dir",
    "guard.",
    "dry_run",
    "logging.",
    "checkpoint.",
    "parallel.",
    "train.device",
    # Which implementation computes the same norms, SwiGLU and RoPE (and old checkpoints have no such key),
    # and the same document-causal attention (a run moved from CPU to GPU may switch sdpa -> flash).
    "model.kernels",
    "model.attention",
    # Which AdamW kernel makes the same update (checkpoints before optim.fused have no such key).
    "optim.fused",
    "train.max_steps_this_run",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "data.num_workers",
    "data.verify_checksums",
    "data.cache_dir",
)


def flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


# A resume may change only these to make the run longer (or shorter) when its schedule allows it
# (Checkpointer._extend); train.steps is the resolved length, train.tokens one way to set it.
LENGTH_KEYS = {"train.steps", "train.tokens"}

# How the batch is cut (per-rank micro-batches, accumulation) is a memory choice; what is trained is
# the number of sequences per optimizer step, recorded as train.global_batch_rows instead.
BATCH_SPLIT = ("train.micro_batch_size", "train.grad_accum_steps", "train.global_batch_size")


def training_config(cfg: Config, resolved: Resolved) -> dict:
    """The part of the config that defines the training itself (hashed and compared on resume):
    the keys of RESUMABLE_CHANGES left out, how the batch is cut (BATCH_SPLIT) replaced by the
    sequences per optimizer step, and the steps and peak LR as start-up resolved them (a hand-off
    may continue the previous stage's LR)."""
    flat = flatten(dataclasses.asdict(cfg))
    flat = {k: v for k, v in flat.items() if k not in BATCH_SPLIT}
    flat["train.steps"] = resolved.steps
    flat["optim.lr"] = resolved.lr
    flat["train.global_batch_rows"] = resolved.global_batch_rows
    return {k: v for k, v in sorted(flat.items()) if not k.startswith(RESUMABLE_CHANGES)}


def config_hash(cfg: Config, resolved: Resolved) -> str:
    """The short sha256 (16 hex digits) of `training_config`, written into every train state."""
    payload = json.dumps(training_config(cfg, resolved), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
