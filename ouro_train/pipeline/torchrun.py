"""`python -m ouro_train.pipeline.torchrun ARGS`: torchrun (torch.distributed.run, the same
arguments) as the pipeline runner launches a stage on several processes, with two changes:

* Exit status 75 (EXIT_STOPPED, "stopped by a signal, resumable") when the stage was stopped by
  a signal. Stock torchrun exits 1 both when it gets SIGTERM/SIGUSR1 itself (it passes the
  signal on to its workers, waits for them, then raises) and when its workers exit 75 (signalled
  directly, e.g. by SLURM); so the runner could not tell a stop from a failure. Workers count
  as stopped when some exited 75 and the others 75 or were killed by torchrun's own shutdown
  signal (`stopped_by_signal`); any other failure still gives torchrun's report and exit 1.
* A signal that arrives while torchrun is shutting its workers down (waiting for them to save,
  up to --shutdown-timeout, then SIGKILL) is ignored. Stock torchrun raises again on every
  signal: a third SIGTERM (SLURM's to every process, the runner's forwarded one, a second
  Ctrl-C) cut the wait short and torchrun exited while its workers were still writing their
  checkpoint.

The runner passes `--signals-to-handle` (torchrun's default lacks SIGUSR1, of which it would die
at once, leaving the workers training; torch 2.13 overwrites TORCHELASTIC_SIGNALS_TO_HANDLE from
that option) and `--shutdown-timeout` (SHUTDOWN_TIMEOUT).
"""

from __future__ import annotations

import os
import sys

from ouro_train.train.signals import EXIT_STOPPED

SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# Seconds torchrun waits, after passing a signal on, for the workers to save and exit before it
# kills them (its default, 30 s, can be shorter than a step plus a large checkpoint save).
SHUTDOWN_TIMEOUT = 300


def _ignore_signals_while_shutting_down() -> None:
    """Patch torchrun's signal handler (looked up when its workers start) to do nothing while
    the agent's `_shutdown` runs. Private torch API: when it is not there, torchrun is unchanged."""
    try:
        from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
        from torch.distributed.elastic.multiprocessing import api
    except ImportError:
        return
    raise_on_signal = getattr(api, "_terminate_process_handler", None)
    shutdown = getattr(LocalElasticAgent, "_shutdown", None)
    if raise_on_signal is None or shutdown is None:
        return
    shutting_down = [False]

    def handler(signum, frame) -> None:
        if shutting_down[0]:
            os.write(2, f"[torchrun] signal {signum} ignored: already stopping the workers\n".encode())
            return
        raise_on_signal(signum, frame)

    def guarded_shutdown(self, *args, **kwargs):
        shutting_down[0] = True
        try:
            return shutdown(self, *args, **kwargs)
        finally:
            shutting_down[0] = False

    api._terminate_process_handler = handler
    LocalElasticAgent._shutdown = guarded_shutdown


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    _ignore_signals_while_shutting_down()
    try:
        torchrun(argv)
    except SignalException as stop:
        print(f"[torchrun] stopped by {stop.sigval.name}; the workers were asked to save and exit", file=sys.stderr)
        return EXIT_STOPPED
    except ChildFailedError as error:
        if stopped_by_signal([failure.exitcode for failure in error.failures.values()]):
            print(f"[torchrun] workers stopped by a signal (exit {EXIT_STOPPED})", file=sys.stderr)
            return EXIT_STOPPED
        raise
    return 0


def stopped_by_signal(exit_codes: list[int]) -> bool:
    """The failed workers' exit codes mean "stopped, resumable": some exited 75 and the others
    too, or were killed by a signal (negative): torchrun SIGTERMs, then SIGKILLs, the workers
    still running once one has exited, and all ranks stop at the same step anyway. Any positive
    code other than 75 is a failure."""
    return EXIT_STOPPED in exit_codes and all(code == EXIT_STOPPED or code < 0 for code in exit_codes)


if __name__ == "__main__":
    sys.exit(main())
