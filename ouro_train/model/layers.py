"""The pieces of one Ouro decoder layer: RMSNorm, RoPE, attention, SwiGLU, and the sandwich-norm layer.

Attribute names match the reference implementation (`modeling_ouro.py`) so that state dicts
copy without renaming. Shapes: B batch, S sequence, H hidden, N heads, K kv heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ouro_train.config.schema import ModelConfig
from ouro_train.kernels.attention import attention
from ouro_train.kernels.linear_cross_entropy import linear_cross_entropy


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The statistic in fp32 whatever the activation dtype: in bf16 the mean of squares
        # over 2048 channels loses most of its mantissa. Cast back before the weight, as the
        # reference does, so bf16 runs match it.
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE. The same positions serve every recurrent step (no step embedding)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        # Non-persistent: derived from config, so a stage may change rope theta freely.
        self.register_buffer("inv_freq", 1.0 / (theta**exponent), persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (B, S) -> cos, sin: (B, S, D) in fp32 (bf16 positions past 256 are not
        # even exact integers); apply_rope casts them to the activations' dtype.
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :].float()  # (B, S, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, N, S, D); cos/sin: (B, S, D) broadcast over heads.
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.resolved_head_dim
        self.backend = cfg.attention
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, doc_ids: torch.Tensor | None
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)  # (B, N, S, D)
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)  # (B, K, S, D)
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)  # (B, K, S, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q, k, v, backend=self.backend, doc_ids=doc_ids)  # (B, N, S, D)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Sandwich norm: each sub-layer's output is normalised again before the residual add.

    Reference names: input_layernorm / input_layernorm_2 wrap attention,
    post_attention_layernorm / post_attention_layernorm_2 wrap the MLP.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = SwiGLU(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.input_layernorm_2 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.post_attention_layernorm_2 = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.input_layernorm_2(self.self_attn(self.input_layernorm(x), cos, sin, doc_ids))
        x = x + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(x)))
        return x


class LMHead(nn.Linear):
    """The untied LM head. `head(h)` gives logits; `head(h, targets)` gives per-token CE computed
    in token chunks, never all logits at once; `head(states, targets, exit_weights=p)` gives the
    stage I term sum_t sum_i p_ti CE_ti of all R steps' states (n, H) in one pass, with CE (R, n)
    (`exit_weighted_cross_entropy`). CE goes through the module call (not through `.weight` from
    outside) so that wrappers which gather parameters in forward hooks, like ZeRO-3, see the head
    being used."""

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__(hidden_size, vocab_size, bias=False)

    def forward(
        self,
        h: torch.Tensor | list[torch.Tensor],
        targets: torch.Tensor | None = None,
        chunk_size: int = 4096,
        exit_weights: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if exit_weights is not None:
            from ouro_train.kernels.exit_weighted_cross_entropy import exit_weighted_cross_entropy

            return exit_weighted_cross_entropy(h, self.weight, targets, exit_weights, chunk_size=chunk_size)
        if targets is None:
            return super().forward(h)
        return linear_cross_entropy(h, self.weight, targets, chunk_size=chunk_size)
