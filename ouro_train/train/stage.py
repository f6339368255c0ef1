"""One stage of training, from a typed config to its final checkpoint: what `ouro-train` runs.

`run_stage(cfg)` is the whole of it (resume or hand-off, data, model, parallelism, callbacks,
the loop, the final save and report), on 1 process or on every process torchrun / srun started;
the CLI (ouro_train/cli/train.py) only parses the recipe and maps the outcome to an exit status,
and the pipeline runner starts that CLI once per stage. `dry_run(cfg)` prints the plan instead.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from ouro_train.config.resolve import Resolved, resolve
from ouro_train.config.schema import Config, ConfigError
from ouro_train.model.flops import count_model
from ouro_train.model.looplm import LoopLM
from ouro_train.train.rundir import RunDirError, RunDirLock, prepare_run_dir, save_config
from ouro_train.train.signals import EXIT_STOPPED, StopOnSignal


def dry_run(cfg: Config, dp_size: int = 1) -> dict:
    """Build the model on the meta device (no memory), print its exact size and cost, return them."""
    with torch.device("meta"):
        model = LoopLM(cfg.model)
    counts = count_model(cfg.model, cfg.train.seq_len)
    built = model.num_parameters()
    if built != counts.total_params:  # the formula and the module tree must agree
        raise AssertionError(f"parameter count mismatch: built {built:,}, formula {counts.total_params:,}")
    m = cfg.model
    print(
        f"model {m.name}: {m.num_layers} layers x {m.recurrent_steps} recurrent steps, hidden {m.hidden_size}, "
        f"heads {m.num_heads}/{m.num_kv_heads} (kv), head dim {m.resolved_head_dim}, "
        f"intermediate {m.intermediate_size}, vocab {m.vocab_size}, rope theta {m.rope_theta:g}"
    )
    print(
        f"parameters: {built:,} (layers {counts.layer_params:,}, embedding {counts.embedding_params:,}, "
        f"head {counts.head_params:,})"
    )
    print(
        f"FLOPs per token at seq len {cfg.train.seq_len}, all {m.recurrent_steps} steps: "
        f"forward {counts.forward_flops_per_token / 1e9:.3f} GFLOP, "
        f"train (3x forward) {counts.train_flops_per_token / 1e9:.3f} GFLOP"
    )
    resolved = resolve(cfg, dp_size)
    print(
        f"batch: {resolved.tokens_per_step:,} tokens per optimizer step; {resolved.steps:,} steps "
        f"= {resolved.tokens_per_step * resolved.steps:,} tokens"
    )
    from ouro_train.model.memory import estimate_memory

    memory = estimate_memory(cfg, dp_size * cfg.parallel.tensor_parallel)
    print(
        f"memory per device (rough): {memory.total_gib:.1f} GiB = states {memory.states_gib:.1f} + activations "
        f"{memory.activations_gib:.1f} + logits {memory.logits_gib:.1f} + attention ({m.attention}) "
        f"{memory.attention_gib:.2f}"
    )
    if memory.quadratic_attention:
        print(f"warning: {memory.quadratic_attention}")
    return {"parameters": built, **asdict(counts)}


def resolve_resume(resume: str, root: Path, trust_engine_files: bool = False) -> Path | None:
    from ouro_train.checkpoint.errors import CheckpointError
    from ouro_train.checkpoint.store import checkpoint_problem, find_latest, is_complete

    if resume == "none":
        return None
    if resume == "auto":
        return find_latest(root, trust_engine_files)
    path = Path(resume)
    if not is_complete(path):
        raise CheckpointError(
            f"checkpoint.resume={resume}: not a complete checkpoint directory (no COMPLETE "
            "marker, train_state.json or engine/); pick one under <run_dir>/checkpoints"
        )
    problem = checkpoint_problem(path, trust_engine_files)
    if problem:
        raise CheckpointError(f"checkpoint.resume={resume}: {problem}; pick an earlier one under <run_dir>/checkpoints")
    return path


def written_by_deepspeed(checkpoint: Path | None) -> bool:
    if checkpoint is None:
        return False
    from ouro_train.checkpoint.manager import saved_layout
    from ouro_train.checkpoint.store import read_train_state

    return saved_layout(checkpoint, read_train_state(checkpoint))[3] == "deepspeed"


def handoff_source(cfg: Config) -> dict | None:
    """The train state of `checkpoint.init_from` (a stage's final checkpoint or an ouro-upcycle
    output), checked to hold what this stage's hand-off options take from it."""
    from ouro_train.checkpoint.errors import CheckpointError
    from ouro_train.checkpoint.store import read_train_state_if_any
    from ouro_train.checkpoint.weights import WEIGHTS

    if not cfg.checkpoint.init_from:
        return None
    path = Path(cfg.checkpoint.init_from)
    if not (path / WEIGHTS).is_file():
        raise CheckpointError(
            f"checkpoint.init_from={path}: no {WEIGHTS} there; this stage starts from a previous stage's final "
            "checkpoint (or an ouro-import / ouro-upcycle output): run that stage first or fix the path"
        )
    state = read_train_state_if_any(path)
    wants = {
        "next_lr": cfg.checkpoint.init_schedule == "keep",
        "loader": cfg.checkpoint.init_data_position,
    }
    for key, wanted in wants.items():
        if wanted and state.get(key) is None:
            option = "init_schedule=keep" if key == "next_lr" else "init_data_position=true"
            raise CheckpointError(
                f"checkpoint.{option}: {path} records no {key} (weights only, e.g. an ouro-import output); "
                f"set checkpoint.{'init_schedule=reset' if key == 'next_lr' else 'init_data_position=false'}"
            )
    return state


def hand_off(cfg: Config, resolved: Resolved, source: dict, trainer, train_batches) -> str:
    """A new stage takes from the previous one what its recipe says; -> a line saying what."""
    path = Path(cfg.checkpoint.init_from)
    taken = ["weights"]
    if cfg.checkpoint.init_optimizer:
        from ouro_train.checkpoint.optimizer_state import load_optimizer_state, read_optimizer_state

        load_optimizer_state(trainer.engine, read_optimizer_state(path), path)
        taken.append("optimizer")
    if cfg.checkpoint.init_schedule == "keep":
        taken.append(f"learning rate {resolved.lr:.3g}")
    if cfg.checkpoint.init_data_position:
        offsets = train_batches.continue_from(source["loader"])
        taken.append(f"data position {offsets}")
    return f"stage {cfg.stage_name} starts from {path}: " + ", ".join(taken)


def run_stage(cfg: Config) -> dict:
    """One stage on 1 process, or on every process torchrun / srun started (same code); -> the
    final evaluation's metrics. Raises StoppedBySignal (checkpoint saved), TrainingDiverged, and
    ConfigError / DataError / CheckpointError / RunDirError for bad input (message names the key or file)."""
    from ouro_train.checkpoint import rollback
    from ouro_train.checkpoint.errors import CheckpointError
    from ouro_train.checkpoint.manager import Checkpointer
    from ouro_train.checkpoint.store import read_train_state
    from ouro_train.data.build import build_data
    from ouro_train.parallel import build_model, destroy_parallel, init_parallel, parallelize
    from ouro_train.train.callbacks import ConsoleLogger, JsonlLogger
    from ouro_train.train.checkpoint_callback import CheckpointCallback
    from ouro_train.train.report import plot_loss_per_step, truncate_metrics
    from ouro_train.train.trainer import Trainer, freeze_for_objective

    run_dir = Path(cfg.run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    checkpoint_root = run_dir / "checkpoints"
    resume_from = resolve_resume(cfg.checkpoint.resume, checkpoint_root, cfg.checkpoint.trust_engine_files)
    # From here to the end a SIGTERM / SIGUSR1 is recorded, never fatal: in start-up the first step
    # boundary stops the run (with a checkpoint); during the final evaluation and save the stage
    # finishes (the signal came when nothing was left to stop).
    check_backends(cfg)
    signals = StopOnSignal().__enter__()
    layout = init_parallel(cfg.parallel, cfg.model, cfg.train.device, group=written_by_deepspeed(resume_from))
    main_rank = layout.rank == 0
    say = print if main_rank else (lambda *a, **k: None)
    lock = None
    try:
        unknown = [rank for rank in cfg.logging.profile_ranks if rank >= layout.world_size]
        if cfg.logging.profile_start is not None and unknown:
            raise ConfigError(
                f"config key 'logging.profile_ranks': ranks {unknown} do not exist in a world of "
                f"{layout.world_size} process(es); name ranks below {layout.world_size}"
            )
        # Rank 0 checks and locks the run directory; every rank fails alike if it cannot.
        if main_rank:
            try:
                prepare_run_dir(run_dir)
                lock = RunDirLock(run_dir).acquire()
                save_config(cfg, run_dir)  # <run_dir>/config.yaml: the config this start trains with
                refused = ""
            except RunDirError as error:
                refused = str(error)
        refused = broadcast_from_rank0(refused if main_rank else None)
        if refused:
            raise RunDirError(refused)
        if main_rank:
            show_config(run_dir)
        source = handoff_source(cfg)
        # The continued LR of a hand-off is part of what this stage trains (and of its config hash),
        # and so is the LR of a rollback (checkpoint/rollback.py), kept by every later resume.
        lr = source["next_lr"] if source is not None and cfg.checkpoint.init_schedule == "keep" else None
        saved_state = read_train_state(resume_from) if resume_from is not None else {}
        lr = rollback.resumed_lr(saved_state) or lr
        rolled_back = None
        if cfg.checkpoint.rolls_back:
            if resume_from is None:
                raise CheckpointError(
                    f"checkpoint.rollback_lr / rollback_skip_batches: no checkpoint to roll back to in "
                    f"{checkpoint_root}; set checkpoint.resume to the checkpoint the divergence message named"
                )
            current = lr if lr is not None else cfg.optim.lr
            record = rollback.plan(cfg, resume_from, saved_state, current)
            made = rollback.already_made(record, checkpoint_root)
            if made is None:
                rolled_back, lr = record, record["lr"]
            else:
                say(f"this rollback was made before and the run went on from it: resuming {made}")
                resume_from, saved_state = made, read_train_state(made)
                lr = rollback.resumed_lr(saved_state)
        resolved = resolve(cfg, layout.dp, lr=lr)
        train_batches, eval_batches = build_data(cfg, resolved, layout.dp_rank)
        # Only this rank's share of the model is ever built (parallel/materialize.py): the initial
        # weights (seeded by train.seed, the same at any layout) or, for a new stage, the previous
        # stage's read tensor by tensor. A resume loads its weights after the engine exists.
        init_from = Path(cfg.checkpoint.init_from) if resume_from is None and cfg.checkpoint.init_from else None
        model, weights = build_model(cfg, layout, resolved, init_from)
        parameters = count_model(cfg.model, cfg.train.seq_len).total_params
        freeze_for_objective(model, cfg.objective.kind)
        engine = parallelize(model, cfg, layout, resolved, weights)
        if init_from is not None:
            say(f"initialised weights from {init_from}")
        say(
            f"model {cfg.model.name}: {parameters:,} parameters; data {cfg.data.source}; "
            f"{layout.describe()}, ZeRO {cfg.parallel.zero_stage}; run dir {run_dir}"
        )
        trainer = Trainer(cfg, model, train_batches, eval_batches, engine=engine, resolved=resolved)
        checkpointer = Checkpointer(cfg, checkpoint_root, layout.rank, layout.world_size, resolved=resolved)
        checkpointer.rollbacks = list(saved_state.get("rollbacks") or []) + ([rolled_back] if rolled_back else [])
        checkpointer.rolling_back = rolled_back is not None
        loader_state = (lambda: train_batches.state_dict()) if hasattr(train_batches, "state_dict") else (lambda: None)
        resumed = None
        if resume_from is not None:
            resumed = checkpointer.load(resume_from, trainer, train_batches)
            say(f"resumed from {resume_from} at step {trainer.state.step}")
        elif source is not None:
            say(hand_off(cfg, resolved, source, trainer, train_batches))
        else:
            say(
                f"starting fresh: no checkpoint in {checkpoint_root} to resume"
                if cfg.checkpoint.resume == "auto"
                else "starting fresh (checkpoint.resume=none)"
            )
        if rolled_back is not None:
            trainer.guard.reset_streak()
            for _ in range(rolled_back["skip_batches"] * resolved.grad_accum_steps):  # each rank its own stream
                next(train_batches)
            trainer.annotations = rollback.metrics_fields(rolled_back)
            aside, failed = None, ""
            if main_rank:
                try:
                    aside = rollback.set_aside_newer(checkpoint_root, rolled_back, metrics_path)
                except OSError as error:
                    failed = f"{checkpoint_root}: could not set the later checkpoints aside for the rollback ({error})"
            failed = broadcast_from_rank0(failed if main_rank else None)
            if failed:
                raise CheckpointError(failed)
            # Durable at once: the checkpoint rolled back to, saved again with the rollback (its rate,
            # the data skipped, the guard reset), so that a crash before the next save resumes it.
            checkpointer.save(trainer, loader_state())
            say(rollback.describe(rolled_back, aside))
        if main_rank:
            # Log lines of steps after the checkpoint (a run killed after it) are replaced, not doubled,
            # and a line torn by a kill or a full disk is dropped (with a warning naming the file).
            truncate_metrics(metrics_path, trainer.state.step)
        if trainer.state.step >= resolved.steps and (resumed or {}).get("final"):
            say(f"nothing to do: {run_dir} already trained {trainer.state.step} of {resolved.steps} steps")
            return {}
        # (At the last step without a final checkpoint, e.g. stopped during the final save, the
        # fit below trains nothing and the final evaluation and checkpoint are made.)
        from ouro_train.train.callbacks import Throughput, WandbLogger, peak_tflops

        # The trainer runs callbacks by their `order` (metrics producers, loggers, then checkpoints).
        flops = count_model(cfg.model, cfg.train.seq_len).train_flops_per_token
        peak = peak_tflops(cfg.logging.peak_tflops, cfg.train.device)
        trainer.callbacks.append(Throughput(flops, layout.world_size, peak))
        if main_rank and cfg.logging.jsonl:
            trainer.callbacks.append(JsonlLogger(metrics_path))
        if main_rank and cfg.logging.wandb:
            trainer.callbacks.append(WandbLogger(cfg, run_dir, asdict(cfg)))
        if main_rank and cfg.logging.console:
            trainer.callbacks.append(ConsoleLogger(cfg.train.log_every, progress_bar=cfg.logging.progress_bar))
        saver = CheckpointCallback(checkpointer, loader_state, cfg.checkpoint.every_steps, cfg.checkpoint.every_minutes)
        trainer.callbacks.append(saver)
        if cfg.logging.profile_start is not None and layout.rank in cfg.logging.profile_ranks:
            from ouro_train.train.profiling import StepProfiler

            log = cfg.logging
            profiler = StepProfiler(log.profile_start, log.profile_steps, run_dir / "profile", layout.rank)
            trainer.callbacks.append(profiler)
        started, first_step, first_tokens = time.monotonic(), trainer.state.step, trainer.state.tokens
        with diverging_ends_in_a_rollback(trainer, checkpoint_root):
            final = trainer.fit(signals)
            if trainer.stopped_by_signal is not None:
                if cfg.checkpoint.save_on_signal:
                    saver.save(trainer)
                say(
                    f"stopped by signal {trainer.stopped_by_signal} after step {trainer.state.step}; "
                    + (f"checkpoint in {checkpoint_root}" if cfg.checkpoint.save_on_signal else "no checkpoint written")
                    + f"; exit status {EXIT_STOPPED}: run the same command again to resume"
                )
                raise StoppedBySignal(trainer.stopped_by_signal)
            if cfg.checkpoint.save_final:
                saver.save(trainer, final=True)
        if not main_rank:
            return final
        (run_dir / "final_eval.json").write_text(json.dumps(final, indent=2))
        if hasattr(train_batches, "report"):
            report = train_batches.report()
            (run_dir / "data_report.json").write_text(json.dumps(report, indent=2))
            for name, seen in report.items():
                samples, epochs = seen["samples"], seen["epochs"]
                print(f"data {name}: {seen['tokens']:,} tokens seen ({samples:,} samples, {epochs:.3f} epochs)")
        if cfg.logging.plot and cfg.logging.jsonl:
            print(f"plot: {plot_loss_per_step(metrics_path, run_dir / 'loss_per_step.png')}")
        saved = saver.last_path if cfg.checkpoint.save_final else None
        print(
            run_summary(cfg, trainer, time.monotonic() - started, first_step, first_tokens, final, saved, metrics_path)
        )
        return final
    finally:
        if lock is not None:
            lock.release()
        destroy_parallel()
        signals.__exit__(None, None, None)


@contextmanager
def diverging_ends_in_a_rollback(trainer, checkpoint_root: Path):
    """A divergence (the guard's, or weights found non-finite by a save: NonFiniteWeights) leaves
    with where to roll back to, which the CLI prints with the command (exit status 3)."""
    from ouro_train.checkpoint.manager import NonFiniteWeights
    from ouro_train.checkpoint.store import read_train_state, rollback_target
    from ouro_train.optim.guard import NONFINITE_WEIGHTS, TrainingDiverged

    try:
        yield
    except (TrainingDiverged, NonFiniteWeights) as caught:
        error = caught
        if isinstance(caught, NonFiniteWeights):
            error = TrainingDiverged(str(caught), NONFINITE_WEIGHTS)
            error.rollback_lr = trainer.suggested_lr(NONFINITE_WEIGHTS)
        error.rollback_checkpoint = rollback_target(checkpoint_root)
        if error.rollback_checkpoint is not None:
            health = read_train_state(error.rollback_checkpoint).get("health") or {}
            error.rollback_note = health.get("why", "")
        if error is caught:
            raise
        raise error from caught


def show_config(run_dir: Path) -> None:
    """The resolved config, once per start: in full into a log (stdout not a terminal: a SLURM
    output file keeps what the run trained with next to what it printed), one line on a terminal."""
    import sys

    from ouro_train.train.rundir import CONFIG_FILE

    path = run_dir / CONFIG_FILE
    if sys.stdout.isatty():
        print(f"config: {path}")
    else:
        print(f"config ({path}):\n{path.read_text().rstrip()}\n--- end of config")


def run_summary(
    cfg: Config,
    trainer,
    seconds: float,
    first_step: int,
    first_tokens: int,
    final: dict,
    checkpoint: Path | None,
    metrics_path: Path,
) -> str:
    """The end-of-run line: what this launch trained, how fast, the evaluation, where the result is."""
    from ouro_train.train.callbacks import clock
    from ouro_train.train.report import read_metrics

    steps, tokens = trainer.state.step - first_step, trainer.state.tokens - first_tokens
    line = (
        f"done: stage {cfg.stage_name}, step {trainer.state.step}; this launch {steps:,} steps, {tokens:,} tokens in "
        f"{clock(seconds)} ({tokens / max(seconds, 1e-9):,.0f} tokens/s); {trainer.state.tokens:,} tokens in all"
    )
    if "eval/loss" in final:
        line += f"; eval loss {final['eval/loss']:.4f}"
        evals = read_metrics(metrics_path)[1] if metrics_path.is_file() else []
        best = min(evals, key=lambda r: r["eval/loss"], default=None)
        if best is not None and best["eval/loss"] < final["eval/loss"]:
            line += f" (best {best['eval/loss']:.4f} at step {best['step']})"
    return line + (
        f"; final checkpoint {checkpoint}"
        if checkpoint is not None
        else "; no final checkpoint (checkpoint.save_final=false)"
    )


def check_backends(cfg: Config) -> None:
    """An attention or kernel backend that cannot run with these settings fails before any work,
    naming the key (instead of at the first step, after the data and the model were built)."""
    from ouro_train.config.schema import ConfigError
    from ouro_train.kernels import require_triton
    from ouro_train.kernels.attention import AttentionBackendError, check_backend

    try:
        check_backend(cfg.model.attention, cfg.train.device, cfg.train.precision)
    except AttentionBackendError as error:
        raise ConfigError(f"config key 'model.attention': {error}") from error
    if cfg.model.kernels == "triton":
        try:
            require_triton(torch.device(cfg.train.device))
        except RuntimeError as error:
            raise ConfigError(f"config key 'model.kernels': {error}") from error


class StoppedBySignal(Exception):
    """The stage stopped at a step boundary on SIGTERM / SIGUSR1 (checkpoint saved): exit EXIT_STOPPED."""


def broadcast_from_rank0(value):
    """Rank 0's value on every rank (the value itself on a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
