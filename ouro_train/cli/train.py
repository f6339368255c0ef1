"""`ouro-train`: train one stage of a looped language model (Ouro's LoopLM), or check a recipe.

It composes a recipe from recipes/ (config.yaml, or --config-name demo | repro_mano), the recipe
groups chosen on the command line (model=, data=, parallel=, stage=) and key=value overrides,
checks every key and value against the typed schema (a typo fails naming the key and the closest
valid one), then trains: checkpoints, metrics.jsonl and the resolved config.yaml go into run_dir,
and the same command again resumes from the newest checkpoint. dry_run=true prints the model's
exact size, FLOPs per token, batch and a rough memory estimate, and writes nothing.
"""

# The work is all in the library: ouro_train.config.store composes the recipe (hydra's compose
# API, so hydra writes nothing and its messages never reach the user), ouro_train.train.stage runs
# the stage (`run_stage`) or the dry run, and this module maps the outcome to an exit status
# (train/signals.py).

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

from ouro_train.config.schema import Config, ConfigError
from ouro_train.config.store import RECIPES_DIR, compose_config, primary_recipes, recipe_groups
from ouro_train.optim.guard import TrainingDiverged
from ouro_train.train.rundir import RunDirError, remove_unused_run_dir
from ouro_train.train.signals import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_STOPPED

OPTIONS = """\
usage: ouro-train [--config-name NAME] [GROUP=OPTION ...] [KEY=VALUE ...]

options:
  -h, --help              this text (with --config-name and overrides: that recipe's values)
  -cn, --config-name NAME the recipe at the top of recipes/: {recipes} (default: config)
  -cp, --config-path DIR  a directory of recipes to use instead of recipes/
  -cd, --config-dir DIR   a directory of recipes searched before recipes/ (your own groups' options)

exit status: 0 done; 2 bad input (the message names the key, file or checkpoint); 3 training
diverged (the message prints the rollback command); 75 stopped by a signal or Ctrl-C (the same
command resumes)."""


@dataclasses.dataclass
class Arguments:
    overrides: list[str] = dataclasses.field(default_factory=list)
    config_name: str = "config"
    config_path: str | None = None
    config_dirs: list[str] = dataclasses.field(default_factory=list)
    help: bool = False


def parse_args(argv: list[str]) -> Arguments:
    """hydra's command line (--config-name / -cn, --config-path / -cp, --config-dir / -cd, KEY=VALUE)."""
    args = Arguments()
    flags = {"--config-name": "config_name", "-cn": "config_name", "--config-path": "config_path"}
    flags |= {"-cp": "config_path", "--config-dir": "config_dirs", "-cd": "config_dirs"}
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        flag, eq, value = arg.partition("=")
        if arg in ("-h", "--help"):
            args.help = True
        elif flag in flags:
            if not eq:
                if not rest:
                    raise ConfigError(f"{flag} needs a value (see ouro-train --help)")
                value = rest.pop(0)
            if flags[flag] == "config_dirs":
                args.config_dirs.append(value)
            else:
                setattr(args, flags[flag], value)
        elif arg.startswith("-"):
            raise ConfigError(
                f"unknown option {arg!r}: ouro-train takes --config-name, --config-path, --config-dir, --help "
                "and KEY=VALUE overrides (see ouro-train --help)"
            )
        else:
            args.overrides.append(arg)
    return args


def _value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[]" if not value else f"[{len(value)} items]"
    return str(value)


def _summary(cls: type) -> str:
    return (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ").split(". ")[0].rstrip(".")


def help_text(args: Arguments) -> str:
    """The docstring, the options, the recipe groups and the main keys with their one-liners (the
    schema's field metadata) and this recipe's values."""
    dirs = [Path(d) for d in args.config_dirs] + [Path(args.config_path or RECIPES_DIR)]
    try:
        values: Config | None = compose_config(args.overrides, args.config_name, args.config_path, args.config_dirs)
        whose = f"the values of --config-name {args.config_name}" + (" with your overrides" if args.overrides else "")
    except ConfigError:
        values, whose = None, "the schema's defaults"
    lines = [__doc__.strip(), "", OPTIONS.format(recipes=", ".join(primary_recipes(dirs))), ""]
    lines.append("recipe groups (GROUP=OPTION; the files in recipes/GROUP/):")
    lines += [f"  {group}=" + " | ".join(options) for group, options in recipe_groups(dirs).items()]
    lines += ["", f"main keys (KEY=VALUE; {whose}; every key: ouro_train/config/schema.py):"]
    rows: list[tuple[str, str] | str] = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        if not dataclasses.is_dataclass(cls):
            continue
        rows.append(f"{section.name}: {_summary(cls)}")
        current = getattr(values, section.name) if values is not None else cls()
        for f in dataclasses.fields(cls):
            if "help" in f.metadata:
                rows.append((f"{section.name}.{f.name}={_value(getattr(current, f.name))}", f.metadata["help"]))
    rows.append("run:")
    for f in dataclasses.fields(Config):
        if "help" in f.metadata:
            value = getattr(values, f.name) if values is not None else f.default
            rows.append((f"{f.name}={_value(value)}", f.metadata["help"]))
    width = min(44, max(len(r[0]) for r in rows if isinstance(r, tuple)) + 2)
    for row in rows:
        if isinstance(row, str):
            lines.append(row)
        else:
            key, text = row
            lines.append(f"  {key.ljust(width)}  {text}" if len(key) <= width else f"  {key}\n  {'':{width}}  {text}")
    return "\n".join(lines)


class _Stdout(logging.StreamHandler):
    """Log records to whatever sys.stdout is when they are emitted."""

    stream = property(lambda self: sys.stdout, lambda self, value: None)


def _configure_logging() -> None:
    """Library warnings on stdout, as hydra's job logging printed them (without its train.log)."""
    root = logging.getLogger()
    if root.handlers:  # configured by the embedding program (or pytest)
        return
    handler = _Stdout()
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def run(cfg: Config) -> None:
    """Train (or dry-run) a composed config; the outcome as an exit status (sys.exit) when it is not 0."""
    from ouro_train.checkpoint.errors import CheckpointError
    from ouro_train.data.manifest import DataError
    from ouro_train.train.stage import StoppedBySignal, dry_run, run_stage  # torch: not for --help or a typo

    run_dir = Path(cfg.run_dir)
    new_run_dir = not run_dir.exists()
    try:
        if cfg.dry_run:
            dry_run(cfg)
        else:
            run_stage(cfg)
    except (ConfigError, DataError, CheckpointError, RunDirError) as error:
        # Bad input is the user's to fix: the message names the key or file; no traceback.
        print(f"error: {error}", file=sys.stderr)
        if new_run_dir:  # refused before it trained: leave no run directory behind
            remove_unused_run_dir(run_dir)
        sys.exit(EXIT_BAD_INPUT)
    except TrainingDiverged as error:
        print(f"error: training diverged: {error}", file=sys.stderr)
        print(diverged_advice(error), file=sys.stderr)
        sys.exit(EXIT_DIVERGED)
    except StoppedBySignal:
        sys.exit(EXIT_STOPPED)


def diverged_advice(error: TrainingDiverged) -> str:
    """Where to go back to and the exact command (checkpoint/rollback.py)."""
    from ouro_train.checkpoint.rollback import rollback_command

    if error.rollback_checkpoint is None:
        return (
            "No checkpoint of this run to roll back to (checkpoint.every_steps / every_minutes were off or it "
            "diverged before the first save): start a new run directory with a lower optim.lr"
            + (f", e.g. optim.lr={error.rollback_lr:g}" if error.rollback_lr else "")
        )
    note = f" ({error.rollback_note})" if error.rollback_note else ""
    launcher = " under the same launcher (torchrun / srun)" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    return (
        f"Roll back to {error.rollback_checkpoint}{note} with a lower peak learning rate{launcher}:\n"
        f"  {rollback_command(error.rollback_checkpoint, error.rollback_lr)}\n"
        "(add checkpoint.rollback_skip_batches=N to also step over the next N batches of data)"
    )


def main(argv: list[str] | None = None) -> None:
    if not RECIPES_DIR.is_dir():
        sys.exit(
            f"error: recipes directory {RECIPES_DIR} not found; install ouro-train from a checkout "
            "with `make setup` (pip install -e .)"
        )
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if args.help:
            print(help_text(args))
            return
        cfg = compose_config(args.overrides, args.config_name, args.config_path, args.config_dirs)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    _configure_logging()
    run(cfg)


if __name__ == "__main__":
    main()
