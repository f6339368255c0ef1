"""Plots of a run's metrics.jsonl: cross-entropy per recurrent step and the exit distribution."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ouro_train.utils.atomic import atomic_write_text


def _records(path: Path) -> tuple[list[tuple[str, dict]], list[int]]:
    """-> ((line, record) for each whole line, numbers of the lines that are not JSON objects).
    A line torn by a kill or a full disk mid-write is the usual one of the latter."""
    good, torn = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            good.append((line, record))
        elif line.strip():
            torn.append(number)
    return good, torn


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """-> (training records, evaluation records) of a metrics.jsonl file (torn lines left out)."""
    train, evaluation = [], []
    for _, record in _records(Path(path))[0]:
        (evaluation if any(key.startswith("eval/") for key in record) else train).append(record)
    return train, evaluation


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Drop records after `last_step` (a resumed run re-trains those steps) and torn lines (said on
    stderr, naming the file and line); atomic rewrite."""
    path = Path(path)
    if not path.exists():
        return
    good, torn = _records(path)
    if torn:
        print(
            f"warning: {path}: dropped {len(torn)} unreadable line(s) ({', '.join(map(str, torn[:5]))}), "
            "torn by a kill or a full disk while being written",
            file=sys.stderr,
            flush=True,
        )
    kept = [line for line, record in good if record.get("step", 0) <= last_step]
    if torn or len(kept) != len(good):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def moving_average(values: list[float], window: int = 10) -> list[float]:
    """Trailing mean: point i is the mean of values[i - window + 1 .. i] (fewer at the start), so
    the curve starts at the first value and lags, never leads. One smoothing for every loss plot
    (a run's and the pipeline report's), so their curves compare."""
    out, recent = [], []
    for value in values:
        recent = (recent + [value])[-window:]
        out.append(sum(recent) / len(recent))
    return out


def plot_loss_per_step(metrics_path: str | Path, out_path: str | Path, smooth: int = 10) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    train, _ = read_metrics(metrics_path)
    if not train:
        raise ValueError(f"{metrics_path} holds no training records to plot")
    steps = [r["step"] for r in train]
    recurrent = sorted(int(k[len("ce_step") :]) for k in train[0] if k.startswith("ce_step"))

    fig, (ax_ce, ax_p) = plt.subplots(1, 2, figsize=(11, 4))
    for t in recurrent:
        ax_ce.plot(steps, moving_average([r[f"ce_step{t}"] for r in train], smooth), label=f"step {t}")
        ax_p.plot(steps, moving_average([r[f"p_step{t}"] for r in train], smooth), label=f"p({t})")
    ax_ce.set(xlabel="optimizer step", ylabel="cross-entropy (nats)", title="CE per recurrent step")
    ax_p.set(xlabel="optimizer step", ylabel="mean exit probability", title="exit distribution", ylim=(0, 1))
    ax_ce.legend()
    ax_p.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
