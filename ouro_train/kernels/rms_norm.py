"""RMSNorm, and the LoopLM's sandwich norm-and-add `residual + weight * norm(x)`, in one kernel.

Semantics (both backends, those of the reference Ouro RMSNorm): the statistic in fp32,
`x32 * rsqrt(mean(x32^2) + eps)`, cast back to x's dtype, then multiplied by the weight, so the
output dtype is torch's promotion of the weight's and x's (fp32 weights with bf16 activations
under autocast give fp32). With `residual` the output is `residual + weight * norm(x)`, promoted
with the residual's dtype as torch's `+` would.

Triton: forward, one program per tile of rows (one row at Ouro's 2048 hidden), writes the output
and rstd (fp32, one per row) for the backward. Backward, one kernel: each program walks row tiles
pid, pid + P, ... and writes d x rows and its fp32 partial sum of d weight; the (P, H) partials
are summed afterwards, which is correct for any number of rows. d residual is the upstream gradient itself (no kernel).
"""

from __future__ import annotations

import torch

from ouro_train.kernels import check_backend, require_triton, triton_jit

try:
    import triton
    import triton.language as tl
except ImportError:  # require_triton names the problem when the triton backend is asked for
    triton = tl = None


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    # The statistic in fp32 whatever the activation dtype: in bf16 the mean of squares over 2048
    # channels loses most of its mantissa. Cast back before the weight, as the reference does, so
    # bf16 runs match it.
    input_dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * x32.to(input_dtype)
    return y if residual is None else residual + y


@triton_jit
def _rms_norm_forward_kernel(
    X,  # (M, H) rows, last dim contiguous
    W,  # (H,)
    R,  # (M, H) residual, or X again when HAS_RESIDUAL is false (never read then)
    OUT,  # (M, H)
    RSTD,  # (M,) fp32
    stride_x,
    stride_r,
    stride_out,
    n_rows,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    ROUND_PRODUCT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (BLOCK_ROWS,)
    offsets = rows.to(tl.int64)[:, None]  # (BLOCK_ROWS, 1)
    cols = tl.arange(0, BLOCK)[None, :]  # (1, BLOCK)
    mask = (rows[:, None] < n_rows) & (cols < n_cols)
    x = tl.load(X + offsets * stride_x + cols, mask=mask, other=0.0)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=1) / n_cols + eps)  # (BLOCK_ROWS,)
    # Arithmetic in fp32 with the reference's roundings made explicit: the normalised x is rounded
    # to x's dtype, the product to torch's promotion of the weight's and x's dtypes (x's dtype
    # when ROUND_PRODUCT), the sum to the output's. (Also: Triton's interpreter computes bf16
    # arithmetic on the raw 16-bit patterns, so no bf16 value enters an operation here.)
    normed = (x32 * rstd[:, None]).to(x.dtype).to(tl.float32)
    out = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32) * normed
    if ROUND_PRODUCT:
        out = out.to(x.dtype).to(tl.float32)
    if HAS_RESIDUAL:
        out = tl.load(R + offsets * stride_r + cols, mask=mask, other=0.0).to(tl.float32) + out
    tl.store(OUT + offsets * stride_out + cols, out.to(OUT.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)


@triton_jit
def _rms_norm_backward_kernel(
    DOUT,  # (M, H)
    X,  # (M, H)
    W,  # (H,)
    RSTD,  # (M,) fp32
    DX,  # (M, H)
    DW_PARTIAL,  # (P, H) fp32, one row per program
    stride_dout,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    BLOCK_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)[None, :]  # (1, BLOCK)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_ROWS, BLOCK], dtype=tl.float32)
    # Program pid takes row tiles pid, pid + P, ...: any number of rows, any number of programs.
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_ROWS), tl.num_programs(0)):
        rows = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        offsets = rows.to(tl.int64)[:, None]
        mask = (rows[:, None] < n_rows) & col_mask
        dout = tl.load(DOUT + offsets * stride_dout + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + offsets * stride_x + cols, mask=mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)[:, None]
        x_hat = x.to(tl.float32) * rstd
        # d weight sees the normalised x as the forward used it (rounded to x's dtype).
        dw += dout * x_hat.to(x.dtype).to(tl.float32)
        d_hat = dout * w
        # d x = rstd * (d_hat - x_hat * mean(d_hat * x_hat)); the cast to x's dtype passes grads through.
        dx = rstd * (d_hat - x_hat * (tl.sum(d_hat * x_hat, axis=1) / n_cols)[:, None])
        tl.store(DX + offsets * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * n_cols + cols, tl.sum(dw, axis=0)[None, :], mask=col_mask)


def _launch_settings(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """-> (BLOCK, BLOCK_ROWS, num_warps): a whole row per block; several short rows per tile (up to
    4096 elements), which also keeps the interpreter's per-program cost down in tests."""
    block = triton.next_power_of_2(n_cols)
    block_rows = max(1, min(4096 // block, triton.next_power_of_2(n_rows)))
    elements = block * block_rows
    num_warps = 32 if elements >= 32768 else 16 if elements >= 8192 else 8 if elements >= 2048 else 4
    return block, block_rows, num_warps


def _backward_programs(n_tiles: int, device: torch.device) -> int:
    # Enough programs to fill the GPU, few enough that the (P, H) partial sums stay small. Under the
    # interpreter two, so that tests cover programs owning several tiles and uneven shares.
    if device.type == "cuda":
        return max(1, min(n_tiles, 2 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_tiles, 2))


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        hidden = x.shape[-1]
        if weight.shape != (hidden,):
            raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden size {hidden}")
        rows = x.reshape(-1, hidden).contiguous()  # (M, H)
        out_dtype = torch.promote_types(weight.dtype, x.dtype)
        if residual is not None:
            if residual.shape != x.shape:
                raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} differs from x {tuple(x.shape)}")
            out_dtype = torch.promote_types(out_dtype, residual.dtype)
            residual_rows = residual.reshape(-1, hidden).contiguous()
        else:
            residual_rows = rows
        weight = weight.contiguous()
        out = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
        rstd = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
        block, block_rows, num_warps = _launch_settings(rows.shape[0], hidden)
        _rms_norm_forward_kernel[(triton.cdiv(rows.shape[0], block_rows),)](
            rows,
            weight,
            residual_rows,
            out,
            rstd,
            rows.stride(0),
            residual_rows.stride(0),
            out.stride(0),
            rows.shape[0],
            hidden,
            eps,
            HAS_RESIDUAL=residual is not None,
            ROUND_PRODUCT=torch.promote_types(weight.dtype, x.dtype) == x.dtype,
            BLOCK_ROWS=block_rows,
            BLOCK=block,
            num_warps=num_warps,
        )
        ctx.save_for_backward(rows, weight, rstd)
        ctx.x_shape = x.shape
        ctx.residual_dtype = None if residual is None else residual.dtype
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        rows, weight, rstd = ctx.saved_tensors
        n_rows, hidden = rows.shape
        grad_rows = grad_out.reshape(-1, hidden).contiguous()
        dx = torch.empty_like(rows)
        block, block_rows, num_warps = _launch_settings(n_rows, hidden)
        programs = _backward_programs(triton.cdiv(n_rows, block_rows), rows.device)
        dw_partial = torch.empty(programs, hidden, dtype=torch.float32, device=rows.device)
        _rms_norm_backward_kernel[(programs,)](
            grad_rows,
            rows,
            weight,
            rstd,
            dx,
            dw_partial,
            grad_rows.stride(0),
            rows.stride(0),
            dx.stride(0),
            n_rows,
            hidden,
            BLOCK_ROWS=block_rows,
            BLOCK=block,
            num_warps=num_warps,
        )
        dw = dw_partial.sum(0).to(weight.dtype)
        d_residual = None if ctx.residual_dtype is None else grad_out.to(ctx.residual_dtype)
        return dx.view(ctx.x_shape), dw, d_residual, None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """x (..., H), weight (H,) -> weight * norm(x), or residual + weight * norm(x) with `residual`
    (same shape as x) in one fused kernel for the triton backend."""
    check_backend(backend)
    if backend == "torch":
        return rms_norm_reference(x, weight, eps, residual)
    require_triton(x.device)
    return _RMSNormFunction.apply(x, weight, residual, eps)
