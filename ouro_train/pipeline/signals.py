"""The runner's signal handling: `ForwardSignals` records SIGTERM / SIGUSR1 / SIGINT sent to the
runner and passes each on, once, to the training stage running as its child process (SIGINT as
SIGTERM, a clean save-and-exit); with no stage running the signal is only recorded, and the run
loop (runner.py) starts nothing more once one has come.
"""

from __future__ import annotations

import signal
import subprocess

from ouro_train.train.signals import StopOnSignal


class ForwardSignals(StopOnSignal):
    """StopOnSignal for the runner: SIGINT counts too, and each signal is passed on to the running
    stage (which saves and exits), once per stage. With no stage running (between stages, during
    an upcycle) the signal is only recorded: `run` checks `requested` before it starts anything."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    ABORT_ON_SECOND_INTERRUPT = False  # a second Ctrl-C at the terminal aborts the stage itself

    def __init__(self) -> None:
        super().__init__(on_signal=lambda signum: self._tell())
        self._child: subprocess.Popen | None = None
        self._told = False  # the current child has been sent its stop signal

    @property
    def child(self) -> subprocess.Popen | None:
        return self._child

    @child.setter
    def child(self, child: subprocess.Popen | None) -> None:
        self._child, self._told = child, False
        if child is not None and self.requested is not None:
            self._tell()  # the signal came while the child was being started

    def _tell(self) -> None:
        # Once: the stage stops at its next step boundary either way, and a repeated signal only
        # risks cutting its save short (torchrun's shutdown; ouro_train/pipeline/torchrun.py).
        if self._told or self._child is None or self._child.poll() is not None:
            return
        self._told = True
        # SIGINT becomes SIGTERM: a clean save-and-exit rather than a KeyboardInterrupt.
        self._child.send_signal(signal.SIGTERM if self.requested == signal.SIGINT else self.requested)
