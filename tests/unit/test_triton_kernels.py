"""Each Triton kernel against its torch reference, forward and backward, and a tiny LoopLM trained
3 AdamW steps with kernels=triton against kernels=torch. Without CUDA they run on CPU through
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported); with
CUDA, compiled on the GPU, plus a GPU test at Ouro's widths.

Tolerances, as a fraction of the largest |reference| value of each tensor:
- fp32: 1e-5. Same math, different summation order (observed ~2e-7).
- bf16: 2^-5 (8 bf16 ulps at the largest value). Not the kernels' error: torch's bf16 path
  itself is off the fp32 math by up to 2.1% of max |d x| in rms_norm (its autograd rounds
  d(normed) to bf16 before the mean subtraction, which cancels; the kernels keep fp32), and
  Triton's interpreter casts fp32 -> bf16 by truncation (interpreter.py `cast_impl` passes no
  rounding mode) where torch and the GPU round to nearest. Measured kernel vs torch bf16 on these
  shapes: 1.6% (d x), 1.5% (forward), 0.3% (d weight). The fp32 cases check the formulas tightly.
Shapes are odd on purpose: 7 x 13 rows, hidden 100 (block 128), 3 heads, head dim 10.
"""

import sys

import pytest
import torch
from tiny_models import TRAINABLE, randomized, tiny_config

from ouro_train.config import ConfigError, ModelConfig
from ouro_train.kernels.rms_norm import rms_norm
from ouro_train.kernels.rope import apply_rope
from ouro_train.kernels.swiglu import swiglu
from ouro_train.model.objective import looplm_loss

FP32, BF16 = torch.float32, torch.bfloat16
TOL = {FP32: 1e-5, BF16: 2**-5}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.float().abs().max().clamp_min(1e-12)
    error = (actual.float() - expected.float()).abs().max()
    assert error <= tol * scale, f"{what}: max error {error:.3g} > {tol:.3g} x {scale:.3g}"


def outputs_and_grads(fn, inputs: list[torch.Tensor], backend: str, grad_seed: int = 0):
    """fn(*inputs, backend) -> (output, grads of every input) for the same upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves, backend)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    return out.detach(), torch.autograd.grad(out, leaves, upstream.to(out.device))


def check_against_reference(fn, inputs, names, tol):
    ref_out, ref_grads = outputs_and_grads(fn, inputs, "torch")
    out, grads = outputs_and_grads(fn, inputs, "triton")
    assert_close_scaled(out, ref_out, tol, "output")
    for name, grad, ref_grad in zip(names, grads, ref_grads):
        assert_close_scaled(grad, ref_grad, tol, f"d {name}")


def norm_inputs(x_dtype, w_dtype, residual_dtype, rows=(7, 13), hidden=100, device=DEVICE):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*rows, hidden, generator=gen).to(device, x_dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device, w_dtype)
    r = None if residual_dtype is None else torch.randn(*rows, hidden, generator=gen).to(device, residual_dtype)
    return x, w, r


def norm_fn(eps=1e-6):
    def fn(x, w, *rest):
        *residual, backend = rest
        return rms_norm(x, w, eps, residual=residual[0] if residual else None, backend=backend)

    return fn


# (x dtype, weight dtype, residual dtype or None). bf16 x with fp32 weight is the autocast case:
# the product and so the residual stream are fp32.
NORM_CASES = [
    (FP32, FP32, None),
    (FP32, FP32, FP32),
    (BF16, BF16, None),
    (BF16, BF16, BF16),
    (BF16, FP32, None),
    (BF16, FP32, FP32),
]


@pytest.mark.parametrize("x_dtype, w_dtype, residual_dtype", NORM_CASES)
def test_rms_norm_matches_reference(x_dtype, w_dtype, residual_dtype):
    x, w, r = norm_inputs(x_dtype, w_dtype, residual_dtype)
    inputs, names = ([x, w], ["x", "weight"]) if r is None else ([x, w, r], ["x", "weight", "residual"])
    check_against_reference(norm_fn(), inputs, names, TOL[x_dtype])


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_swiglu_matches_reference(dtype):
    gen = torch.Generator().manual_seed(1)
    # 7 x 13 x 96 = 8736 elements: not a multiple of the 1024 block.
    gate, up = (torch.randn(7, 13, 96, generator=gen).to(DEVICE, dtype) for _ in range(2))
    check_against_reference(swiglu, [gate, up], ["gate", "up"], TOL[dtype])


def rope_inputs(dtype, batch=2, heads=3, seq=7, head_dim=10, device=DEVICE):
    gen = torch.Generator().manual_seed(2)
    # q as the model makes it: a (B, N, S, D) transposed view of a (B, S, N, D) projection.
    x = torch.randn(batch, seq, heads, head_dim, generator=gen).to(device, dtype).transpose(1, 2)
    positions = torch.arange(seq)[None] + torch.tensor([[0], [5000]])[:batch]  # (B, S), far positions too
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = positions[:, :, None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1).to(device)  # (B, S, D)
    return x, emb.cos(), emb.sin()


@pytest.mark.parametrize("dtype, cos_batch", [(FP32, 2), (BF16, 2), (FP32, 1)])
def test_rope_matches_reference(dtype, cos_batch):
    x, cos, sin = rope_inputs(dtype)
    cos, sin = cos[:cos_batch], sin[:cos_batch]  # batch 1: broadcast over the batch

    def fn(x, backend):
        return apply_rope(x, cos, sin, backend)

    check_against_reference(fn, [x], ["x"], TOL[dtype])


def test_rope_rotates_in_fp32_and_returns_x_dtype():
    # The reference Ouro model under autocast: bf16 q times fp32 cos promotes to fp32; one rounding
    # at the end. Casting cos/sin to bf16 first (this project's old way) differs at far positions.
    x, cos, sin = rope_inputs(BF16, device="cpu")
    out = apply_rope(x, cos, sin)
    x32 = x.float()
    expected = x32 * cos[:, None] + torch.cat((-x32[..., 5:], x32[..., :5]), -1) * sin[:, None]
    assert out.dtype == BF16
    torch.testing.assert_close(out, expected.to(BF16), rtol=0, atol=0)


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the check reads triton's knob, i.e. the variable
    x, w, _ = norm_inputs(FP32, FP32, None, rows=(2,), hidden=8, device="cpu")
    with pytest.raises(RuntimeError, match=r"CUDA device.*model\.kernels=torch"):
        rms_norm(x, w, 1e-6, backend="triton")
    with pytest.raises(RuntimeError, match=r"model\.kernels=torch"):
        swiglu(x, x, "triton")


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    x, cos, sin = rope_inputs(FP32, device="cpu")
    with pytest.raises(RuntimeError, match=r"needs the `triton` package.*model\.kernels=torch"):
        apply_rope(x, cos, sin, "triton")


def test_kernels_config_is_validated():
    assert ModelConfig().kernels == "torch"
    with pytest.raises(ConfigError, match="model.kernels"):
        ModelConfig(kernels="cuda")


def train(model, batches, steps=3):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    losses = []
    for input_ids, labels in batches[:steps]:  # (2, B, S): inputs and labels
        out = looplm_loss(model(input_ids), model.lm_head, labels, beta=0.1)
        loss = out.loss_sum / out.num_tokens
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_tiny_looplm_trains_the_same_with_triton_kernels():
    # One layer, two loops, 2 x 4 tokens: every kernel runs forward and backward under the
    # interpreter (slow: ~5 ms per program) in a few seconds.
    cfg = tiny_config(**TRAINABLE, num_layers=1, recurrent_steps=2)
    reference = randomized(cfg).to(DEVICE)
    fused = randomized(tiny_config(**TRAINABLE, num_layers=1, recurrent_steps=2, kernels="triton")).to(DEVICE)
    fused.load_state_dict(reference.state_dict())
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, cfg.vocab_size, (2, 2, 4), generator=gen).to(DEVICE) for _ in range(3)]
    expected, got = train(reference, batches), train(fused, batches)
    assert got == pytest.approx(expected, rel=1e-5)
    for (name, p_ref), p in zip(reference.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a CUDA device")
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_compiled_kernels_at_ouro_widths_on_cuda(dtype):
    tol = TOL[dtype]
    for w_dtype, residual_dtype in [(dtype, None), (dtype, dtype), (FP32, FP32)]:
        x, w, r = norm_inputs(dtype, w_dtype, residual_dtype, rows=(3, 337), hidden=2048, device="cuda")
        inputs = [x, w] if r is None else [x, w, r]
        check_against_reference(norm_fn(), inputs, ["x", "weight", "residual"][: len(inputs)], tol)
    gen = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(1011, 5632, generator=gen).to("cuda", dtype) for _ in range(2))
    check_against_reference(swiglu, [gate, up], ["gate", "up"], tol)
    x, cos, sin = rope_inputs(dtype, batch=2, heads=16, seq=513, head_dim=128, device="cuda")
    check_against_reference(lambda x, backend: apply_rope(x, cos, sin, backend), [x], ["x"], tol)


def test_activation_checkpointing_recomputes_the_triton_kernels_exactly():
    # apply_activation_checkpointing wraps layer (or recurrent step) forwards: the fused kernels'
    # autograd Functions are re-run in backward and must give the very same gradients.
    from ouro_train.parallel.checkpointing import apply_activation_checkpointing

    ids = torch.randint(0, 64, (2, 2, 4), generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def grads(policy):
        model = randomized(tiny_config(**TRAINABLE, num_layers=1, recurrent_steps=2, kernels="triton")).to(DEVICE)
        model = apply_activation_checkpointing(model, policy)
        looplm_loss(model(ids[0]), model.lm_head, ids[1], beta=0.1).loss_sum.backward()
        return {name: p.grad for name, p in model.named_parameters()}

    plain = grads("none")
    for policy in ("layer", "step"):
        for name, grad in grads(policy).items():
            torch.testing.assert_close(grad, plain[name], rtol=0, atol=0, msg=f"{policy}: {name} differs")


def test_model_kernels_may_change_on_resume():
    # Same math either way, and checkpoints saved before the field existed must still resume.
    from ouro_train.checkpoint.config_hash import config_hash, training_config
    from ouro_train.config.resolve import resolve
    from ouro_train.config.store import compose_config

    torch_cfg = compose_config(["model=tiny"])
    triton_cfg = compose_config(["model=tiny", "model.kernels=triton"])
    assert triton_cfg.model.kernels == "triton"
    assert "model.kernels" not in training_config(torch_cfg, resolve(torch_cfg))
    assert config_hash(torch_cfg, resolve(torch_cfg)) == config_hash(triton_cfg, resolve(triton_cfg))
