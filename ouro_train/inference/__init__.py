"""Inference with a looped model: generation with a per-step KV cache and a real early exit
(`generate`), teacher-forced scoring under the same decoder (`score`), and evaluation (the
`ouro-eval` CLI: `ouro_train.inference.loading` for the model, `.documents` for the held-out
text, `.evaluate` for the measurement, `.eval_report` and `.eval_plot` for eval.md / eval.png)."""

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
