"""Planning a pipeline: every stage composed and checked before anything runs. `plan` turns the
recipe and the command line's overrides into one `PlannedStage` per stage (its run directory, the
checkpoint it starts from and the one it leaves, its overrides with each key once and its composed
config); `select` picks the stages from start_at to stop_after; `check_layout` and `check_data`
refuse a tensor parallel the world size cannot hold and a data directory that is not there;
`stage_done` says whether a stage's output is complete (a finished stage is skipped).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ouro_train.checkpoint.store import is_complete, read_train_state, step_name
from ouro_train.config.schema import Config, ConfigError
from ouro_train.config.store import compose_config, recipe_groups
from ouro_train.pipeline.overrides import merge_overrides
from ouro_train.pipeline.spec import PipelineSpec, StageSpec, resolve_spec, split_overrides


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


def plan(spec: PipelineSpec, run_dir: Path, extra: list[str]) -> list[PlannedStage]:
    """Compose and validate every stage's config (nothing is read from disk but recipes).

    `extra` overrides go to every training stage; `NAME:key=value` only to stage NAME. The
    recipe's `${run_dir}` is `run_dir`."""
    common, per_stage = split_overrides(extra, [stage.name for stage in spec.stages])
    resolved = resolve_spec(spec, run_dir)
    groups = recipe_groups()
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
        # Each key once, a later override replacing an earlier one: the command a person would write.
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
        overrides = merge_overrides(overrides, groups)
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
