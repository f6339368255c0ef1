"""Inference with a looped model: generation with a per-step KV cache and a real early exit
(`generate`), teacher-forced scoring under the same decoder (`score`), and evaluation
(`ouro_train.inference.evaluate`, the `ouro-eval` CLI)."""

from ouro_train.inference.generate import (
    ExitPolicy,
    GenerationOutput,
    LoopDecoder,
    Sampling,
    exit_steps,
    generate,
    generate_uncached,
    q_exit_steps,
    sample,
    score,
)
from ouro_train.inference.kv_cache import KV_POLICIES, LoopKVCache

__all__ = [
    "KV_POLICIES",
    "ExitPolicy",
    "GenerationOutput",
    "LoopDecoder",
    "LoopKVCache",
    "Sampling",
    "exit_steps",
    "generate",
    "generate_uncached",
    "q_exit_steps",
    "sample",
    "score",
]
