"""`ouro-pipeline`: run (or plan) a whole multi-stage pipeline recipe.

    ouro-pipeline pipeline=ouro_1p4b dry_run=true          # the stage table, checkpoints, commands
    ouro-pipeline pipeline=demo                             # every stage at toy scale on CPU
    ouro-pipeline pipeline=ouro_2p6b nproc=8 data_root=/lustre/shards start_at=upcycle stop_after=stable2

Pipeline keys: pipeline, dry_run, run_dir, start_at, stop_after, nproc (processes per stage,
launched with torchrun), world_size (GPUs the dry run's memory estimate assumes). Any other
key=value is a hydra override given to every training stage (e.g. train.device=cuda), and
STAGE:key=value to one stage only (e.g. sft:train.tokens=1000000000).
Running it again skips finished stages and resumes an interrupted one.

SIGTERM / SIGUSR1 / SIGINT: the running stage saves a checkpoint and exits, and no further stage
starts (an upcycle in progress is finished first: it is committed by one rename).
Exit status: 0 every selected stage finished; 75 stopped by a signal, resumable (the same
command continues; ouro-train says the same with 75); 2 bad input or a stage failed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ouro_train.checkpoint.store import CheckpointError
from ouro_train.config.schema import ConfigError
from ouro_train.data.manifest import DataError

KEYS = ("pipeline", "dry_run", "run_dir", "start_at", "stop_after", "nproc", "world_size")


def parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    options: dict[str, str] = {}
    overrides: list[str] = []
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__)
            sys.exit(0)
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"argument {arg!r}: expected key=value (see ouro-pipeline --help)")
        if key in KEYS:
            options[key] = value
        else:
            overrides.append(arg)
    if "pipeline" not in options:
        raise ConfigError("pipeline=NAME is required (a recipe in recipes/pipeline/: demo, ouro_1p4b, ouro_2p6b)")
    return options, overrides


def main(argv: list[str] | None = None) -> int:
    from ouro_train.pipeline.runner import PipelineError, describe, plan, run
    from ouro_train.pipeline.spec import load_pipeline

    try:
        options, overrides = parse(sys.argv[1:] if argv is None else argv)
        spec = load_pipeline(options["pipeline"])
        run_dir = Path(options.get("run_dir", spec.run_dir)).absolute()
        nproc = int(options.get("nproc", 1))
        if options.get("dry_run", "false").lower() in ("true", "1", "yes"):
            world = int(options.get("world_size", spec.plan_world_size))
            print(describe(spec, plan(spec, run_dir, overrides), world, nproc))
            return 0
        return run(spec, run_dir, overrides, nproc, options.get("start_at"), options.get("stop_after"))
    except (ConfigError, DataError, CheckpointError, PipelineError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
