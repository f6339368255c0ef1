import math

import pytest
import torch

from ouro_train.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from ouro_train.model import LoopOutput, exit_log_distribution, gate_loss, looplm_loss


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_exit_distribution_by_hand():
    # lambda = 0.5, 0.5, 0.5 -> p = 0.5, 0.25, 0.125 and the rest (0.125) on the last step.
    gates = torch.tensor([0.0, 0.0, 0.0, 3.0]).view(4, 1)
    p = exit_log_distribution(gates).exp().squeeze(1)
    torch.testing.assert_close(p, torch.tensor([0.5, 0.25, 0.125, 0.125]))
    # lambda_T is unused: changing the last gate changes nothing.
    gates[-1] = -7.0
    torch.testing.assert_close(exit_log_distribution(gates).exp().squeeze(1), p)


def test_exit_distribution_sums_to_one_and_survives_extreme_gates():
    gates = torch.randn(4, 3, 50) * 30  # saturated sigmoids in both directions
    log_p = exit_log_distribution(gates)
    assert torch.isfinite(log_p).all()
    torch.testing.assert_close(log_p.exp().sum(0), torch.ones(3, 50))


def _output_from(hidden: list[torch.Tensor], gates: torch.Tensor) -> LoopOutput:
    return LoopOutput(hidden_states=hidden, gate_logits=gates)


def test_stage1_loss_by_hand():
    # Two-word vocabulary, hidden size 1, one token: logits_t = [a_t, 0], target 0,
    # CE_t = log(1 + exp(-a_t)).
    a = [0.5, 1.0, 2.0, 3.0]
    hidden = [torch.tensor([[[value]]]) for value in a]
    head = torch.tensor([[1.0], [0.0]])
    lambdas = [0.5, 0.5, 0.5, 0.9]
    gates = torch.tensor([logit(x) for x in lambdas]).view(4, 1, 1)
    labels = torch.zeros(1, 1, dtype=torch.long)
    beta = 0.1
    out = looplm_loss(_output_from(hidden, gates), head, labels, beta=beta)
    ce = [math.log1p(math.exp(-x)) for x in a]
    p = [0.5, 0.25, 0.125, 0.125]
    entropy = -sum(x * math.log(x) for x in p)  # = 1.2130 nats
    assert out.num_tokens == 1
    assert out.loss.item() == pytest.approx(sum(pi * ci for pi, ci in zip(p, ce)) - beta * entropy, rel=1e-6)
    assert out.entropy.item() == pytest.approx(entropy, rel=1e-6)
    torch.testing.assert_close(out.ce_per_step, torch.tensor(ce))
    torch.testing.assert_close(out.exit_prob_per_step, torch.tensor(p))


@pytest.mark.slow
def test_stage1_loss_gradcheck_float64():
    torch.manual_seed(0)
    steps, batch, seq, hidden, vocab = 3, 2, 3, 4, 5
    hs = [torch.randn(batch, seq, hidden, dtype=torch.float64, requires_grad=True) for _ in range(steps)]
    gates = torch.randn(steps, batch, seq, dtype=torch.float64, requires_grad=True)
    head = torch.randn(vocab, hidden, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq))
    labels[0, 1] = -100

    def loss(h0, h1, h2, g, w):
        return looplm_loss(_output_from([h0, h1, h2], g), w, labels, beta=0.07, chunk_size=2).loss

    assert torch.autograd.gradcheck(loss, (*hs, gates, head), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_chunked_cross_entropy_equals_naive_values_and_grads(chunk_size):
    torch.manual_seed(chunk_size)
    hidden = torch.randn(13, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 11, (13,))
    targets[[2, 9]] = -100
    upstream = torch.rand(13)  # non-uniform per-token weights, as p(t) gives
    ours = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    (ours * upstream).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    naive = linear_cross_entropy_reference(hidden, weight, targets)
    (naive * upstream).sum().backward()
    torch.testing.assert_close(ours, naive)
    assert ours[2] == 0 and ours[9] == 0
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)


def test_chunked_cross_entropy_gradcheck_float64():
    hidden = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 4, -100, 2, 1, 3])
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy(h, w, targets, chunk_size=4), (hidden, weight))


def test_stepwise_loss_equals_full_logits_loss_and_saves_no_full_logits():
    torch.manual_seed(1)
    steps, batch, seq, hidden, vocab, beta = 4, 2, 16, 8, 97, 0.05
    hs = [torch.randn(batch, seq, hidden, requires_grad=True) for _ in range(steps)]
    gates = torch.randn(steps, batch, seq, requires_grad=True)
    head = torch.randn(vocab, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq))
    saved_shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_shapes.append(t.shape) or t, lambda t: t):
        ours = looplm_loss(_output_from(hs, gates), head, labels, beta=beta, chunk_size=8)
    # No tensor saved for backward holds logits, not even a chunk (the fused objective saves its
    # gradients: (R, n, H) for the states, (V, H) for the head), let alone all steps' logits.
    assert saved_shapes and all(shape[-1] != vocab for shape in saved_shapes)
    assert max(shape.numel() for shape in saved_shapes) <= max(steps * batch * seq * hidden, vocab * hidden)
    ours.loss.backward()
    grads = [t.grad.clone() for t in (*hs, gates, head)]
    for t in (*hs, gates, head):
        t.grad = None
    # Naive: materialise every step's logits at once.
    logits = torch.stack([h @ head.T for h in hs])  # (R, B, S, V)
    ce = torch.nn.functional.cross_entropy(
        logits.flatten(0, 2), labels.repeat(steps, 1, 1).flatten(), reduction="none"
    ).view(steps, batch, seq)
    lam = torch.sigmoid(gates)
    survive = torch.cumprod(1 - lam, dim=0)
    p = torch.cat([lam[:1], lam[1:-1] * survive[:-2], survive[-2:-1]], dim=0)
    naive = ((p * ce).sum(0) + beta * (p * p.log()).sum(0)).mean()
    naive.backward()
    torch.testing.assert_close(ours.loss, naive)
    for mine, reference in zip(grads, (*hs, gates, head)):
        torch.testing.assert_close(mine, reference.grad)


def test_loss_mask_and_ignore_index_exclude_tokens():
    torch.manual_seed(2)
    hs = [torch.randn(1, 6, 4) for _ in range(3)]
    gates = torch.randn(3, 1, 6)
    head = torch.randn(9, 4)
    labels = torch.randint(0, 9, (1, 6))
    mask = torch.tensor([[0, 1, 1, 0, 1, 1]])
    masked = looplm_loss(_output_from(hs, gates), head, labels, beta=0.1, loss_mask=mask)
    ignored = looplm_loss(_output_from(hs, gates), head, labels.masked_fill(mask == 0, -100), beta=0.1)
    keep = mask[0].bool()
    subset = looplm_loss(_output_from([h[:, keep] for h in hs], gates[:, :, keep]), head, labels[:, keep], beta=0.1)
    assert masked.num_tokens == ignored.num_tokens == subset.num_tokens == 4
    torch.testing.assert_close(masked.loss, subset.loss)
    torch.testing.assert_close(ignored.loss, subset.loss)


def test_gate_loss_by_hand():
    # CE per step 3, 2, 2, 1.999 -> improvements I = 1, 0, 0.001 for steps 2..4.
    a = [logit(math.exp(-c)) for c in (3.0, 2.0, 2.0, 1.999)]  # p(target) = exp(-CE)
    hidden = [torch.tensor([[[value]]]) for value in a]
    head = torch.tensor([[1.0], [0.0]])
    gate_values = [0.3, -0.2, 0.4, 1.1]
    gates = torch.tensor(gate_values).view(4, 1, 1).requires_grad_()
    labels = torch.zeros(1, 1, dtype=torch.long)
    out = gate_loss(_output_from(hidden, gates), head, labels, k=50.0, gamma=0.005)
    expected = 0.0
    for improvement, g in zip((1.0, 0.0, 0.001), gate_values[1:]):
        w = 1 / (1 + math.exp(-50.0 * (improvement - 0.005)))
        cont = 1 / (1 + math.exp(g))  # 1 - lambda
        expected += -(w * math.log(cont) + (1 - w) * math.log(1 - cont))
    assert out.loss.item() == pytest.approx(expected / 4, rel=1e-5)
    out.loss.backward()
    assert gates.grad[0].abs().item() == 0.0  # the first gate is not trained by this loss
    assert (gates.grad[1:].abs() > 0).all()


def test_gate_loss_needs_two_steps():
    with pytest.raises(ValueError, match="recurrent_steps >= 2"):
        gate_loss(
            _output_from([torch.randn(1, 2, 3)], torch.randn(1, 1, 2)),
            torch.randn(4, 3),
            torch.zeros(1, 2, dtype=torch.long),
        )


class _SyncingOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The ops that make the host wait for a GPU: an output whose size is data (`nonzero`,
    `masked_select`...) or a scalar read (`_local_scalar_dense`: item, tolist, bool)."""

    SYNCING = ("nonzero", "masked_select", "_local_scalar_dense", "unique", "repeat_interleave")

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNCING:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("objective", ["looplm", "gate"])
def test_the_dense_loss_equals_the_selected_one_and_needs_no_sync(objective):
    """Without a loss mask (pretraining) the loss is taken over every position, the ignored ones
    weighted 0, with no op whose output size the host must read; with one (SFT), over the
    selected tokens. Both give the same values and gradients."""
    torch.manual_seed(3)
    steps, batch, seq = 3, 2, 7
    labels = torch.randint(0, 9, (batch, seq))
    labels[0, 2] = labels[1, 5] = labels[1, 6] = -100
    results = {}
    for form, mask in (("dense", None), ("selected", torch.ones(batch, seq, dtype=torch.bool))):
        hs = [torch.randn(batch, seq, 4, generator=torch.Generator().manual_seed(i)).requires_grad_() for i in range(3)]
        gates = torch.randn(steps, batch, seq, generator=torch.Generator().manual_seed(7)).requires_grad_()
        head = torch.randn(9, 4, generator=torch.Generator().manual_seed(8)).requires_grad_()
        loss_fn = looplm_loss if objective == "looplm" else gate_loss
        kwargs = {"beta": 0.1} if objective == "looplm" else {}
        with _SyncingOps() as syncing:
            out = loss_fn(_output_from(hs, gates), head, labels, loss_mask=mask, chunk_size=4, **kwargs)
            out.loss.backward()
        results[form] = (out, [t.grad for t in (*hs, gates, head)], syncing.seen)
    (dense, dense_grads, dense_syncs), (selected, selected_grads, selected_syncs) = results.values()
    assert dense_syncs == [] and "nonzero.default" in selected_syncs  # the check sees a nonzero
    assert int(dense.num_tokens) == int(selected.num_tokens) == batch * seq - 3
    for name in ("loss", "ce_per_step", "exit_prob_per_step", "entropy"):
        torch.testing.assert_close(getattr(dense, name), getattr(selected, name), msg=name)
    for a, b in zip(dense_grads, selected_grads, strict=True):
        if a is None and b is None:
            continue
        torch.testing.assert_close(a, b)
