"""SwiGLU's gating, `silu(gate) * up`, fused forward and backward.

Triton: one pass over the elements each way, in fp32 internally, results in the inputs' dtype
(torch's promotion of gate's and up's). The backward recomputes sigmoid(gate) instead of saving
silu(gate): it saves the two inputs autograd would keep anyway, and no (tokens x intermediate)
activation more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ouro_train.kernels import check_backend, require_triton, triton_jit

try:
    import triton
    import triton.language as tl
except ImportError:  # require_triton names the problem when the triton backend is asked for
    triton = tl = None

BLOCK = 1024


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@triton_jit
def _swiglu_forward_kernel(GATE, UP, OUT, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    gate = tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offsets, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up  # silu; tl.sigmoid is the same formula
    tl.store(OUT + offsets, out.to(OUT.dtype.element_ty), mask=mask)


@triton_jit
def _swiglu_backward_kernel(DOUT, GATE, UP, DGATE, DUP, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    dout = tl.load(DOUT + offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-gate))
    silu = gate * sig
    # d silu(g) / d g = sig * (1 + g * (1 - sig))
    dgate = dout * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(DGATE + offsets, dgate.to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offsets, (dout * silu).to(DUP.dtype.element_ty), mask=mask)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        if gate.shape != up.shape:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} shapes differ")
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
        n = gate.numel()
        _swiglu_forward_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_backward_kernel[(triton.cdiv(n, BLOCK),)](grad_out, gate, up, dgate, dup, n, BLOCK=BLOCK)
        return dgate, dup


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """gate, up (..., I) -> silu(gate) * up (..., I)."""
    check_backend(backend)
    if backend == "torch":
        return swiglu_reference(gate, up)
    require_triton(gate.device)
    return _SwiGLUFunction.apply(gate, up)
