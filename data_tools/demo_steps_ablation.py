"""Why do the demo's later recurrent steps get worse? An ablation over the demo pipeline's stage I.

    python -m data_tools.demo_steps_ablation --run-dir runs/demo_steps_ablation [--variants NAME ...]

Each variant runs the demo pipeline (recipes/pipeline/demo.yaml) up to the end of stage I
(`ouro-pipeline pipeline=demo stop_after=stable1`: warmup, then stable 1, R = 8) with its own
overrides for every stage, in <run_dir>/<variant>, and the table gives, at the end of stable 1,
the held-out cross-entropy after each recurrent step (the stage's last evaluation), the exit
distribution p(t) of its last logged training step, and whether the last step is the best.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# The Mano init: unit-std embedding, sandwich norms closing each branch at 0.1.
SMALL_INIT = ["model.embed_init_std=1.0", "model.branch_norm_init=0.1"]

# name -> (what it changes, overrides for every stage)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "reference": ("the reference's init (ModelConfig defaults), exit gate bias 0", []),
    "small_init": (
        "unit-std embedding, sandwich norms closing each branch at 0.1 (the Mano init)",
        SMALL_INIT,
    ),
    "gate_bias": ("exit gate bias -2 at init: p(t) starts on the last step", ["model.exit_gate_bias_init=-2.0"]),
    "beta_1": ("entropy weight beta 1 instead of 0.1", ["objective.beta=1.0"]),
    "lr_1e-3": ("peak learning rate 1e-3 instead of 3e-3", ["optim.lr=1e-3"]),
    "small_init+beta_1": (
        "the Mano init and beta 1",
        [*SMALL_INIT, "objective.beta=1.0"],
    ),
    "small_init+lr_1e-3": (
        "the Mano init and peak learning rate 1e-3",
        [*SMALL_INIT, "optim.lr=1e-3"],
    ),
    "small_init+gate_bias": (
        "the Mano init and the exit gate bias -2",
        [*SMALL_INIT, "model.exit_gate_bias_init=-2.0"],
    ),
    "small_init+gate_bias_-4": (
        "the Mano init and the exit gate bias -4 (p(8) = 0.88 at init)",
        [*SMALL_INIT, "model.exit_gate_bias_init=-4.0"],
    ),
    "small_init+gate_bias+3x_stable1": (
        "the Mano init, gate bias -2, stable 1 three times longer (300 steps)",
        [*SMALL_INIT, "model.exit_gate_bias_init=-2.0", "stable1:train.tokens=1228800"],
    ),
}


def run(variant: str, run_dir: Path, extra: list[str]) -> float:
    command = [sys.executable, "-m", "ouro_train.cli.pipeline", "pipeline=demo", "stop_after=stable1"]
    command += [f"run_dir={run_dir}", *VARIANTS[variant][1], *extra]
    print("$ ouro-pipeline " + " ".join(command[3:]), flush=True)
    started = time.monotonic()
    with open(run_dir.with_suffix(".log"), "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.monotonic() - started


def end_of_stage(metrics: Path) -> dict:
    """CE per recurrent step of the last evaluation, p(t) of the last logged training step."""
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evaluation = [line for line in lines if "eval/loss" in line][-1]
    train = [line for line in lines if "p_step1" in line][-1]
    steps = sorted(int(key[len("eval/ce_step") :]) for key in evaluation if key.startswith("eval/ce_step"))
    ce = [evaluation[f"eval/ce_step{t}"] for t in steps]
    return {"step": evaluation.get("step"), "ce": ce, "p": [train[f"p_step{t}"] for t in steps]}


def table(results: dict[str, dict]) -> str:
    steps = len(next(iter(results.values()))["ce"])
    header = "| variant | " + " | ".join(f"CE {t + 1}" for t in range(steps)) + " | best step | p(1) | p(R) |"
    lines = [header, "|" + "---|" * (steps + 4)]
    for name, r in results.items():
        best = min(range(steps), key=lambda t: r["ce"][t]) + 1
        cells = " | ".join(f"{ce:.3f}" for ce in r["ce"])
        lines.append(f"| {name} | {cells} | {best} | {r['p'][0]:.2f} | {r['p'][-1]:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/demo_steps_ablation")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("overrides", nargs="*", help="ouro-pipeline overrides for every variant")
    args = parser.parse_args(argv)
    root = Path(args.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    results = {}
    for variant in args.variants:
        seconds = run(variant, root / variant, args.overrides)
        results[variant] = end_of_stage(root / variant / "stable1" / "metrics.jsonl") | {"seconds": seconds}
        print(f"{variant}: {seconds:.0f} s; CE per step {' '.join(f'{c:.3f}' for c in results[variant]['ce'])}")
    text = table(results)
    print(text)
    for name in results:
        print(f"- {name}: {VARIANTS[name][0]}")
    (root / "ablation.md").write_text(text + "\n")
    (root / "ablation.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
