"""A training stage's hydra overrides with each key once: the pipeline's, then the stage's, then
the command line's, then the runner's own, composed by `merge_overrides` so that a later override
of a key replaces the earlier one where it stands (`model=ouro_1p4b … model=ouro_2p6b` becomes
`model=ouro_2p6b` in the first one's place), and the stage's printed and launched command is the
one a person would write. The stage's composed config is the same either way; only merges that
compose the same config (after config/store.py check_overrides) are made, and everything else is
left as written (see merge_overrides).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass


@dataclass
class _Parsed:
    key: str  # the key (or group) with its @package, without the +/++/~ of its form
    group: bool  # a recipe choice (model=ouro_1p4b) rather than a config value
    form: str  # "", "+", "++" or "~"
    mergeable: bool
    value: str  # the text after the first "=" (as written)
    plain: bool = False  # a `+key=` that composes as `key=` (config/store.py check_overrides)


def _parse(text: str, groups: Collection[str]) -> _Parsed | None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import OverrideParseException

    try:
        (override,) = OverridesParser.create().parse_overrides([text])
    except OverrideParseException:
        return None  # composing the stage reports it
    value = override.value()
    # a dict value for a group (`model={num_layers: 8}`) is merged into the node, as hydra's defaults
    # list takes it (`is_dict or not is_group`): a config value, not a recipe choice
    group = override.key_or_group in groups and not isinstance(value, dict)
    form = {OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++", OverrideType.DEL: "~"}.get(override.type, "")
    mergeable = (
        form != "~"
        and not override.is_sweep_override()
        # a dict value is merged into the node, not assigned: two of them both count
        and not isinstance(value, dict)
        # `stage=null` is no choice: a deletion (config/store.py check_overrides)
        and not (group and value is None)
    )
    key = override.key_or_group + (f"@{override.package}" if override.package is not None else "")
    plain = form == "+" and not group and mergeable and _plus_dropped(text, groups)
    return _Parsed(key, group, form, mergeable, text.partition("=")[2], plain)


def _plus_dropped(text: str, groups: Collection[str]) -> bool:
    """config/store.py check_overrides drops the `+`/`++` of a key the schema has before hydra sees
    it (`+optim.lr=1e-4` composes as `optim.lr=1e-4`); it keeps them on hydra's own keys, nested
    groups and packages, and rejects keys the schema lacks."""
    from ouro_train.config.schema import ConfigError
    from ouro_train.config.store import check_overrides

    try:
        (checked,) = check_overrides([text], list(groups))
    except ConfigError:
        return False
    return checked == text.lstrip("+")


def _overlap(a: str, b: str) -> bool:
    """One key is the other or inside it (train and train.steps; not train.steps and train.seq_len)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def merge_overrides(overrides: list[str], groups: Collection[str]) -> list[str]:
    """`overrides` in order with each key once: a later override of a key already given replaces
    the earlier one in its place, keeping the earlier one's form (`+a=1 … a=2` is `+a=2`) and the
    later one's value. `groups` are the recipe groups (config/store.py recipe_groups).

    Merged only where hydra composes the same config from both lists:
    * a recipe choice (`model=x … model=y`): hydra keeps the last choice whatever the order, so it
      may move; `+group=x` (which adds a default, in order) and `group=null` / `~group` (deletions)
      are never merged, nor are choices with a deletion of their group between them;
    * a config value (`optim.lr=3e-3 … optim.lr=3e-4`), when the later one is `key=` or `++key=`,
      or `+key=` on a key the schema has (config/store.py check_overrides drops its `+`, so
      `optim.lr=3e-3 … +optim.lr=1e-4` composes as two assignments and becomes `optim.lr=1e-4`;
      elsewhere `a=1 … +a=2` fails in hydra either way and is kept as written), and no override in
      between sets or deletes a key that contains it or lies inside it (`train.x=1 … train=… …
      train.x=2`, `model.num_layers=4 … model={…} … model.num_layers=6`), since values are assigned
      in order; a dict value (`key={a: 1}`, a group's too) is merged into the node, so it is never
      merged with another; nor are `~key` deletions and sweeps (`a=1,2`).
    """
    parsed = [_parse(text, groups) for text in overrides]
    result: list[str | None] = list(overrides)  # None: merged into an earlier one
    first: dict[str, int] = {}  # key -> index of the override that holds it
    for index, this in enumerate(parsed):
        if this is None or not this.mergeable:
            continue
        earlier = first.get(this.key)
        between = [parsed[i] for i in range(earlier + 1, index) if result[i] is not None] if earlier is not None else []
        if earlier is not None and _can_replace(parsed[earlier], this, between):
            result[earlier] = f"{parsed[earlier].form}{this.key}={this.value}"
            result[index] = None
            continue
        first[this.key] = index
    return [text for text in result if text is not None]


def _can_replace(held: _Parsed, this: _Parsed, between: list[_Parsed | None]) -> bool:
    if held.group != this.group:
        return False
    if this.group:  # and no deletion of the group in between (`stage=null`), to be plain
        return held.form == this.form == "" and not any(p is not None and p.key == this.key for p in between)
    if this.form == "+" and not this.plain:
        return False
    return not any(p is None or (not p.group and _overlap(p.key, this.key)) for p in between)
