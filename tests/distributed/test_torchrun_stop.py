"""ouro_train.pipeline.torchrun (the pipeline's torchrun for nproc > 1) on two tiny worker
processes that stand in for ouro-train: on SIGTERM/SIGUSR1 they "save" (until the test lets
them finish, then a file) and exit 75. Stock torch 2.13 torchrun exits 1 for a stop and for a
failure alike, dies of SIGUSR1 unless --signals-to-handle lists it, and exits mid-save on a
third signal."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runs import wait_until

from ouro_train.pipeline.torchrun import SIGNALS_TO_HANDLE, stopped_by_signal
from ouro_train.train.signals import EXIT_STOPPED

WORKER = """
import os, signal, sys, time
from pathlib import Path
here, mode, rank = Path(sys.argv[1]), sys.argv[2], os.environ["RANK"]
got = []
for s in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(s, lambda n, f: got.append(n))
(here / f"up{rank}").write_text(str(os.getpid()))
if mode != "wait" and rank == "1":
    sys.exit(int(mode))  # then torchrun signals rank 0, which stops (75)
while not got:
    time.sleep(0.01)
(here / f"got{rank}").write_text(str(got[0]))
deadline = time.monotonic() + 120
while mode == "wait" and not (here / "save-ends").exists() and time.monotonic() < deadline:
    time.sleep(0.01)  # saving a checkpoint: as long as the test says
(here / f"saved{rank}").write_text("")
sys.exit(75)
"""


def launch(tmp_path: Path, mode: str) -> subprocess.Popen:
    (tmp_path / "worker.py").write_text(WORKER)
    command = [sys.executable, "-m", "ouro_train.pipeline.torchrun", "--standalone", "--nproc-per-node=2"]
    command += [f"--signals-to-handle={SIGNALS_TO_HANDLE}", str(tmp_path / "worker.py"), str(tmp_path), mode]
    # Output to a file, not a pipe: the workers inherit it, and a pipe's end would wait for them.
    with open(tmp_path / "output.txt", "w") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, tmp_path: Path) -> str:
    proc.wait(timeout=120)
    return (tmp_path / "output.txt").read_text()[-3000:]


def wait_for(*paths: Path, proc: subprocess.Popen) -> None:
    wait_until(lambda: all(p.exists() for p in paths), f"all of {[p.name for p in paths]}", proc)


@pytest.mark.slow
@pytest.mark.parametrize("mode, expected", [("75", EXIT_STOPPED), ("1", 1)])
def test_workers_exit_codes(tmp_path, mode, expected):
    """Workers that exit 75 (stopped by a signal sent to them): 75. A worker failing: 1."""
    proc = launch(tmp_path, mode)
    output = finish(proc, tmp_path)
    assert proc.returncode == expected, output


def test_which_worker_exit_codes_mean_stopped():
    assert stopped_by_signal([75, 75]) and stopped_by_signal([75, -15]) and stopped_by_signal([-9, 75])
    assert not stopped_by_signal([75, 1]) and not stopped_by_signal([-15]) and not stopped_by_signal([2, -15])


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_reaches_the_workers_and_repeats_do_not_cut_their_save_short(tmp_path, signum):
    proc = launch(tmp_path, "wait")
    try:
        wait_for(tmp_path / "up0", tmp_path / "up1", proc=proc)
        proc.send_signal(signum)
        wait_for(tmp_path / "got0", tmp_path / "got1", proc=proc)  # torchrun passed it on and waits for them
        log = tmp_path / "output.txt"
        for repeat in (1, 2):  # while they save: e.g. SLURM's own to every process, then a second Ctrl-C
            proc.send_signal(signal.SIGTERM)
            # One at a time (two pending ones would merge into one): torchrun says it ignored it.
            wait_until(lambda n=repeat: log.read_text().count("ignored: already stopping") >= n, "the repeat", proc)
        (tmp_path / "save-ends").write_text("")  # only now, after both repeats
        output = finish(proc, tmp_path)
    finally:
        proc.kill()
    # torchrun waited for both workers to finish saving (else they would still be running now).
    assert (tmp_path / "saved0").exists() and (tmp_path / "saved1").exists(), output
    assert proc.returncode == EXIT_STOPPED, output
    assert (tmp_path / "got0").read_text() == str(int(signum))
