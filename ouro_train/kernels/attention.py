"""Attention backends behind one function, chosen by name in config (never by sniffing hardware).

`sdpa`: torch's scaled_dot_product_attention (CPU and GPU). Causal; with `doc_ids` (B, S),
tokens attend only within their own document (packed sequences never leak across documents).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa",)


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) document ids -> (B, 1, S, S) boolean mask: True where query i may attend key j."""
    seq = doc_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, S, S)
    return (same_doc & causal)[:, None]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str = "sdpa",
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: (B, N, S, D); k, v: (B, K, S, D) with K dividing N (GQA) -> (B, N, S, D)."""
    if backend != "sdpa":
        raise ValueError(f"attention backend {backend!r} is not available; choose one of {list(BACKENDS)}")
    gqa = k.shape[1] != q.shape[1]
    if doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = document_causal_mask(doc_ids)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
