"""Rotate-half RoPE applied to queries or keys, computed in fp32, returned in x's dtype.

Precision (both backends): the reference Ouro model computes RoPE in fp32 under autocast (a bf16
q times the fp32 cos promotes to fp32) and only attention casts to bf16. Casting cos/sin to
bf16 first, as this project used to, rounds angles at long positions (a bf16 sin has 8 bits).

Triton: one program per (batch row, block of positions) rotates all heads of those positions,
loading each position's cos/sin once. x may be a transposed view (B, N, S, D) of a (B, S, N, D) projection: any
strides for the first three dims, the last contiguous. The backward is the inverse rotation.
cos/sin are constants (they come from positions): no gradient flows to them.
"""

from __future__ import annotations

import torch

from ouro_train.kernels import check_backend, require_triton, triton_jit

try:
    import triton
    import triton.language as tl
except ImportError:  # require_triton names the problem when the triton backend is asked for
    triton = tl = None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, N, S, D); cos/sin: (B, S, D) fp32, broadcast over heads.
    x32 = x.float()
    return (x32 * cos[:, None] + rotate_half(x32) * sin[:, None]).to(x.dtype)


@triton_jit
def _rope_kernel(
    X,  # (B, N, S, D) any strides but the last
    COS,  # (B, S, D) fp32
    SIN,  # (B, S, D) fp32
    OUT,  # (B, N, S, D)
    seq_len,
    n_heads,
    half,  # D / 2
    stride_xb,
    stride_xn,
    stride_xs,
    stride_ob,
    stride_on,
    stride_os,
    stride_cb,
    stride_cs,
    stride_sb,
    stride_ss,
    INVERSE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    positions = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    s = positions.to(tl.int64)[:, None, None]  # (BLOCK_S, 1, 1)
    heads = tl.arange(0, BLOCK_N)[None, :, None]  # (1, BLOCK_N, 1)
    dims = tl.arange(0, BLOCK_HALF)[None, None, :]  # (1, 1, BLOCK_HALF)
    row_mask = (s < seq_len) & (dims < half)  # (BLOCK_S, 1, BLOCK_HALF): cos/sin
    mask = row_mask & (heads < n_heads)
    cos_row = COS + b * stride_cb + s * stride_cs
    sin_row = SIN + b * stride_sb + s * stride_ss
    cos1 = tl.load(cos_row + dims, mask=row_mask, other=0.0)
    cos2 = tl.load(cos_row + half + dims, mask=row_mask, other=0.0)
    sin1 = tl.load(sin_row + dims, mask=row_mask, other=0.0)
    sin2 = tl.load(sin_row + half + dims, mask=row_mask, other=0.0)
    x_row = X + b * stride_xb + s * stride_xs + heads * stride_xn
    x1 = tl.load(x_row + dims, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + half + dims, mask=mask, other=0.0).to(tl.float32)
    # Forward: out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1). Its transpose
    # (the backward, the inverse rotation when cos1 = cos2 and sin1 = sin2):
    # d x1 = g1 cos1 + g2 sin2, d x2 = g2 cos2 - g1 sin1.
    if INVERSE:
        out1 = x1 * cos1 + x2 * sin2
        out2 = x2 * cos2 - x1 * sin1
    else:
        out1 = x1 * cos1 - x2 * sin1
        out2 = x2 * cos2 + x1 * sin2
    out_row = OUT + b * stride_ob + s * stride_os + heads * stride_on
    tl.store(out_row + dims, out1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(out_row + half + dims, out2.to(OUT.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty_like(x)  # keeps x's layout (a transposed view stays one)
    batch, heads, seq, dim = x.shape
    block_n, block_half = triton.next_power_of_2(heads), triton.next_power_of_2(dim // 2)
    # Positions per program: tiles of up to 4096 elements (one position at 16 heads x 128 dims
    # gives 1024 pairs, so 4), which also keeps the interpreter's per-program cost down in tests.
    block_s = max(1, min(4096 // (block_n * block_half), triton.next_power_of_2(seq)))
    _rope_kernel[(batch, triton.cdiv(seq, block_s))](
        x,
        cos,
        sin,
        out,
        seq,
        heads,
        dim // 2,
        *x.stride()[:3],
        *out.stride()[:3],
        *cos.stride()[:2],
        *sin.stride()[:2],
        INVERSE=inverse,
        BLOCK_S=block_s,
        BLOCK_N=block_n,
        BLOCK_HALF=block_half,
    )
    return out


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        batch, _, seq, dim = x.shape
        if dim % 2 or cos.dim() != 3 or cos.shape[1:] != (seq, dim) or sin.shape != cos.shape:
            raise ValueError(
                f"apply_rope: x {tuple(x.shape)} needs an even head dim and cos/sin of shape {(batch, seq, dim)} "
                f"(or batch 1), got {tuple(cos.shape)} and {tuple(sin.shape)}"
            )
        # A batch of 1 broadcasts as in the reference: a stride-0 view, no copy.
        cos, sin = (t.float().expand(batch, seq, dim) for t in (cos, sin))
        cos = cos if cos.stride(-1) == 1 else cos.contiguous()
        sin = sin if sin.stride(-1) == 1 else sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        return _rotate(grad_out, cos, sin, inverse=True), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """x (B, N, S, D), cos/sin (B, S, D) fp32 -> x rotated, computed in fp32, in x's dtype."""
    check_backend(backend)
    if backend == "torch":
        return apply_rope_reference(x, cos, sin)
    require_triton(x.device)
    return _RopeFunction.apply(x, cos, sin)
