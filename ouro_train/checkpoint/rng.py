"""The random number generators of one process, saved with a checkpoint and restored on resume.

`rng_state` captures python's, numpy's, torch's CPU and (when present) every CUDA device's
generator in a form torch's weights-only loader reads back; `set_rng_state` restores it; and
`seed_everything` seeds them all from one number (a resume that finds no RNG file for its rank,
e.g. at another world size, derives one from the seed, the step and the rank).
"""

from __future__ import annotations

import random

import numpy as np
import torch


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
