"""kernels/shared_linear.py: a weight used R times whose uses' gradients are accumulated in fp32 by
the GEMMs and handed to autograd once. On CPU against the exact sum; on CUDA (GPU-marked: cuBLAS's
bf16 x bf16 -> fp32 GEMM with beta = 1 into the buffer itself, pytorch issue 154086's corner) the
same, and a bf16_loop training step, eager and compiled, against bf16 autocast's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ouro_train.kernels.shared_linear import accumulate_weight_grad, hand_over_grads, shared_linear


def test_fused_accumulation_equals_the_sum_of_the_uses_gradients():
    torch.manual_seed(0)
    master = torch.randn(24, 40, requires_grad=True)
    compute = master.detach().to(torch.bfloat16)
    acc = torch.zeros(24, 40)
    xs = [torch.randn(3, 7, 40).to(torch.bfloat16) for _ in range(4)]
    cs = [torch.randn(3, 7, 24) for _ in range(4)]
    anchor = torch.zeros((), requires_grad=True)
    h = hand_over_grads(anchor, [master], [acc])
    loss = sum((shared_linear(x + 0 * h, compute, acc).float() * c).sum() for x, c in zip(xs, cs))
    loss.backward()
    # The exact sum over the 4 uses of g^T x from the same bf16 operands (fp64), what autograd
    # would give without rounding in between: equal to fp32 summation error (84 terms of ~10).
    want = sum(c.to(torch.bfloat16).double().reshape(-1, 24).t() @ x.double().reshape(-1, 40) for x, c in zip(xs, cs))
    torch.testing.assert_close(master.grad.double(), want, rtol=1e-5, atol=1e-5)
    # Autocast's plain linear rounds each use's weight gradient to bf16 before autograd sums them:
    # the same gradient to bf16 rounding, and further from the exact sum than the fused one.
    plain = master.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sum((F.linear(x, plain).float() * c).sum() for x, c in zip(xs, cs)).backward()

    def error(grad):
        return float((grad.double() - want).norm() / want.norm())

    assert error(plain.grad) < 1e-2
    assert error(master.grad) < error(plain.grad) / 100


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLAS's fp32-output bf16 GEMM needs a CUDA device")
def test_the_cuda_gemm_accumulates_into_the_buffer_in_fp32():
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(2, 1000, 384, generator=gen).to("cuda", torch.bfloat16)
    x = torch.randn(2, 1000, 512, generator=gen).to("cuda", torch.bfloat16)
    start = torch.randn(384, 512, generator=gen).cuda()  # beta = 1: what is there stays
    acc = start.clone()
    pointer = acc.data_ptr()
    for _ in range(3):
        accumulate_weight_grad(acc, grad, x)
    want = start.double() + 3 * grad.double().reshape(-1, 384).t() @ x.double().reshape(-1, 512)
    assert acc.dtype == torch.float32 and acc.data_ptr() == pointer  # in place, fp32
    torch.testing.assert_close(acc.double(), want, rtol=1e-5, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("compiled", "checkpointing"),
    [(False, "none"), (True, "none"), (True, "layer"), (True, "selective")],
    ids=["eager", "compiled", "compiled, layer checkpointing", "compiled, selective checkpointing"],
)
def test_a_bf16_loop_step_on_cuda_matches_autocast(compiled, checkpointing):
    """Also with activation checkpointing inside compiled layers, which the GPU's attention kernels
    (tagged random: cuDNN / flash) and torch version may treat otherwise than the CPU's."""
    from ouro_train.config.schema import ModelConfig
    from ouro_train.model import LoopLM
    from ouro_train.model.objective import looplm_loss
    from ouro_train.parallel.checkpointing import apply_activation_checkpointing, apply_compile
    from ouro_train.parallel.precision import apply_loop_precision

    torch._dynamo.reset()
    cfg = ModelConfig(
        name="t", vocab_size=512, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=704
    )
    with torch.device("cuda"):
        plain, loop = LoopLM(cfg, seed=0), apply_loop_precision(LoopLM(cfg, seed=0))
    apply_activation_checkpointing(loop, checkpointing)
    if compiled:
        apply_compile(loop)
    ids = torch.randint(0, 512, (2, 257), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    for model in (plain, loop):
        for _ in range(2):  # two micro-batches: each layer's R uses update the accumulators in place twice
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=checkpointing != "selective"):
                looplm_loss(model(ids[:, :-1]), model.lm_head, ids[:, 1:], beta=0.05).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), loop.parameters()):
        relative = float((b.grad - a.grad).norm() / a.grad.norm())
        assert relative < 2e-2, f"{name}: {relative:.2e}"
