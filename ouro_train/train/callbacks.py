"""Side effects of training as callbacks: console lines, a progress bar, a JSONL metrics file."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path

from tqdm import tqdm

from ouro_train.train.trainer import Callback, Trainer


def clock(seconds: float) -> str:
    """H:MM:SS."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


# The console line names the host's wait for the data where it is at least this share of the step
# (the metrics hold it at every step: `data_wait_s`); more loader workers (`data.num_workers`) help.
DATA_WAIT_SHOWN = 0.05


def format_metrics(metrics: dict) -> str:
    """One console line, made for a log file as much as a terminal: step (of the total), loss, CE
    and exit probability per recurrent step, entropy, grad norm, lr, tokens/s, TFLOP/s per device
    and MFU (where the peak is known), peak memory, tokens seen and the ETA of the stage."""
    prefix = "eval/" if any(key.startswith("eval/") for key in metrics) else ""
    get = lambda key: metrics.get(prefix + key)  # noqa: E731
    steps = sorted(int(key[len(prefix) + 7 :]) for key in metrics if key.startswith(prefix + "ce_step"))
    parts = [f"{'eval ' if prefix else ''}step {metrics['step']}", f"loss {get('loss'):.4f}"]
    parts.append("ce/step " + " ".join(f"{get(f'ce_step{t}'):.3f}" for t in steps))
    parts.append("p(t) " + " ".join(f"{get(f'p_step{t}'):.2f}" for t in steps))
    parts.append(f"H {get('entropy'):.3f}")
    if not prefix:
        grad_norm = metrics.get("grad_norm")
        parts.append(f"gnorm {grad_norm:.3f}" if grad_norm is not None and math.isfinite(grad_norm) else "gnorm -")
        parts.append(f"lr {metrics['lr']:.2e}")
        parts.append(f"{metrics['tokens_per_s'] / 1e3:.1f}k tok/s")
        wait, step_time = metrics.get("data_wait_s"), metrics.get("step_time_s")
        if wait is not None and step_time and wait >= DATA_WAIT_SHOWN * step_time:
            parts.append(f"data wait {wait / step_time:.0%}")  # the loader may be the bottleneck
        if "tflops_per_device" in metrics:
            parts.append(f"{metrics['tflops_per_device']:.3g} TFLOP/s")
    if "mfu" in metrics:
        parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
    if not prefix:
        if "peak_memory_gib" in metrics:
            parts.append(f"mem {metrics['peak_memory_gib']:.2f} GiB")
        if "tokens" in metrics:
            parts.append(f"{_count(metrics['tokens'])} tokens")
        if "eta_s" in metrics:
            parts.append(f"ETA {clock(metrics['eta_s'])} ({metrics['step']}/{metrics['steps_total']})")
    if metrics.get("skipped"):
        reason = metrics["skip_reason"].replace("_", " ")
        parts.append(f"update SKIPPED ({reason}; {metrics['guard/skipped_steps']} so far)")
    return " | ".join(parts)


class ConsoleLogger(Callback):
    """A line every `every` steps (and the first, and every skipped one); the tqdm bar only on a
    terminal: in a redirected log (a SLURM output file) its carriage-return frames are noise."""

    def __init__(self, every: int, progress_bar: bool = True) -> None:
        self.every = every
        self.progress_bar = progress_bar and sys.stderr.isatty()
        self.bar: tqdm | None = None

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)  # keeps the bar intact below the line
        else:
            print(line, flush=True)

    def on_train_start(self, trainer: Trainer) -> None:
        if self.progress_bar:
            total = trainer.resolved.steps
            self.bar = tqdm(total=total, initial=trainer.state.step, desc="train", unit="step", dynamic_ncols=True)

    def on_step_end(self, trainer: Trainer, metrics: Mapping) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
        if metrics["step"] % self.every == 0 or metrics["step"] == 1 or metrics.get("skipped"):
            self._write(format_metrics(metrics))

    def on_eval_end(self, trainer: Trainer, metrics: Mapping) -> None:
        self._write(format_metrics(metrics))

    def on_train_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class JsonlLogger(Callback):
    """Appends one JSON object per step (and per evaluation) to `path`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_start(self, trainer: Trainer) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _append(self, record: Mapping) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(dict(record)) + "\n")

    def on_step_end(self, trainer: Trainer, metrics: Mapping) -> None:
        self._append(metrics)

    def on_eval_end(self, trainer: Trainer, metrics: Mapping) -> None:
        self._append(metrics)


# Dense bf16 peak per device (vendor datasheets, without sparsity), for MFU.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def peak_tflops(configured: float | None, device: str) -> float | None:
    if configured is not None:
        return configured
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


class Throughput(Callback):
    """Achieved TFLOP/s per device and, where the device's peak is known, MFU: metrics derived
    from each step's, which the loggers then see. FLOPs per token count all R recurrent steps,
    forward + backward (3x forward; recomputation not counted), as in ouro_train/model/flops.py.
    Also this process's peak memory (CUDA: allocated by torch; CPU: resident set) and the ETA of
    the stage (the mean step time of this launch times the steps left)."""

    order = Callback.METRICS

    def __init__(self, train_flops_per_token: float, world_size: int, peak: float | None) -> None:
        self.flops_per_token = train_flops_per_token
        self.world_size = world_size
        self.peak = peak
        self.timed = (0.0, 0)  # (seconds, steps) after the first step of this launch
        self.seen = False

    def step_metrics(self, trainer: Trainer, metrics: Mapping) -> dict:
        achieved = self.flops_per_token * metrics["tokens_per_s"] / self.world_size / 1e12
        out = {"tflops_per_device": achieved} | ({"mfu": achieved / self.peak} if self.peak else {})
        # The mean step time of this launch after its first step (which compiles and warms up).
        self.timed = (self.timed[0] + metrics["step_time_s"], self.timed[1] + 1) if self.seen else (0.0, 0)
        self.seen = True
        mean = self.timed[0] / self.timed[1] if self.timed[1] else metrics["step_time_s"]
        total = trainer.resolved.steps
        out |= {
            "steps_total": total,
            "eta_s": max(total - metrics["step"], 0) * mean,
            "peak_memory_gib": peak_memory_gib(trainer.device),
        }
        return out


def peak_memory_gib(device) -> float:
    """Peak memory of this process so far: torch's CUDA allocator peak, or the resident set's."""
    import torch

    if getattr(device, "type", device) == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class WandbLogger(Callback):
    """One wandb run per stage, grouped by pipeline; offline unless configured (rank 0 only).

    Logging never takes the training (or the checkpoint a signal asks for) down with it: wandb
    writes through a service process (wandb-core), and a scheduler's SIGTERM reaches every
    process of a job step, that one included (SLURM's scancel / requeue / preemption), so the next
    `log` raises (ConnectionResetError). A failed log or finish is reported once, on stderr, and
    the run carries on without wandb; metrics.jsonl still has every step. (wandb starts its
    service in a session of its own, so a signal to the trainer's process group, e.g. torchrun
    forwarding it, does not reach it; a SLURM step signals each of its processes.)"""

    def __init__(self, cfg, run_dir: Path, config: dict) -> None:
        import os

        import wandb

        log = cfg.logging
        mode = os.environ.get("WANDB_MODE", log.wandb_mode)
        self.failure: str | None = None  # what went wrong, once wandb is given up
        self.run = wandb.init(
            project=log.wandb_project,
            group=log.wandb_group or run_dir.name,
            name=cfg.stage_name,
            job_type=cfg.stage_name,
            dir=str(run_dir),
            config=config,
            mode=mode,
            resume="allow",
            id=_stable_run_id(run_dir),
            settings=wandb.Settings(quiet=True, console="off"),
        )

    def _guarded(self, what: str, call) -> None:
        if self.run is None:  # given up after an earlier failure (or finished)
            return
        try:
            call()
        except Exception as error:  # noqa: BLE001 -- whatever wandb raises, training goes on
            self._give_up(what, error)

    def _give_up(self, what: str, error: BaseException) -> None:
        import sys

        self.run = None
        self.failure = f"{what}: {type(error).__name__}: {error}"
        print(
            f"warning: wandb {what} failed ({type(error).__name__}: {error}); continuing without wandb "
            "(metrics.jsonl still logs every step). Its service process has probably been stopped, e.g. "
            "by a SIGTERM that SLURM sends to every process of the job step.",
            file=sys.stderr,
            flush=True,
        )
        try:  # drop wandb's connection and its exit hook, which would fail the same way at exit
            import wandb

            wandb.teardown()
        except (Exception, SystemExit):  # noqa: BLE001 -- teardown re-raises the broken connection
            pass

    def on_step_end(self, trainer: Trainer, metrics: Mapping) -> None:
        record = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        self._guarded(f"log of step {metrics['step']}", lambda: self.run.log(record, step=metrics["step"]))

    def on_eval_end(self, trainer: Trainer, metrics: Mapping) -> None:
        record = {k: v for k, v in metrics.items() if k != "step"}
        self._guarded(f"log of the eval at step {metrics['step']}", lambda: self.run.log(record, step=metrics["step"]))

    def on_train_end(self, trainer: Trainer) -> None:
        if getattr(trainer, "stopped_by_signal", None) is not None:
            # The checkpoint the signal asks for comes first: finish (which may wait for uploads)
            # at exit, after the save.
            import atexit

            atexit.register(self._finish)
            return
        self._finish()

    def _finish(self) -> None:
        self._guarded("finish", lambda: self.run.finish())
        self.run = None


def _stable_run_id(run_dir: Path) -> str:
    """The same wandb run id for every restart of one run directory (a resumed stage continues its run)."""
    import hashlib

    return hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
