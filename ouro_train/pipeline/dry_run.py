"""The dry run's plan (`ouro-pipeline ... dry_run=true`): `describe` prints one row per stage of
what it trains (model, tokens, sequence length, batch, steps, learning rate, what it carries from
the stage before), one per stage of what it assumes (layout, memory per GPU, GPU-hours and wall
time at the planned world size), where each stage's checkpoints go and the command that launches
each training stage alone (commands.py, exactly what the runner runs).
"""

from __future__ import annotations

from ouro_train.config.schema import Config
from ouro_train.model.memory import estimate_memory
from ouro_train.pipeline.commands import stage_command
from ouro_train.pipeline.cost import MEASURED, human_duration, human_hours, stage_throughput
from ouro_train.pipeline.plan import PlannedStage
from ouro_train.pipeline.spec import PipelineSpec


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def _carries(cfg: Config) -> str:
    if not cfg.checkpoint.init_from:
        return "-"
    parts = ["weights"]
    if cfg.checkpoint.init_optimizer:
        parts.append("optim")
    if cfg.checkpoint.init_schedule == "keep":
        parts.append("LR")
    if cfg.checkpoint.init_data_position:
        parts.append("data")
    return "+".join(parts)


def describe(
    spec: PipelineSpec,
    planned: list[PlannedStage],
    world_size: int,
    nproc: int,
    gpu_memory_gb: float | None = None,
    tokens_per_gpu_s: float | None = None,
) -> str:
    """The dry run's plan: one row per stage (what it trains), then one per stage of what it
    assumes (layout, memory, GPU time), where checkpoints go and how to launch each.

    `gpu_memory_gb` (None: the recipe's plan_gpu_memory_gb) is the budget the memory estimate is
    held against; `tokens_per_gpu_s` (None: cost.MEASURED, scaled per stage by FLOPs per token)
    prices each stage in GPU-hours and wall time at `world_size` GPUs."""
    budget = spec.plan_gpu_memory_gb if gpu_memory_gb is None else gpu_memory_gb
    rows = [("stage", "model", "tokens", "seq", "batch tok", "steps", "LR", "beta", "theta", "carries")]
    for stage in planned:
        if stage.spec.kind == "eval":
            evaluation = stage.spec
            rows.append(
                (
                    evaluation.name,
                    f"{stage.model_layers}x{stage.recurrent_steps}",
                    "-",
                    _human(evaluation.max_tokens),
                    "-",
                    "-",
                    f"eval {evaluation.documents} docs",
                    "-",
                    "-",
                    f"q {','.join(f'{q:g}' for q in evaluation.q)}; KV {','.join(evaluation.kv_policies)}",
                )
            )
            continue
        if stage.cfg is None:
            rows.append(
                (
                    stage.spec.name,
                    f"-> {stage.model_layers}x{stage.recurrent_steps}",
                    "-",
                    "-",
                    "-",
                    "-",
                    f"upcycle {stage.spec.order}",
                    "-",
                    "-",
                    f"moments {stage.spec.optimizer}",
                )
            )
            continue
        cfg = stage.cfg
        t = cfg.train
        batch_tokens = (t.global_batch_rows or t.micro_batch_size) * t.seq_len
        sched = cfg.schedule
        lr = f"{cfg.optim.lr:.3g}"
        if sched.kind != "constant":
            lr += f"->{sched.final_lr:.3g} {sched.kind}"
        else:
            lr += " const"
        if sched.warmup_steps:
            lr += f" (warmup {sched.warmup_steps})"
        if cfg.checkpoint.init_schedule == "keep":
            lr += " kept"
        rows.append(
            (
                stage.spec.name,
                f"{cfg.model.name} {cfg.model.num_layers}x{cfg.model.recurrent_steps}",
                _human(t.total_steps * batch_tokens),
                _human(t.seq_len),
                _human(batch_tokens),
                f"{t.total_steps:,}",
                lr,
                f"{cfg.objective.beta:g}",
                f"{cfg.model.rope_theta:g}",
                _carries(cfg),
            )
        )
    lines = [f"pipeline {spec.name}: {len(planned)} stages in {planned[0].directory.parent}"]
    if spec.description:
        lines.append(spec.description.strip())
    lines += _table(rows)
    lines.append("")
    lines += _resources(planned, world_size, budget, tokens_per_gpu_s)
    lines.append("checkpoints:")
    for stage in planned:
        source = f"{stage.input}" if stage.input else "scratch"
        target = stage.directory / "eval.json" if stage.spec.kind == "eval" else stage.output
        lines.append(f"  {stage.spec.name}: from {source} -> {target}")
    lines.append("launch one stage alone (the runner runs exactly this):")
    for stage in planned:
        if stage.cfg is not None:
            lines.append(f"  {stage.spec.name}: {' '.join(stage_command(spec, stage, nproc, for_display=True))}")
    return "\n".join(lines)


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def _resources(planned: list[PlannedStage], world_size: int, budget: float, given: float | None) -> list[str]:
    """The plan's second table: per training stage, the layout it assumes (world size, TP x DP,
    ZeRO stage, micro-batch, activation checkpointing), its memory per GPU and its GPU time."""
    rows = [("stage", "world", "TP x DP", "ZeRO", "micro", "recompute", "mem/GPU", "tok/s/GPU", "GPU-hours", "wall")]
    total_hours = total_wall = 0.0
    derived = False
    notes: list[str] = []
    for stage in planned:
        cfg = stage.cfg
        if cfg is None:
            what = "upcycle (one process)" if stage.spec.kind == "upcycle" else "eval (one process)"
            rows.append((stage.spec.name, "-", "-", "-", "-", "-", "-", "-", "-", what))
            continue
        par, t = cfg.parallel, cfg.train
        tp = par.tensor_parallel
        layout = f"{tp} x {world_size // tp}" if world_size % tp == 0 else f"{tp} x ?"
        memory = estimate_memory(cfg, world_size)
        speed = stage_throughput(cfg, given)
        derived |= speed.how == "derived"
        # Tokens per step at this layout: a batch the recipe does not fix grows with data parallel.
        per_step = t.global_batch_rows or t.micro_batch_size * t.grad_accum_steps * max(world_size // tp, 1)
        tokens = t.total_steps * per_step * t.seq_len
        hours = tokens / speed.tokens_per_gpu_s / 3600
        total_hours += hours
        total_wall += hours / world_size
        rows.append(
            (
                stage.spec.name,
                str(world_size),
                layout + (" SP" if par.sequence_parallel else ""),
                str(par.zero_stage) + (" offload" if par.cpu_offload else ""),
                str(t.micro_batch_size),
                par.activation_checkpointing,
                f"{memory.total_gib:.1f} GiB" + (" !" if memory.total_gib > budget else ""),
                f"{_human(speed.tokens_per_gpu_s)} {speed.how}",
                human_hours(hours),
                human_duration(hours / world_size),
            )
        )
        if memory.total_gib > budget:
            notes.append(
                f"  warning: {stage.spec.name} may not fit ({memory.total_gib:.1f} > {budget:g} GiB); raise ZeRO/TP "
                "or recompute more"
            )
        if memory.quadratic_attention:
            notes.append(f"  warning: {stage.spec.name}: {memory.quadratic_attention}")
    rows.append(("total", "", "", "", "", "", "", "", human_hours(total_hours), human_duration(total_wall)))
    lines = [
        f"plan at world_size={world_size} GPUs (world_size=N), budget {budget:g} GiB per GPU (plan_gpu_memory_gb=G):"
    ]
    lines += _table(rows)
    lines.append(
        "memory: a rough per-GPU estimate (fp32 states sharded as the stage's ZeRO stage says + bf16 activations; "
        "see ouro_train/model/memory.py); `!`: over the budget"
    )
    if given is not None:
        lines.append(f"time: at {given:,.0f} tokens/s per GPU for every stage (plan_tokens_per_gpu_s, given)")
    else:
        lines.append(f"time: at the measured throughput of {MEASURED.what}")
        if derived:
            lines.append(
                "  derived: other models / sequence lengths scaled from it by training FLOPs per token "
                "(ouro_train/model/flops.py count_model; the same MFU assumed; gate training: forward only)"
            )
        lines.append("  give your own figure with plan_tokens_per_gpu_s=N")
    lines.append("  GPU-hours = tokens / (tokens/s per GPU); wall = GPU-hours / world size (perfect scaling assumed)")
    return lines + notes
