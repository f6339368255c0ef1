"""Importing our parallel modules prints none of megatron-core's 'Transformer Engine and Apex are
not installed' warnings nor Megatron-FSDP's INFO lines (ouro_train/__init__.py), and every other
warning and log line still shows.

In a fresh interpreter: megatron warns once, at its first import, and pytest's warning capture
would hide the messages in this process either way."""

import os
import subprocess
import sys

SCRIPT = """
import warnings
import ouro_train.parallel
import ouro_train.parallel.engine
import ouro_train.parallel.sequence_parallel
import ouro_train.parallel.tensor_parallel
import megatron.core.optimizer
warnings.warn("an unrelated warning")
warnings.warn("Transformer Engine and Apex are not installed. Falling back to something (from elsewhere)")
import logging
logging.basicConfig(level=logging.INFO)  # as hydra configures the console
import megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision as fsdp
logging.getLogger(fsdp.__name__).info("fsdp info")
logging.getLogger("megatron.core.other").info("other megatron info")
"""


def test_megatron_import_warnings_are_filtered_and_nothing_else():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True)
    lines = [line for line in done.stderr.splitlines() if "Warning:" in line]
    assert not [line for line in lines if "megatron/" in line], done.stderr
    assert any("UserWarning: an unrelated warning" in line for line in lines), done.stderr
    assert any("Falling back to something (from elsewhere)" in line for line in lines), done.stderr
    # Megatron-FSDP's INFO lines ("Using Megatron-FSDP without Transformer Engine" ...) are raised to
    # WARNING; megatron's other loggers keep their level.
    assert "fsdp info" not in done.stderr and "other megatron info" in done.stderr, done.stderr
