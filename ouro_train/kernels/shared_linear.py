"""A linear layer for a weight that one forward pass uses R times (train.precision=bf16_loop): its
bf16 compute copy is made by the caller once per optimizer step, and the weight gradient of each
use is accumulated by its own GEMM into one fp32 buffer (`accumulate_weight_grad`, the pattern of
Megatron's gradient_accumulation_fusion), instead of autocast casting the fp32 weight at every use
in forward and backward and autograd adding the R gradients one by one. `hand_over_grads` gives
each buffer to autograd as its weight's gradient once, after the last use's backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("ouro_train::accumulate_weight_grad", mutates_args={"acc"})
def accumulate_weight_grad(acc: torch.Tensor, grad_output: torch.Tensor, x: torch.Tensor) -> None:
    """acc += grad_output^T @ x over all tokens, in fp32: one GEMM with beta = 1 (out, in).

    CUDA: cuBLAS with bf16 operands and an fp32 output (`torch.addmm(..., out_dtype=float32)`).
    Elsewhere (CPU has no bf16 x bf16 -> fp32 GEMM in torch 2.13): the bf16 operands upcast, then
    an fp32 GEMM into acc; the products of bf16 values are exact in fp32 either way. An opaque
    custom op, so that torch.compile keeps the in-place accumulation as it is."""
    g = grad_output.reshape(-1, grad_output.shape[-1])
    i = x.reshape(-1, x.shape[-1])
    if acc.is_cuda and g.dtype in (torch.bfloat16, torch.float16) and g.dtype == i.dtype:
        torch.addmm(acc, g.t(), i, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(g.t().to(acc.dtype), i.to(acc.dtype))


@accumulate_weight_grad.register_fake
def _(acc: torch.Tensor, grad_output: torch.Tensor, x: torch.Tensor) -> None:
    return None


class _SharedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
        ctx.input_dtype = x.dtype
        x = x.to(weight.dtype)
        ctx.save_for_backward(x, weight)
        # The buffer is not saved (save_for_backward would refuse its in-place updates): held here.
        ctx.acc = acc
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        accumulate_weight_grad(ctx.acc, grad, x)
        return (grad @ weight).to(ctx.input_dtype), None, None


def shared_linear(x: torch.Tensor, weight: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """x @ weight^T with `weight` the compute copy (bf16, no gradient of its own): the weight
    gradient is added to `acc` (fp32, the master weight's shape) in backward. Without grad mode
    it is a plain linear in the weight's dtype."""
    if not torch.is_grad_enabled():
        return F.linear(x.to(weight.dtype), weight)
    return _SharedLinear.apply(x, weight, acc)


class _HandOverGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, accs: list[torch.Tensor], *weights: torch.Tensor) -> torch.Tensor:
        ctx.accs = accs
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        return (grad_h, None, *ctx.accs)


def hand_over_grads(h: torch.Tensor, weights: list[torch.Tensor], accs: list[torch.Tensor]) -> torch.Tensor:
    """`h` unchanged, with an autograd node whose backward returns `accs[i]` as the gradient of
    `weights[i]` (fp32 masters). Put on a tensor that every use of the weights depends on (the
    embedding output): autograd runs this node after all of them, when the buffers are complete,
    and each weight's gradient then reaches its AccumulateGrad (and any hook on it, DeepSpeed's
    ZeRO reduction included) once per micro-batch."""
    if not torch.is_grad_enabled():
        return h
    return _HandOverGrads.apply(h, accs, *weights)


# train.precision=fp8: the forward GEMM and the input-gradient GEMM of each use in float8 (torch's
# _scaled_mm, tensorwise dynamic scaling as torchao's default recipe: e4m3 weights and activations,
# e5m2 gradients), with the weight quantised once per optimizer step by the caller (the R uses share
# it), and the weight gradient kept in high precision: bf16 operands accumulated in fp32 by
# `accumulate_weight_grad`, as under bf16_loop.
E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2


def to_float8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(t scaled so that its largest magnitude is the format's largest, in `dtype`; the inverse
    scale, fp32 0-d): per-tensor dynamic scaling. An all-zero tensor gets scale 1."""
    fmax = torch.finfo(dtype).max
    amax = t.detach().abs().amax().float()
    # A floor on amax, as torchao's: fmax / amax stays finite (no 0 * inf on the zeros).
    scale = torch.where(amax > 0, fmax / amax.clamp(min=1e-12), torch.ones_like(amax))
    # Row-major whatever t's strides (an elementwise result keeps them): cuBLAS's float8 GEMM takes
    # its first operand row-major.
    quantised = (t.float() * scale).clamp(-fmax, fmax).to(dtype).contiguous()
    return quantised, scale.reciprocal()


def fp8_gemm_fits(*dims: int) -> bool:
    """cuBLAS's float8 GEMM takes dimensions that are multiples of 16."""
    return all(d % 16 == 0 for d in dims)


class _SharedLinearFP8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_bf16, acc, weight_fp8, weight_fp8_t, weight_scale_inv):
        ctx.input_dtype = x.dtype
        x = x.to(torch.bfloat16)
        ctx.save_for_backward(x, weight_bf16, weight_fp8_t, weight_scale_inv)
        ctx.acc = acc
        rows = x.reshape(-1, x.shape[-1])
        ctx.fp8 = fp8_gemm_fits(*rows.shape, weight_fp8.shape[0])
        if not ctx.fp8:  # a shape cuBLAS's float8 GEMM does not take: bf16, as bf16_loop
            return F.linear(x, weight_bf16)
        # Its own dtypes, not autocast's (a traced _scaled_mm decomposed on CPU would run under it).
        with torch.autocast(x.device.type, enabled=False):
            x8, x_scale_inv = to_float8(rows, E4M3)
            out = torch._scaled_mm(
                x8, weight_fp8.t(), scale_a=x_scale_inv, scale_b=weight_scale_inv, out_dtype=torch.bfloat16
            )
        return out.reshape(*x.shape[:-1], weight_fp8.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight_bf16, weight_fp8_t, weight_scale_inv = ctx.saved_tensors
        grad = grad.to(torch.bfloat16)
        accumulate_weight_grad(ctx.acc, grad, x)
        if ctx.fp8:
            rows = grad.reshape(-1, grad.shape[-1])
            with torch.autocast(grad.device.type, enabled=False):
                g8, g_scale_inv = to_float8(rows, E5M2)
                grad_input = torch._scaled_mm(
                    g8, weight_fp8_t.t(), scale_a=g_scale_inv, scale_b=weight_scale_inv, out_dtype=torch.bfloat16
                ).reshape(*grad.shape[:-1], weight_fp8_t.shape[0])
        else:
            grad_input = grad @ weight_bf16
        return grad_input.to(ctx.input_dtype), None, None, None, None, None


def shared_linear_fp8(
    x: torch.Tensor,
    weight_bf16: torch.Tensor,
    acc: torch.Tensor,
    weight_fp8: torch.Tensor,
    weight_fp8_t: torch.Tensor,
    weight_scale_inv: torch.Tensor,
) -> torch.Tensor:
    """`shared_linear` with its forward and input-gradient GEMMs in float8: `weight_fp8` (out, in)
    and `weight_fp8_t` (in, out) are the weight quantised once per optimizer step (e4m3,
    `weight_scale_inv` its inverse scale); activations are quantised at each use (e4m3), output
    gradients too (e5m2). The weight gradient goes to `acc` in fp32 from bf16 operands."""
    return _SharedLinearFP8.apply(x, weight_bf16, acc, weight_fp8, weight_fp8_t, weight_scale_inv)
