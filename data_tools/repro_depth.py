"""`make repro-depth`: does looping buy depth? Variable chains (data_tools/chains.py) on CPU.

    python -m data_tools.repro_depth --run-dir runs/repro_depth

For each seed (data and training), through our own tools:
1. data: `ouro-data synth chains` into <run_dir>/seed_<s>/data (skipped when it is there with the
   same settings);
2. train: `ouro-train --config-name repro_depth experiment=E` for E in depth_flat (k layers x 1),
   depth_looped (k x R: the same parameters) and depth_flat_deep (k R layers x 1: the same FLOPs),
   on the same shards in the same order for the same tokens, two at a time;
3. evaluate: exact-match accuracy of the answer on the held-out test set by number of hops, after
   every recurrent step of the looped model and at its Q-exit;
4. verdict, per seed: h* is the hardest hop count the deep flat model solves (accuracy >=
   `--solved`); the loop works when the looped model beats its same-parameter flat twin there by
   >= `--margin` points and its accuracy at h* rises from its first recurrent step to its last;
5. report: <run_dir>/report.md, report.json and accuracy.png, and the tables on stdout.
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

from data_tools import chains, repro

EXPERIMENTS = ("depth_flat", "depth_looped", "depth_flat_deep")


@dataclass
class Settings:
    chains: int = 3
    depth: int = 2
    train_samples: int = 320_000  # 2,500 steps x 128 rows: every sample seen once
    test_per_hop: int = 300
    q: float = 0.5
    solved: float = 0.9
    margin: float = 0.15
    rise: float = 0.05

    def data_key(self, seed: int) -> dict:
        return {
            "seed": seed,
            "chains": self.chains,
            "depth": self.depth,
            "train_samples": self.train_samples,
            "test_per_hop": self.test_per_hop,
        }


def prepare_data(run_dir: Path, settings: Settings, seeds: list[int]) -> dict[int, dict]:
    """The data set of each seed in <run_dir>/seed_<s>/data, written (the seeds side by side) unless
    it is already there with the same settings. -> {seed: its chains.json}."""
    writing = {}
    for seed in seeds:
        data_dir = run_dir / f"seed_{seed}" / "data"
        stamp = data_dir / "chains.json"
        if stamp.is_file():
            info = json.loads(stamp.read_text())
            if all(info.get(key) == value for key, value in settings.data_key(seed).items()):
                print(f"data: {data_dir} is up to date ({info['train_samples']:,} training samples)", flush=True)
                continue
        command = [sys.executable, "-c", "import sys; from data_tools.cli import main; sys.exit(main())"]
        command += ["synth", "chains", "--out", str(data_dir), "--chains", str(settings.chains)]
        command += ["--depth", str(settings.depth), "--train-samples", str(settings.train_samples)]
        command += ["--test-per-hop", str(settings.test_per_hop), "--seed", str(seed)]
        print("$ ouro-data " + " ".join(command[3:]), flush=True)
        writing[seed] = subprocess.Popen(command)
    for seed, process in writing.items():
        if process.wait() != 0:
            raise RuntimeError(f"ouro-data synth chains (seed {seed}) exited with {process.returncode}")
    return {seed: json.loads((run_dir / f"seed_{seed}" / "data" / "chains.json").read_text()) for seed in seeds}


def train_command(experiment: str, run_dir: Path, data_dir: Path, settings: Settings, seed: int) -> list:
    command = [*repro.TRAIN, "--config-name", "repro_depth", f"experiment={experiment}", f"data_root={data_dir}"]
    command += [f"run_dir={run_dir}", f"train.seq_len={chains.doc_length(settings.chains, settings.depth)}"]
    return command + [f"train.seed={seed}"]


def evaluate(checkpoint: Path, test: list[chains.Sample], settings: Settings) -> dict:
    """Exact-match accuracy by number of hops: per recurrent step and at the Q-exit."""
    tokens, mask = chains.encode(test, settings.chains, settings.depth)
    where = mask.argmax(1) - 1  # the logits at the queried variable predict the answer
    hops = np.array([s.hops for s in test])
    return repro.answer_accuracy(checkpoint, tokens, where, hops, "hops", settings.q)


def verdict(results: dict[str, dict], settings: Settings) -> dict:
    """h*: the hardest hop count the deep flat model solves; the looped model's lead over its flat
    twin there, and the rise of its accuracy there from its first recurrent step to its last."""
    hops = results["depth_flat_deep"]["hops"]
    deep = results["depth_flat_deep"]["per_step"][-1]
    solved = [h for h, acc in zip(hops, deep) if acc >= settings.solved]
    if not solved:
        return {
            "h_star": None,
            "holds": False,
            "why": f"the deep flat model solves no hop count (>= {settings.solved:.0%})",
        }
    h_star = max(solved)
    i = hops.index(h_star)
    looped = results["depth_looped"]["per_step"]
    lead = looped[-1][i] - results["depth_flat"]["per_step"][-1][i]
    rise = looped[-1][i] - looped[0][i]
    holds = lead >= settings.margin and rise >= settings.rise
    why = (
        f"at h* = {h_star} the looped model is {100 * lead:+.1f} points from its flat twin (target >= "
        f"+{100 * settings.margin:.0f}) and rises {100 * rise:+.1f} points from step 1 to step {len(looped)} "
        f"(target >= +{100 * settings.rise:.0f})"
    )
    return {"h_star": h_star, "lead": lead, "rise": rise, "holds": holds, "why": why}


def report(per_seed: dict[int, dict], settings: Settings, wall: float, out: Path) -> str:
    """Markdown (returned, and written with report.json and accuracy.png into `out`)."""
    parts = [
        f"# Variable chains ({settings.chains} chains of depth {settings.depth}, hops uniform in [1, "
        f"{settings.depth}]): exact-match accuracy (%) on held-out samples\n",
        f"Chance is {100 / 10:.0f}% (ten digits); a model that only learned which digits are roots scores "
        f"{100 / settings.chains:.1f}%. Total wall time {wall / 60:.1f} min.\n",
    ]
    for seed, entry in per_seed.items():
        results, data_info = entry["models"], entry["data"]
        counts = " / ".join(str(c) for c in next(iter(results.values()))["counts"])
        parts.append(
            f"## Seed {seed}\n\nTest samples per hop count: {counts} (none seen in training); "
            f"{data_info['train_samples']:,} training samples ({data_info['train_tokens']:,} tokens).\n"
        )
        parts.append(repro.accuracy_table(results, "hops", "h", settings.q, None) + "\n")
        parts += [
            f"- {name}: peak lr {r['train']['peak_lr']:.2g}, {r['train']['steps']} steps, {r['train']['tokens']:,} "
            f"tokens, {r['train']['train_seconds']:.0f} s of steps, "
            f"final train loss {r['train']['final_train_loss']:.3f}"
            + (f"; mean Q-exit step {np.mean(r['exit_mean_step']):.2f}" if r["steps"] > 1 else "")
            for name, r in results.items()
        ]
        check = entry["verdict"]
        parts.append(f"\n**Seed {seed}: the loop {'works' if check['holds'] else 'does not show'}**: {check['why']}.\n")
    holds = all(entry["verdict"]["holds"] for entry in per_seed.values())
    parts.append(f"**Verdict: the target {'holds' if holds else 'does not hold'} in {len(per_seed)} seed(s).**\n")
    text = "\n".join(parts)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    record = {"settings": asdict(settings), "wall_seconds": wall, "holds": holds, "seeds": per_seed}
    (out / "report.json").write_text(json.dumps(record, indent=1))
    plot(per_seed, settings, out / "accuracy.png")
    return text


def plot(per_seed: dict[int, dict], settings: Settings, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(per_seed), figsize=(6 * len(per_seed), 4), dpi=100, squeeze=False)
    for ax, (seed, entry) in zip(axes[0], per_seed.items()):
        title = f"chains {settings.chains} x depth {settings.depth}, seed {seed}, held-out test"
        roots = ("root digits only", [1 / settings.chains] * settings.depth)
        repro.plot_accuracy(entry["models"], "hops", path, title, "hops h", settings.q, 0.1, roots, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="repro-depth", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", default="runs/repro_depth")
    parser.add_argument("--chains", type=int, default=Settings.chains, help="chains per sample (distractors + 1)")
    parser.add_argument("--depth", type=int, default=Settings.depth, help="variables per chain: hops in [1, depth]")
    parser.add_argument("--train-samples", type=int, default=Settings.train_samples)
    parser.add_argument("--test-per-hop", type=int, default=Settings.test_per_hop)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="data and training seeds")
    parser.add_argument("--q", type=float, default=Settings.q, help="Q-exit threshold on the exit CDF")
    parser.add_argument("--solved", type=float, default=Settings.solved, help="accuracy that counts as solved")
    parser.add_argument("--margin", type=float, default=Settings.margin, help="the looped model's lead to reach")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time (one torch thread each when > 1)")
    parser.add_argument(
        "overrides", nargs="*", help="ouro-train overrides for every model (E:key=value for experiment E only)"
    )
    args = parser.parse_args(argv)
    settings = Settings(
        args.chains, args.depth, args.train_samples, args.test_per_hop, args.q, args.solved, args.margin
    )
    run_dir = Path(args.run_dir)
    started = time.monotonic()
    data = prepare_data(run_dir, settings, args.seeds)
    commands = {}
    for experiment in EXPERIMENTS:  # the looped and deep models first, so that the flat ones fill in
        for seed in args.seeds:
            seed_dir = run_dir / f"seed_{seed}"
            command = train_command(experiment, seed_dir / experiment, seed_dir / "data", settings, seed)
            for override in args.overrides:
                target, sep, rest = override.partition(":")
                if sep and target in EXPERIMENTS:
                    command += [rest] if target == experiment else []
                else:
                    command.append(override)
            commands[f"seed_{seed}/{experiment}"] = command
    order = sorted(commands, key=lambda name: name.endswith("/depth_flat"))
    seconds = repro.train_all({name: commands[name] for name in order}, run_dir, args.jobs)
    per_seed = {}
    for seed in args.seeds:
        seed_dir = run_dir / f"seed_{seed}"
        test = chains.read_test(seed_dir / "data" / "test.jsonl")
        results = {}
        for experiment in EXPERIMENTS:
            result = evaluate(repro.final_checkpoint(seed_dir / experiment), test, settings)
            wall = seconds[f"seed_{seed}/{experiment}"]
            result["train"] = repro.run_facts(seed_dir / experiment) | {"wall_seconds": wall}
            results[experiment] = result
        per_seed[seed] = {"data": data[seed], "models": results, "verdict": verdict(results, settings)}
    text = report(per_seed, settings, time.monotonic() - started, run_dir)
    print(text)
    print(f"report: {run_dir / 'report.md'}, {run_dir / 'report.json'}, {run_dir / 'accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
