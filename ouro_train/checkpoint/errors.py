"""The error a checkpoint or model directory that cannot be used raises (`CheckpointError`): a
module of its own below every other module of checkpoint/, so that the file formats, the loaders
(safety.py) and the directory discovery (store.py) all raise it without importing each other.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the directory and what to do."""
