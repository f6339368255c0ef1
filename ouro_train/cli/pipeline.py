"""`ouro-pipeline`: run (or plan) a whole multi-stage pipeline recipe.

    ouro-pipeline pipeline=ouro_1p4b dry_run=true          # the stage table, checkpoints, commands
    ouro-pipeline pipeline=demo                             # every stage at toy scale on CPU
    ouro-pipeline pipeline=ouro_2p6b nproc=8 data_root=/lustre/shards start_at=upcycle stop_after=stable2
    ouro-pipeline pipeline=ouro_2p6b data_root=/lustre/shards launch=slurm \
        sbatch='--nodes=32 --gpus-per-node=8 --time=24:00:00' dry_run=true   # the sbatch lines

Pipeline keys (typed, parsed with OmegaConf: a bad value fails naming its key): pipeline,
dry_run (bool), run_dir, start_at, stop_after (they apply to dry runs too), nproc (processes per
stage, launched with torchrun; under SLURM, per node), world_size (GPUs the dry run's plan
assumes; a stage whose tensor parallel it cannot hold is an error), plan_gpu_memory_gb (the
plan's memory budget per GPU; default: the recipe's), plan_tokens_per_gpu_s (prices each stage in
GPU-hours and wall time; default: the measured figure in ouro_train/pipeline/cost.py, scaled by
FLOPs per token), launch (local | slurm: every remaining stage as a SLURM job of
launch/slurm.sbatch, each after the one before; with dry_run=true the sbatch lines are printed),
sbatch (options for every job under launch=slurm). Any other key=value is a
hydra override given to every training stage (e.g. train.device=cuda), and STAGE:key=value to one
stage only (e.g. sft:train.tokens=1000000000); an unknown key fails naming the key and the stage.
A recipe's `${run_dir}` is the run directory (run_dir= here, else the recipe's).
Running it again skips finished stages and resumes an interrupted one.

SIGTERM / SIGUSR1 / SIGINT: the running stage saves a checkpoint and exits, and no further stage
starts (an upcycle in progress is finished first: it is committed by one rename).
Exit status: 0 every selected stage finished; 75 stopped by a signal, resumable (the same
command continues; ouro-train says the same with 75); 2 bad input or a stage failed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from ouro_train.checkpoint.errors import CheckpointError
from ouro_train.config.schema import ConfigError
from ouro_train.data.manifest import DataError


@dataclass
class PipelineOptions:
    """The runner's own keys; None: the recipe's value (run_dir, world_size = plan_world_size)."""

    pipeline: str = MISSING
    dry_run: bool = False
    run_dir: str | None = None
    start_at: str | None = None
    stop_after: str | None = None
    nproc: int = 1
    world_size: int | None = None
    # The dry run's plan: GPU memory budget per GPU (None: the recipe's plan_gpu_memory_gb) and
    # tokens/s per GPU that prices each stage (None: the measured figure, ouro_train/pipeline/cost.py).
    plan_gpu_memory_gb: float | None = None
    plan_tokens_per_gpu_s: float | None = None
    # `local`: the stages run here, one after the other; `slurm`: each remaining stage is submitted
    # as a SLURM job after the one before (ouro_train/pipeline/slurm.py), with `sbatch` options.
    launch: str = "local"
    sbatch: str = ""


KEYS = tuple(f.name for f in fields(PipelineOptions))


def parse(argv: list[str]) -> tuple[PipelineOptions, list[str]]:
    """-> (the pipeline keys, typed, and the stages' hydra overrides, `STAGE:key=value` included)."""
    options: list[str] = []
    overrides: list[str] = []
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__)
            sys.exit(0)
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"argument {arg!r}: expected key=value (see ouro-pipeline --help)")
        if key.lstrip("+") in KEYS:  # `+nproc=2` (hydra's advice elsewhere) is nproc=2
            options.append(f"{key.lstrip('+')}={value}")
        else:
            _check_stage_override(key)
            overrides.append(arg)
    try:
        parsed = OmegaConf.merge(OmegaConf.structured(PipelineOptions), OmegaConf.from_dotlist(options))
        return OmegaConf.to_object(parsed), overrides  # type: ignore[return-value]
    except MissingMandatoryValue as error:
        raise ConfigError(
            "pipeline=NAME is required (a recipe in recipes/pipeline/: demo, ouro_1p4b, ouro_2p6b)"
        ) from error
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "argument"
        raise ConfigError(f"{key}: {str(error).splitlines()[0]} (see ouro-pipeline --help)") from error


def _check_stage_override(key: str) -> None:
    """A key given to every stage is a config key or a recipe group (ouro-train's): one that is
    neither fails here, naming it and the closest pipeline key, config key or group."""
    import re
    from difflib import get_close_matches

    from ouro_train.config.schema import Config
    from ouro_train.config.store import key_type, recipe_groups

    name = key.lstrip("+~")
    if ":" in name:  # STAGE:key=value: the stage it names checks it
        return
    groups = list(recipe_groups())
    head = re.split(r"[./@\[]", name, maxsplit=1)[0]
    known = [f.name for f in fields(Config)] + groups + ["hydra"]
    if head not in known:
        hint = get_close_matches(head, [*KEYS, *known], n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
        raise ConfigError(
            f"unknown key '{name}'{suggestion} (pipeline keys: {', '.join(KEYS)}; any other KEY=VALUE goes to "
            f"every training stage: a config key such as train.steps, or a recipe group: {', '.join(groups)})"
        )
    if name not in groups and head != "hydra" and not any(c in name for c in "/@"):
        key_type(name, Config, groups)  # a dotted key: its first unknown part and the closest valid key


def main(argv: list[str] | None = None) -> int:
    from ouro_train.pipeline.dry_run import describe
    from ouro_train.pipeline.plan import check_data, check_layout, plan, select
    from ouro_train.pipeline.runner import PipelineError, run
    from ouro_train.pipeline.spec import load_pipeline, pipeline_path

    try:
        options, overrides = parse(sys.argv[1:] if argv is None else argv)
        _check_plan_options(options)
        spec = load_pipeline(options.pipeline)
        run_dir = Path(options.run_dir or spec.run_dir).absolute()
        if options.launch == "slurm":
            from ouro_train.pipeline.slurm import submit

            planned = plan(spec, run_dir, overrides)
            selected = select(planned, options.start_at, options.stop_after)
            check_layout(selected, options.world_size or spec.plan_world_size)
            check_data(spec, selected)
            recipe = pipeline_path(options.pipeline).absolute()
            return submit(
                spec, recipe, run_dir, planned, selected, overrides, options.nproc, options.sbatch, options.dry_run
            )
        if options.dry_run:
            world = options.world_size or spec.plan_world_size
            selected = select(plan(spec, run_dir, overrides), options.start_at, options.stop_after)
            check_layout(selected, world)
            check_data(spec, selected)
            print(
                describe(
                    spec, selected, world, options.nproc, options.plan_gpu_memory_gb, options.plan_tokens_per_gpu_s
                )
            )
            return 0
        return run(spec, run_dir, overrides, options.nproc, options.start_at, options.stop_after)
    except (ConfigError, DataError, CheckpointError, PipelineError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _check_plan_options(options: PipelineOptions) -> None:
    if options.launch not in ("local", "slurm"):
        raise ConfigError(f"launch={options.launch}: expected local or slurm")
    if options.sbatch and options.launch != "slurm":
        raise ConfigError("sbatch=... is for launch=slurm")
    for key in ("world_size", "plan_gpu_memory_gb", "plan_tokens_per_gpu_s"):
        value = getattr(options, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value}: must be positive")
    if options.nproc < 1:
        raise ConfigError(f"nproc={options.nproc}: must be at least 1")


if __name__ == "__main__":
    sys.exit(main())
