"""Stop cleanly on SIGTERM / SIGUSR1 (what SLURM and most schedulers send before preemption)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Self

# Exit statuses of ouro-train and ouro-pipeline, so that SLURM scripts and shell loops can tell
# "done" (0) from "stopped, run the same command again to resume" and from failures.
EXIT_STOPPED = 75  # sysexits EX_TEMPFAIL: stopped by a signal, resumable
EXIT_BAD_INPUT = 2  # a config key, file or checkpoint to fix; the message names it
EXIT_DIVERGED = 3  # the stability guard stopped the run: too many bad steps in a row


class StopOnSignal:
    """Context manager: records the first of `signals` (default SIGTERM, SIGUSR1) instead of dying
    mid-step. The trainer polls `requested` at step boundaries (all ranks agree on it through the
    engine). `on_signal(signum)` is called after every one of them is recorded: the pipeline runner
    passes the stop on to the stage it runs (ouro_train/pipeline/runner.py)."""

    SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, signals: tuple[int, ...] | None = None, on_signal: Callable[[int], None] | None = None) -> None:
        self.signals = self.SIGNALS if signals is None else tuple(signals)
        self.on_signal = on_signal
        self.requested: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.requested = self.requested or signum
        if self.on_signal is not None:
            self.on_signal(signum)

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
