"""Attention backends behind one function, chosen by name in config (`model.attention`), never by
sniffing hardware. All three compute the same thing on packed rows: causal attention within each
document (a maximal run of equal `doc_ids` in a row), nothing across documents.

    sdpa   torch scaled_dot_product_attention, CPU and GPU. A row holding one document takes the
           causal kernel with no mask; packed rows go through the causal kernel one document
           segment at a time (a view of q, k, v each), so no S x S tensor ever exists and SDPA
           stays on its flash / memory-efficient kernels (a dense boolean mask would push it onto
           the math path, whose scores are S^2 per head).
    flex   torch flex_attention with a document-causal BlockMask built from the segment
           boundaries (O((S/128)^2) block indices, never an S x S mask). Compiled on CUDA; on CPU
           it runs eagerly (scores materialised, forward only: torch 2.13 has no flex backward on
           CPU), so it is an inference / test path there.
    flash  flash-attn's varlen kernel over `cu_seqlens` (CUDA and bf16/fp16 only; `pip install
           -e .[gpu]` or the Docker image).

The document structure is turned into its attention form once per forward (`plan_attention`, in
`LoopLM.forward`, like cos/sin) and shared by every layer and recurrent step: L x R calls.
`document_causal_mask` (dense) is kept only as the tests' and benchmarks' reference.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ouro_train.config.schema import ATTENTION_BACKENDS as BACKENDS

# flex_attention's block size: the BlockMask holds one entry per (query block, key block).
FLEX_BLOCK = 128


class AttentionBackendError(RuntimeError):
    """The configured attention backend cannot run here; the message says what to do instead."""


@dataclass(frozen=True)
class AttentionPlan:
    """How every attention call of one forward treats the batch. Built once by `plan_attention`.

    `segments`: None when every row is a single causal sequence (the plain causal kernel), else
    one tuple of (start, end) document spans per row (sdpa). `cu_seqlens`: (docs + 1,) int32
    document starts over the flattened B*S tokens and `max_seqlen` (flash). `block_mask`: flex's
    BlockMask."""

    backend: str
    batch: int
    seq_len: int
    segments: tuple[tuple[tuple[int, int], ...], ...] | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    block_mask: object | None = None

    @property
    def packed(self) -> bool:
        return self.segments is not None


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) document ids -> (B, 1, S, S) boolean mask: True where query i may attend key j.
    The reference the backends are tested against; no backend builds it."""
    seq = doc_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, S, S)
    return (same_doc & causal)[:, None]


def document_index(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) ids -> (B, S) int32 0, 1, 2, ... counting the runs of equal ids in each row, so that
    documents are contiguous and numbered in order whatever ids the loader gave them."""
    starts = torch.ones_like(doc_ids, dtype=torch.int32)
    starts[:, 1:] = (doc_ids[:, 1:] != doc_ids[:, :-1]).to(torch.int32)
    return starts.cumsum(1, dtype=torch.int32) - 1


def plan_attention(
    backend: str, batch: int, seq_len: int, doc_ids: torch.Tensor | None, device: torch.device | None = None
) -> AttentionPlan:
    """Once per forward: the document structure of a (B, S) batch in the form `backend` consumes.
    One host sync (the segment boundaries) when rows are packed; none otherwise."""
    device = doc_ids.device if doc_ids is not None else device
    if backend not in BACKENDS:
        raise AttentionBackendError(f"attention backend {backend!r} is unknown; choose one of {list(BACKENDS)}")
    if doc_ids is None:
        single = True
    else:
        index = document_index(doc_ids)  # (B, S)
        single = bool((index[:, -1] == 0).all())
    if backend == "sdpa":
        if single:
            return AttentionPlan(backend, batch, seq_len)
        return AttentionPlan(backend, batch, seq_len, segments=_row_segments(index))
    if backend == "flash":
        if single:
            starts = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=device)
            return AttentionPlan(backend, batch, seq_len, cu_seqlens=starts, max_seqlen=seq_len)
        cu_seqlens, max_seqlen = _cu_seqlens(index)
        return AttentionPlan(backend, batch, seq_len, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    # flex
    if doc_ids is None:
        index = torch.zeros(batch, seq_len, dtype=torch.int32, device=device)
    return AttentionPlan(backend, batch, seq_len, block_mask=document_block_mask(index))


def _row_segments(index: torch.Tensor) -> tuple[tuple[tuple[int, int], ...], ...]:
    """(B, S) run index -> per row, the (start, end) of each document."""
    seq = index.shape[1]
    rows = []
    for row in index.cpu():
        starts = (torch.nonzero(row[1:] != row[:-1]).squeeze(1) + 1).tolist()
        bounds = [0, *starts, seq]
        rows.append(tuple(zip(bounds[:-1], bounds[1:])))
    return tuple(rows)


def _cu_seqlens(index: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, S) run index -> (docs + 1,) int32 starts over the flattened B*S tokens, longest document."""
    batch, seq = index.shape
    flat = index.flatten()
    new_doc = torch.ones_like(flat, dtype=torch.bool)
    new_doc[1:] = flat[1:] != flat[:-1]
    new_doc[::seq] = True  # every row starts a document, even if its first id equals the last row's
    starts = torch.nonzero(new_doc).squeeze(1)
    cu_seqlens = torch.cat([starts, starts.new_tensor([batch * seq])]).to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return cu_seqlens, max_seqlen


def document_block_mask(index: torch.Tensor):
    """flex_attention's document-causal BlockMask from the (B, S) run index, without evaluating the
    mask over S x S: per (query block, key block) pair, from the first and last document of each
    block. Empty: key block after the query block, or no document in common. Full (no mask_mod
    needed): an earlier key block and both blocks whole and inside one document. Otherwise partial."""
    from torch.nn.attention.flex_attention import BlockMask

    batch, seq = index.shape
    blocks = -(-seq // FLEX_BLOCK)
    padded = torch.nn.functional.pad(index, (0, blocks * FLEX_BLOCK - seq), value=-1)  # (B, blocks * 128)
    block_view = padded.view(batch, blocks, FLEX_BLOCK)
    first = block_view[:, :, 0]  # (B, blocks)
    block_ends = torch.clamp(torch.arange(1, blocks + 1, device=index.device) * FLEX_BLOCK, max=seq) - 1
    last = index[:, block_ends]  # (B, blocks)
    q_first, q_last = first[:, :, None], last[:, :, None]  # query blocks along dim 1
    k_first, k_last = first[:, None, :], last[:, None, :]  # key blocks along dim 2
    block_q = torch.arange(blocks, device=index.device)[:, None]
    block_k = torch.arange(blocks, device=index.device)[None, :]
    shares_document = (k_last >= q_first) & (k_first <= q_last)
    nonempty = shares_document & (block_k <= block_q)
    full = nonempty & (block_k < block_q) & (q_first == q_last) & (k_first == k_last) & (q_first == k_first)
    if seq % FLEX_BLOCK:
        # A ragged last block is never "full" (as create_block_mask decides): the mask_mod runs there.
        full = full & (block_q < blocks - 1) & (block_k < blocks - 1)
    partial = nonempty & ~full
    doc = index.to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)

    kv_num, kv_idx = _to_indices(partial)
    full_num, full_idx = _to_indices(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(seq, seq)
    )


def _to_indices(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Q, K) block booleans -> (B, 1, Q) counts and (B, 1, Q, K) key-block indices, set ones first."""
    counts = dense.sum(-1, dtype=torch.int32)
    order = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[:, None], order[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan | None = None) -> torch.Tensor:
    """q: (B, N, S, D); k, v: (B, K, S, D) with K dividing N (GQA) -> (B, N, S, D).
    `plan` None: plain causal sdpa (one document per row)."""
    gqa = k.shape[1] != q.shape[1]
    if plan is None or (plan.backend == "sdpa" and not plan.packed):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if plan.backend == "sdpa":
        return _sdpa_segments(q, k, v, plan.segments, gqa)
    if plan.backend == "flex":
        return _flex(q, k, v, plan.block_mask, gqa)
    return _flash_varlen(q, k, v, plan)


def prepare_for_compile() -> None:
    """Call before torch.compile of a model (parallel.compile does): the functions below run eagerly
    inside a compiled model, a graph break each. `_sdpa_segments`: Python loops over segments are
    not graph material, compiled it would recompile for every new document layout; `_flash_varlen`
    takes max_seqlen as a Python int, which would recompile for every new value. Done here and not
    by decorating them, because `torch.compiler.disable` imports torch._dynamo, seconds of every
    process start (each test's CLI run, each rank) that nothing uncompiled needs."""
    for name in ("_sdpa_segments", "_flash_varlen"):
        function = globals()[name]
        if not getattr(function, "_torchdynamo_disable", False):
            globals()[name] = torch.compiler.disable(function)


def _sdpa_segments(q, k, v, segments, gqa: bool) -> torch.Tensor:
    rows = []
    for b, spans in enumerate(segments):
        parts = [
            F.scaled_dot_product_attention(
                q[b : b + 1, :, s:e], k[b : b + 1, :, s:e], v[b : b + 1, :, s:e], is_causal=True, enable_gqa=gqa
            )
            for s, e in spans
        ]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    return torch.cat(rows, dim=0)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Eager flex materialises the scores; compiled it is a fused kernel. Compiled once per process.
    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, block_mask, gqa: bool) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    if torch.is_grad_enabled() and q.requires_grad:
        raise AttentionBackendError(
            "model.attention=flex has no backward on CPU in torch 2.13 (flex_attention's CPU path is forward "
            "only); train with model.attention=sdpa on CPU, or on a CUDA device"
        )
    with warnings.catch_warnings():
        # The unfused CPU path is the documented one here (forward only, tests and inference).
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def _flash_function():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as error:
        raise AttentionBackendError(
            f"model.attention=flash needs the flash-attn package ({error}): install it on a CUDA machine with "
            "`pip install -e '.[gpu]'` (or use the Docker image), or choose model.attention=sdpa or flex"
        ) from error
    return flash_attn_varlen_func


def _flash_varlen(q, k, v, plan: AttentionPlan) -> torch.Tensor:
    if q.device.type != "cuda":
        raise AttentionBackendError(
            f"model.attention=flash runs on CUDA only (got a {q.device.type} tensor); use model.attention=sdpa"
        )
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise AttentionBackendError(
            f"model.attention=flash needs bf16 or fp16 activations (got {q.dtype}); set train.precision=bf16 "
            "or use model.attention=sdpa"
        )
    flash_attn_varlen_func = _flash_function()
    batch, heads, seq, dim = q.shape

    def tokens_major(x: torch.Tensor) -> torch.Tensor:  # (B, H, S, D) -> (B*S, H, D)
        return x.transpose(1, 2).reshape(batch * seq, x.shape[1], dim)

    cu = plan.cu_seqlens.to(q.device)
    out = flash_attn_varlen_func(
        tokens_major(q), tokens_major(k), tokens_major(v), cu, cu, plan.max_seqlen, plan.max_seqlen, causal=True
    )  # (B*S, N, D)
    return out.view(batch, seq, heads, dim).transpose(1, 2)


def check_backend(backend: str, device: str | torch.device, precision: str, training: bool = True) -> None:
    """Fail at start-up, not at the first step, when `backend` cannot run with these settings."""
    device_type = torch.device(device).type
    if backend not in BACKENDS:
        raise AttentionBackendError(f"attention backend {backend!r} is unknown; choose one of {list(BACKENDS)}")
    if backend == "flash":
        if device_type != "cuda":
            raise AttentionBackendError(
                f"model.attention=flash runs on CUDA only (train.device={device_type}); use model.attention=sdpa"
            )
        if precision not in ("bf16", "bf16_loop", "fp8"):
            raise AttentionBackendError(
                "model.attention=flash needs bf16 activations: set train.precision=bf16 or use model.attention=sdpa"
            )
        _flash_function()
    if backend == "flex" and training and device_type == "cpu":
        raise AttentionBackendError(
            "model.attention=flex has no backward on CPU in torch 2.13; train with model.attention=sdpa on CPU"
        )
