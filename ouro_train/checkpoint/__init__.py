"""Checkpoints: save/load/resume, atomic commit, retention, world-size change, upcycling, HF import/export."""
