from ouro_train.checkpoint.manager import Checkpointer, config_hash
from ouro_train.checkpoint.store import CheckpointError, find_latest

__all__ = ["CheckpointError", "Checkpointer", "config_hash", "find_latest"]
