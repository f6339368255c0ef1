"""The plot of an `ouro-eval` result (eval.png): perplexity against recurrent steps computed per
token (fixed exits, the reference's Q-exit, the real Q-exit per KV policy), and the histogram of
exit steps per q under the first KV policy. matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

from pathlib import Path


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = len(result["per_step"])
    fig, (ax, ax_h) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax.plot(
        [r["step"] for r in result["per_step"]],
        [r["ppl"] for r in result["per_step"]],
        "o-",
        color="black",
        label="fixed exit at step t",
    )
    ax.plot(
        [r["mean_steps"] for r in result["reference_q_exit"]],
        [r["ppl"] for r in result["reference_q_exit"]],
        "x:",
        color="grey",
        label="Q-exit picked after all steps (reference)",
    )
    policies = list(dict.fromkeys(r["kv_policy"] for r in result["runs"]))
    for i, policy in enumerate(policies):
        rows = [r for r in result["runs"] if r["kv_policy"] == policy and r["q"] is not None]
        ax.plot(
            [r["mean_steps"] for r in rows], [r["ppl"] for r in rows], "s-", color=f"C{i}", label=f"Q-exit, KV {policy}"
        )
        for r in rows:
            ax.annotate(
                f"q={r['q']:g}", (r["mean_steps"], r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    ax.set(
        xlabel="recurrent steps computed per token (mean)", ylabel="perplexity (held out)", title="quality vs compute"
    )
    ax.legend(fontsize=7)
    rows = [r for r in result["runs"] if r["kv_policy"] == policies[0] and r["q"] is not None]
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        total = max(1, sum(r["exit_histogram"]))
        ax_h.bar(
            [t + 1 + (i - len(rows) / 2 + 0.5) * width for t in range(steps)],
            [c / total for c in r["exit_histogram"]],
            width,
            label=f"q={r['q']:g}",
        )
    ax_h.set(xlabel="exit step", ylabel="fraction of tokens", title=f"exit steps (KV {policies[0]})")
    ax_h.set_xticks(range(1, steps + 1))
    ax_h.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
