"""Where a training step's time goes: torch.profiler over a window of optimizer steps.

`StepProfiler` (set by `logging.profile_start`, `logging.profile_steps`, `logging.profile_ranks`)
traces the window after one warm-up step and writes, per profiled rank, into <run_dir>/profile/:

  * `steps_A-B.rankR.json.gz`: the trace, for https://ui.perfetto.dev or chrome://tracing, with
    the step's phases marked (`ouro/data`, `ouro/forward`, `ouro/backward`, `ouro/host_read`,
    `ouro/engine_step`, `ouro/callbacks`, `ouro/checkpoint`: `Trainer.phase`);
  * `steps_A-B.rankR.txt` (also printed) and `.json`: the breakdown. Device time by kind of
    kernel (matmul, attention, optimizer, communication, casts/copies, elementwise), the time the
    device was idle (the window's wall time less the union of its kernels' intervals), and the
    host's time per phase: a long `ouro/host_read` is the host waiting for the device (good: it
    was ahead); a long `ouro/data` or `ouro/callbacks` with an idle device is the host holding
    the device up.

On a CPU run the "device" is the host itself: kinds are aten ops and c10d collectives by self
time, and what no op accounts for (Python, the profiler, compiled C++ kernels) is shown as "not
in ops", not as idle.

The window is bracketed by two device synchronisations (before its first step, after its last),
so that no kernel of an earlier step is counted and none of the last is lost; steps outside the
window run unchanged and the phases are marked only inside it (`Trainer.profiling`).
`benchmarks/bench_mfu.py --profile` prints the same breakdown for the bare model's step.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ouro_train.train.trainer import Callback, Trainer

# Names of the step's phases as the trainer marks them (`Trainer.phase`), in step order.
PHASES = (
    "ouro/data",
    "ouro/forward",
    "ouro/backward",
    "ouro/host_read",
    "ouro/engine_step",
    "ouro/callbacks",
    "ouro/checkpoint",
)

# First match wins: communication before elementwise (an NCCL kernel's name says "Reduce"),
# attention before matmul (flash kernels are GEMMs too), casts before elementwise.
KINDS = (
    ("communication", ("nccl", "c10d::", "gloo", "allreduce", "all_reduce", "allgather", "all_gather", "scatter")),
    ("attention", ("flash", "attention", "fmha", "sdpa", "cudnn")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("matmul", ("gemm", "matmul", "aten::mm", "addmm", "bmm", "cutlass", "xmma", "nvjet", "cublas", "sm90")),
    ("casts/copies", ("copy", "_to_copy", "convert", "memcpy", "memset")),
    ("elementwise", ("triton", "elementwise", "vectorized", "reduce", "aten::")),
)


def kind_of(name: str) -> str:
    """The kind of a CUDA kernel or aten op, by its name (KINDS); "other" if none matches."""
    n = name.lower()
    return next((kind for kind, keys in KINDS if any(key in n for key in keys)), "other")


def union_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length of the union of (start, end) intervals: the time a device with several streams
    (compute, NCCL) was busy, overlapping kernels counted once."""
    total, reach = 0.0, -float("inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


@dataclass
class Breakdown:
    """A profiled window: `kinds` {kind: [microseconds, launches]} of device time (aten ops' self
    time on a CPU), `busy_us` their union (CUDA), `phases` {phase: host microseconds}."""

    device: str
    steps: int
    wall_us: float
    kinds: dict[str, list[float]] = field(default_factory=dict)
    busy_us: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def idle_us(self) -> float:
        return max(self.wall_us - self.busy_us, 0.0)

    def lines(self, title: str) -> list[str]:
        steps, wall = self.steps, self.wall_us
        per = lambda us: f"{us / 1e3 / steps:9.1f} ms {us / wall:6.1%}"  # noqa: E731
        cuda = self.device == "cuda"
        unit = "GPU time" if cuda else "CPU time in aten and c10d ops (self)"
        out = [f"{title}: {steps} step(s), {wall / 1e3 / steps:.1f} ms wall per step; {unit} by kind, per step:"]
        for kind, (us, launches) in sorted(self.kinds.items(), key=lambda kv: -kv[1][0]):
            out.append(f"  {kind:<14} {per(us)}  ({launches / steps:.0f} launches)")
        rest = "idle" if cuda else "not in ops"
        out.append(f"  {rest:<14} {per(self.idle_us)}")
        if self.phases:
            out.append("host time per phase, per step:")
            out += [f"  {name:<18} {per(us)}" for name, us in self.phases.items()]
        return out


def breakdown(events, wall_us: float, device: str, steps: int = 1) -> Breakdown:
    """The Breakdown of a profiler's events (`prof.events()`) over `wall_us` of `steps` steps."""
    result = Breakdown(device=device, steps=steps, wall_us=wall_us)
    intervals, phases = [], dict.fromkeys(PHASES, 0.0)
    events = list(events)
    cuda = torch.autograd.DeviceType.CUDA
    # A host range (record_function: ours, torch.compile's, the profiler's steps) has a device-side
    # twin of the same name spanning its kernels, idle gaps included: not a kernel. Kernels never
    # have a host event of their own name (the host side is cudaLaunchKernel).
    host_names = {event.name for event in events if event.device_type != cuda}
    for event in events:
        name = event.name
        on_device = event.device_type == cuda
        annotation = (
            getattr(event, "is_user_annotation", False)
            or name.startswith(("ouro/", "ProfilerStep"))
            or (on_device and name in host_names)
        )
        if annotation:
            if not on_device and name in phases:
                phases[name] += event.time_range.end - event.time_range.start
            continue
        if device == "cuda":
            if not on_device:
                continue
            us = event.device_time
            intervals.append((event.time_range.start, event.time_range.end))
        else:
            if not name.startswith(("aten::", "c10d::")):  # torch's ops and its collectives
                continue
            us = event.self_cpu_time_total
        entry = result.kinds.setdefault(kind_of(name), [0.0, 0])
        entry[0] += us
        entry[1] += 1
    result.busy_us = union_us(intervals) if device == "cuda" else sum(us for us, _ in result.kinds.values())
    result.phases = {name: us for name, us in phases.items() if us > 0}
    return result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepProfiler(Callback):
    """Profiles optimizer steps [start, start + steps) of this rank (1-based, as the metrics count
    them) after one warm-up step, then writes and prints the breakdown (module docstring). A run
    resumed past the window profiles nothing; one resumed inside it profiles the rest of it; one
    that ends inside it (a signal, a divergence) writes what it profiled."""

    order = Callback.SAVE + 10  # its step ends after every other callback's, a checkpoint's included

    def __init__(self, start: int, steps: int, out_dir: Path, rank: int, say=print) -> None:
        self.start, self.end = start, start + steps  # end exclusive
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.say = say
        self.prof: torch.profiler.profile | None = None
        self.first = self.start
        self.recording_since: float | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        upcoming = trainer.state.step + 1
        self.end = min(self.end, trainer.last_step_of_launch() + 1)  # a window past the end is cut there
        if upcoming >= self.end:
            return
        self.first = max(self.start, upcoming)
        warmup = 1 if self.first > upcoming else 0
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
        with warnings.catch_warnings():  # no warm-up step only where the window starts with the launch
            warnings.filterwarnings("ignore", message="Profiler won't be using warmup")
            steps = schedule(wait=self.first - upcoming - warmup, warmup=warmup, active=self.end - self.first, repeat=1)
        self.prof = profile(
            activities=activities, schedule=steps, on_trace_ready=lambda prof: self._write(prof, trainer)
        )
        if self.first == upcoming:  # recording starts with the first step: nothing queued before it
            synchronize(trainer.device)
        self.prof.start()
        self._arm(trainer, trainer.state.step)

    def _arm(self, trainer: Trainer, done: int) -> None:
        """After `done` steps: mark the next step's phases and time the window if it is profiled."""
        recording = self.first <= done + 1 < self.end
        if recording and self.recording_since is None:
            self.recording_since = time.perf_counter()
        trainer.profiling = recording

    def on_step_decision(self, trainer: Trainer, decision) -> None:
        """The last hook of a step (after any checkpoint it saved): a profiled step is its
        train_step, its callbacks and its save; an evaluation after it counts in the next one."""
        if self.prof is None:
            return
        step = trainer.state.step
        if step + 1 == self.first or step + 1 == self.end:
            # The window starts or ends with this step: let the device drain, so that the window's
            # kernels are exactly its own (and the last ones are in the trace).
            synchronize(trainer.device)
        self.prof.step()  # at the window's end this calls _write
        if step + 1 >= self.end:
            self._stop(trainer)
            return
        self._arm(trainer, step)

    def on_train_end(self, trainer: Trainer) -> None:
        """A run that ends inside the window (a signal, a divergence) writes what it profiled."""
        if self.prof is not None:
            synchronize(trainer.device)
            self._stop(trainer)

    def _stop(self, trainer: Trainer) -> None:
        prof, self.prof = self.prof, None
        trainer.profiling = False
        prof.stop()  # inside the window (still recording): calls _write

    def _write(self, prof, trainer: Trainer) -> None:
        """Writes and prints the window's files; a failure to write them (a full disk) is reported
        on stderr and training goes on: a diagnostic never takes the run down."""
        try:
            self._write_files(prof, trainer)
        except OSError as error:
            import sys

            print(
                f"warning: the profile of steps {self.first}.. could not be written to {self.out_dir} "
                f"({type(error).__name__}: {error}); training goes on",
                file=sys.stderr,
                flush=True,
            )

    def _write_files(self, prof, trainer: Trainer) -> None:
        wall_us = (time.perf_counter() - self.recording_since) * 1e6
        last = min(self.end - 1, trainer.state.step)  # the window, or as much of it as ran
        result = breakdown(prof.events(), wall_us, trainer.device.type, last - self.first + 1)
        stem = f"steps_{self.first}-{last}.rank{self.rank}"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"{stem}.json.gz"
        prof.export_chrome_trace(str(trace))
        title = f"profile of rank {self.rank}, steps {self.first}-{last}"
        lines = result.lines(title)
        (self.out_dir / f"{stem}.txt").write_text("\n".join(lines) + "\n")
        (self.out_dir / f"{stem}.json").write_text(json.dumps(asdict(result) | {"idle_us": result.idle_us}, indent=1))
        self.say("\n".join(lines) + f"\ntrace for https://ui.perfetto.dev: {trace}")
