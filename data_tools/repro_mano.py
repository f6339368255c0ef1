"""`make repro-mano`: the Mano result of the Ouro paper (§6) on CPU, end to end through our tools.

    python -m data_tools.repro_mano --run-dir runs/repro_mano

1. data: `ouro-data synth mano` into <run_dir>/data (skipped when it is there with the same settings);
2. train: `ouro-train --config-name repro_mano experiment=E` for E in mano_flat (k layers x 1),
   mano_looped (k x R: the same parameters), mano_flat_deep (k R layers x 1: the same FLOPs), each
   into <run_dir>/E, on the same shards in the same order for the same tokens (a finished run is
   skipped, an interrupted one resumes);
3. evaluate: exact-match accuracy of the answer (argmax over the whole vocabulary at the <ans>
   position) on the held-out test set, by number of operations; for looped models also read out
   after each recurrent step, and under the learned exit (Q-exit: the first step t whose CDF(t) =
   1 - prod_{j<=t} (1 - lambda_j) reaches q, from the gates of the full forward pass);
4. report: <run_dir>/report.md, report.json and accuracy.png, and the table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_tools import mano

EXPERIMENTS = ("mano_flat", "mano_looped", "mano_flat_deep")


@dataclass
class Settings:
    max_ops: int = 4
    train_samples: int = 80_000
    test_per_length: int = 200
    seed: int = 0
    q: float = 0.5
    modulus: int = 7

    def data_key(self) -> dict:
        return {
            "seed": self.seed,
            "max_ops": self.max_ops,
            "train_samples": self.train_samples,
            "test_per_length": self.test_per_length,
            "modulus": self.modulus,
        }


def prepare_data(data_dir: Path, settings: Settings) -> dict:
    """The data set, written unless `data_dir` already holds one with the same settings."""
    stamp = data_dir / "mano.json"
    if stamp.is_file():
        info = json.loads(stamp.read_text())
        if all(info.get(key) == value for key, value in settings.data_key().items()):
            print(f"data: {data_dir} is up to date ({info['train_samples']:,} training samples)", flush=True)
            return info
    command = [sys.executable, "-c", "import sys; from data_tools.cli import main; sys.exit(main())"]
    command += ["synth", "mano", "--out", str(data_dir), "--max-ops", str(settings.max_ops)]
    command += ["--train-samples", str(settings.train_samples), "--test-per-length", str(settings.test_per_length)]
    command += ["--seed", str(settings.seed), "--modulus", str(settings.modulus)]
    print("$ ouro-data " + " ".join(command[3:]), flush=True)
    subprocess.run(command, check=True)
    return json.loads(stamp.read_text())


def train_command(experiment: str, run_dir: Path, data_dir: Path, settings: Settings, overrides: list[str]) -> list:
    command = [sys.executable, "-m", "ouro_train.cli.train", "--config-name", "repro_mano", f"experiment={experiment}"]
    command += [f"data_root={data_dir}", f"run_dir={run_dir}", f"train.seq_len={mano.doc_length(settings.max_ops)}"]
    return command + overrides


def train_all(commands: dict[str, list], run_dir: Path, jobs: int) -> dict[str, float]:
    """The `ouro-train` runs, `jobs` at a time, each with torch on one thread when jobs > 1 (tiny
    models: two one-thread runs use 2 cores better than one two-thread run); output in
    <run_dir>/<experiment>.log. -> wall seconds per run."""
    env = os.environ | {"WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "PYTHONUNBUFFERED": "1"}
    if jobs > 1:
        env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending = list(commands.items())
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    seconds: dict[str, float] = {}
    while pending or running:
        while pending and len(running) < jobs:
            name, command = pending.pop(0)
            print(f"$ ouro-train {' '.join(command[3:])}  (log: {run_dir / name}.log)", flush=True)
            log = open(run_dir / f"{name}.log", "w")
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


def evaluate(checkpoint: Path, test: list[mano.Sample], max_ops: int, q: float, batch: int = 512) -> dict:
    """Exact-match accuracy of the answer by number of operations: per recurrent step and at the
    Q-exit. -> {"steps", "per_step": [[acc by ops] per step], "exit": [acc by ops],
    "exit_mean_step": [mean exit step by ops], "ops": [1..L], "counts": [...]}."""
    import torch

    from ouro_train.checkpoint.weights import read_weights
    from ouro_train.config.schema import ModelConfig
    from ouro_train.model.looplm import LoopLM
    from ouro_train.model.objective import exit_log_distribution

    state, cfg = read_weights(checkpoint)
    model = LoopLM(ModelConfig(**cfg))
    model.load_state_dict(state)
    model.eval()
    tokens, mask = mano.encode(mano.build_tokenizer(), test, max_ops)
    # The logits at the position before the answer predict it (that of <ans>).
    where = mask.argmax(1) - 1
    answers = tokens[np.arange(len(test)), where + 1].astype(np.int64)
    steps = model.config.recurrent_steps
    correct = np.zeros((steps, len(test)), dtype=bool)
    exit_step = np.zeros(len(test), dtype=np.int64)
    with torch.no_grad():
        for start in range(0, len(test), batch):
            rows = slice(start, start + batch)
            ids = torch.from_numpy(tokens[rows].astype(np.int64))
            at = torch.from_numpy(where[rows])
            index = torch.arange(len(at))
            out = model(ids)
            for t, h in enumerate(out.hidden_states):
                predicted = model.logits(h[index, at]).argmax(-1).numpy()
                correct[t, rows] = predicted == answers[rows]
            cdf = exit_log_distribution(out.gate_logits[:, index, at]).exp().cumsum(0)  # (R, n)
            reached = (cdf >= q).numpy()
            reached[-1] = True  # CDF(R) = 1
            exit_step[rows] = reached.argmax(0)
    ops = np.array([s.ops for s in test])
    lengths = list(range(1, max_ops + 1))

    def by_ops(values: np.ndarray) -> list[float]:
        return [float(values[ops == n].mean()) for n in lengths]

    chosen = correct[exit_step, np.arange(len(test))]
    return {
        "steps": steps,
        "layers": model.config.num_layers,
        "parameters": model.num_parameters(),
        "ops": lengths,
        "counts": [int((ops == n).sum()) for n in lengths],
        "per_step": [by_ops(correct[t]) for t in range(steps)],
        "exit": by_ops(chosen),
        "exit_mean_step": by_ops(exit_step + 1.0),
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
    return f"{result['layers']}⊗{result['steps']}" if result["steps"] > 1 else f"{result['layers']}⊗1"


def constant_baseline(test: list[mano.Sample], max_ops: int) -> list[float]:
    """Per length, the accuracy of the best constant answer (the test set's most common one): what
    a model that learned only the answers' marginal distribution scores (0 is common under *)."""
    best = []
    for n in range(1, max_ops + 1):
        answers = [s.answer for s in test if s.ops == n]
        best.append(max(answers.count(a) for a in set(answers)) / len(answers))
    return best


def report(
    results: dict[str, dict], settings: Settings, data_info: dict, wall: float, out: Path, baseline: list[float]
) -> str:
    """Markdown table (returned, and written with report.json and accuracy.png into `out`)."""
    lengths = list(range(1, settings.max_ops + 1))
    header = "| model | layers⊗loops | params | read-out | " + " | ".join(f"ℓ={n}" for n in lengths) + " | all |"
    lines = [header, "|" + "---|" * (len(lengths) + 5)]

    def row(name: str, result: dict, readout: str, accs: list[float], overall: float) -> str:
        cells = " | ".join(f"{100 * a:.1f}" for a in accs)
        return f"| {name} | {label(result)} | {result['parameters']:,} | {readout} | {cells} | {100 * overall:.1f} |"

    for name, result in results.items():
        steps = result["steps"]
        lines.append(row(name, result, f"step {steps}", result["per_step"][-1], result["overall_per_step"][-1]))
        if steps > 1:
            for t in range(steps - 1):
                lines.append(row(name, result, f"step {t + 1}", result["per_step"][t], result["overall_per_step"][t]))
            exit_label = f"Q-exit q={settings.q}"
            lines.append(row(name, result, exit_label, result["exit"], result["overall_exit"]))
    cells = " | ".join(f"{100 * a:.1f}" for a in baseline)
    lines.append(f"| best constant answer | – | 0 | – | {cells} | – |")
    table = "\n".join(lines)
    facts = "\n".join(
        f"- {name}: peak lr {r['train']['peak_lr']:.2g}, {r['train']['steps']} steps, {r['train']['tokens']:,} tokens, "
        f"{r['train']['train_seconds']:.0f} s of steps, final train loss {r['train']['final_train_loss']:.3f}, "
        f"answer CE on the test set {r['train']['test_ce']:.3f} (uniform: {np.log(settings.modulus):.3f})"
        + (f"; mean Q-exit step {np.mean([s for s in r['exit_mean_step']]):.2f}" if r["steps"] > 1 else "")
        for name, r in results.items()
    )
    counts = " / ".join(str(c) for c in next(iter(results.values()))["counts"])
    text = (
        f"# Mano (F_{settings.modulus}, ℓ uniform in [1, {settings.max_ops}]): exact-match accuracy (%) on held-out "
        f"expressions\n\nTest expressions per ℓ: {counts} (none seen in training); "
        f"{data_info['train_samples']:,} training samples ({data_info['train_tokens']:,} tokens), "
        f"seed {settings.seed}; "
        f"chance is {100 / settings.modulus:.1f}%. Total wall time {wall / 60:.1f} min.\n\n{table}\n\n{facts}\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    record = {"settings": asdict(settings), "data": data_info, "wall_seconds": wall, "models": results}
    record["best_constant_answer"] = baseline
    (out / "report.json").write_text(json.dumps(record, indent=1))
    plot(results, settings, out / "accuracy.png", baseline)
    return text


def plot(results: dict[str, dict], settings: Settings, path: Path, baseline: list[float]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, result in results.items():
        ops = result["ops"]
        ax.plot(ops, [100 * a for a in result["per_step"][-1]], marker="o", label=f"{name} ({label(result)})")
        if result["steps"] > 1:
            ax.plot(ops, [100 * a for a in result["exit"]], ls="--", marker=".", label=f"{name}, Q-exit q={settings.q}")
    ax.axhline(100 / settings.modulus, color="grey", lw=0.8, ls=":", label="chance (uniform)")
    ax.plot(result["ops"], [100 * a for a in baseline], color="grey", lw=0.8, ls="-.", label="best constant answer")
    ax.set_xlabel("operations ℓ")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title(f"Mano, F_{settings.modulus}, L = {settings.max_ops}, held-out test")
    ax.set_ylim(0, 100)
    ax.set_xticks(result["ops"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="repro-mano", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", default="runs/repro_mano")
    parser.add_argument("--max-ops", type=int, default=Settings.max_ops)
    parser.add_argument("--train-samples", type=int, default=Settings.train_samples)
    parser.add_argument("--test-per-length", type=int, default=Settings.test_per_length)
    parser.add_argument("--seed", type=int, default=Settings.seed)
    parser.add_argument("--modulus", type=int, default=Settings.modulus, help="the prime p of F_p (<= 23)")
    parser.add_argument("--q", type=float, default=Settings.q, help="Q-exit threshold on the exit CDF")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time (one torch thread each when > 1)")
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=EXPERIMENTS)
    parser.add_argument(
        "overrides", nargs="*", help="ouro-train overrides for every model (E:key=value for experiment E only)"
    )
    args = parser.parse_args(argv)
    settings = Settings(args.max_ops, args.train_samples, args.test_per_length, args.seed, args.q, args.modulus)
    run_dir = Path(args.run_dir)
    started = time.monotonic()
    data_dir = run_dir / "data"
    data_info = prepare_data(data_dir, settings)
    test = mano.read_test(data_dir / "test.jsonl")
    commands = {}
    for experiment in args.experiments:
        overrides = []
        for override in args.overrides:
            target, sep, rest = override.partition(":")
            if sep and target in EXPERIMENTS:
                overrides += [rest] if target == experiment else []
            else:
                overrides.append(override)
        commands[experiment] = train_command(experiment, run_dir / experiment, data_dir, settings, overrides)
    # The longest runs first, so that the short one fills in beside them.
    order = sorted(commands, key=lambda name: name == "mano_flat")
    seconds = train_all({name: commands[name] for name in order}, run_dir, args.jobs)
    results = {}
    for experiment in args.experiments:
        result = evaluate(final_checkpoint(run_dir / experiment), test, settings.max_ops, settings.q)
        result["train"] = run_facts(run_dir / experiment) | {"wall_seconds": seconds[experiment]}
        results[experiment] = result
    baseline = constant_baseline(test, settings.max_ops)
    text = report(results, settings, data_info, time.monotonic() - started, run_dir, baseline)
    print(text)
    print(f"report: {run_dir / 'report.md'}, {run_dir / 'report.json'}, {run_dir / 'accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
