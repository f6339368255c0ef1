"""What the `make repro-*` commands share (data_tools/repro_mano.py, data_tools/repro_depth.py):
running the `ouro-train` trainings of a comparison side by side with their logs, reading back each
run's facts (steps, tokens, learning rate, time), and the evaluation of a trained checkpoint on a
held-out test set whose answer is one token: exact-match accuracy grouped by the task's difficulty
knob (Mano's operations, the chains' hops), after every recurrent step and at the Q-exit (the first
step t whose exit CDF(t) = 1 - prod_{j<=t} (1 - lambda_j) reaches q, from the full forward's gates)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TRAIN = [sys.executable, "-m", "ouro_train.cli.train"]


def train_all(commands: dict[str, list], run_dir: Path, jobs: int, device: str = "cpu") -> dict[str, float]:
    """The `ouro-train` runs, `jobs` at a time, each with torch on one thread when jobs > 1 on the
    CPU (tiny models: two one-thread runs use 2 cores better than one two-thread run); output in
    <run_dir>/<name>.log. -> wall seconds per run."""
    env = os.environ | {"WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "PYTHONUNBUFFERED": "1"}
    if jobs > 1 and device == "cpu":
        env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending = list(commands.items())
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    seconds: dict[str, float] = {}
    while pending or running:
        while pending and len(running) < jobs:
            name, command = pending.pop(0)
            log_path = run_dir / f"{name}.log"
            print(f"$ ouro-train {' '.join(command[len(TRAIN) :])}  (log: {log_path})", flush=True)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "w")
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            running[name] = (process, time.monotonic(), log)
        time.sleep(0.5)
        for name, (process, started, log) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            del running[name]
            tail = (run_dir / f"{name}.log").read_text().splitlines()[-3:]
            if process.returncode != 0:
                for other, _, _ in running.values():
                    other.terminate()
                raise RuntimeError(f"{name}: ouro-train exited with {process.returncode}:\n" + "\n".join(tail))
            seconds[name] = time.monotonic() - started
            print(f"{name}: trained in {seconds[name]:.0f} s; " + " / ".join(tail[-2:]), flush=True)
    return seconds


def final_checkpoint(run_dir: Path) -> Path:
    from ouro_train.checkpoint.store import find_latest

    found = find_latest(run_dir / "checkpoints")
    if found is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint; train it first")
    return found


def answer_accuracy(
    checkpoint: Path,
    tokens: np.ndarray,
    where: np.ndarray,
    groups: np.ndarray,
    key: str,
    q: float,
    batch: int = 512,
) -> dict:
    """Exact-match accuracy of the one-token answer at `where + 1` of each row of `tokens`
    (argmax over the whole vocabulary of the logits at `where`), by the value of `groups` (the
    difficulty of each row), after every recurrent step and at the Q-exit. -> {"steps", "layers",
    "parameters", key: [group values], "counts", "per_step": [[acc by group] per step], "exit",
    "exit_mean_step", "overall_per_step", "overall_exit"}."""
    import torch

    from ouro_train.checkpoint.weights import read_weights
    from ouro_train.config.schema import ModelConfig
    from ouro_train.model.looplm import LoopLM
    from ouro_train.model.objective import exit_log_distribution

    state, cfg = read_weights(checkpoint)
    model = LoopLM(ModelConfig(**cfg))
    model.load_state_dict(state)
    model.eval()
    rows = len(tokens)
    answers = tokens[np.arange(rows), where + 1].astype(np.int64)
    steps = model.config.recurrent_steps
    correct = np.zeros((steps, rows), dtype=bool)
    exit_step = np.zeros(rows, dtype=np.int64)
    with torch.no_grad():
        for start in range(0, rows, batch):
            part = slice(start, start + batch)
            ids = torch.from_numpy(tokens[part].astype(np.int64))
            at = torch.from_numpy(where[part])
            index = torch.arange(len(at))
            out = model(ids)
            for t, h in enumerate(out.hidden_states):
                predicted = model.logits(h[index, at]).argmax(-1).numpy()
                correct[t, part] = predicted == answers[part]
            cdf = exit_log_distribution(out.gate_logits[:, index, at]).exp().cumsum(0)  # (R, n)
            reached = (cdf >= q).numpy()
            reached[-1] = True  # CDF(R) = 1
            exit_step[part] = reached.argmax(0)
    values = sorted(set(groups.tolist()))

    def by_group(per_row: np.ndarray) -> list[float]:
        return [float(per_row[groups == v].mean()) for v in values]

    chosen = correct[exit_step, np.arange(rows)]
    return {
        "steps": steps,
        "layers": model.config.num_layers,
        "parameters": model.num_parameters(),
        key: values,
        "counts": [int((groups == v).sum()) for v in values],
        "per_step": [by_group(correct[t]) for t in range(steps)],
        "exit": by_group(chosen),
        "exit_mean_step": by_group(exit_step + 1.0),
        "overall_per_step": [float(correct[t].mean()) for t in range(steps)],
        "overall_exit": float(chosen.mean()),
    }


def run_facts(run_dir: Path) -> dict:
    """What a run trained: lr, steps, tokens, wall time (from its metrics.jsonl)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [line for line in lines if "loss" in line and "tokens" in line]
    last = steps[-1] if steps else {}
    evals = [line for line in lines if "eval/loss" in line]
    return {
        "steps": last.get("step"),
        "tokens": last.get("tokens"),
        "peak_lr": max((line.get("lr", 0.0) for line in steps), default=None),
        "train_seconds": sum(line.get("step_time_s", 0.0) for line in steps),
        "final_train_loss": last.get("loss"),
        # Cross-entropy of the answer read out after the last step (eval/loss has -beta H in it).
        "test_ce": evals[-1][max((k for k in evals[-1] if k.startswith("eval/ce_step")), key=len_and_name)]
        if evals
        else None,
    }


def len_and_name(key: str) -> tuple[int, str]:
    return len(key), key


def label(result: dict) -> str:
    return f"{result['layers']}⊗{result['steps']}"


def accuracy_table(results: dict[str, dict], key: str, symbol: str, q: float, baseline: tuple[str, list] | None) -> str:
    """The markdown table: one row per model and read-out (the last step first, then the earlier
    steps and the Q-exit of a looped model), a column per group value, and an optional baseline row."""
    values = next(iter(results.values()))[key]
    header = "| model | layers⊗loops | params | read-out | " + " | ".join(f"{symbol}={v}" for v in values) + " | all |"
    lines = [header, "|" + "---|" * (len(values) + 5)]

    def row(name: str, result: dict, readout: str, accs: list[float], overall: float) -> str:
        cells = " | ".join(f"{100 * a:.1f}" for a in accs)
        return f"| {name} | {label(result)} | {result['parameters']:,} | {readout} | {cells} | {100 * overall:.1f} |"

    for name, result in results.items():
        steps = result["steps"]
        lines.append(row(name, result, f"step {steps}", result["per_step"][-1], result["overall_per_step"][-1]))
        if steps > 1:
            for t in range(steps - 1):
                lines.append(row(name, result, f"step {t + 1}", result["per_step"][t], result["overall_per_step"][t]))
            lines.append(row(name, result, f"Q-exit q={q}", result["exit"], result["overall_exit"]))
    if baseline is not None:
        name, accs = baseline
        cells = " | ".join(f"{100 * a:.1f}" for a in accs)
        lines.append(f"| {name} | – | 0 | – | {cells} | – |")
    return "\n".join(lines)


def plot_accuracy(
    results: dict[str, dict],
    key: str,
    path: Path,
    title: str,
    xlabel: str,
    q: float,
    chance: float,
    baseline: tuple[str, list] | None = None,
    ax=None,
) -> Path:
    """Accuracy by group for each model (the last step, and the Q-exit of a looped model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, result in results.items():
        values = result[key]
        ax.plot(values, [100 * a for a in result["per_step"][-1]], marker="o", label=f"{name} ({label(result)})")
        if result["steps"] > 1:
            ax.plot(values, [100 * a for a in result["exit"]], ls="--", marker=".", label=f"{name}, Q-exit q={q}")
    ax.axhline(100 * chance, color="grey", lw=0.8, ls=":", label="chance (uniform)")
    if baseline is not None:
        ax.plot(values, [100 * a for a in baseline[1]], color="grey", lw=0.8, ls="-.", label=baseline[0])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title(title)
    ax.set_ylim(0, 100)
    ax.set_xticks(values)
    ax.legend(fontsize=8)
    if own:
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
    return path
