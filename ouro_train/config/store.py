"""Hydra wiring: the schema registered with the ConfigStore, and composing a recipe into the typed
config with every failure a `ConfigError` in our words (the key, the reason, the closest valid key).

`ouro-train` composes with hydra's compose API (no `hydra.main`): nothing is written before
training starts, and hydra's own messages (its `+key` advice included) never reach the user.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from difflib import get_close_matches
from pathlib import Path
from types import NoneType, UnionType
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ouro_train.config.schema import Config, ConfigError

# recipes/ sits beside the package in the repository (installed editable by `make setup`).
RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
# recipes/pipeline/ holds ouro-pipeline's recipes, not a group of the training config.
NOT_GROUPS = ("pipeline",)

_registered = False


def register_configs() -> None:
    """Register the structured schemas once; recipes name `base_config` first in their defaults."""
    global _registered
    if _registered:
        return
    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    _registered = True


def recipe_groups(config_dirs: list[Path] | None = None) -> dict[str, list[str]]:
    """The recipe groups (`model=`, `data=`, ...: subdirectories of the recipe directories) and their options."""
    groups: dict[str, set[str]] = {}
    for directory in config_dirs or [RECIPES_DIR]:
        for sub in sorted(Path(directory).iterdir()) if Path(directory).is_dir() else []:
            if sub.is_dir() and sub.name not in NOT_GROUPS and not sub.name.startswith((".", "_")):
                groups.setdefault(sub.name, set()).update(p.stem for p in sub.glob("*.yaml"))
    return {name: sorted(options) for name, options in groups.items()}


def primary_recipes(config_dirs: list[Path] | None = None) -> list[str]:
    """The recipes `--config-name` takes (the .yaml files at the top of the recipe directories)."""
    return sorted({p.stem for d in config_dirs or [RECIPES_DIR] for p in Path(d).glob("*.yaml")})


def _unknown(prefix: str, key: str, schema: type, groups: list[str] = ()) -> ConfigError:
    fields = [f.name for f in dataclasses.fields(schema)]
    candidates = fields + [g for g in groups if g not in fields]
    hint = get_close_matches(str(key), candidates, n=1)
    suggestion = f"; did you mean '{prefix}{hint[0]}'?" if hint else ""
    what = f"a field of {schema.__name__}" + (" or a recipe group" if groups else "")
    valid = ", ".join(fields) + (f"; recipe groups: {', '.join(groups)}" if groups else "")
    return ConfigError(f"config key '{prefix}{key}' is not {what}{suggestion} (valid: {valid})")


def check_known_keys(node: DictConfig, schema: type, prefix: str = "") -> None:
    """Reject keys the schema does not define. Hydra's `+key=value` opens the struct flag, so
    OmegaConf alone would let `+model.foo=1` through into a typed config."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        if key == "hydra":
            continue
        full_key = f"{prefix}{key}"
        if key not in fields:
            raise _unknown(prefix, str(key), schema)
        # Nested sections are dataclass fields built by a default_factory that is the class.
        nested = fields[key].default_factory
        child = node[key]
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(nested):
            check_known_keys(child, nested, prefix=f"{full_key}.")


def _optional(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    args = typing.get_args(tp)
    if (typing.get_origin(tp) in (typing.Union, UnionType)) and NoneType in args:
        rest = [a for a in args if a is not NoneType]
        return (rest[0] if len(rest) == 1 else tp), True
    return tp, False


def describe_type(tp: Any) -> str:
    """`int | None` -> 'an integer or null' (what a user types on the command line)."""
    inner, optional = _optional(tp)
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if inner in names:
        text = names[inner]
    elif typing.get_origin(inner) is list:
        text = "a list"
    elif dataclasses.is_dataclass(inner):
        text = f"a section ({inner.__name__}: set its keys, KEY.FIELD=VALUE)"
    else:
        text = "a value"
    return f"{text} or null" if optional else text


def type_name(tp: Any) -> str:
    inner, optional = _optional(tp)
    if typing.get_origin(inner) is list:
        name = f"list[{getattr(typing.get_args(inner)[0], '__name__', 'Any')}]"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} | None" if optional else name


def key_type(key: str, schema: type = Config, groups: list[str] = ()) -> Any:
    """The schema's annotation of a dotted key (list items as `.0` or `[0]`); a ConfigError naming
    the first part that is not a field, with the closest valid key (and recipe group at the top)."""
    tp: Any = schema
    done: list[str] = []
    for part in (p for p in re.sub(r"\[(\w+)\]", r".\1", key).split(".") if p):
        inner, _ = _optional(tp)
        prefix = "".join(f"{p}." for p in done)
        if dataclasses.is_dataclass(inner):
            if part not in {f.name for f in dataclasses.fields(inner)}:
                raise _unknown(prefix, part, inner, groups if not done else ())
            tp = typing.get_type_hints(inner)[part]
        elif typing.get_origin(inner) is list and part.isdigit():
            tp = typing.get_args(inner)[0]
        else:
            raise ConfigError(f"config key '{key}': '{prefix[:-1]}' is {describe_type(tp)}, it has no key '{part}'")
        done.append(part)
    return tp


def check_overrides(overrides: list[str], groups: list[str]) -> list[str]:
    """Check each override's key against the schema before hydra sees it (so that an unknown key,
    with or without `+`, is one message with a suggestion); -> the overrides, a `+` dropped from
    keys the schema has (they always exist in the typed config)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    checked = []
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except OverrideParseException as error:
            reason = _first_line(str(error.message)).replace(f"Error parsing override '{text}'", "").strip()
            raise ConfigError(
                f"override {text!r} is not key=value{': ' + reason if reason else ''} "
                "(e.g. train.steps=10, model=ouro_1p4b)"
            ) from None
        key = override.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")) or "/" in key or override.package is not None:
            checked.append(text)  # hydra's own settings, nested groups: hydra checks them
            continue
        if key in groups:
            # A recipe choice (model=ouro_1p4b): hydra finds the file. `stage=null` is no choice (hydra: ~stage).
            null = override.type == OverrideType.CHANGE and override.value() is None
            checked.append(f"~{key}" if null else text)
            continue
        tp = key_type(key, Config, groups)
        if dataclasses.is_dataclass(_optional(tp)[0]) and override.type != OverrideType.DEL:
            raise ConfigError(
                f"config key '{key}' is a section ({type_name(tp)}), not a value: set its keys, e.g. "
                f"{key}.{dataclasses.fields(_optional(tp)[0])[0].name}=..."
            )
        checked.append(text.lstrip("+") if override.type in (OverrideType.ADD, OverrideType.FORCE_ADD) else text)
    return checked


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)


def _value_error(error: Exception, groups: list[str], override_key: str = "") -> ConfigError:
    """An OmegaConf error about a key (a wrong type, a missing value, an interpolation) in our words;
    `override_key`: the key of the override being merged (errors inside a list's items name only the item's key)."""
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue, ValidationError

    full_key = getattr(error, "full_key", None) or ""
    if isinstance(error, MissingMandatoryValue):
        return ConfigError(f"config key '{full_key}': has no value (???); set {full_key}=...")
    if isinstance(error, InterpolationResolutionError):
        reason = _first_line(getattr(error, "msg", None) or str(error))
        return ConfigError(f"config key '{full_key}': cannot be resolved: {reason}")
    if isinstance(error, ValidationError) and full_key:
        value = getattr(error, "value", None)
        got = "null" if value is None else repr(value)
        try:
            tp = key_type(full_key, Config, groups)
        except ConfigError:
            tp, where = None, f"config key '{override_key or full_key}'"
            try:  # an item's key inside a list of sections (data.sources=[{..., weight: x}])
                item = _optional(key_type(override_key, Config, groups))[0] if override_key else None
                item = typing.get_args(item)[0] if typing.get_origin(item) is list else item
                if dataclasses.is_dataclass(item) and error.key in typing.get_type_hints(item):
                    tp = typing.get_type_hints(item)[error.key]
                    where = f"config key '{override_key}', its '{error.key}'"
            except ConfigError:
                pass
            if tp is None:
                return ConfigError(f"{where}: {_first_line(getattr(error, 'msg', None) or str(error))}")
            return ConfigError(f"{where}: got {got}, expected {describe_type(tp)} ({type_name(tp)})")
        return ConfigError(f"config key '{full_key}': got {got}, expected {describe_type(tp)} ({type_name(tp)})")
    where = f"config key '{full_key}': " if full_key else "config: "
    return ConfigError(where + _first_line(getattr(error, "msg", None) or str(error)))


def _composition_error(error: Exception, config_name: str, groups: dict[str, list[str]]) -> ConfigError:
    """One of hydra's composition errors in our words; never hydra's `+key` advice."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, MissingConfigException):
        missing = str(error.missing_cfg_file or config_name)
        group, _, option = missing.rpartition("/")
        if group:
            options = list(error.options or groups.get(group, []))
            hint = get_close_matches(option, options, n=1)
            suggestion = f"; did you mean {group}={hint[0]}?" if hint else ""
            return ConfigError(
                f"{group}={option}: no such recipe in the '{group}' group{suggestion} "
                f"(available: {', '.join(options) or 'none'})"
            )
        names = primary_recipes()
        hint = get_close_matches(missing, names, n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
        return ConfigError(f"--config-name {missing}: no such recipe{suggestion} (available: {', '.join(names)})")
    cause = error.__cause__
    if isinstance(cause, ConfigError):
        return cause
    merging = re.match(r"Error merging override ([^=\s]+)=", str(error))
    if isinstance(cause, OmegaConfBaseException):
        return _value_error(cause, list(groups), merging.group(1).lstrip("+") if merging else "")
    twice = re.match(r"Multiple values for (\S+)\.", str(error))
    if twice:  # `+stage=warmup` when the recipe's defaults already list the group
        group = twice.group(1)
        return ConfigError(f"{group}: the recipe already has a '{group}' choice; select one with {group}=OPTION")
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and "+" not in line]
    return ConfigError("config: " + ("; ".join(lines[:2]) if lines else type(error).__name__))


def to_config(cfg: DictConfig, groups: list[str] = ()) -> Config:
    """Turn a composed DictConfig into the typed object, running every `validate()`."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        check_known_keys(cfg, Config)
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as error:
        raise _value_error(error, list(groups)) from error


def compose_config(
    overrides: list[str] | None = None,
    config_name: str = "config",
    config_dir: str | Path | None = None,
    extra_dirs: list[str | Path] = (),
) -> Config:
    """Compose a recipe the way the `ouro-train` CLI does; every problem is a ConfigError naming the key.

    `config_dir` replaces recipes/ (`--config-path`); `extra_dirs` are searched before it (`--config-dir`)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    primary = Path(config_dir or RECIPES_DIR).absolute()
    dirs = [Path(d).absolute() for d in extra_dirs]
    groups = recipe_groups([*dirs, primary])
    overrides = check_overrides(list(overrides or []), list(groups))
    if dirs:
        overrides.append(f"hydra.searchpath=[{','.join(f'file://{d}' for d in dirs)}]")
    try:
        with initialize_config_dir(config_dir=str(primary), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        raise _composition_error(error, config_name, groups) from None
    return to_config(cfg, list(groups))
