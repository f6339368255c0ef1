"""logging.profile_*: torch.profiler over a window of optimizer steps (ouro_train/train/profiling.py)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ouro_train.config.schema import ConfigError, LoggingConfig
from ouro_train.train.profiling import StepProfiler, breakdown, kind_of, union_us
from ouro_train.train.trainer import Trainer

CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU


@pytest.mark.parametrize(
    "name, kind",
    [
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
        ("c10d::allreduce_", "communication"),
        ("flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "matmul"),
        ("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_NNT", "matmul"),
        ("aten::mm", "matmul"),
        ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
        ("Memcpy HtoD (Pinned -> Device)", "casts/copies"),
        ("aten::_to_copy", "casts/copies"),
        ("triton_poi_fused__to_copy_add_0", "casts/copies"),
        ("triton_red_fused_mul_rsqrt_sum_1", "elementwise"),
        ("aten::add_", "elementwise"),
        ("cudaLaunchKernel", "other"),
    ],
)
def test_kernels_and_ops_are_sorted_into_kinds(name, kind):
    assert kind_of(name) == kind


def test_busy_time_counts_overlapping_kernels_once():
    assert union_us([]) == 0
    assert union_us([(20, 30), (0, 10), (5, 15), (21, 22), (30, 31)]) == 26  # [0, 15] + [20, 31]


def _event(name, start, end, device=CUDA, annotation=False, self_us=None):
    return SimpleNamespace(
        name=name,
        device_type=device,
        time_range=SimpleNamespace(start=start, end=end),
        device_time=end - start,
        self_cpu_time_total=end - start if self_us is None else self_us,
        is_user_annotation=annotation,
    )


def test_the_breakdown_of_a_cuda_window():
    events = [
        _event("ouro/forward", 0, 40, CPU, annotation=True),
        _event("ouro/forward", 0, 40, CUDA, annotation=True),  # its GPU-side twin: not a kernel
        _event("## Call CompiledFxGraph fabc ##", 0, 100, CPU),  # torch.compile's range...
        _event("## Call CompiledFxGraph fabc ##", 5, 70, CUDA),  # ...and its twin, unflagged
        _event("ProfilerStep#3", 0, 100, CPU, annotation=True),
        _event("ouro/host_read", 40, 90, CPU, annotation=True),
        _event("cudaLaunchKernel", 1, 2, CPU),  # host side: not device time
        _event("sm90_xmma_gemm_bf16", 5, 35),
        _event("ncclDevKernel_AllReduce", 30, 50),  # overlaps the GEMM on another stream
        _event("triton_poi_fused_add_0", 60, 70),
    ]
    result = breakdown(events, wall_us=100, device="cuda", steps=1)
    assert result.kinds == {"matmul": [30, 1], "communication": [20, 1], "elementwise": [10, 1]}
    assert result.busy_us == 55 and result.idle_us == 45
    assert result.phases == {"ouro/forward": 40, "ouro/host_read": 50}
    text = "\n".join(result.lines("t"))
    assert "idle" in text and "45.0%" in text and "ouro/host_read" in text


def test_on_a_cpu_the_kinds_are_aten_ops_by_self_time():
    events = [
        _event("aten::mm", 0, 50, CPU, self_us=30),
        _event("aten::add", 0, 5, CPU),
        _event("c10d::allreduce_", 0, 4, CPU),
        _event("my_graph", 0, 9, CPU),
    ]
    result = breakdown(events, wall_us=100, device="cpu", steps=2)
    assert result.kinds == {"matmul": [30, 1], "elementwise": [5, 1], "communication": [4, 1]}
    assert result.idle_us == 61
    assert "not in ops" in "\n".join(result.lines("t")) and "idle" not in "\n".join(result.lines("t"))


class FakeTrainer:
    """What StepProfiler reads of a trainer, driven the way Trainer.fit drives callbacks."""

    def __init__(self, done: int, steps: int, max_steps_this_run: int | None = None) -> None:
        self.state = SimpleNamespace(step=done)
        self.resolved = SimpleNamespace(steps=steps)
        self.cfg = SimpleNamespace(train=SimpleNamespace(max_steps_this_run=max_steps_this_run))
        self.device = torch.device("cpu")
        self.profiling = False
        self.marked: list[int] = []  # steps whose phases were marked

    phase = Trainer.phase
    last_step_of_launch = Trainer.last_step_of_launch

    def fit(self, profiler: StepProfiler, stop_after: int | None = None) -> None:
        last = self.last_step_of_launch()
        profiler.on_train_start(self)
        x = torch.randn(32, 32)
        while self.state.step < last:
            if self.profiling:
                self.marked.append(self.state.step + 1)
            with self.phase("ouro/forward"):
                (x @ x).relu()
            self.state.step += 1
            if stop_after is not None and self.state.step == stop_after:
                break  # a signal: fit ends without the step decision
            profiler.on_step_decision(self, None)
        profiler.on_train_end(self)


def forward_marks(trace: Path) -> int:
    with gzip.open(trace, "rt") as f:
        return sum(event.get("name") == "ouro/forward" for event in json.load(f)["traceEvents"])


@pytest.mark.parametrize(
    "done, steps, start, count, max_steps, marked",
    [
        (0, 6, 3, 2, None, [3, 4]),  # a warm-up step (2) before the window
        (0, 6, 1, 2, None, [1, 2]),  # the window starts with the run: no warm-up
        (0, 6, 5, 4, None, [5, 6]),  # cut at the stage's end
        (0, 10, 3, 4, 4, [3, 4]),  # cut at train.max_steps_this_run
        (3, 6, 3, 2, None, [4]),  # resumed inside the window: the rest of it
        (4, 6, 3, 2, None, []),  # resumed past it: nothing
    ],
)
def test_the_window_is_profiled_and_nothing_else(tmp_path, done, steps, start, count, max_steps, marked):
    trainer = FakeTrainer(done, steps, max_steps)
    said = []
    profiler = StepProfiler(start, count, tmp_path / "profile", rank=0, say=said.append)
    trainer.fit(profiler)
    assert trainer.marked == marked and trainer.profiling is False
    if not marked:
        assert not (tmp_path / "profile").exists() and not said
        return
    stem = f"steps_{marked[0]}-{marked[-1]}.rank0"
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == [
        f"{stem}.{x}" for x in ("json", "json.gz", "txt")
    ]
    assert forward_marks(tmp_path / "profile" / f"{stem}.json.gz") == len(marked)
    summary = json.loads((tmp_path / "profile" / f"{stem}.json").read_text())
    assert summary["steps"] == len(marked) and summary["phases"]["ouro/forward"] > 0
    assert summary["kinds"]["matmul"][1] == 2 * len(marked)  # aten::matmul and its aten::mm, per step
    assert said and f"steps {marked[0]}-{marked[-1]}" in said[0]


def test_a_run_stopped_inside_the_window_writes_what_it_profiled(tmp_path):
    trainer = FakeTrainer(0, 8)
    trainer.fit(StepProfiler(2, 4, tmp_path / "profile", rank=0), stop_after=3)
    assert trainer.marked == [2, 3] and trainer.profiling is False
    assert forward_marks(tmp_path / "profile" / "steps_2-3.rank0.json.gz") == 2
    assert json.loads((tmp_path / "profile" / "steps_2-3.rank0.json").read_text())["steps"] == 2


def test_a_run_stopped_before_the_window_writes_nothing(tmp_path):
    trainer = FakeTrainer(0, 8)
    trainer.fit(StepProfiler(4, 2, tmp_path / "profile", rank=0), stop_after=3)  # in the warm-up step
    assert trainer.marked == [] and not (tmp_path / "profile").exists()


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"profile_start": 0}, "logging.profile_start"),
        ({"profile_steps": 0}, "logging.profile_steps"),
        ({"profile_ranks": [-1]}, "logging.profile_ranks"),
    ],
)
def test_a_bad_profile_setting_names_its_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        LoggingConfig(**overrides)


def _stage(tmp: Path, run: str, *overrides: str) -> Path:
    from cli_runs import TINY

    from ouro_train.config.store import compose_config
    from ouro_train.train.stage import run_stage

    os.environ["OURO_CACHE_DIR"] = str(tmp / "cache")
    common = [*TINY, "logging.wandb=false", "logging.console=false", "train.steps=4", "train.global_batch_size=4"]
    run_stage(compose_config([*common, f"run_dir={tmp / run}", *overrides]))
    return tmp / run


def _losses(run: Path) -> list[float]:
    return [
        json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"grad_norm"' in line
    ]


def test_a_profiled_stage_trains_exactly_as_an_unprofiled_one(tmp_path):
    profiled = _stage(tmp_path, "profiled", "logging.profile_start=2", "logging.profile_steps=2")
    plain = _stage(tmp_path, "plain")
    assert _losses(profiled) == _losses(plain) and len(_losses(plain)) == 4
    assert not (plain / "profile").exists()
    # micro-batch 2 of a 4-row batch: 2 forwards per step, in the 2 profiled steps only
    assert forward_marks(profiled / "profile" / "steps_2-3.rank0.json.gz") == 4
    text = (profiled / "profile" / "steps_2-3.rank0.txt").read_text()
    for phase in ("ouro/data", "ouro/forward", "ouro/backward", "ouro/host_read", "ouro/engine_step"):
        assert phase in text


def test_a_profiled_rank_that_does_not_exist_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"logging\.profile_ranks.*\[1\].*world of 1"):
        _stage(tmp_path, "run", "logging.profile_start=1", "logging.profile_ranks=[1]")


def test_a_profile_that_cannot_be_written_is_reported_and_training_goes_on(tmp_path, capsys):
    blocked = tmp_path / "a_file"
    blocked.write_text("")  # the profile directory would be inside a file: mkdir fails
    trainer = FakeTrainer(0, 4)
    trainer.fit(StepProfiler(2, 1, blocked / "profile", rank=0))
    assert trainer.state.step == 4 and trainer.marked == [2]
    assert "could not be written" in capsys.readouterr().err
