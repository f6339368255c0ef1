"""A rough per-GPU memory estimate for the dry run (what fits, not an exact count):
`estimate_memory` adds up the training states, the activations, the step-wise CE's logits and what
the attention backend adds (`attention_memory`, which names the one S^2 term left, eager `flex`
on CPU, for the plan to warn about).
"""

from __future__ import annotations

from dataclasses import dataclass

from ouro_train.config.schema import Config
from ouro_train.model.flops import count_model

GIB = 2**30
# Bytes per layer use, token and unit of hidden size kept for backward without recomputation.
# Korthikanti et al. 2022 count 34 (bf16, memory-efficient attention); one H200 measured 37.2 for
# Ouro-1.4B with compiled layers (2026-12-04, benchmarks/README.md: 28.0 GiB more per 4K row from
# micro-batch 1 to 2, under bf16 and bf16_loop alike, over 24 layers x R=4 uses).
ACTIVATION_BYTES_PER_H = 37


@dataclass
class MemoryEstimate:
    states_gib: float
    activations_gib: float
    logits_gib: float
    attention_gib: float = 0.0
    # Why the attention term grows with the square of the sequence length, when it does.
    quadratic_attention: str | None = None

    @property
    def total_gib(self) -> float:
        return self.states_gib + self.activations_gib + self.logits_gib + self.attention_gib


def attention_memory(cfg: Config) -> tuple[float, str | None]:
    """-> (bytes the attention backend adds beyond the activations, why it is S^2 or None).

    `model.attention` (ouro_train/kernels/attention.py): `sdpa` and `flash` run fused kernels over
    document segments, so their scores are never stored (O(s) log-sum-exp, inside the activations'
    34 h); compiled `flex` adds its BlockMask, O((s/128)^2) indices. Eager `flex` (on CPU, where it
    is not compiled) materialises fp32 scores and probabilities, heads x s^2 per call: the one S^2
    term left, which the plan warns about."""
    m, t = cfg.model, cfg.train
    heads = m.num_heads / cfg.parallel.tensor_parallel
    if m.attention == "flex":
        if t.device == "cpu":
            scores = 2 * 4 * heads * t.micro_batch_size * t.seq_len**2
            return scores, (
                f"attention=flex on CPU runs eagerly: fp32 scores of {heads:g} heads x {t.seq_len:,}^2 tokens "
                f"({scores / GIB:.1f} GiB per call); use attention=sdpa on CPU"
            )
        blocks = -(-t.seq_len // 128)
        # kv and q block indices, partial and full: four (blocks x blocks) int32 tables per row.
        return 4 * 4 * t.micro_batch_size * blocks**2, None
    return 0.0, None


def estimate_memory(cfg: Config, world_size: int) -> MemoryEstimate:
    """Per GPU at `world_size` GPUs.

    States: parameters, gradients and the two Adam moments are fp32 (4 + 4 + 8 bytes per parameter;
    autocast runs the matmuls in bf16), divided by tensor parallel, and the parts ZeRO shards
    divided by data parallel (stage 1: moments, 2: + gradients, 3: + parameters); no fp32 master
    copy (ZeRO-1/2's is the weights' own partition: parallel/engine.py share_fp32_master). Under
    ZeRO-2/3 the shared layers' whole gradients are held until their last use's backward, and under
    ZeRO-3 with zero3_gather=trunk their whole weights during each pass (unmeasured on a GPU: from
    the code). Activations: per
    layer use and token about 37 h bytes without recomputation (ACTIVATION_BYTES_PER_H, measured;
    memory-efficient attention, so no s^2 term); a looped model uses each layer R times.
    `layer` checkpointing keeps each layer use's input (4 h bytes: the residual stream is fp32) and
    recomputes one layer; `selective` keeps that and the matmul and attention outputs (bf16); `step`
    keeps each recurrent step's input (4 h, fp32 residual stream) and recomputes one step (L layer
    uses). The step-wise CE holds one chunk of logits (chunk x vocab x
    4 bytes, about 3 live copies). Stage II (`objective.kind=gate`) trains the exit gate alone:
    gradients and moments cover its h + 1 parameters only, and the frozen layers record no autograd
    graph, so the activations are one layer use's working set plus the R final states the gate loss
    reads (4 h bytes per token each), whatever the checkpointing policy. train.precision=bf16_loop
    adds 2 bytes per layer parameter at the peak: its bf16 compute copy, and its fp32 accumulator
    in place of the gradient (autograd makes the shared layers' gradients from the accumulators
    after their backward, when their activations are gone). Checked against one H200 (Ouro-1.4B,
    4K, compiled layers, no checkpointing, micro-batch 1 and 2): within 7% under bf16 (low) and 2%
    under bf16_loop (tests/unit/test_memory_estimate.py)."""
    m, par = cfg.model, cfg.parallel
    tp = par.tensor_parallel
    dp = max(1, world_size // tp)
    params = count_model(m, cfg.train.seq_len).total_params / tp
    zero = par.zero_stage
    weights = 4 * params / (dp if zero >= 3 else 1)
    gate = cfg.objective.kind == "gate"
    trained = m.hidden_size + 1 if gate else params  # the exit gate is replicated over tensor parallel
    grads = 4 * trained / (dp if zero >= 2 else 1)
    moments = 8 * trained / (dp if zero >= 1 else 1)
    layer_params = count_model(m, cfg.train.seq_len).layer_params / tp
    if zero >= 2 and not gate and dp > 1:
        # A shared layer's gradient is complete only after its last use's backward: autograd holds
        # every layer's whole gradient until then (its R contributions summed), whatever ZeRO-2/3
        # shard afterwards.
        grads += 4 * layer_params * (1 - 1 / dp)
    if zero == 3 and par.zero3_gather == "trunk" and dp > 1:
        # ZeRO-3 with zero3_gather=trunk holds every layer's weights gathered during each pass
        # (parallel/zero3.py; frozen ones too, in stage II), where `layer` holds about one layer's.
        weights += 4 * layer_params * (1 - 1 / dp)
    if cfg.train.precision in ("bf16_loop", "fp8"):
        # parallel/precision.py's bf16 copies (fp8: and two float8 ones) of this rank's shards;
        # layer_params also holds the norms (< 0.1% of it).
        copies = 4 if cfg.train.precision == "fp8" else 2
        grads += copies * layer_params
    tokens = cfg.train.micro_batch_size * cfg.train.seq_len / (tp if par.sequence_parallel else 1)
    h, uses = m.hidden_size, m.num_layers * m.recurrent_steps
    per_use = ACTIVATION_BYTES_PER_H * h * tokens
    if gate:
        activations = per_use + 4 * h * tokens * m.recurrent_steps
    elif par.activation_checkpointing == "none":
        activations = per_use * uses
    elif par.activation_checkpointing == "layer":
        activations = 4 * h * tokens * uses + per_use
    elif par.activation_checkpointing == "selective":
        # Each layer use keeps its input (fp32) and, in bf16, its matmul and attention outputs:
        # q and the attention output (h each), k and v (kv each), o_proj and down_proj (h each),
        # gate and up (intermediate each), divided over tensor parallel like the layers.
        kv = m.num_kv_heads * m.resolved_head_dim
        kept = 4 * h + 2 * (4 * h + 2 * kv + 2 * m.intermediate_size) / tp
        activations = kept * tokens * uses + per_use
    else:
        activations = 4 * h * tokens * m.recurrent_steps + per_use * m.num_layers
    chunk = min(cfg.objective.ce_chunk_size, cfg.train.micro_batch_size * cfg.train.seq_len)
    logits = 3 * 4 * chunk * m.vocab_size / tp
    attention, quadratic = attention_memory(cfg)
    return MemoryEstimate(
        (weights + grads + moments) / GIB, activations / GIB, logits / GIB, attention / GIB, quadratic
    )
