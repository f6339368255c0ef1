"""Hydra wiring: the schema registered with the ConfigStore, and loading outside `hydra.main`."""

from __future__ import annotations

import dataclasses
from difflib import get_close_matches
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ouro_train.config.schema import Config, ConfigError

# recipes/ sits beside the package in the repository (installed editable by `make setup`).
RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"

_registered = False


def register_configs() -> None:
    """Register the structured schemas once; recipes name `base_config` first in their defaults."""
    global _registered
    if _registered:
        return
    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    _registered = True


def check_known_keys(node: DictConfig, schema: type, prefix: str = "") -> None:
    """Reject keys the schema does not define. Hydra's `+key=value` opens the struct flag, so
    OmegaConf alone would let `+model.foo=1` through into a typed config."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        if key == "hydra":
            continue
        full_key = f"{prefix}{key}"
        if key not in fields:
            hint = get_close_matches(str(key), list(fields), n=1)
            suggestion = f"; did you mean '{prefix}{hint[0]}'?" if hint else ""
            raise ConfigError(
                f"config key '{full_key}' is not a field of {schema.__name__}{suggestion} (valid: {', '.join(fields)})"
            )
        # Nested sections are dataclass fields built by a default_factory that is the class.
        nested = fields[key].default_factory
        child = node[key]
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(nested):
            check_known_keys(child, nested, prefix=f"{full_key}.")


def to_config(cfg: DictConfig) -> Config:
    """Turn a composed DictConfig into the typed object, running every `validate()`."""
    check_known_keys(cfg, Config)
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def compose_config(overrides: list[str] | None = None, config_name: str = "config") -> Config:
    """Compose a recipe the way the `ouro-train` CLI does (used by tests and tools)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides or [])
    return to_config(cfg)
