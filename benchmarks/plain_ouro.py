"""A plain PyTorch Ouro, the baseline of `bench_mfu.py --baseline`: what a user would write from the
released modeling code (HF style), sharing no code with ouro_train. Its own module tree with the
reference's parameter names (so ouro-train's state dict loads as it is), autocast with fp32
weights, every recurrent step's full logits and a plain per-step cross-entropy objective:
    loss = mean over tokens of [ sum_t p(t) CE_t - beta H(p) ],
p from the exit gate as in the paper. Nothing here is fused, chunked or cast once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PlainRMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PlainAttention(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.heads, self.kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.resolved_head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class PlainMLP(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PlainLayer(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.self_attn = PlainAttention(cfg)
        self.mlp = PlainMLP(cfg)
        self.input_layernorm = PlainRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.input_layernorm_2 = PlainRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.post_attention_layernorm = PlainRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.post_attention_layernorm_2 = PlainRMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.input_layernorm_2(self.self_attn(self.input_layernorm(h), cos, sin))
        return h + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(h)))


class PlainTrunk(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(PlainLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = PlainRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.early_exit_gate = nn.Linear(cfg.hidden_size, 1)


class PlainOuro(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = PlainTrunk(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """-> (per-step logits (B, S, V) fp32, per-step gate logits (B, S) fp32)."""
        cfg = self.cfg
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        inv_freq = 1.0 / cfg.rope_theta ** (
            torch.arange(0, cfg.resolved_head_dim, 2, device=input_ids.device).float() / cfg.resolved_head_dim
        )
        freqs = positions[:, None].float() * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        h = self.model.embed_tokens(input_ids)
        logits, gates = [], []
        for _ in range(cfg.recurrent_steps):
            for layer in self.model.layers:
                h = layer(h, cos, sin)
            h = self.model.norm(h)
            logits.append(self.lm_head(h).float())
            with torch.autocast(device_type=h.device.type, enabled=False):
                gates.append(self.model.early_exit_gate(h.float()).squeeze(-1))
        return logits, gates


def plain_loss(logits: list[torch.Tensor], gates: list[torch.Tensor], labels: torch.Tensor, beta: float):
    """mean over tokens of sum_t p(t) CE_t - beta H(p), every step's CE from its full logits."""
    lam = torch.sigmoid(torch.stack(gates))  # (R, B, S)
    survival_before = torch.cat([torch.ones_like(lam[:1]), torch.cumprod(1 - lam, dim=0)[:-1]])  # S_{t-1}
    p = torch.cat([lam[:-1] * survival_before[:-1], survival_before[-1:]])  # p(R) = S_{R-1}
    ce = torch.stack([F.cross_entropy(x.flatten(0, 1), labels.flatten(), reduction="none") for x in logits])
    ce = ce.view_as(p)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(0)
    return ((p * ce).sum(0) - beta * entropy).mean()


def plain_from(ours: nn.Module) -> PlainOuro:
    """A PlainOuro holding a copy of `ours`'s weights (a LoopLM: the reference's names)."""
    with torch.device(next(ours.parameters()).device):
        plain = PlainOuro(ours.config)
    plain.load_state_dict(ours.state_dict(), strict=True)
    return plain
