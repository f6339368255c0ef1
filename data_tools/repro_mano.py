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
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_tools import mano, repro

EXPERIMENTS = ("mano_flat", "mano_looped", "mano_flat_deep")


@dataclass
class Settings:
    max_ops: int = 4
    train_samples: int = 80_000
    test_per_length: int = 200
    seed: int = 0
    q: float = 0.5
    modulus: int = 7
    recipe: str = "repro_mano"

    def data_key(self) -> dict:
        return {
            "seed": self.seed,
            "max_ops": self.max_ops,
            "train_samples": self.train_samples,
            "test_per_length": self.test_per_length,
            "modulus": self.modulus,
        }


# `--device cuda`: recipes/repro_mano_gpu.yaml and its data (F_23, L = 8: 4M rows seen in 4,000 steps).
GPU = Settings(max_ops=8, train_samples=2_000_000, test_per_length=500, modulus=23, recipe="repro_mano_gpu")


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
    command = [*repro.TRAIN, "--config-name", settings.recipe, f"experiment={experiment}"]
    command += [f"data_root={data_dir}", f"run_dir={run_dir}", f"train.seq_len={mano.doc_length(settings.max_ops)}"]
    return command + overrides


def evaluate(checkpoint: Path, test: list[mano.Sample], max_ops: int, q: float, batch: int = 512) -> dict:
    """Exact-match accuracy of the answer by number of operations: per recurrent step and at the
    Q-exit. -> {"steps", "per_step": [[acc by ops] per step], "exit": [acc by ops],
    "exit_mean_step": [mean exit step by ops], "ops": [1..L], "counts": [...]}."""
    tokens, mask = mano.encode(mano.build_tokenizer(), test, max_ops)
    # The logits at the position before the answer predict it (that of <ans>).
    where = mask.argmax(1) - 1
    ops = np.array([s.ops for s in test])
    return repro.answer_accuracy(checkpoint, tokens, where, ops, "ops", q, batch)


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
    table = repro.accuracy_table(results, "ops", "ℓ", settings.q, ("best constant answer", baseline))
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
    title = f"Mano, F_{settings.modulus}, L = {settings.max_ops}, held-out test"
    repro.plot_accuracy(
        results,
        "ops",
        out / "accuracy.png",
        title,
        "operations ℓ",
        settings.q,
        1 / settings.modulus,
        ("best constant answer", baseline),
    )
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="repro-mano", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: recipes/repro_mano_gpu.yaml (F_23, L = 8, wider models, ~8 min of one H100/H200) "
        "and its data defaults, the three trainings side by side on the GPU",
    )
    parser.add_argument("--run-dir", default=None, help="default: runs/repro_mano, runs/repro_mano_cuda on cuda")
    parser.add_argument("--max-ops", type=int, default=None, help=f"default {Settings.max_ops}, {GPU.max_ops} on cuda")
    parser.add_argument("--train-samples", type=int, default=None)
    parser.add_argument("--test-per-length", type=int, default=None)
    parser.add_argument("--seed", type=int, default=Settings.seed)
    parser.add_argument("--modulus", type=int, default=None, help="the prime p of F_p (<= 23); default 7, 23 on cuda")
    parser.add_argument("--q", type=float, default=Settings.q, help="Q-exit threshold on the exit CDF")
    parser.add_argument(
        "--jobs", type=int, default=None, help="trainings at a time (cpu: 2, one torch thread each; cuda: 3)"
    )
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=EXPERIMENTS)
    parser.add_argument(
        "overrides", nargs="*", help="ouro-train overrides for every model (E:key=value for experiment E only)"
    )
    args = parser.parse_args(argv)
    preset = GPU if args.device == "cuda" else Settings()
    settings = Settings(
        preset.max_ops if args.max_ops is None else args.max_ops,
        preset.train_samples if args.train_samples is None else args.train_samples,
        preset.test_per_length if args.test_per_length is None else args.test_per_length,
        args.seed,
        args.q,
        preset.modulus if args.modulus is None else args.modulus,
        preset.recipe,
    )
    jobs = args.jobs or (3 if args.device == "cuda" else 2)
    run_dir = Path(args.run_dir or ("runs/repro_mano_cuda" if args.device == "cuda" else "runs/repro_mano"))
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
    seconds = repro.train_all({name: commands[name] for name in order}, run_dir, jobs, args.device)
    results = {}
    for experiment in args.experiments:
        result = evaluate(repro.final_checkpoint(run_dir / experiment), test, settings.max_ops, settings.q)
        result["train"] = repro.run_facts(run_dir / experiment) | {"wall_seconds": seconds[experiment]}
        results[experiment] = result
    baseline = constant_baseline(test, settings.max_ops)
    text = report(results, settings, data_info, time.monotonic() - started, run_dir, baseline)
    print(text)
    print(f"report: {run_dir / 'report.md'}, {run_dir / 'report.json'}, {run_dir / 'accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
