"""The pieces of one Ouro decoder layer: RMSNorm, RoPE, attention, SwiGLU, and the sandwich-norm layer.

Attribute names match the reference implementation (`modeling_ouro.py`) so that state dicts
copy without renaming. Shapes: B batch, S sequence, H hidden, N heads, K kv heads, D head dim.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ouro_train.config.schema import ModelConfig
from ouro_train.kernels.attention import AttentionPlan, attention
from ouro_train.kernels.exit_weighted_cross_entropy import exit_weighted_cross_entropy
from ouro_train.kernels.linear_cross_entropy import linear_cross_entropy
from ouro_train.kernels.rms_norm import rms_norm
from ouro_train.kernels.rope import apply_rope, rotate_half
from ouro_train.kernels.swiglu import swiglu


class KVCacheSlot(Protocol):
    """One (recurrent step, layer) slot of a decoding cache (ouro_train.inference.kv_cache)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this call's k, v (B, K, S, D) and return attention of q (B, N, S, D) over the slot."""
        ...


__all__ = [
    "Attention",
    "DecoderLayer",
    "KVCacheSlot",
    "LMHead",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "apply_rope",
    "rotate_half",
]


class RMSNorm(nn.Module):
    """weight * norm(x), statistic in fp32 (`kernels/rms_norm.py`). `norm(x, residual=r)` is the
    sandwich norm-and-add r + weight * norm(x), one fused kernel with `kernels="triton"`. The add
    goes through this module's call, not around it, so that wrappers which gather the weight in
    forward hooks (ZeRO-3) see it used."""

    def __init__(self, hidden_size: int, eps: float, kernels: str = "torch") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.kernels = kernels

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, residual=residual, backend=self.kernels)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, kernels={self.kernels}"


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE. The same positions serve every recurrent step (no step embedding)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        # Non-persistent: derived from config, so a stage may change rope theta freely.
        self.register_buffer("inv_freq", self._inv_freq(None), persistent=False)

    def _inv_freq(self, device: torch.device | None) -> torch.Tensor:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.theta**exponent)

    def _apply(self, fn, recurse: bool = True):
        # `.to(torch.bfloat16)` / `.half()` would round inv_freq (0.2 rad off at position 1,000, 6.6 rad
        # at 32,000 in bf16), and `to_empty` (meta-device start-up) would leave it uninitialised:
        # after any conversion it is recomputed in fp32 on the buffer's new device.
        super()._apply(fn, recurse)
        device = self.inv_freq.device
        if device.type != "meta":
            self.inv_freq = self._inv_freq(device)
        return self

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (B, S) -> cos, sin: (B, S, D) in fp32 (bf16 positions past 256 are not
        # even exact integers); apply_rope rotates in fp32 too and returns the activations' dtype.
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :].float()  # (B, S, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos(), emb.sin()


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.resolved_head_dim
        self.kernels = cfg.kernels
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: AttentionPlan | None,
        cache: KVCacheSlot | None = None,
    ) -> torch.Tensor:
        """`cache`: inference only (ouro_train.inference): the slot of this layer at this recurrent
        step stores the new keys/values and runs the attention over everything it holds."""
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)  # (B, N, S, D)
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)  # (B, K, S, D)
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)  # (B, K, S, D)
        q, k = apply_rope(q, cos, sin, self.kernels), apply_rope(k, cos, sin, self.kernels)
        out = attention(q, k, v, plan) if cache is None else cache.attend(q, k, v)  # (B, N, S, D)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.kernels = cfg.kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.kernels))


class DecoderLayer(nn.Module):
    """Sandwich norm: each sub-layer's output is normalised again before the residual add.

    Reference names: input_layernorm / input_layernorm_2 wrap attention,
    post_attention_layernorm / post_attention_layernorm_2 wrap the MLP.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = SwiGLU(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.kernels)
        self.input_layernorm_2 = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.kernels)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.kernels)
        self.post_attention_layernorm_2 = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.kernels)

    def branch_norms(self) -> tuple[RMSNorm, RMSNorm]:
        """The norms on the output of each residual branch (ModelConfig.branch_norm_init)."""
        return self.input_layernorm_2, self.post_attention_layernorm_2

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: AttentionPlan | None = None,
        cache: KVCacheSlot | None = None,
    ) -> torch.Tensor:
        # x + norm_2(sublayer(norm(x))), the add fused into the second norm (one kernel with triton).
        x = self.input_layernorm_2(self.self_attn(self.input_layernorm(x), cos, sin, plan, cache), residual=x)
        x = self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(x)), residual=x)
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
            return exit_weighted_cross_entropy(h, self.weight, targets, exit_weights, chunk_size=chunk_size)
        if targets is None:
            return super().forward(h)
        return linear_cross_entropy(h, self.weight, targets, chunk_size=chunk_size)
