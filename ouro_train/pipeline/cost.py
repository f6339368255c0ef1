"""What a stage costs in GPU time, for the dry run's plan: tokens / (tokens/s per GPU).

The default throughput is the one GPU measurement so far (`MEASURED`); for another model or
sequence length it is derived from it by training FLOPs per token (ouro_train/model/flops.py
count_model: the same MFU is assumed), and the plan says so. `plan_tokens_per_gpu_s=` on the
ouro-pipeline command line replaces it for every stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from ouro_train.config.schema import Config, ModelConfig
from ouro_train.model.flops import count_model


@dataclass(frozen=True)
class Measurement:
    model: str  # recipes/model/<model>.yaml, as measured (its own recurrent_steps)
    seq_len: int
    tokens_per_gpu_s: float
    what: str


# The only GPU measurement so far: issue #22 of this project (2026-12-04), Ouro-1.4B
# (model=ouro_1p4b: 24 layers x 4 recurrent steps) at seq 4,096, bf16, torch.compile, one H200:
# 11,427 tokens/s (48.2% MFU). Replace it here when a better figure is measured.
MEASURED = Measurement(
    model="ouro_1p4b",
    seq_len=4096,
    tokens_per_gpu_s=11427.0,
    what="Ouro-1.4B (24x4) at seq 4K on one H200, compiled: 11,427 tokens/s, 48.2% MFU (issue #22, 2026-12-04)",
)


@dataclass(frozen=True)
class Throughput:
    tokens_per_gpu_s: float
    how: str  # "given", "measured" or "derived"


@cache
def _measured_model() -> ModelConfig:
    import yaml

    from ouro_train.config.store import RECIPES_DIR

    raw = yaml.safe_load((RECIPES_DIR / "model" / f"{MEASURED.model}.yaml").read_text())
    return ModelConfig(**raw)


def _flops_per_token(cfg: Config) -> int:
    counts = count_model(cfg.model, cfg.train.seq_len)
    # Stage II trains the exit gate alone: the frozen LM runs forward only.
    return counts.forward_flops_per_token if cfg.objective.kind == "gate" else counts.train_flops_per_token


def stage_throughput(cfg: Config, given: float | None = None) -> Throughput:
    """Tokens/s per GPU for a training stage: `given`, else MEASURED scaled by FLOPs per token."""
    if given is not None:
        return Throughput(given, "given")
    reference = count_model(_measured_model(), MEASURED.seq_len).train_flops_per_token
    m = cfg.model
    measured = _measured_model()
    same = (m.name, m.num_layers, m.recurrent_steps, cfg.train.seq_len) == (
        measured.name,
        measured.num_layers,
        measured.recurrent_steps,
        MEASURED.seq_len,
    )
    if same and cfg.objective.kind != "gate":
        return Throughput(MEASURED.tokens_per_gpu_s, "measured")
    return Throughput(MEASURED.tokens_per_gpu_s * reference / _flops_per_token(cfg), "derived")


def human_hours(hours: float) -> str:
    if hours >= 10:
        return f"{hours:,.0f}"
    return f"{hours:.2g}" if hours >= 0.01 else "<0.01"


def human_duration(hours: float) -> str:
    if hours * 60 < 1:
        return "<1 min"
    if hours >= 48:
        return f"{hours / 24:.1f} d"
    if hours >= 1:
        return f"{hours:.1f} h"
    return f"{hours * 60:.0f} min"
