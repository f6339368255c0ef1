"""The multi-stage runner: plan the stages, run them in order in one run directory, hand each
the previous stage's final checkpoint, skip finished stages, resume an interrupted one.

Layout of a pipeline run directory:

    runs/ouro_1p4b/
      data/                       the demo's shards (prepare: demo)
      warmup/                     a stage's own run directory (ouro-train run_dir)
        checkpoints/step_00004769 its final checkpoint: the next stage's input
        metrics.jsonl  final_eval.json  wandb/
      upcycle/                    an upcycle stage's output (weights, moments, train state)
      report.md  loss_per_step.png  exit_distribution.png

Training stages run as child processes (`python -m ouro_train.cli.train`, under torchrun when
nproc > 1, through `ouro_train.pipeline.torchrun`): the same command that launches the stage
alone, printed by the dry run. A stage is finished when its final checkpoint (step ==
train.steps, with the optimizer file) is complete; anything less is resumed by the stage itself
(checkpoint.resume=auto).

Signals: SIGTERM / SIGUSR1 / SIGINT to the runner go on to the running stage (once), which saves
a checkpoint and exits 75 (EXIT_STOPPED). The runner stops at the next safe point: when the
running stage ends, after an upcycle in progress (committed by one rename, so complete or
absent), or before the next stage would start; it never starts a stage after a signal, and
exits 75 too, as does a stage stopped by a signal sent to it directly (exit 75). The same
command resumes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ouro_train.checkpoint.store import CheckpointError, is_complete, read_train_state, step_name
from ouro_train.config.schema import Config, ConfigError
from ouro_train.config.store import compose_config
from ouro_train.pipeline.cost import MEASURED, human_duration, human_hours, stage_throughput
from ouro_train.pipeline.memory import estimate_memory
from ouro_train.pipeline.spec import PipelineSpec, StageSpec, resolve_spec, split_overrides
from ouro_train.train.signals import EXIT_STOPPED, StopOnSignal


@dataclass
class PlannedStage:
    spec: StageSpec
    directory: Path
    input: Path | None  # the checkpoint it starts from
    output: Path  # what the next stage starts from
    overrides: list[str]
    cfg: Config | None  # None for upcycle stages
    model_layers: int
    recurrent_steps: int


class PipelineError(RuntimeError):
    """A stage failed or cannot start; the message names the stage and what to do."""


def plan(spec: PipelineSpec, run_dir: Path, extra: list[str]) -> list[PlannedStage]:
    """Compose and validate every stage's config (nothing is read from disk but recipes).

    `extra` overrides go to every training stage; `NAME:key=value` only to stage NAME. The
    recipe's `${run_dir}` is `run_dir`."""
    common, per_stage = split_overrides(extra, [stage.name for stage in spec.stages])
    resolved = resolve_spec(spec, run_dir)
    planned: list[PlannedStage] = []
    for index, stage in enumerate(spec.stages):
        source = spec.input_of(index)
        input_path = None
        if source is not None:
            input_path = next(p.output for p in planned if p.spec.name == source.name)
        directory = run_dir / stage.name
        if stage.kind == "upcycle":
            previous = next(p for p in planned if p.spec.name == source.name)
            steps = stage.recurrent_steps or max(1, previous.recurrent_steps // 2)
            planned.append(
                PlannedStage(stage, directory, input_path, directory, [], None, 2 * previous.model_layers, steps)
            )
            continue
        if stage.kind == "eval":  # reads its input, writes a report; the next stage starts from the same input
            previous = next(p for p in planned if p.spec.name == source.name)
            planned.append(
                PlannedStage(
                    _eval_spec(resolved.stages[index], per_stage[stage.name]),
                    directory,
                    input_path,
                    input_path,
                    [],
                    None,
                    previous.model_layers,
                    previous.recurrent_steps,
                )
            )
            continue
        overrides = [
            *resolved.overrides,
            *resolved.stages[index].overrides,
            *common,
            *per_stage[stage.name],
            f"stage_name={stage.name}",
            f"run_dir={directory}",
            f"logging.wandb_group={run_dir.name}",
            "checkpoint.resume=auto",
        ]
        if input_path is not None:
            overrides.append(f"checkpoint.init_from={input_path}")
        try:
            cfg = compose_config(overrides, config_name=spec.config_name)
        except ConfigError as error:
            raise ConfigError(f"stage {stage.name}: {error}") from error
        except Exception as error:  # hydra's own errors: a missing group option, a bad override
            raise ConfigError(f"stage {stage.name}: {type(error).__name__}: {error}") from error
        if source is not None and source.kind == "upcycle":
            grown = next(p for p in planned if p.spec.name == source.name)
            if (cfg.model.num_layers, cfg.model.recurrent_steps) != (grown.model_layers, grown.recurrent_steps):
                raise ConfigError(
                    f"stage {stage.name}: its model has {cfg.model.num_layers} layers x {cfg.model.recurrent_steps} "
                    f"steps but the upcycle stage {source.name} writes {grown.model_layers} x {grown.recurrent_steps}; "
                    "give the stage the grown model (e.g. model=ouro_2p6b)"
                )
        output = directory / "checkpoints" / step_name(cfg.train.total_steps)
        planned.append(
            PlannedStage(
                stage, directory, input_path, output, overrides, cfg, cfg.model.num_layers, cfg.model.recurrent_steps
            )
        )
    return planned


def _eval_spec(stage: StageSpec, overrides: list[str]) -> StageSpec:
    """An eval stage with `NAME:key=value` overrides of its own fields (documents=64, q=[0.5,0.9])."""
    if not overrides:
        return stage
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(stage), OmegaConf.from_dotlist(overrides))
        updated = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ConfigError(f"stage {stage.name}: {overrides}: {str(error).splitlines()[0]}") from error
    PipelineSpec(stages=[StageSpec(name="input"), updated]).validate(f"stage {stage.name}")
    return updated


def stage_done(stage: PlannedStage) -> bool:
    if stage.spec.kind == "eval":
        return (stage.directory / "eval.json").is_file()  # written last, atomically
    if stage.spec.kind == "upcycle":
        return (stage.output / "model.safetensors").is_file() and (stage.output / "train_state.json").is_file()
    if not is_complete(stage.output):
        return False
    state = read_train_state(stage.output)
    return bool(state.get("final")) and state.get("step") == stage.cfg.train.total_steps


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
        "see ouro_train/pipeline/memory.py); `!`: over the budget"
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


def check_layout(planned: list[PlannedStage], world_size: int, key: str = "world_size") -> None:
    """A stage whose tensor parallel cannot exist at `world_size` processes fails here, naming the
    stage and the keys (the trainer would fail the same way, but only when the stage starts)."""
    for stage in planned:
        if stage.cfg is None:
            continue
        tp = stage.cfg.parallel.tensor_parallel
        if tp > world_size or world_size % tp:
            why = "is larger than" if tp > world_size else "does not divide"
            raise ConfigError(
                f"stage {stage.spec.name}: parallel.tensor_parallel={tp} {why} {key}={world_size}: give a world "
                f"size that is a multiple of {tp}, or {stage.spec.name}:parallel.tensor_parallel=1 (or another "
                "parallel preset for that stage)"
            )


def check_data(spec: PipelineSpec, planned: list[PlannedStage]) -> None:
    """A training stage that reads shards under `data_root` needs that directory; an eval stage its
    `data` directory. Not for a recipe whose data the runner builds first (prepare: demo)."""
    if spec.prepare is not None:
        return
    for stage in planned:
        if stage.spec.kind == "eval":
            if not Path(stage.spec.data).is_dir():
                raise ConfigError(
                    f"stage {stage.spec.name}: data={stage.spec.data} is not a directory: give "
                    f"{stage.spec.name}:data=DIR (a held-out shard directory)"
                )
            continue
        cfg = stage.cfg
        if cfg is None or cfg.data.source != "shards":
            continue
        root = Path(cfg.data_root)
        reads = [s.path for s in [*cfg.data.sources, *cfg.data.eval_sources] if Path(s.path).is_relative_to(root)]
        if reads and not root.is_dir():
            raise ConfigError(
                f"stage {stage.spec.name}: data_root={cfg.data_root} ({root.absolute()}) is not a directory, and the "
                "stage reads "
                f"{', '.join(reads[:2])}{' ...' if len(reads) > 2 else ''} from it: give data_root=DIR (the "
                "directory of the ouro-data tokenize outputs)"
            )


def train_args(spec: PipelineSpec, stage: PlannedStage) -> list[str]:
    """ouro-train's arguments for a training stage: the same whether the runner launches it here
    (stage_command) or a SLURM job does (ouro_train/pipeline/slurm.py, through launch/slurm.sbatch)."""
    return ["--config-name", spec.config_name, *stage.overrides]


def stage_command(spec: PipelineSpec, stage: PlannedStage, nproc: int, for_display: bool = False) -> list[str]:
    python = "python" if for_display else sys.executable
    launcher = [python, "-m", "ouro_train.cli.train"]
    if nproc > 1:
        # torchrun, exiting 75 when stopped by a signal (ouro_train/pipeline/torchrun.py); it passes
        # on only --signals-to-handle, whose default lacks SIGUSR1 (SLURM's "stop soon").
        from ouro_train.pipeline.torchrun import SHUTDOWN_TIMEOUT, SIGNALS_TO_HANDLE

        launcher = [python, "-m", "ouro_train.pipeline.torchrun", "--standalone", f"--nproc-per-node={nproc}"]
        launcher += [f"--signals-to-handle={SIGNALS_TO_HANDLE}", f"--shutdown-timeout={SHUTDOWN_TIMEOUT}"]
        launcher += ["-m", "ouro_train.cli.train"]
    args = train_args(spec, stage)
    return launcher + ([f"'{a}'" if any(c in a for c in " {}[]") else a for a in args] if for_display else args)


class _Forward(StopOnSignal):
    """StopOnSignal for the runner: SIGINT counts too, and each signal is passed on to the running
    stage (which saves and exits), once per stage. With no stage running (between stages, during
    an upcycle) the signal is only recorded: `run` checks `requested` before it starts anything."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    ABORT_ON_SECOND_INTERRUPT = False  # a second Ctrl-C at the terminal aborts the stage itself

    def __init__(self) -> None:
        super().__init__(on_signal=lambda signum: self._tell())
        self._child: subprocess.Popen | None = None
        self._told = False  # the current child has been sent its stop signal

    @property
    def child(self) -> subprocess.Popen | None:
        return self._child

    @child.setter
    def child(self, child: subprocess.Popen | None) -> None:
        self._child, self._told = child, False
        if child is not None and self.requested is not None:
            self._tell()  # the signal came while the child was being started

    def _tell(self) -> None:
        # Once: the stage stops at its next step boundary either way, and a repeated signal only
        # risks cutting its save short (torchrun's shutdown; ouro_train/pipeline/torchrun.py).
        if self._told or self._child is None or self._child.poll() is not None:
            return
        self._told = True
        # SIGINT becomes SIGTERM: a clean save-and-exit rather than a KeyboardInterrupt.
        self._child.send_signal(signal.SIGTERM if self.requested == signal.SIGINT else self.requested)


def select(planned: list[PlannedStage], start_at: str | None, stop_after: str | None) -> list[PlannedStage]:
    """The stages from `start_at` to `stop_after` (names; None: the first / the last)."""
    names = [p.spec.name for p in planned]
    for key, value in (("start_at", start_at), ("stop_after", stop_after)):
        if value is not None and value not in names:
            raise ConfigError(f"{key}={value}: no such stage; the stages are {', '.join(names)}")
    first = names.index(start_at) if start_at else 0
    last = names.index(stop_after) if stop_after else len(names) - 1
    if last < first:
        raise ConfigError(f"stop_after={stop_after} comes before start_at={start_at}")
    return planned[first : last + 1]


def run(
    spec: PipelineSpec,
    run_dir: Path,
    extra: list[str],
    nproc: int = 1,
    start_at: str | None = None,
    stop_after: str | None = None,
) -> int:
    """Run the selected stages; -> 0 when they are all finished, EXIT_STOPPED (75) when stopped by a
    signal (to the runner, or to a stage directly) at a safe point: the same call resumes."""
    planned = plan(spec, run_dir, extra)
    selected = select(planned, start_at, stop_after)
    check_layout(selected, nproc, "nproc")
    run_dir.mkdir(parents=True, exist_ok=True)
    with _Forward() as forward:

        def stopped(where: str) -> int:
            print(
                f"[pipeline] stopped by signal {forward.requested} ({signal.Signals(forward.requested).name}) {where}; "
                "run the same command again to continue",
                flush=True,
            )
            return EXIT_STOPPED

        if spec.prepare == "demo":
            from ouro_train.data.demo_shards import build_demo_shards

            vocab = next(p.cfg for p in planned if p.cfg is not None).data.tokenizer_vocab_size
            build_demo_shards(run_dir / "data", vocab)
        for stage in selected:
            name = stage.spec.name
            if stage_done(stage):
                print(f"[pipeline] {name}: finished earlier ({stage.output}), skipped", flush=True)
                continue
            if forward.requested is not None:  # between two stages: start nothing more
                return stopped(f"before {name}")
            if stage.input is not None and not _input_ready(planned, stage):
                raise CheckpointError(
                    f"stage {name} starts from {stage.input}, which is missing or incomplete: run the stage that "
                    f"writes it first (start_at=<that stage>), or point the stage elsewhere with "
                    f"checkpoint.init_from"
                )
            if stage.spec.kind == "eval":
                _evaluate(stage)  # in process; eval.json is written last, by one rename
                if forward.requested is not None:
                    return stopped(f"after {name}")
                continue
            if stage.spec.kind == "upcycle":
                # In process and committed by one rename: a signal during it is handled once it is complete.
                _upcycle(stage)
                if forward.requested is not None:
                    return stopped(f"during {name} (its output is complete)")
                continue
            command = stage_command(spec, stage, nproc)
            print(f"[pipeline] {name}: {'resuming' if stage.directory.exists() else 'starting'}", flush=True)
            forward.child = subprocess.Popen(command, env=_child_env())
            code = forward.child.wait()
            forward.child = None
            if forward.requested is not None:
                return stopped(f"during {name} (exit code {code})")
            if code == EXIT_STOPPED:
                print(
                    f"[pipeline] {name} was stopped by a signal sent to it (exit code {code}); run the same "
                    "command again to resume it",
                    flush=True,
                )
                return EXIT_STOPPED
            if code != 0:
                raise PipelineError(f"stage {name} failed (exit code {code}); its run directory is {stage.directory}")
            if not stage_done(stage):
                raise PipelineError(f"stage {name} ended without its final checkpoint {stage.output}")
    from ouro_train.pipeline.report import write_report

    report = write_report(spec, planned, run_dir)
    print(f"[pipeline] done: {len(selected)} stages; report {report}", flush=True)
    return 0


def _input_ready(planned: list[PlannedStage], stage: PlannedStage) -> bool:
    producer = next((p for p in planned if p.output == stage.input), None)
    return producer is not None and stage_done(producer)


def _upcycle(stage: PlannedStage) -> None:
    from ouro_train.checkpoint.upcycle import upcycle_config, write_upcycled
    from ouro_train.checkpoint.weights import read_weights
    from ouro_train.config.schema import ModelConfig

    state, raw = read_weights(stage.input)
    source = ModelConfig(**raw)
    target = upcycle_config(source, stage.spec.order, stage.recurrent_steps)
    write_upcycled(stage.input, stage.output, state, source, target, stage.spec.order, stage.spec.optimizer)
    print(
        f"[pipeline] {stage.spec.name}: {source.num_layers} layers x {source.recurrent_steps} -> "
        f"{target.num_layers} x {target.recurrent_steps} ({stage.spec.order}, moments {stage.spec.optimizer}) "
        f"in {stage.output}",
        flush=True,
    )


def _evaluate(stage: PlannedStage) -> None:
    from ouro_train.inference.documents import shard_documents
    from ouro_train.inference.eval_report import write_outputs
    from ouro_train.inference.evaluate import evaluate
    from ouro_train.inference.loading import load_model

    spec = stage.spec
    print(f"[pipeline] {spec.name}: evaluating {stage.input} on {spec.data}", flush=True)
    model = load_model(stage.input)
    docs = shard_documents(Path(spec.data), spec.documents, spec.max_tokens, model.config.vocab_size)
    result = evaluate(model, docs, tuple(spec.q), tuple(spec.kv_policies))
    result["source"] = {"model": str(stage.input), "data": spec.data}
    write_outputs(result, stage.directory, f"Exit evaluation ({spec.name}) of {stage.input}")
    print(f"[pipeline] {spec.name}: {stage.directory / 'eval.md'}", flush=True)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    try:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:
        pass
    return env
