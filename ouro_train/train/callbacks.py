"""Side effects of training as callbacks: console lines, a progress bar, a JSONL metrics file."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm

from ouro_train.train.trainer import Callback, Trainer


def format_metrics(metrics: dict) -> str:
    """One console line: loss, CE and exit probability per recurrent step, entropy, grad norm, lr, speed."""
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
    return " | ".join(parts)


class ConsoleLogger(Callback):
    def __init__(self, every: int, progress_bar: bool = True) -> None:
        self.every = every
        self.progress_bar = progress_bar
        self.bar: tqdm | None = None

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)  # keeps the bar intact below the line
        else:
            print(line, flush=True)

    def on_train_start(self, trainer: Trainer) -> None:
        if self.progress_bar:
            total = trainer.cfg.train.steps
            self.bar = tqdm(total=total, initial=trainer.state.step, desc="train", unit="step", dynamic_ncols=True)

    def on_step_end(self, trainer: Trainer, metrics: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
        if metrics["step"] % self.every == 0 or metrics["step"] == 1:
            self._write(format_metrics(metrics))

    def on_eval_end(self, trainer: Trainer, metrics: dict) -> None:
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

    def _append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def on_step_end(self, trainer: Trainer, metrics: dict) -> None:
        self._append(metrics)

    def on_eval_end(self, trainer: Trainer, metrics: dict) -> None:
        self._append(metrics)
