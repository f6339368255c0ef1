r"""A pipeline recipe (recipes/pipeline/*.yaml): stages in order, each a set of hydra overrides.

    name: ouro_2p6b
    run_dir: runs/ouro_2p6b
    overrides: [model=ouro_1p4b, parallel=zero1]        # every stage
    stages:
      - {name: warmup, overrides: [stage=warmup, data=stage1]}
      - {name: stable1, overrides: [stage=stable1, data=stage1]}
      - {name: upcycle, kind: upcycle, order: stack}     # 24 -> 48 layers, moments duplicated
      - {name: stable2, overrides: [stage=stable2, data=stage1, model=ouro_2p6b]}

Each stage starts from the final checkpoint of the stage before it (or `from`); what it takes
from it (weights, optimizer, learning rate, data position) is its stage recipe's
`checkpoint.init_*`. Overrides are OmegaConf strings: `${run_dir}` in one is the pipeline's run
directory (the recipe's `run_dir`, or `run_dir=` on the command line), resolved when the stages
are planned (`resolve_spec`); `${name}` and any other recipe key work alike, and `\${...}`
passes an interpolation on to the stage's own config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf, SCMode
from omegaconf.errors import OmegaConfBaseException

from ouro_train.config.schema import ConfigError
from ouro_train.config.store import RECIPES_DIR


@dataclass
class StageSpec:
    name: str = "???"
    # `train`: an ouro-train run; `upcycle`: ouro-upcycle of the input checkpoint (N -> 2N layers);
    # `eval`: ouro-eval of the input checkpoint on held-out data (exit policies, KV policies).
    kind: str = "train"
    overrides: list[str] = field(default_factory=list)
    # The stage whose final checkpoint this one starts from; None: the stage before it.
    from_stage: str | None = None
    # upcycle only: layer order, Adam moments (duplicate | reset), recurrent steps (None: half).
    order: str = "stack"
    optimizer: str = "duplicate"
    recurrent_steps: int | None = None
    # eval only (ouro_train/inference/evaluate.py; shards read by inference/documents.py): held-out
    # shard directory, documents and tokens per document, Q-exit thresholds, KV policies (the
    # first is the baseline).
    data: str | None = None
    documents: int = 16
    max_tokens: int = 256
    q: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.9, 1.0])
    kv_policies: list[str] = field(default_factory=lambda: ["full", "last"])


@dataclass
class PipelineSpec:
    name: str = "???"
    description: str = ""
    # The base recipe each training stage composes from (recipes/<config_name>.yaml).
    config_name: str = "config"
    run_dir: str = "runs/pipeline"
    overrides: list[str] = field(default_factory=list)
    # `demo`: build the embedded corpus's pretraining and SFT shards into <run_dir>/data first.
    prepare: str | None = None
    # What the dry run's plan assumes (the launch decides the real world size); world_size= and
    # plan_gpu_memory_gb= on the ouro-pipeline command line override them.
    plan_world_size: int = 8
    plan_gpu_memory_gb: float = 80.0
    stages: list[StageSpec] = field(default_factory=list)

    def validate(self, where: str) -> None:
        names = [s.name for s in self.stages]
        if not names:
            raise ConfigError(f"{where}: 'stages' is empty")
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: stage names repeat: {names}")
        if self.prepare not in (None, "demo"):
            raise ConfigError(f"{where}: prepare={self.prepare!r}, expected null or demo")
        for override in self.overrides:
            _refuse_old_template(override, f"{where}: overrides")
        for index, stage in enumerate(self.stages):
            key = f"{where}: stages[{index}] ({stage.name})"
            for override in stage.overrides:
                _refuse_old_template(override, key)
            if stage.kind not in ("train", "upcycle", "eval"):
                raise ConfigError(f"{key}: kind={stage.kind!r}, expected train, upcycle or eval")
            if stage.from_stage is not None and stage.from_stage not in names[:index]:
                raise ConfigError(f"{key}: from_stage={stage.from_stage!r} is not an earlier stage ({names[:index]})")
            if stage.kind == "upcycle":
                if index == 0:
                    raise ConfigError(f"{key}: an upcycle stage needs a stage before it to grow")
                if stage.order not in ("stack", "interleave") or stage.optimizer not in ("duplicate", "reset"):
                    raise ConfigError(f"{key}: order must be stack|interleave and optimizer duplicate|reset")

            if stage.kind == "eval":
                from ouro_train.inference.kv_cache import KV_POLICIES

                if index == 0:
                    raise ConfigError(f"{key}: an eval stage needs a stage before it to evaluate")
                if not stage.data:
                    raise ConfigError(f"{key}: an eval stage needs `data`, a held-out shard directory")
                if stage.documents < 1 or stage.max_tokens < 2 or not all(0.0 <= q <= 1.0 for q in stage.q):
                    raise ConfigError(f"{key}: needs documents >= 1, max_tokens >= 2 and every q in [0, 1]")
                if not stage.kv_policies or set(stage.kv_policies) - set(KV_POLICIES):
                    raise ConfigError(f"{key}: kv_policies {stage.kv_policies}: choose from {list(KV_POLICIES)}")

    def input_of(self, index: int) -> StageSpec | None:
        stage = self.stages[index]
        if stage.from_stage is not None:
            return next(s for s in self.stages if s.name == stage.from_stage)
        return self.stages[index - 1] if index > 0 else None


def pipeline_path(name: str) -> Path:
    return Path(name) if name.endswith((".yaml", ".yml")) else RECIPES_DIR / "pipeline" / f"{name}.yaml"


def load_pipeline(name: str) -> PipelineSpec:
    """A pipeline recipe by name (recipes/pipeline/NAME.yaml) or path; unknown keys are errors."""
    path = pipeline_path(name)
    if not path.is_file():
        known = sorted(p.stem for p in (RECIPES_DIR / "pipeline").glob("*.yaml"))
        raise ConfigError(f"pipeline={name}: no recipe {path} (shipped: {', '.join(known)})")
    try:
        raw = OmegaConf.load(path)
        merged = OmegaConf.merge(OmegaConf.structured(PipelineSpec), raw)
        # Checked against the schema, interpolations kept: `${run_dir}` is the run directory the
        # stages are planned in (resolve_spec), which the command line may change.
        fields = OmegaConf.to_container(merged, resolve=False, structured_config_mode=SCMode.DICT)
        stages = [StageSpec(**stage) for stage in fields.pop("stages")]  # type: ignore[union-attr]
        spec = PipelineSpec(**fields, stages=stages)  # type: ignore[arg-type]
    except OmegaConfBaseException as error:
        raise ConfigError(f"{path}: {error}".splitlines()[0] + f" ({type(error).__name__})") from error
    except yaml.YAMLError as error:  # not YAML at all: the parser names the line and column
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from error
    spec.validate(str(path))
    return spec


def resolve_spec(spec: PipelineSpec, run_dir: Path) -> PipelineSpec:
    """The recipe with its interpolations resolved, `${run_dir}` being `run_dir`."""
    try:
        node = OmegaConf.structured(spec)
        node.run_dir = str(run_dir)
        return OmegaConf.to_object(node)  # type: ignore[return-value]
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        raise ConfigError(
            f"pipeline {spec.name}: {key or 'recipe'}: {str(error).splitlines()[0]}; an override may use "
            "${run_dir} or another key of the recipe (write \\${...} for the stage config's own)"
        ) from error


def split_overrides(overrides: list[str], stage_names: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Command-line overrides -> (those for every training stage, those for one stage each).

    `STAGE:key=value` is `key=value` for stage STAGE only; an unknown STAGE is refused, naming the
    stages. The overrides themselves are hydra's (parsed and checked when each stage is composed)."""
    common: list[str] = []
    per_stage: dict[str, list[str]] = {name: [] for name in stage_names}
    for override in overrides:
        stage, colon, rest = override.partition("=")[0].partition(":")
        if not colon:
            common.append(override)
        elif stage in per_stage:
            per_stage[stage].append(override.split(":", 1)[1])
        else:
            raise ConfigError(f"override {override!r}: no stage {stage!r}; the stages are {', '.join(stage_names)}")
    return common, per_stage


def _refuse_old_template(override: str, where: str) -> None:
    """`{run_dir}` (before OmegaConf interpolation) would now reach the stage as literal text."""
    if "{run_dir}" in override.replace("${run_dir}", ""):
        raise ConfigError(f"{where}: {override!r} uses {{run_dir}}; write ${{run_dir}} (OmegaConf interpolation)")
