"""Stop cleanly on SIGTERM / SIGUSR1 (what SLURM and most schedulers send before preemption)."""

from __future__ import annotations

import signal
import threading

# Exit statuses of ouro-train and ouro-pipeline, so that SLURM scripts and shell loops can tell
# "done" (0) from "stopped, run the same command again to resume" and from failures.
EXIT_STOPPED = 75  # sysexits EX_TEMPFAIL: stopped by a signal, resumable
EXIT_BAD_INPUT = 2  # a config key, file or checkpoint to fix; the message names it
EXIT_DIVERGED = 3  # the stability guard stopped the run: too many bad steps in a row


class StopOnSignal:
    """Context manager: records the first SIGTERM or SIGUSR1 instead of dying mid-step. The
    trainer polls `requested` at step boundaries (all ranks agree on it through the engine)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.requested = self.requested or signum

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
