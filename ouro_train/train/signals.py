"""Stop cleanly on SIGTERM / SIGUSR1 (what SLURM and most schedulers send before preemption)."""

from __future__ import annotations

import os
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
    """Context manager: records the first of `signals` (default SIGTERM, SIGUSR1, SIGINT) instead
    of dying mid-step. The trainer polls `requested` at step boundaries (all ranks agree on it
    through the engine). `on_signal(signum)` is called after every one of them is recorded: the
    pipeline runner passes the stop on to the stage it runs (ouro_train/pipeline/signals.py).

    Ctrl-C (SIGINT) is a stop like SIGTERM: the run saves at the step boundary and exits 75, so a
    newcomer's Ctrl-C loses nothing. A second Ctrl-C aborts at once (KeyboardInterrupt), as people
    expect of a second one; a save it cuts short is never picked up (checkpoints commit by rename)."""

    SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    # The pipeline runner keeps its stage's save safe instead: a second Ctrl-C at the terminal
    # reaches the stage itself, which aborts (ouro_train/pipeline/signals.py).
    ABORT_ON_SECOND_INTERRUPT = True

    def __init__(self, signals: tuple[int, ...] | None = None, on_signal: Callable[[int], None] | None = None) -> None:
        self.signals = self.SIGNALS if signals is None else tuple(signals)
        self.on_signal = on_signal
        self.requested: int | None = None
        self._interrupted = False  # a first SIGINT came
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.ABORT_ON_SECOND_INTERRUPT:
            if self._interrupted:
                raise KeyboardInterrupt
            self._interrupted = True
            os.write(
                2,
                b"\nCtrl-C: stopping at the end of this step and saving a checkpoint "
                b"(Ctrl-C again aborts without saving)\n",
            )
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
