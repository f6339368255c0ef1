"""Typed configuration: one dataclass per component, each validating its own fields.

Hydra loads YAML from `recipes/` on top of these schemas (registered in `store.py`), so a
key that is not a field here is rejected by OmegaConf with the key named. Value checks live
in each class's `validate()`, which `OmegaConf.to_object` runs through `__post_init__`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# model.attention's choices (ouro_train/kernels/attention.py implements them; kept here so that
# reading a config does not import torch).
ATTENTION_BACKENDS = ("sdpa", "flex", "flash")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what to do."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


def _one_of(value: Any, choices: tuple, key: str) -> None:
    _require(value in choices, key, f"got {value!r}, expected one of {list(choices)}")


@dataclass
class ModelConfig:
    """The LoopLM's shape. Field names follow the paper; `to_hf_config` maps them to HF names."""

    name: str = field(
        default="tiny", metadata={"help": "model name (runs/<name> by default; set by the model= recipe)"}
    )
    vocab_size: int = field(default=4096, metadata={"help": "vocabulary size (must cover the tokenizer's ids)"})
    hidden_size: int = field(default=128, metadata={"help": "width of the residual stream"})
    num_layers: int = field(default=2, metadata={"help": "decoder layers in the stack"})
    num_heads: int = field(default=4, metadata={"help": "attention heads"})
    num_kv_heads: int = 2
    # None means hidden_size // num_heads (what the released models use: 2048 / 16 = 128).
    head_dim: int | None = None
    intermediate_size: int = 352
    # R, the number of times the whole layer stack is applied (4 in the released models).
    recurrent_steps: int = field(
        default=4, metadata={"help": "R: times the whole layer stack is applied (4 in the released models)"}
    )
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # Two departures from the reference's init, for small models trained briefly (recipes/model/
    # mano.yaml): the embedding's std (None: init_std) and the initial weight of the sandwich norms
    # that close each residual branch (input_layernorm_2, post_attention_layernorm_2; 1 in the
    # reference). Those norms make every branch add a unit-RMS vector to a stream whose embedding
    # has RMS init_std, so at init a deep stack buries the token's identity under 2 L R such
    # vectors; a unit embedding and branch norms of 0.1 start it near the identity instead.
    embed_init_std: float | None = None
    branch_norm_init: float = 1.0
    # The exit gate's initial bias (0 in the reference: lambda = 1/2 at every step, so p(t) starts at
    # 1/2, 1/4, ... and the last of R steps gets 2^-(R-1) of the loss). Negative starts the exit
    # distribution on the last step, so that the later steps learn from the start (docs/LOOP.md).
    exit_gate_bias_init: float = 0.0
    max_position_embeddings: int = 65536
    # Attention backend (ouro_train/kernels/attention.py), the same semantics on packed rows:
    # `sdpa` (torch; CPU and GPU; packed rows one document segment at a time), `flex` (torch
    # flex_attention with a document-causal BlockMask; trains on CUDA, forward only on CPU), `flash`
    # (flash-attn varlen; CUDA, bf16, the `.[gpu]` extra). None builds an S x S mask.
    attention: str = field(default="sdpa", metadata={"help": "attention backend: sdpa | flex | flash"})
    # RMSNorm (with the sandwich residual add fused in), SwiGLU and RoPE: `torch` (plain torch, any
    # device) or `triton` (fused Triton kernels; CUDA only, an error elsewhere). Same math: a run
    # may resume with the other one.
    kernels: str = field(default="torch", metadata={"help": "norm / SwiGLU / RoPE kernels: torch | triton (CUDA)"})

    def __post_init__(self) -> None:
        self.validate()

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def validate(self, section: str = "model") -> None:
        for key in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            _require(getattr(self, key) >= 1, f"{section}.{key}", f"must be >= 1, got {getattr(self, key)}")
        _require(
            self.recurrent_steps >= 1,
            f"{section}.recurrent_steps",
            f"must be >= 1 (the number of loops), got {self.recurrent_steps}",
        )
        if self.head_dim is None:
            _require(
                self.hidden_size % self.num_heads == 0,
                f"{section}.num_heads",
                f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size} "
                f"(or set {section}.head_dim explicitly)",
            )
        else:
            _require(self.head_dim >= 2, f"{section}.head_dim", f"must be >= 2, got {self.head_dim}")
        _require(
            self.resolved_head_dim % 2 == 0,
            f"{section}.head_dim",
            f"RoPE needs an even head dimension, got {self.resolved_head_dim}",
        )
        _require(
            self.num_heads % self.num_kv_heads == 0,
            f"{section}.num_kv_heads",
            f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}",
        )
        _require(self.rope_theta > 0, f"{section}.rope_theta", f"must be > 0, got {self.rope_theta}")
        _require(self.norm_eps > 0, f"{section}.norm_eps", f"must be > 0, got {self.norm_eps}")
        _require(self.init_std > 0, f"{section}.init_std", f"must be > 0, got {self.init_std}")
        if self.embed_init_std is not None:
            _require(self.embed_init_std > 0, f"{section}.embed_init_std", f"must be > 0, got {self.embed_init_std}")
        _require(self.branch_norm_init > 0, f"{section}.branch_norm_init", f"must be > 0, got {self.branch_norm_init}")
        _one_of(self.attention, ATTENTION_BACKENDS, f"{section}.attention")
        _one_of(self.kernels, ("torch", "triton"), f"{section}.kernels")


@dataclass
class ObjectiveConfig:
    """Stage I: sum_t p(t) CE_t - beta H(p). Stage II (`gate`): LM frozen, only the exit gate trains."""

    kind: str = field(
        default="stage1",
        metadata={"help": "stage1 (sum_t p(t) CE_t - beta H(p)) | gate (stage II: only the exit gate trains)"},
    )
    # Entropy coefficient beta: 0.1 in stage 1a, 0.05 afterwards (OURO_SPEC).
    beta: float = field(default=0.1, metadata={"help": "entropy coefficient beta (0.1 in stage 1a, 0.05 afterwards)"})
    # Tokens per chunk of the step-wise cross-entropy: bounds logits memory to chunk x vocab.
    ce_chunk_size: int = 4096
    # Stage II target w_t = sigmoid(k (I_t - gamma)), I_t = max(0, CE_{t-1} - CE_t).
    gate_k: float = 50.0
    gate_gamma: float = 0.005

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, section: str = "objective") -> None:
        _one_of(self.kind, ("stage1", "gate"), f"{section}.kind")
        _require(self.beta >= 0, f"{section}.beta", f"must be >= 0, got {self.beta}")
        _require(self.ce_chunk_size >= 1, f"{section}.ce_chunk_size", f"must be >= 1, got {self.ce_chunk_size}")
        _require(self.gate_k > 0, f"{section}.gate_k", f"must be > 0, got {self.gate_k}")


@dataclass
class OptimConfig:
    """AdamW as in the paper: betas (0.9, 0.95), weight decay 0.1, clipping 1.0."""

    lr: float = field(default=3e-4, metadata={"help": "peak learning rate (AdamW)"})
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8  # OPEN in the paper; our choice (the torch default).
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clipping (0: off)"})
    # torch's fused AdamW kernel (one kernel for every parameter, CPU and CUDA) instead of its
    # foreach implementation: the same update (to float rounding); the optimizer step 3.3x faster
    # on 2 CPU threads (benchmarks/bench_optimizer.py). A checkpoint resumes under either.
    fused: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, section: str = "optim") -> None:
        _require(math.isfinite(self.lr) and self.lr > 0, f"{section}.lr", f"must be a finite number > 0, got {self.lr}")
        for key in ("beta1", "beta2"):
            _require(
                0 <= getattr(self, key) < 1,
                f"{section}.{key}",
                f"must be in [0, 1), got {getattr(self, key)}",
            )
        _require(self.eps > 0, f"{section}.eps", f"must be > 0, got {self.eps}")
        _require(self.weight_decay >= 0, f"{section}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.grad_clip >= 0, f"{section}.grad_clip", f"must be >= 0, got {self.grad_clip}")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then `constant`, `cosine` or `wsd`.

    `wsd` (warmup-stable-decay) holds the peak and decays over the last `decay_steps`
    (or `decay_fraction` of the run) with `decay_shape` linear | cosine | sqrt (1 - sqrt).
    `cosine` decays from the end of warmup to the last step. Both end at `final_lr`.
    """

    kind: str = field(
        default="constant", metadata={"help": "after warmup: constant | cosine | wsd (warmup-stable-decay)"}
    )
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    final_lr: float = field(default=0.0, metadata={"help": "learning rate at the last step (cosine, wsd)"})
    decay_steps: int | None = None
    decay_fraction: float = field(
        default=0.2, metadata={"help": "wsd: the fraction of the run that decays (unless decay_steps)"}
    )
    decay_shape: str = "linear"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, section: str = "schedule") -> None:
        _one_of(self.kind, ("constant", "cosine", "wsd"), f"{section}.kind")
        _one_of(self.decay_shape, ("linear", "cosine", "sqrt"), f"{section}.decay_shape")
        _require(self.warmup_steps >= 0, f"{section}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(self.final_lr >= 0, f"{section}.final_lr", f"must be >= 0, got {self.final_lr}")
        _require(
            self.decay_steps is None or self.decay_steps >= 0,
            f"{section}.decay_steps",
            f"must be >= 0, got {self.decay_steps}",
        )
        _require(
            0 <= self.decay_fraction <= 1,
            f"{section}.decay_fraction",
            f"must be in [0, 1], got {self.decay_fraction}",
        )


@dataclass
class SourceConfig:
    """One tokenized source (a directory written by `ouro-data tokenize` or `ouro-data sft`)."""

    name: str = "???"
    path: str = "???"
    weight: float = 1.0


@dataclass
class DataConfig:
    """Where batches come from.

    `demo`: the embedded corpus (Python docs), tokenized in memory; no files needed.
    `shards`: a weighted mixture of tokenized sources, read by global sample index
    (deterministic, resumable at any data-parallel size; see ouro_train/data/loader.py).
    """

    source: str = field(
        default="demo", metadata={"help": "demo (the embedded corpus, no files) | shards (tokenized sources)"}
    )
    sources: list[SourceConfig] = field(
        default_factory=list, metadata={"help": "shards: [{name, path, weight}, ...] (ouro-data tokenize output)"}
    )
    # Held-out sources for evaluation (shards only); empty: no evaluation.
    eval_sources: list[SourceConfig] = field(
        default_factory=list, metadata={"help": "held-out sources to evaluate on (empty: none)"}
    )
    # Loader worker processes per rank (0: read in the training process).
    num_workers: int = field(
        default=0, metadata={"help": "loader worker processes per rank (0: in the training process)"}
    )
    # Attention stays inside each packed document and no label crosses a document boundary.
    document_masking: bool = True
    # Position ids restart at 0 at every document (else 0..S-1 along the packed row).
    document_positions: bool = True
    # Check each shard's sha256 against its manifest the first time a process opens it (a
    # corrupt copy fails naming the shard): the shard is read once more per process, ~1-1.3 s
    # per GB from the page cache. false skips it, for storage you trust (e.g. after one
    # `ouro-data inspect --verify` there).
    verify_checksums: bool = field(
        default=True, metadata={"help": "check each shard's sha256 the first time it is opened"}
    )
    # Demo only: tokenizer trained once on the embedded corpus with `tokenizers`, cached.
    tokenizer_vocab_size: int = 4096
    # None: $OURO_CACHE_DIR or ~/.cache/ouro-train.
    cache_dir: str | None = None
    val_fraction: float = 0.05

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, section: str = "data") -> None:
        _one_of(self.source, ("demo", "shards"), f"{section}.source")
        if self.source == "shards":
            _require(
                len(self.sources) > 0,
                f"{section}.sources",
                "data.source=shards needs at least one source {name, path, weight}",
            )
        for kind in ("sources", "eval_sources"):
            names = [s.name for s in getattr(self, kind)]
            _require(len(set(names)) == len(names), f"{section}.{kind}", f"duplicate source names in {names}")
            for i, src in enumerate(getattr(self, kind)):
                _require(src.weight >= 0, f"{section}.{kind}[{i}].weight", f"must be >= 0, got {src.weight}")
        if self.sources:
            _require(
                sum(s.weight for s in self.sources) > 0,
                f"{section}.sources",
                "weights must sum to a positive number",
            )
        _require(self.num_workers >= 0, f"{section}.num_workers", f"must be >= 0, got {self.num_workers}")
        _require(
            self.tokenizer_vocab_size >= 256 + 5,
            f"{section}.tokenizer_vocab_size",
            f"a byte-level BPE needs at least 261 ids (256 bytes + 5 specials), got {self.tokenizer_vocab_size}",
        )
        _require(
            0 < self.val_fraction < 1,
            f"{section}.val_fraction",
            f"must be in (0, 1), got {self.val_fraction}",
        )


# train.precision: fp32; bf16 autocast; bf16 autocast with LoopLM-aware shared weights.
PRECISIONS = ("fp32", "bf16", "bf16_loop", "fp8")
# The LoopLM-aware precisions (ouro_train/parallel/precision.py): shared weights cast once per step.
LOOP_PRECISIONS = ("bf16_loop", "fp8")

# Optimizer steps of a stage that sets neither train.steps nor train.tokens.
DEFAULT_STEPS = 100


@dataclass
class TrainConfig:
    """The stage's length and batch, precision, device, seed and logging cadence."""

    # Optimizer steps of the stage. None: from `tokens` when that is set, else DEFAULT_STEPS.
    steps: int | None = field(
        default=None, metadata={"help": "optimizer steps of the stage (null: from train.tokens, else 100)"}
    )
    # Stage length and batch in tokens, as the paper states them. `tokens` gives the steps
    # (tokens / global_batch_tokens, rounded up) and `global_batch_tokens` the global batch in
    # sequences (global_batch_tokens / seq_len); each excludes its counterpart (`steps`,
    # `global_batch_size`): set one of each pair.
    tokens: int | None = field(
        default=None, metadata={"help": "stage length in tokens (with global_batch_tokens; instead of steps)"}
    )
    global_batch_tokens: int | None = field(
        default=None, metadata={"help": "tokens per optimizer step (instead of global_batch_size)"}
    )
    # Sequences per rank per forward pass (a memory knob).
    micro_batch_size: int = field(default=8, metadata={"help": "sequences per rank per forward pass (a memory knob)"})
    grad_accum_steps: int = 1
    # Sequences per optimizer step over all ranks. When set, the accumulation steps are derived
    # from it at start-up (global / (micro_batch_size x data-parallel size)), so the same recipe
    # trains the same batches at any world size, and a resume at another world size sees the same data.
    global_batch_size: int | None = field(
        default=None, metadata={"help": "sequences per optimizer step over all ranks (sets grad accumulation)"}
    )
    seq_len: int = field(default=128, metadata={"help": "tokens per sequence"})
    # Autocast dtype for the forward pass; parameters and optimizer state stay fp32. `bf16_loop`:
    # bf16 autocast, and the shared layers' linears use a bf16 copy of each weight made once per
    # optimizer step, their R weight gradients accumulated in fp32 by the GEMMs themselves
    # (ouro_train/parallel/precision.py). Not with tensor parallel or ZeRO-3. `fp8` (opt-in):
    # bf16_loop with the shared linears' forward and input-gradient GEMMs in float8, each weight
    # quantised once per optimizer step (CPU, or a GPU of compute capability 8.9+: H100, H200, L40).
    precision: str = field(
        default="fp32",
        metadata={
            "help": "fp32 | bf16 (autocast) | bf16_loop (bf16, weights cast once per step) | fp8 (bf16_loop, "
            "shared linears' GEMMs in float8)"
        },
    )
    device: str = field(default="cpu", metadata={"help": "cpu | cuda"})
    seed: int = field(default=1234, metadata={"help": "seed of the initial weights and the data order"})
    eval_every: int = field(default=0, metadata={"help": "evaluate every N steps (0: only at the end)"})
    eval_batches: int = 4
    log_every: int = field(default=10, metadata={"help": "log a line every N steps"})
    # Stop after this many steps of this run (the schedule still spans `steps`); None: run to `steps`.
    max_steps_this_run: int | None = field(
        default=None, metadata={"help": "stop after N steps of this run (resume later; the schedule still spans steps)"}
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, section: str = "train") -> None:
        """Checks the fields as written; changes nothing (what they imply: `total_steps`,
        `global_batch_rows` and ouro_train/config/resolve.py)."""
        _require(
            self.tokens is None or self.steps is None,
            f"{section}.steps",
            f"train.tokens={self.tokens} already sets the number of steps (tokens / global_batch_tokens); "
            "set only one of them (e.g. train.tokens=null to give train.steps)",
        )
        _require(
            self.global_batch_tokens is None or self.global_batch_size is None,
            f"{section}.global_batch_size",
            f"train.global_batch_tokens={self.global_batch_tokens} already sets the global batch "
            f"(global_batch_tokens / seq_len sequences); set only one of them (e.g. train.global_batch_tokens=null)",
        )
        if self.global_batch_tokens is not None:
            _require(
                self.global_batch_tokens >= self.seq_len and self.global_batch_tokens % self.seq_len == 0,
                f"{section}.global_batch_tokens",
                f"{self.global_batch_tokens} is not a whole number of sequences of seq_len {self.seq_len}",
            )
        if self.tokens is not None:
            _require(self.tokens >= 1, f"{section}.tokens", f"must be >= 1, got {self.tokens}")
            _require(
                self.global_batch_tokens is not None,
                f"{section}.tokens",
                "needs train.global_batch_tokens (the tokens per optimizer step) to give the number of steps",
            )
        if self.steps is not None:
            _require(self.steps >= 1, f"{section}.steps", f"must be >= 1, got {self.steps}")
        for key in ("micro_batch_size", "grad_accum_steps", "seq_len", "eval_batches", "log_every"):
            _require(getattr(self, key) >= 1, f"{section}.{key}", f"must be >= 1, got {getattr(self, key)}")
        _require(self.eval_every >= 0, f"{section}.eval_every", f"must be >= 0, got {self.eval_every}")
        _one_of(self.precision, PRECISIONS, f"{section}.precision")
        if self.global_batch_size is not None:
            _require(
                self.global_batch_size >= 1,
                f"{section}.global_batch_size",
                f"must be >= 1, got {self.global_batch_size}",
            )

    @property
    def total_steps(self) -> int:
        """The stage's optimizer steps: `steps`, or `tokens` / `global_batch_tokens` rounded up."""
        if self.tokens is not None:
            return -(-self.tokens // self.global_batch_tokens)
        return DEFAULT_STEPS if self.steps is None else self.steps

    @property
    def global_batch_rows(self) -> int | None:
        """Sequences per optimizer step over all ranks when the recipe fixes them (`global_batch_size`
        or `global_batch_tokens`); None: micro_batch_size x grad_accum_steps x data-parallel size."""
        if self.global_batch_tokens is not None:
            return self.global_batch_tokens // self.seq_len
        return self.global_batch_size


@dataclass
class ParallelConfig:
    """How one run spreads over processes. The data-parallel size is derived:
    dp = world_size / tensor_parallel (checked against the world size at start-up)."""

    tensor_parallel: int = field(
        default=1, metadata={"help": "tensor-parallel size (data parallel is world size / this)"}
    )
    # DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states sharded), 2 (+ gradients),
    # 3 (+ parameters). Shards over the data-parallel group only.
    zero_stage: int = field(default=0, metadata={"help": "DeepSpeed ZeRO stage 0-3"})
    # Keep ZeRO optimizer states (and, at stage 3, parameters) in CPU memory.
    cpu_offload: bool = False
    # What ZeRO-3 gathers at a time. `trunk`: every weight but the LM head's, once for the forward's
    # R recurrent steps and once for the backward's (each shared weight is used R times per pass;
    # the gathered trunk is held for the pass). `layer`: DeepSpeed's own per-module gathering, each
    # layer's weights at each of its R uses (R times the all-gathers, the least memory held).
    zero3_gather: str = field(default="trunk", metadata={"help": "ZeRO-3 gathers: trunk | layer"})
    # Recompute activations in backward: `selective` (each decoder layer use keeps its matmul and
    # attention outputs, recomputes the elementwise rest), `layer` (each decoder layer use) or
    # `step` (each whole recurrent step, the cheaper in memory: R x fewer saved states per layer).
    activation_checkpointing: str = field(
        default="none", metadata={"help": "recompute activations: none | selective | layer | step"}
    )
    # Megatron sequence parallelism in the tensor-parallel group (norms and residuals on a
    # sequence shard). Needs tensor_parallel > 1.
    sequence_parallel: bool = False
    # Process-group backend: `auto` is nccl on CUDA, gloo on CPU.
    backend: str = "auto"
    # torch.compile each decoder layer (it runs L x R times per forward: one compiled unit reused by
    # every layer and recurrent step). On in the GPU pipelines; under ZeRO-3 only with
    # zero3_gather=trunk (with `layer`, DeepSpeed's parameter hooks run inside every layer call).
    compile: bool = field(default=False, metadata={"help": "torch.compile each decoder layer"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, section: str = "parallel") -> None:
        _require(self.tensor_parallel >= 1, f"{section}.tensor_parallel", f"must be >= 1, got {self.tensor_parallel}")
        _one_of(self.zero_stage, (0, 1, 2, 3), f"{section}.zero_stage")
        _one_of(
            self.activation_checkpointing, ("none", "selective", "layer", "step"), f"{section}.activation_checkpointing"
        )
        _one_of(self.backend, ("auto", "gloo", "nccl"), f"{section}.backend")
        _one_of(self.zero3_gather, ("trunk", "layer"), f"{section}.zero3_gather")
        _require(
            not self.sequence_parallel or self.tensor_parallel > 1,
            f"{section}.sequence_parallel",
            "sequence parallelism splits the sequence over the tensor-parallel group: set tensor_parallel > 1",
        )
        _require(
            not (self.compile and self.zero_stage == 3 and self.zero3_gather == "layer"),
            f"{section}.compile",
            "compiling the layers is not supported with zero_stage=3 and zero3_gather=layer (DeepSpeed gathers "
            "parameters in hooks inside each layer call); set parallel.zero3_gather=trunk or parallel.compile=false",
        )
        _require(
            not self.cpu_offload or self.zero_stage >= 1,
            f"{section}.cpu_offload",
            "offloading needs ZeRO: set zero_stage >= 1",
        )

    def check_world(self, world_size: int, model: ModelConfig) -> int:
        """Validate against the launched world and the model; returns the data-parallel size."""
        tp = self.tensor_parallel
        _require(
            world_size % tp == 0,
            "parallel.tensor_parallel",
            f"tensor_parallel={tp} does not divide the world size {world_size}; launch a multiple of {tp} "
            "processes or change parallel.tensor_parallel",
        )
        for key in ("num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
            value = getattr(model, key)
            _require(
                value % tp == 0,
                "parallel.tensor_parallel",
                f"tensor_parallel={tp} does not divide model.{key}={value}; pick a tensor-parallel size "
                f"that divides it",
            )
        return world_size // tp


@dataclass
class CheckpointConfig:
    """Periodic, atomic checkpoints in <run_dir>/checkpoints and resuming from them."""

    # `auto`: continue from the newest complete checkpoint of the run directory if there is one;
    # `none`: always start fresh; or the path of a checkpoint directory.
    resume: str = field(
        default="auto", metadata={"help": "auto (the newest checkpoint of run_dir) | none | a checkpoint path"}
    )
    # Start (when there is nothing to resume) from the weights of this checkpoint directory or
    # `ouro-import` output (model.safetensors): weights only, fresh optimizer, any world size.
    init_from: str | None = field(
        default=None, metadata={"help": "start from the weights of this checkpoint (a previous stage)"}
    )
    # Hand-off from `init_from` (a previous stage's final checkpoint or an ouro-upcycle output):
    # also its Adam moments and step (optimizer.safetensors; any world size) ...
    init_optimizer: bool = False
    # ... `keep`: start at the learning rate it ended with (its next LR), as this stage's peak,
    # without warmup (stable 1 -> stable 2 -> CT annealing ...); `reset`: this stage's own schedule.
    init_schedule: str = "reset"
    # ... and continue its data stream: sources with the same name resume after the tokens it used.
    init_data_position: bool = False
    every_steps: int = field(default=0, metadata={"help": "save every N steps (0: off)"})
    # On by default, so that a run nobody configured still loses at most this much to a crash
    # (a signal or Ctrl-C saves at the step boundary anyway). 0: off.
    every_minutes: float = field(default=30.0, metadata={"help": "save every N minutes (0: off)"})
    keep_last: int = field(default=2, metadata={"help": "newest checkpoints kept"})
    keep_every: int = 0  # also keep every step that is a multiple of this (0: off)
    save_final: bool = True
    save_on_signal: bool = True  # SIGTERM / SIGUSR1: save at the step boundary, then exit
    # DeepSpeed unpickles its engine files with weights_only=False; by default every such load
    # (ds_to_universal's included) is forced to torch's weights-only unpickler
    # (checkpoint/safety.py). True skips that, for files you wrote and trust.
    trust_engine_files: bool = False
    # Roll back after a divergence (the command the exit-3 message prints): resume from
    # checkpoint.resume (a checkpoint's path) with this peak learning rate instead
    # of the saved one, for this stage's own schedule and a continued (init_schedule=keep) one
    # alike. Everything else about the training config is still checked. The checkpoints after it
    # are moved aside (checkpoints/rolled_back-*/, never resumed), the rollback is recorded in every
    # later train_state.json and in the next step's metrics, and later resumes keep the new rate.
    rollback_lr: float | None = field(
        default=None, metadata={"help": "roll back after a divergence with this peak learning rate"}
    )
    # ... and step over the next N batches (optimizer steps' worth) of data after it, as large runs
    # do to pass a bad stretch. With or without rollback_lr.
    rollback_skip_batches: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, section: str = "checkpoint") -> None:
        _one_of(self.init_schedule, ("reset", "keep"), f"{section}.init_schedule")
        for key in ("init_optimizer", "init_data_position"):
            _require(
                not getattr(self, key) or self.init_from is not None,
                f"{section}.{key}",
                "needs checkpoint.init_from (the checkpoint to take it from)",
            )
        _require(
            self.init_schedule == "reset" or self.init_from is not None,
            f"{section}.init_schedule",
            "keep needs checkpoint.init_from (the checkpoint whose learning rate to continue)",
        )
        for key in ("every_steps", "every_minutes", "keep_every"):
            _require(getattr(self, key) >= 0, f"{section}.{key}", f"must be >= 0, got {getattr(self, key)}")
        _require(self.keep_last >= 1, f"{section}.keep_last", f"must be >= 1, got {self.keep_last}")
        _require(
            self.rollback_lr is None or (math.isfinite(self.rollback_lr) and self.rollback_lr > 0),
            f"{section}.rollback_lr",
            f"must be a finite learning rate > 0, got {self.rollback_lr}",
        )
        _require(
            self.rollback_skip_batches >= 0,
            f"{section}.rollback_skip_batches",
            f"must be >= 0, got {self.rollback_skip_batches}",
        )
        _require(
            not self.rolls_back or self.resume not in ("none", "auto"),
            f"{section}.rollback_lr",
            "a rollback names the checkpoint it goes back to: set checkpoint.resume to its path (the "
            "divergence message prints the whole command)",
        )

    @property
    def rolls_back(self) -> bool:
        return self.rollback_lr is not None or self.rollback_skip_batches > 0


@dataclass
class GuardConfig:
    """The training stability guard (optim/guard.py). A step whose loss or gradient norm is not
    finite on any rank, or whose loss spikes, has its update skipped on every rank (its batch is
    consumed, the step counter and LR schedule advance, the weights and optimizer do not change);
    `max_consecutive_bad` bad steps in a row stop the run with exit status 3."""

    enabled: bool = field(
        default=True,
        metadata={"help": "skip bad updates (non-finite or spiking loss, an update too large for the weights)"},
    )
    # A loss spike: the step's loss is more than `spike_zscore` standard deviations above the mean
    # of the last `window` accepted steps' losses AND more than `spike_min_ratio` times that mean
    # (so that a very flat loss curve, tiny std, does not turn noise into spikes). 0: no spike check.
    spike_zscore: float = 6.0
    spike_min_ratio: float = 1.1
    window: int = 100
    # Accepted steps seen before spikes are judged (the first steps of a run fall fast).
    min_history: int = 20
    max_consecutive_bad: int = field(default=5, metadata={"help": "stop (exit 3) after this many bad steps in a row"})
    # The update is judged before it is applied: AdamW moves each element by at most ~1.17 x the
    # learning rate (betas 0.9/0.95; optim/guard.py adamw_update_bound), so a step whose largest
    # possible update ||dw|| is more than this many times ||w|| is skipped. 4 stops a learning rate
    # some 200x above the usual before it writes blown-up weights into a checkpoint (Ouro-1.4B at
    # 3e-4: ~0.02; the tiny test models at 1e-2: ~0.2) and lets the exit gate, a small probe whose
    # weights start near 0.02, train at 3e-2 (1.7). 0: off.
    max_update_ratio: float = 4.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, section: str = "guard") -> None:
        _require(self.spike_zscore >= 0, f"{section}.spike_zscore", f"must be >= 0 (0: off), got {self.spike_zscore}")
        _require(self.spike_min_ratio >= 1, f"{section}.spike_min_ratio", f"must be >= 1, got {self.spike_min_ratio}")
        for key in ("window", "min_history", "max_consecutive_bad"):
            _require(getattr(self, key) >= 1, f"{section}.{key}", f"must be >= 1, got {getattr(self, key)}")
        _require(
            self.max_update_ratio >= 0,
            f"{section}.max_update_ratio",
            f"must be >= 0 (0: off), got {self.max_update_ratio}",
        )
        _require(
            self.min_history <= self.window,
            f"{section}.min_history",
            f"{self.min_history} exceeds guard.window={self.window}: the window never holds that many losses",
        )


@dataclass
class LoggingConfig:
    """Console, metrics.jsonl, plots and Weights & Biases."""

    console: bool = True
    # tqdm's bar, on a terminal only (a redirected log gets the plain lines alone).
    progress_bar: bool = field(default=True, metadata={"help": "a progress bar on the console"})
    jsonl: bool = True
    # Write loss_per_step.png into the run directory at the end of training.
    plot: bool = field(default=True, metadata={"help": "write loss_per_step.png into run_dir at the end"})
    # Weights & Biases: one run per stage, grouped by `wandb_group` (the pipeline's run directory
    # name when a pipeline runs it). `offline` unless configured (or WANDB_MODE is set): files in
    # <run_dir>/wandb, to `wandb sync` later.
    wandb: bool = field(
        default=True, metadata={"help": "log to Weights & Biases (offline files in run_dir/wandb unless wandb_mode)"}
    )
    wandb_project: str = "ouro-train"
    wandb_group: str | None = None
    wandb_mode: str = field(default="offline", metadata={"help": "offline | online | disabled"})
    # Peak dense bf16 TFLOP/s per device, for MFU. None: looked up from the CUDA device name
    # (H100/H200 989, A100 312); no MFU on CPU.
    peak_tflops: float | None = None
    # torch.profiler over optimizer steps [profile_start, profile_start + profile_steps), after one
    # warm-up step, on the ranks in profile_ranks: a trace (Perfetto) and a breakdown (device time
    # by kind of kernel, idle time, host time per phase of the step) in <run_dir>/profile/
    # (ouro_train/train/profiling.py). None: off.
    profile_start: int | None = field(
        default=None, metadata={"help": "first optimizer step to profile (trace + breakdown in run_dir/profile)"}
    )
    profile_steps: int = field(default=2, metadata={"help": "how many steps to profile from profile_start"})
    profile_ranks: list[int] = field(default_factory=lambda: [0], metadata={"help": "the ranks that profile"})

    def __post_init__(self) -> None:
        _one_of(self.wandb_mode, ("offline", "online", "disabled"), "logging.wandb_mode")
        _require(
            self.profile_start is None or self.profile_start >= 1,
            "logging.profile_start",
            f"got {self.profile_start}: optimizer steps count from 1 (null turns profiling off)",
        )
        _require(self.profile_steps >= 1, "logging.profile_steps", f"got {self.profile_steps}, expected >= 1")
        _require(
            all(rank >= 0 for rank in self.profile_ranks),
            "logging.profile_ranks",
            f"got {list(self.profile_ranks)}: ranks are >= 0",
        )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # The stage this run is (warmup, stable1, ... in a pipeline): run names, logs, train state.
    stage_name: str = field(
        default="main", metadata={"help": "the stage this run is (warmup, stable1, ... in a pipeline)"}
    )
    # The directory data recipes' source paths start from (`${data_root}/nemotron_cc`).
    data_root: str = field(default="data", metadata={"help": "the directory data recipes' source paths start from"})
    run_dir: str = field(
        default="runs/default", metadata={"help": "where checkpoints, metrics.jsonl and config.yaml go (resumed from)"}
    )
    # Resolve the config, build the model on the meta device, print counts and FLOPs, exit.
    dry_run: bool = field(
        default=False, metadata={"help": "print the model's size, FLOPs, batch and memory, then exit; writes nothing"}
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.parallel.sequence_parallel:
            _require(
                self.train.seq_len % self.parallel.tensor_parallel == 0,
                "train.seq_len",
                f"sequence parallelism splits the sequence over tensor_parallel={self.parallel.tensor_parallel} "
                f"ranks: seq_len {self.train.seq_len} must be divisible by it",
            )
        if self.train.precision in LOOP_PRECISIONS:
            precision = self.train.precision
            _require(
                self.parallel.zero_stage != 3,
                "train.precision",
                f"{precision} keeps a compute copy and an fp32 gradient accumulator of each weight as this rank "
                "holds it between steps: it does not work with zero_stage=3 (the weights are partitioned and "
                "gathered per call); use train.precision=bf16 there",
            )
        _require(
            self.checkpoint.init_schedule == "reset" or self.schedule.warmup_steps == 0,
            "schedule.warmup_steps",
            "checkpoint.init_schedule=keep continues the previous stage's learning rate: set warmup_steps to 0",
        )
        _require(
            self.schedule.warmup_steps <= self.train.total_steps,
            "schedule.warmup_steps",
            f"warmup ({self.schedule.warmup_steps}) must not exceed train.steps ({self.train.total_steps})",
        )
