"""The pipeline's report: a markdown table of every stage and two PNG plots across stages
(cross-entropy per recurrent step, and the mean exit distribution of each stage's final eval)."""

from __future__ import annotations

import json
from pathlib import Path

from ouro_train.train.report import moving_average, read_metrics


def _stage_records(stage) -> tuple[list[dict], dict]:
    metrics = stage.directory / "metrics.jsonl"
    train = read_metrics(metrics)[0] if metrics.is_file() else []
    final = stage.directory / "final_eval.json"
    return train, (json.loads(final.read_text()) if final.is_file() else {})


def write_report(spec, planned, run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        f"# Pipeline `{spec.name}`",
        "",
        f"Run directory: `{run_dir}`. Each training stage's held-out cross-entropy after each recurrent",
        "step (final evaluation), its mean exit probabilities p(t), and where it started from.",
        "",
        "| stage | model | steps | tokens | seq | LR | beta | theta | eval CE per step | p(t) | from |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fig, (ax_ce, ax_p) = plt.subplots(1, 2, figsize=(13, 4.5))
    offset = 0
    exits: list[tuple[str, list[float]]] = []
    evaluations = []
    for stage in planned:
        if stage.spec.kind == "eval":
            evaluations.append(stage)
            lines.append(f"| {stage.spec.name} | eval of {_source_name(stage)} | | | | | | | see below | | |")
            continue
        if stage.cfg is None:
            lines.append(
                f"| {stage.spec.name} | -> {stage.model_layers} layers x {stage.recurrent_steps} | | | | "
                f"upcycle ({stage.spec.order}, moments {stage.spec.optimizer}) | | | | | {stage.input} |"
            )
            ax_ce.axvline(offset, color="grey", linestyle=":", linewidth=1)
            continue
        train, final = _stage_records(stage)
        cfg = stage.cfg
        steps = sorted(int(k.split("ce_step")[1]) for k in final if k.startswith("eval/ce_step"))
        ce = [final[f"eval/ce_step{t}"] for t in steps]
        p = [final.get(f"eval/p_step{t}", float("nan")) for t in steps]
        if p:
            exits.append((stage.spec.name, p))
        tokens = train[-1]["tokens"] if train else 0
        lines.append(
            f"| {stage.spec.name} | {cfg.model.num_layers} layers x {cfg.model.recurrent_steps} | "
            f"{cfg.train.total_steps} | {tokens:,} | {cfg.train.seq_len} | {_lr_range(train, cfg)} | "
            f"{cfg.objective.beta:g} | {cfg.model.rope_theta:g} | {' / '.join(f'{v:.3f}' for v in ce) or 'n/a'} | "
            f"{' / '.join(f'{v:.2f}' for v in p) or 'n/a'} | "
            f"{_source_name(stage)} |"
        )
        if train:
            recurrent = sorted(int(k[len("ce_step") :]) for k in train[0] if k.startswith("ce_step"))
            xs = [offset + r["step"] for r in train]
            for t in recurrent:
                ax_ce.plot(xs, moving_average([r[f"ce_step{t}"] for r in train]), color=f"C{t - 1}", linewidth=1)
            ax_ce.axvline(offset, color="grey", linestyle=":", linewidth=1)
            ax_ce.text(
                offset,
                1.0,
                f" {stage.spec.name}",
                transform=ax_ce.get_xaxis_transform(),
                fontsize=7,
                rotation=90,
                va="top",
            )
            offset += train[-1]["step"]
    for t in range(1, 9):
        ax_ce.plot([], [], color=f"C{t - 1}", label=f"step {t}")
    ax_ce.legend(fontsize=7, ncol=2)
    ax_ce.set(xlabel="optimizer step (stages in order)", ylabel="training CE (nats)", title="CE per recurrent step")
    width = 0.8 / max(1, max((len(p) for _, p in exits), default=1))
    for i, (_, p) in enumerate(exits):
        for t, value in enumerate(p):
            ax_p.bar(i + t * width, value, width, color=f"C{t}", label=f"p({t + 1})" if i == 0 else None)
    ax_p.set_xticks([i + 0.4 - width / 2 for i in range(len(exits))], [n for n, _ in exits], rotation=30, fontsize=8)
    ax_p.set(ylabel="mean exit probability (held out)", title="exit distribution per stage", ylim=(0, 1))
    ax_p.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run_dir / "loss_per_step.png", dpi=100)
    plt.close(fig)
    lines += [
        "",
        "![CE per recurrent step across stages, and the exit distribution](loss_per_step.png)",
        "",
        "Metrics per stage: `<stage>/metrics.jsonl`; offline wandb runs: `<stage>/wandb` (`wandb sync`).",
        "",
    ]
    for stage in evaluations:
        lines += _evaluation_section(stage, run_dir)
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out


def _evaluation_section(stage, run_dir: Path) -> list[str]:
    """An eval stage's own report (ouro-eval's eval.md), its headings one level down and its plot
    linked from the pipeline's directory."""
    report = stage.directory / "eval.md"
    if not report.is_file():
        return [f"## {stage.spec.name}", "", "Not run yet.", ""]
    relative = stage.directory.relative_to(run_dir) if stage.directory.is_relative_to(run_dir) else stage.directory
    body = report.read_text().replace("](eval.png)", f"]({relative}/eval.png)")
    return [line.replace("# ", "## ", 1) if line.startswith("# ") else line for line in body.splitlines()] + [""]


def _lr_range(train: list[dict], cfg) -> str:
    """The learning rate the stage actually ran (a kept schedule starts where the last one ended)."""
    if not train:
        return f"{cfg.optim.lr:.3g} {cfg.schedule.kind}"
    return f"{train[0]['lr']:.3g} -> {train[-1]['lr']:.3g} {cfg.schedule.kind}"


def _source_name(stage) -> str:
    if stage.input is None:
        return "scratch"
    # <run>/<stage>/checkpoints/step_N -> the stage's name; an upcycle output is its own directory.
    return stage.input.parent.parent.name if stage.input.name.startswith("step_") else stage.input.name
