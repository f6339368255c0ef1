"""The random number generators of one process (python's, numpy's, torch's CPU and every CUDA
device's), saved with a checkpoint by `rng_state`, restored on resume by `set_rng_state`, and
seeded from one number by `seed_everything`.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """python's, numpy's, torch's CPU and (when present) every CUDA device's generator state, in a
    form torch's weights-only loader reads back."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured (the CUDA generators only where CUDA is present)."""
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed every generator from one number (a resume that finds no RNG file for its rank, e.g. at
    another world size, derives one from the seed, the step and the rank)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
