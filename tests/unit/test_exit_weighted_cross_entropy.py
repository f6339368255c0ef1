"""The fused all-steps objective against the reference that materialises every step's logits.

Tolerances: float64 agrees to rounding (1e-12); float32 to torch's float32 defaults (the
chunked sums run in another order); bf16 under autocast: both the fused loss and the naive loss
under the same autocast are compared with the float64 truth, and the fused one may not be worse
than 2x the naive one's error plus 1e-3 of the norm (bf16 has 8 mantissa bits, ~4e-3; we measured
relative errors of 7e-5 to 1e-2 for both, the fused within 4% of the naive one).
"""

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ouro_train.kernels.exit_weighted_cross_entropy import (
    exit_weighted_cross_entropy,
    exit_weighted_cross_entropy_reference,
)
from ouro_train.model import LoopOutput, exit_log_distribution, gate_loss, looplm_loss
from ouro_train.model.layers import LMHead

STEPS, TOKENS, HIDDEN, VOCAB = 4, 13, 8, 11


def make_inputs(dtype=torch.float32, seed=0, steps=STEPS, tokens=TOKENS, hidden=HIDDEN, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    states = [torch.randn(tokens, hidden, generator=g, dtype=dtype).requires_grad_() for _ in range(steps)]
    weight = torch.randn(vocab, hidden, generator=g, dtype=dtype).requires_grad_()
    gates = torch.randn(steps, tokens, generator=g, dtype=dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    targets[[2, 9 % tokens]] = -100
    return states, weight, gates, targets


def loss_and_grads(fn, states, weight, gates, targets):
    """Both objectives through the same p = exit distribution of the gates, so the gate gradient
    is checked too; an upstream factor 1.7 checks that backward scales the saved gradients."""
    for t in (*states, weight, gates):
        t.grad = None
    p = exit_log_distribution(gates).exp()
    loss, ce = fn(states, weight, targets, p)
    (1.7 * loss).backward()
    return loss.detach(), ce.detach(), [t.grad.clone() for t in (*states, weight, gates)]


def fused(chunk_size):
    return lambda states, weight, targets, p: exit_weighted_cross_entropy(
        states, weight, targets, p, chunk_size=chunk_size
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("chunk_size", [1, 5, 13, 64])  # 5 divides neither 13 nor the last chunk
def test_fused_equals_all_logits_reference(dtype, chunk_size):
    inputs = make_inputs(dtype, seed=chunk_size)
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else {}
    loss, ce, grads = loss_and_grads(fused(chunk_size), *inputs)
    ref_loss, ref_ce, ref_grads = loss_and_grads(exit_weighted_cross_entropy_reference, *inputs)
    torch.testing.assert_close(loss, ref_loss, **tolerance)
    torch.testing.assert_close(ce, ref_ce, **tolerance)
    assert (ce[:, 2] == 0).all() and (ce[:, 9] == 0).all()
    for name, got, ref in zip([*(f"state {t}" for t in range(STEPS)), "weight", "gates"], grads, ref_grads):
        torch.testing.assert_close(got, ref, **tolerance, msg=name)


def test_fused_gradcheck_float64():
    states, weight, gates, targets = make_inputs(torch.float64, steps=2, tokens=5, hidden=3, vocab=4)
    p = torch.rand(2, 5, dtype=torch.float64, requires_grad=True)

    def loss(h0, h1, w, p):
        return exit_weighted_cross_entropy([h0, h1], w, targets, p, chunk_size=2)[0]

    assert torch.autograd.gradcheck(loss, (*states, weight, p))


def relative_error(got: torch.Tensor, truth: torch.Tensor) -> float:
    return ((got.double() - truth).norm() / truth.norm()).item()


def test_fused_under_bf16_autocast_is_as_accurate_as_naive_autocast():
    inputs = make_inputs(torch.float32, seed=3, tokens=40, hidden=32, vocab=300)
    truth = loss_and_grads(exit_weighted_cross_entropy_reference, *[make_double(t) for t in inputs])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = loss_and_grads(fused(7), *inputs)
        naive = loss_and_grads(exit_weighted_cross_entropy_reference, *inputs)
    assert ours[1].dtype == torch.float32  # softmax statistics and CE in fp32 under autocast
    assert inputs[1].grad.dtype == torch.float32
    for got, ref, true in zip(
        [ours[0], ours[1], *ours[2]], [naive[0], naive[1], *naive[2]], [truth[0], truth[1], *truth[2]]
    ):
        assert relative_error(got, true) <= 2 * relative_error(ref, true) + 1e-3


def make_double(t):
    if isinstance(t, list):
        return [make_double(x) for x in t]
    return t.detach().double().requires_grad_() if t.is_floating_point() else t


class MatmulFlops(TorchDispatchMode):
    """2 m k n of every matmul, in-place and out= ones included (torch's FlopCounterMode skips
    `addmm_`, which accumulates the weight gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in (torch.ops.aten.mm, torch.ops.aten.matmul, torch.ops.aten.bmm):
            self.flops += 2 * args[0].shape[:-1].numel() * args[0].shape[-1] * args[1].shape[-1]
        elif packet in (torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.flops += 2 * args[1].shape[0] * args[1].shape[1] * args[2].shape[1]
        return func(*args, **(kwargs or {}))


def test_no_grad_computes_only_the_loss():
    states, weight, gates, targets = make_inputs(tokens=32, hidden=16, vocab=64)
    p = exit_log_distribution(gates).exp()
    matmul_flops = 2 * STEPS * 32 * 16 * 64  # one (tokens x hidden x vocab) matmul per step
    with MatmulFlops() as counter:
        loss, ce = exit_weighted_cross_entropy(states, weight, targets, p, chunk_size=10)
        loss.backward()
    # Forward and backward: 3 matmuls per step (logits, d states, d weight), none recomputed.
    assert counter.flops == 3 * matmul_flops
    with torch.no_grad(), MatmulFlops() as counter:
        loss_no_grad, ce_no_grad = exit_weighted_cross_entropy(states, weight, targets, p, chunk_size=10)
    assert counter.flops == matmul_flops  # only the logits
    assert loss_no_grad.grad_fn is None and not ce_no_grad.requires_grad
    torch.testing.assert_close(loss_no_grad, loss.detach())
    torch.testing.assert_close(ce_no_grad, ce)
    # Nothing requiring grad is the same as no_grad.
    detached = [h.detach() for h in states]
    with MatmulFlops() as counter:
        exit_weighted_cross_entropy(detached, weight.detach(), targets, p.detach(), chunk_size=10)
    assert counter.flops == matmul_flops


class PeakAllocations(TorchDispatchMode):
    """Bytes of the tensor storages that ops create while active, the most alive at once (checked
    after every op; storages freed are found through weak references). Deterministic, unlike the
    process's resident memory, and it sees every op of forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # In-place ops and views return storages that exist already.
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.live and storage.data_ptr() not in inputs:
                    self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return out


def test_peak_memory_is_one_chunk_of_logits():
    tokens, hidden, vocab, chunk = 64, 4, 8192, 16
    states, weight, gates, targets = make_inputs(tokens=tokens, hidden=hidden, vocab=vocab)
    p = exit_log_distribution(gates).exp().detach()
    chunk_logits = chunk * vocab * 4  # 512 KB of fp32 logits; one step's logits are 4x that
    gradients = 2 * (weight.numel() + STEPS * tokens * hidden) * 4  # saved, then scaled in backward
    with PeakAllocations() as meter:
        exit_weighted_cross_entropy(states, weight, targets, p, chunk_size=chunk)[0].backward()
    assert meter.peak <= chunk_logits + gradients + 8192  # + the (R, n) vectors
    with PeakAllocations() as naive:  # the meter sees all logits when they exist
        exit_weighted_cross_entropy_reference(states, weight, targets, p)[0].backward()
    assert naive.peak > STEPS * tokens * vocab * 4


def test_looplm_loss_through_the_head_module_equals_weight_and_reference():
    # fp64, loss mask and ignore_index, a chunk that divides nothing: the module call
    # (LMHead, as ZeRO-3 needs it) = the bare weight = the loss with every logit materialised.
    torch.manual_seed(4)
    steps, batch, seq, hidden, vocab, beta = 3, 2, 9, 6, 23, 0.07
    hs = [torch.randn(batch, seq, hidden, dtype=torch.float64, requires_grad=True) for _ in range(steps)]
    gates = torch.randn(steps, batch, seq, dtype=torch.float64, requires_grad=True)
    head = LMHead(hidden, vocab).double()
    labels = torch.randint(0, vocab, (batch, seq))
    labels[0, 3] = -100
    mask = torch.rand(batch, seq) < 0.7
    results = []
    for variant in ("module", "weight", "reference"):
        for t in (*hs, gates, head.weight):
            t.grad = None
        output = LoopOutput(hidden_states=hs, gate_logits=gates)
        if variant == "reference":
            valid = (labels != -100) & mask
            log_p = exit_log_distribution(gates)
            p = log_p.exp()
            ce = torch.stack(
                [
                    torch.nn.functional.cross_entropy(head(h).flatten(0, 1), labels.flatten(), reduction="none")
                    for h in hs
                ]
            ).view(steps, batch, seq)
            loss = (((p * ce).sum(0) + beta * (p * log_p).sum(0)) * valid).sum()
            ce_per_step = (ce * valid).sum((1, 2))
        else:
            out = looplm_loss(output, head if variant == "module" else head.weight, labels, beta, mask, chunk_size=4)
            loss, ce_per_step = out.loss_sum, out.ce_per_step
            assert out.num_tokens == int(((labels != -100) & mask).sum())
        loss.backward()
        results.append((loss.detach(), ce_per_step.detach(), [t.grad.clone() for t in (*hs, gates, head.weight)]))
    for loss, ce_per_step, grads in results[:2]:
        torch.testing.assert_close(loss, results[2][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ce_per_step, results[2][1], rtol=1e-12, atol=1e-12)
        for got, ref in zip(grads, results[2][2]):
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_gate_loss_cross_entropy_runs_without_gradient_work():
    torch.manual_seed(5)
    hs = [torch.randn(1, 12, 8, requires_grad=True) for _ in range(3)]
    gates = torch.randn(3, 1, 12, requires_grad=True)
    head = torch.randn(32, 8, requires_grad=True)
    labels = torch.randint(0, 32, (1, 12))
    with MatmulFlops() as counter:
        out = gate_loss(LoopOutput(hidden_states=hs, gate_logits=gates), head, labels, chunk_size=5)
        out.loss.backward()
    assert counter.flops == 3 * 2 * 12 * 8 * 32  # logits of every step, nothing more
    assert hs[0].grad is None and head.grad is None and gates.grad is not None
    stage1 = looplm_loss(LoopOutput(hidden_states=hs, gate_logits=gates), head, labels, beta=0.0)
    torch.testing.assert_close(out.ce_per_step, stage1.ce_per_step)
