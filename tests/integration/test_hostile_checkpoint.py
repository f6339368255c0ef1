"""A real ZeRO-1 checkpoint (2 gloo processes, 2 steps) whose engine file is replaced by one that
would run `touch <marker>` if unpickled fully, as DeepSpeed 0.19.8 does (torch.load with
weights_only=False). Resuming refuses it, names the file and the way out, and the marker never
appears: at the saved layout (DeepSpeed's load_checkpoint) and at another world size (DeepSpeed's
ds_to_universal, also when the file changes after the check, in forked workers). With
checkpoint.trust_engine_files=true the benign original still loads.
"""

import shutil
import subprocess
from pathlib import Path

import pytest
from cli_runs import TINY, run_cli
from hostile_pickles import hostile_pickle, replace_pickle

pytestmark = pytest.mark.slow  # CLI subprocesses on 1 and 2 processes

COMMON = [*TINY, "train.steps=3", "train.global_batch_size=4", "parallel.zero_stage=1"]
STATE = Path("engine") / "state"


def launch(nproc: int, tmp: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_cli(
        tmp,
        f"run_dir={run_dir}",
        *COMMON,
        *overrides,
        nproc=nproc,
        check=False,
        env={"DS_ACCELERATOR": "cpu"},
        timeout=300,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A 2-process ZeRO-1 checkpoint after 2 of 3 steps."""
    tmp = tmp_path_factory.mktemp("hostile")
    done = launch(2, tmp, tmp / "run", "train.max_steps_this_run=2")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    checkpoint = tmp / "run" / "checkpoints" / "step_00000002"
    assert (checkpoint / STATE / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    return checkpoint


def copy_with_hostile(saved: Path, tmp: Path, name: str, spelling: str) -> tuple[Path, Path, Path]:
    """-> (checkpoint copy, the replaced file, marker)."""
    checkpoint = tmp / "checkpoints" / saved.name
    shutil.copytree(saved, checkpoint)
    marker = tmp / "payload-ran"
    replace_pickle(checkpoint / STATE / name, hostile_pickle(spelling, "top_level", marker))
    return checkpoint, checkpoint / STATE / name, marker


def assert_refused(done: subprocess.CompletedProcess, path: Path, refused: str) -> None:
    assert done.returncode != 0, done.stdout[-2000:]
    assert f"{path}: refused by torch's weights-only unpickler" in done.stderr, done.stderr[-4000:]
    assert refused in done.stderr and "checkpoint.trust_engine_files=true" in done.stderr


def test_same_layout_resume_refuses_a_hostile_engine_file(saved, tmp_path):
    checkpoint, path, marker = copy_with_hostile(saved, tmp_path, "mp_rank_00_model_states.pt", "memo")
    done = launch(2, saved.parents[2], tmp_path / "resumed", f"checkpoint.resume={checkpoint}")
    assert not marker.exists(), "the payload ran"
    assert_refused(done, path, "STACK_GLOBAL")


def test_resume_at_another_world_size_refuses_it_before_converting(saved, tmp_path):
    """1 process from 2: the universal conversion (ds_to_universal) would unpickle every engine file."""
    checkpoint, path, marker = copy_with_hostile(saved, tmp_path, "zero_pp_rank_1_mp_rank_00_optim_states.pt", "global")
    done = launch(1, saved.parents[2], tmp_path / "one", f"checkpoint.resume={checkpoint}")
    assert not marker.exists(), "the payload ran"
    assert_refused(done, path, "posix.system")
    assert not (checkpoint / "universal").exists()


def test_the_restricted_conversion_of_the_benign_original_in_forked_workers(saved, tmp_path):
    from ouro_train.checkpoint import universal

    universal._convert(saved / STATE, tmp_path / "universal", workers=2)
    assert (tmp_path / "universal" / "zero" / "optimizer_state.pt").is_file()


FORK_AFTER_OPENMP = """
import sys
from pathlib import Path

import torch

torch.set_num_threads(2)
(torch.randn(4_000_000) * 2).sum()  # a parallel region: OpenMP's thread pool exists in this process now
from ouro_train.checkpoint import universal

universal._convert(Path(sys.argv[1]), Path(sys.argv[2]), workers=2)
print("converted")
"""


def test_forked_conversion_workers_do_not_hang_after_the_parent_used_openmp_threads(saved, tmp_path):
    """A trainer has run multi-threaded torch ops before it converts: GNU OpenMP's thread pool does
    not survive fork, and a forked worker's first parallel op (a tensor clone) waited forever."""
    import os
    import signal
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", FORK_AFTER_OPENMP, str(saved / STATE), str(tmp_path / "universal")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the conversion's forked workers hung (fork after OpenMP threads ran)")
    assert proc.returncode == 0 and "converted" in out, err[-3000:]


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_the_conversion_itself_is_weights_only_in_its_workers(saved, tmp_path, monkeypatch, name):
    """A file replaced after the check (the check skipped here) is still refused, also in the
    conversion's forked extraction workers (rank 1's shard is read only there)."""
    from ouro_train.checkpoint import safety, universal
    from ouro_train.checkpoint.errors import CheckpointError

    checkpoint, path, marker = copy_with_hostile(saved, tmp_path, name, "global")
    monkeypatch.setattr(safety, "verify_engine_files", lambda directory: None)
    with pytest.raises(CheckpointError) as refused:
        universal._convert(checkpoint / STATE, tmp_path / "universal", workers=2)
    assert not marker.exists(), "the payload ran"
    message = str(refused.value)
    assert str(checkpoint / STATE) in message and "refused by torch's weights-only unpickler" in message
    assert "posix.system" in message and "checkpoint.trust_engine_files=true" in message
    # The model states are read in this process (the file is named); rank 1's shard only in a
    # worker, whose traceback does not come back (the directory is named).
    assert message.startswith(str(path) if name.startswith("mp_rank") else f"a file under {checkpoint / STATE}")


@pytest.mark.parametrize("trust", ["false", "true"])
def test_the_benign_original_resumes_at_the_same_layout(saved, tmp_path, trust):
    """Untrusted: DeepSpeed's ZeRO-1 files (LossScaler, ZeroStageEnum, fragment_address inside) load
    with the weights-only unpickler. Trusted (checkpoint.trust_engine_files=true): no restriction."""
    checkpoint = tmp_path / "checkpoints" / saved.name
    shutil.copytree(saved, checkpoint)
    run = tmp_path / "resumed"
    done = launch(2, saved.parents[2], run, f"checkpoint.resume={checkpoint}", f"checkpoint.trust_engine_files={trust}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "at step 2" in done.stdout and (run / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
