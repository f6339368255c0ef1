"""Parameter and FLOP accounting for the LoopLM (used by dry runs and MFU)."""

from __future__ import annotations

from dataclasses import dataclass

from ouro_train.config.schema import ModelConfig


@dataclass
class ModelCounts:
    total_params: int
    embedding_params: int
    layer_params: int  # all layers, counted once (they are shared by every step)
    head_params: int
    # Per token, forward only, counting all R recurrent steps: 2 FLOPs per multiply-add of
    # every matmul (layers and LM head applied R times, the gate R times) plus attention
    # scores and values (2 * 2 * S * D per head per layer per step, non-causal convention as
    # in PaLM/Megatron MFU; seq_len given).
    forward_flops_per_token: int
    # Training = forward + backward = 3 x forward (activation recomputation not counted).
    train_flops_per_token: int


def count_model(cfg: ModelConfig, seq_len: int) -> ModelCounts:
    h, d = cfg.hidden_size, cfg.resolved_head_dim
    q_out, kv_out = cfg.num_heads * d, cfg.num_kv_heads * d
    attn_matmul = h * q_out + 2 * h * kv_out + q_out * h
    mlp_matmul = 3 * h * cfg.intermediate_size
    per_layer = attn_matmul + mlp_matmul + 4 * h  # four RMSNorms
    embedding = cfg.vocab_size * h
    head = cfg.vocab_size * h
    gate = h + 1
    total = embedding + cfg.num_layers * per_layer + h + gate + head  # + final norm
    matmul_per_step = cfg.num_layers * (attn_matmul + mlp_matmul) + head + h
    attention_per_step = cfg.num_layers * cfg.num_heads * 2 * 2 * seq_len * d
    forward = cfg.recurrent_steps * (2 * matmul_per_step + attention_per_step)
    return ModelCounts(
        total_params=total,
        embedding_params=embedding,
        layer_params=cfg.num_layers * per_layer,
        head_params=head,
        forward_flops_per_token=forward,
        train_flops_per_token=3 * forward,
    )


def decode_flops_per_token(cfg: ModelConfig, steps_used: float, context: float) -> float:
    """Forward FLOPs of decoding one token that runs `steps_used` recurrent steps (a mean may be
    fractional) against `context` cached positions: per step the layers' matmuls, their attention
    over the context and the exit gate; the LM head once, at the exit step (ouro_train.inference)."""
    h, d = cfg.hidden_size, cfg.resolved_head_dim
    q_out, kv_out = cfg.num_heads * d, cfg.num_kv_heads * d
    layers = cfg.num_layers * (h * q_out + 2 * h * kv_out + q_out * h + 3 * h * cfg.intermediate_size)
    attention = cfg.num_layers * cfg.num_heads * 2 * 2 * context * d
    per_step = 2 * (layers + h) + attention
    return steps_used * per_step + 2 * cfg.vocab_size * h
