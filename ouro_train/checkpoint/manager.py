"""Saving and resuming a run: engine state, RNG per rank, train state, loader position.

Every rank calls `save`/`load` together (the engine's state is sharded under ZeRO); rank 0
writes the shared files and commits. Loading reads only weights-only torch files and JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ouro_train.checkpoint.store import (
    TRAIN_STATE,
    CheckpointError,
    apply_retention,
    commit,
    read_train_state,
    temporary_dir,
)
from ouro_train.checkpoint.weights import WEIGHTS, full_state_dict, save_weights
from ouro_train.config.schema import Config

# Keys that may change between a save and a resume without changing what is being trained.
RESUMABLE_CHANGES = (
    "run_dir",
    "dry_run",
    "logging.",
    "checkpoint.",
    "parallel.",
    "train.device",
    "train.max_steps_this_run",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "data.num_workers",
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


def training_config(cfg: Config) -> dict:
    """The part of the config that defines the training itself (hashed and compared on resume)."""
    flat = flatten(dataclasses.asdict(cfg))
    return {k: v for k, v in sorted(flat.items()) if not k.startswith(RESUMABLE_CHANGES)}


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(training_config(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_version() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        return (
            subprocess.run(
                ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, cfg: Config, root: Path, rank: int = 0, world_size: int = 1) -> None:
        self.cfg = cfg
        self.root = Path(root)
        self.rank = rank
        self.world_size = world_size

    def save(self, trainer, loader_state: dict | None) -> Path:
        step = trainer.state.step
        tmp = temporary_dir(self.root, step)
        if self.rank == 0:
            if tmp.exists():  # left by a save that was killed
                import shutil

                shutil.rmtree(tmp)
            (tmp / "rng").mkdir(parents=True)
        _barrier()
        full = full_state_dict(trainer.engine.module)  # collective: every rank takes part
        if self.rank == 0:
            save_weights(full, tmp / WEIGHTS, self.cfg.model)
        trainer.engine.save_checkpoint(tmp / "engine")
        torch.save(rng_state(), tmp / "rng" / f"rank_{self.rank:05d}.pt")
        if self.rank == 0:
            state = {
                "step": step,
                "tokens": trainer.state.tokens,
                "loader": loader_state,
                "config_hash": config_hash(self.cfg),
                "config": training_config(self.cfg),
                "code_version": code_version(),
                "world_size": self.world_size,
                "tensor_parallel": self.cfg.parallel.tensor_parallel,
                "zero_stage": self.cfg.parallel.zero_stage,
            }
            (tmp / TRAIN_STATE).write_text(json.dumps(state, indent=1, default=str))
        _barrier()
        final = self.root / tmp.name.removeprefix(".tmp-")
        if self.rank == 0:
            commit(self.root, tmp, step)
            ckpt = self.cfg.checkpoint
            apply_retention(self.root, ckpt.keep_last, ckpt.keep_every)
        _barrier()
        return final

    def load(self, path: Path, trainer, loader) -> dict:
        """Restore engine, RNG, step counters and the loader position from `path`."""
        state = read_train_state(path)
        self.check_compatible(path, state)
        if state["world_size"] != self.world_size or state["tensor_parallel"] != self.cfg.parallel.tensor_parallel:
            raise CheckpointError(
                f"{path}: saved by {state['world_size']} processes (tensor parallel {state['tensor_parallel']}), "
                f"resumed by {self.world_size} (tensor parallel {self.cfg.parallel.tensor_parallel}); resuming at "
                "another world size is not available yet: relaunch with the saved layout"
            )
        trainer.engine.load_checkpoint(path / "engine")
        rng_file = path / "rng" / f"rank_{self.rank:05d}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        trainer.state.step = state["step"]
        trainer.state.tokens = state["tokens"]
        if state["loader"] is not None and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(state["loader"])
        return state

    def check_compatible(self, path: Path, state: dict) -> None:
        if state.get("config_hash") == config_hash(self.cfg):
            return
        saved, now = state.get("config", {}), training_config(self.cfg)
        changed = sorted(k for k in set(saved) | set(now) if str(saved.get(k)) != str(now.get(k)))
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:8])
        raise CheckpointError(
            f"{path}: the training config changed since this checkpoint ({details}); resume with the saved config, "
            "or start a new run directory (or a new stage) for a changed one"
        )
