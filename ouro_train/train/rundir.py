"""The run directory: checked before use, and locked against a second writer.

Two runs writing one run directory corrupt each other (checkpoints, metrics, the data
position), so rank 0 holds `<run_dir>/run.lock` while training. The lock file is created with
O_EXCL and records who holds it (host, pid, process start time, SLURM job and restart count);
a second run is refused with a message naming the holder. A lock whose holder is gone is taken
over with a warning; "gone" is decided without guessing:
  * the same host, and the pid is dead (or reused: its start time differs);
  * the same SLURM job at another restart count (SLURM requeues a job only once it has ended);
  * otherwise the holder's heartbeat (the lock file's mtime, touched every HEARTBEAT_S by a
    thread) is older than STALE_AFTER_S: a holder on another node that died without releasing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats


class RunDirError(ValueError):
    """The run directory cannot be used; the message names it and what to do."""


def prepare_run_dir(path: Path) -> Path:
    """Create `path` if needed; a clear error when it (or a parent) is a file or not writable."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run_dir={path}: is a file, not a directory; choose another run_dir or move the file away")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), error.filename)
        raise RunDirError(f"run_dir={path}: cannot be created, {blocker} is a file; choose another run_dir") from error
    except PermissionError as error:
        raise RunDirError(f"run_dir={path}: cannot be created here ({error}); choose a writable run_dir") from error
    if not os.access(path, os.W_OK):
        raise RunDirError(f"run_dir={path}: is not writable by this user; choose a writable run_dir")
    return path


def _process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot, /proc/<pid>/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _me() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": _process_start(os.getpid()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')}"


class RunDirLock:
    def __init__(self, run_dir: Path, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.path = Path(run_dir) / LOCK
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.info = _me()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written, or torn by a crash: judged by its age alone

    def _stale(self, holder: dict) -> str | None:
        """Why the holder is certainly gone, or None."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "released"
        if holder.get("host") == self.info["host"] and isinstance(holder.get("pid"), int):
            pid = holder["pid"]
            if not _alive(pid):
                return f"pid {pid} is not running"
            started = _process_start(pid)
            if holder.get("process_start") and started and started != holder["process_start"]:
                return f"pid {pid} is another process now"
            return None
        me = self.info
        if (
            holder.get("slurm_job_id")
            and holder.get("slurm_job_id") == me["slurm_job_id"]
            and holder.get("slurm_restart_count") != me["slurm_restart_count"]
        ):
            return f"SLURM job {me['slurm_job_id']} was requeued (restart {me['slurm_restart_count']})"
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s"
        return None

    def acquire(self) -> RunDirLock:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue  # released meanwhile: try again
                reason = self._stale(holder)
                if reason is None:
                    raise RunDirError(
                        f"{self.path.parent} is in use by another run ({describe(holder)}; lock file {self.path}): "
                        "two runs on one run directory would corrupt its checkpoints and metrics. Wait for it to "
                        "end, or choose another run_dir; if that process is gone for sure, delete the lock file"
                    ) from None
                # Move the stale lock aside atomically: of two runs taking it over, one wins the O_EXCL.
                aside = self.path.with_name(f"{LOCK}.stale-{os.getpid()}")
                try:
                    os.replace(self.path, aside)
                    aside.unlink()
                except FileNotFoundError:
                    pass
                log.warning("%s: taking over the lock of %s (%s)", self.path, describe(holder), reason)
                print(f"warning: {self.path}: taking over the lock of {describe(holder)} ({reason})", flush=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.info))
                f.flush()
                os.fsync(f.fileno())
            self._thread = threading.Thread(target=self._heartbeat, name="run-dir-lock", daemon=True)
            self._thread.start()
            return self
        raise RunDirError(f"{self.path}: could not take the run directory lock (it keeps changing hands)")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        holder = self._read()
        if holder and holder.get("pid") == self.info["pid"] and holder.get("host") == self.info["host"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


CONFIG_FILE = "config.yaml"


def save_config(cfg, run_dir: Path) -> Path:
    """The run's resolved, typed config as <run_dir>/config.yaml, written (atomically) by rank 0 each
    time training starts in it: the config this start trains with. A RunDirError when it cannot be."""
    from omegaconf import OmegaConf

    from ouro_train.utils.atomic import atomic_write_text

    text = "# ouro-train: the resolved config this run trains with (rewritten at every start)\n"
    text += OmegaConf.to_yaml(OmegaConf.structured(cfg))
    try:
        return atomic_write_text(Path(run_dir) / CONFIG_FILE, text)
    except OSError as error:
        raise RunDirError(
            f"run_dir={run_dir}: cannot write {CONFIG_FILE} ({error}); choose a writable run_dir"
        ) from error


def remove_unused_run_dir(path: Path) -> None:
    """Remove a run directory that this command created and then refused to train in (bad input
    found after it was made): only while it holds nothing but config.yaml; rank 0 only."""
    if os.environ.get("RANK", "0") != "0" or not path.is_dir():
        return
    try:
        if {p.name for p in path.iterdir()} <= {CONFIG_FILE}:
            (path / CONFIG_FILE).unlink(missing_ok=True)
            path.rmdir()
    except OSError:
        pass  # another process writes there now: it is not ours to remove
