"""launch/slurm.sbatch on a real SLURM cluster: two fake nodes on this machine (tests/slurm/cluster.sh).

Run by `make test-slurm` only (tests/slurm/run.sh starts the cluster and sets OURO_SLURM_CLUSTER);
`make test` skips these. Every job is the tiny model on CPU (gloo), wandb on in offline mode (the
script's default), submitted with the script's own #SBATCH header, overriding only what a small
machine needs (--cpus-per-task, --nodes, --time...). The tests run side by side (pytest -n) and
poll files and job states with deadlines; none sleeps a fixed time except to see that a job stays
ended.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "launch" / "slurm.sbatch"
CLUSTER = os.environ.get("OURO_SLURM_CLUSTER", "")

pytestmark = [
    pytest.mark.skipif(
        not CLUSTER, reason="needs a SLURM cluster: `make test-slurm` starts one (OURO_SLURM_CLUSTER is unset)"
    ),
    pytest.mark.slow,  # SLURM jobs
]

TINY = [
    "train.seq_len=32",
    "train.micro_batch_size=2",
    "train.eval_batches=1",
    "model.vocab_size=512",
    "data.tokenizer_vocab_size=512",
    "logging.progress_bar=false",
]
ENDED = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
STARTUP = 240  # seconds for a job to start training (imports of torch, DeepSpeed, megatron on 2 busy cores)


@pytest.fixture(scope="session")
def submit_dir(tmp_path_factory) -> Path:
    """The submit directory: slurm-<name>-<job>.out and runs/<name>/ are written here."""
    path = tmp_path_factory.mktemp("slurm")
    cache = path / "cache"
    # The demo tokenizer, trained once here rather than by several jobs at the same moment.
    env = os.environ | {"OURO_CACHE_DIR": str(cache)}
    code = "from ouro_train.data.tokenizer import load_or_train_demo_tokenizer as f; f(512)"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=ROOT)
    return path


class Job:
    def __init__(self, submit_dir: Path, name: str, options: list[str], overrides: list[str], env: dict | None = None):
        self.dir = submit_dir
        self.name = name
        self.run_dir = submit_dir / "runs" / name
        job_env = os.environ | {
            "SLURM_CONF": f"{CLUSTER}/etc/slurm.conf",
            "PYTHON": sys.executable,
            "OURO_CACHE_DIR": str(submit_dir / "cache"),
            "OMP_NUM_THREADS": "1",  # two cores shared by every job here
            **(env or {}),
        }
        command = ["sbatch", "--parsable", f"--job-name={name}", "--cpus-per-task=2", *options, str(SBATCH)]
        out = subprocess.run(
            [*command, *TINY, *overrides],
            cwd=submit_dir,
            env=job_env,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        self.id = out.stdout.strip().split(";")[0]
        self.output = submit_dir / f"slurm-{name}-{self.id}.out"

    @classmethod
    def submitted(cls, submit_dir: Path, name: str, job_id: str, run_dir: Path, output: Path) -> Job:
        """A job submitted by someone else (ouro-pipeline launch=slurm)."""
        job = cls.__new__(cls)
        job.dir, job.name, job.id, job.run_dir, job.output = submit_dir, name, job_id, run_dir, output
        return job

    def info(self) -> dict[str, str]:
        out = subprocess.run(["scontrol", "-o", "show", "job", self.id], capture_output=True, text=True)
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def state(self) -> str:
        """squeue's state while SLURM still holds the job (PENDING, RUNNING, COMPLETING...), then the final one."""
        out = subprocess.run(["squeue", "-h", "-j", self.id, "-o", "%T"], capture_output=True, text=True)
        return out.stdout.strip() or self.info().get("JobState", "")

    def log(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def steps(self) -> list[int]:
        from ouro_train.train.report import read_metrics

        path = self.run_dir / "metrics.jsonl"
        return [r["step"] for r in read_metrics(path)[0]] if path.exists() else []

    def wait(self, condition, what: str, timeout: float, after_end: bool = False) -> None:
        """Poll `condition` until it holds; fail at the deadline, or as soon as the job has ended
        without it (unless `after_end`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ended = not after_end and self.state() in ENDED
            if condition():
                return
            if ended:
                break
            time.sleep(0.3)
        why = "and the job has ended" if time.monotonic() < deadline else f"within {timeout:.0f} s"
        lines = [line for line in self.log().splitlines() if not line.startswith(("[", "  ", "/"))]
        tail = "\n".join(lines)[-4000:]
        pytest.fail(f"job {self.id} ({self.name}): no {what} {why}; {self.info()}\n{tail}")

    def wait_done(self, timeout: float = 2 * STARTUP) -> str:
        """-> the final state, once the batch script has ended and SLURM will not start it again."""
        self.wait(lambda: self.state() in ENDED, "end", timeout)
        return self.state()

    def wait_steps(self, count: int) -> None:
        self.wait(lambda: len(self.steps()) >= count, f"{count} training steps in metrics.jsonl", STARTUP)

    def checkpoint_step(self) -> int:
        latest = self.run_dir / "checkpoints" / "latest"
        return int(latest.read_text().strip().removeprefix("step_")) if latest.exists() else 0

    def stays(self, state: str, restarts: str, seconds: float = 12.0) -> None:
        """Still `state` with `restarts` restarts after SLURM's requeue delay (cred_expire=5 s) has passed."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            info = self.info()
            assert (info.get("JobState"), info.get("Restarts")) == (state, restarts), info
            time.sleep(0.5)


def losses(job: Job) -> list[float]:
    from ouro_train.train.report import read_metrics

    return [r["loss"] for r in read_metrics(job.run_dir / "metrics.jsonl")[0]]


def test_stage_finishes_on_one_node_and_on_two_nodes_with_the_same_losses(submit_dir):
    # One node, two processes: one per (fake) GPU that --gpus-per-node gave it.
    one = Job(submit_dir, "one-node", ["--nodes=1", "--gpus-per-node=2"], ["train.steps=30"])
    # Two nodes, one process each (NPROC_PER_NODE), a rendezvous across them.
    two = Job(submit_dir, "two-nodes", ["--nodes=2"], ["train.steps=30"], env={"NPROC_PER_NODE": "1"})
    assert one.wait_done() == "COMPLETED", one.log()[-3000:]
    assert two.wait_done() == "COMPLETED", two.log()[-3000:]
    assert "on 1 nodes x 2 processes (CPU)" in one.log() and "on 2 nodes x 1 processes (CPU)" in two.log()
    for job in (one, two):
        assert "world 2 = tensor parallel 1 x data parallel 2" in job.log()
        assert "stage finished: final checkpoint at step 30" in job.log()
        assert job.steps() == list(range(1, 31))
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)


def signalled_after_3_steps(submit_dir: Path, name: str, steps: int, *command: str) -> Job:
    """A one-node job of `steps` steps, to which `command` (scontrol / scancel, the job id appended)
    is sent once it has logged 3 steps."""
    job = Job(submit_dir, name, ["--nodes=1"], [f"train.steps={steps}"])
    job.wait_steps(3)
    subprocess.run([*command, job.id], check=True)
    return job


def test_scontrol_requeue_with_wandb_saves_requeues_and_logs_every_step_once(submit_dir):
    job = signalled_after_3_steps(submit_dir, "requeue", 300, "scontrol", "requeue")
    # SLURM's TERM reaches every process of the step, wandb's service too: rank 0 must still save.
    assert job.wait_done() == "COMPLETED", job.log()[-3000:]
    log = job.log()
    assert job.info()["Restarts"] == "1"
    assert "warning: wandb" in log and "continuing without wandb" in log
    saved = re.search(r"stopped by signal 15 after step (\d+)", log)
    assert saved, log[-3000:]
    assert f"resumed from {job.run_dir}/checkpoints/step_{int(saved[1]):08d} at step {saved[1]}" in log
    assert job.steps() == list(range(1, 301))  # every step logged exactly once


def test_time_limit_lead_saves_and_requeues_and_scancel_then_cancels(submit_dir):
    # --time=3 minutes and USR1 60 s before: SLURM checks limits every 30 s and signals once
    # fewer than lead + 30 s are left, so at 90-120 s; 100,000 steps would run far past the limit.
    job = Job(
        submit_dir,
        "time-limit",
        ["--nodes=1", "--time=3", "--signal=B:USR1@60"],
        ["train.steps=100000"],
        env={"SIGNAL_LEAD": "60"},
    )
    job.wait(lambda: "resumed from" in job.log(), "requeue and resume after the time-limit signal", 3 * STARTUP)
    log = job.log()
    assert re.search(r"USR1 received \((1:[0-3]\d|[0-5]\d) left\)", log), log[-3000:]
    saved = re.search(r"saved at step (\d+); requeueing job", log)
    assert saved and f"at step {saved[1]}" in log.split("resumed from")[1].splitlines()[0]
    assert job.info()["Restarts"] == "1"
    resumed_at = int(saved[1])
    job.wait(lambda: max(job.steps(), default=0) > resumed_at + 2, "steps after the resume", STARTUP)
    # A plain scancel cancels: TERM to every process, the ranks save, SLURM ends the job.
    subprocess.run(["scancel", job.id], check=True)
    assert job.wait_done(60) == "CANCELLED"
    job.wait(lambda: "stopped by TERM" in job.log(), "end of the batch script", 60, after_end=True)
    assert job.checkpoint_step() > resumed_at  # saved at the TERM
    assert job.checkpoint_step() == job.steps()[-1]
    job.stays("CANCELLED", "1")  # not requeued


def test_scancel_usr1_to_the_batch_script_saves_and_requeues(submit_dir):
    job = signalled_after_3_steps(submit_dir, "usr1-batch", 300, "scancel", "--signal=USR1", "--batch")
    assert job.wait_done() == "COMPLETED", job.log()[-3000:]
    log = job.log()
    assert job.info()["Restarts"] == "1"
    saved = re.search(r"saved at step (\d+); requeueing job", log)
    assert saved, log[-3000:]
    assert f"step_{int(saved[1]):08d} at step {saved[1]}" in log
    assert job.steps() == list(range(1, 301))


def test_scancel_usr1_to_the_steps_saves_and_ends_without_requeue(submit_dir):
    job = signalled_after_3_steps(submit_dir, "usr1-steps", 100000, "scancel", "--signal=USR1")
    assert job.wait_done() == "FAILED", job.log()[-3000:]
    info = job.info()
    assert info["ExitCode"] == "75:0"
    assert "stopped by signal 10" in job.log()
    assert job.checkpoint_step() == job.steps()[-1] >= 3
    job.stays("FAILED", "0")


def test_signal_lead_not_below_the_time_limit_fails_before_training(submit_dir):
    job = Job(submit_dir, "bad-lead", ["--nodes=1", "--time=1"], ["train.steps=10"])  # lead 300 s, limit 60 s
    assert job.wait_done(60) == "FAILED"
    assert job.info()["ExitCode"] == "2:0"
    assert "SIGNAL_LEAD=300 s (--signal=B:USR1@300) is not smaller than the time limit --time=1:00" in job.log()
    assert not (job.run_dir / "metrics.jsonl").exists()


def test_pipeline_stages_run_as_chained_jobs_one_requeued_the_next_from_its_final_checkpoint(submit_dir):
    """ouro-pipeline launch=slurm: tests/slurm/pipeline_tiny.yaml's two stages (200 and 10 steps) as
    two jobs of launch/slurm.sbatch, the second after the first (afterok); the first requeued after
    3 steps resumes, and the second starts from its final checkpoint."""
    run_dir = submit_dir / "runs" / "pipeline"
    env = os.environ | {
        "SLURM_CONF": f"{CLUSTER}/etc/slurm.conf",
        "OURO_CACHE_DIR": str(submit_dir / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "ouro_train.cli.pipeline", f"pipeline={ROOT / 'tests/slurm/pipeline_tiny.yaml'}"]
    command += [f"run_dir={run_dir}", "launch=slurm", "sbatch=--nodes=1 --cpus-per-task=2"]
    out = subprocess.run(command, cwd=submit_dir, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    ids = dict(re.findall(r"^\[pipeline\] (\w+): job (\d+): ", out.stdout, re.M))
    assert list(ids) == ["first", "second"], out.stdout
    first, second = (
        Job.submitted(submit_dir, name, ids[name], run_dir / name, run_dir / f"slurm-tiny-{name}-{ids[name]}.out")
        for name in ("first", "second")
    )
    assert second.info()["Dependency"].startswith(f"afterok:{first.id}")
    first.wait_steps(3)
    subprocess.run(["scontrol", "requeue", first.id], check=True)
    assert first.wait_done() == "COMPLETED", first.log()[-3000:]
    assert first.info()["Restarts"] == "1"
    assert "resumed from" in first.log() and first.steps() == list(range(1, 201))
    assert second.wait_done() == "COMPLETED", second.log()[-3000:]
    final = run_dir / "first" / "checkpoints" / "step_00000200"
    assert f"initialised weights from {final}" in second.log()
    assert second.steps() == list(range(1, 11))
    assert "stage finished: final checkpoint at step 10" in second.log()
    # Submitting again: every stage is finished, nothing is submitted.
    again = subprocess.run(command, cwd=submit_dir, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stdout + again.stderr
