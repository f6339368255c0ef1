"""benchmarks/plain_ouro.py, the baseline `bench_mfu.py --baseline` trains against, computes the
same model and objective as ouro-train (so the A/B compares implementations, not models), and the
benchmark's CPU smoke run prints the A/Bs (against it and between precisions) and the profile."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import TRAINABLE, randomized, tiny_config

from ouro_train.model.objective import looplm_loss

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import plain_ouro  # noqa: E402


@pytest.mark.parametrize("steps", [1, 3])
def test_the_plain_ouro_computes_our_loss_and_gradients(steps):
    ours = randomized(tiny_config(**TRAINABLE, recurrent_steps=steps))
    plain = plain_ouro.plain_from(ours)
    ids = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(0))
    want = looplm_loss(ours(ids[:, :-1]), ours.lm_head, ids[:, 1:], beta=0.05).loss
    got = plain_ouro.plain_loss(*plain(ids[:, :-1]), ids[:, 1:], beta=0.05)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want.backward()
    got.backward()
    for (name, a), b in zip(ours.named_parameters(), plain.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_bench_mfu_baseline_and_profile_run_on_cpu():
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_mfu.py"), "--model", "tiny", "--device", "cpu", "--seq", "32",
         "--steps", "1", "--warmup", "1", "--baseline", "--profile", "--precision", "bf16_loop",
         "--versus", "precision=bf16"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    # The profile on a CPU: aten ops by kind, and the time no op accounts for (a GPU's says "idle").
    assert "ours/baseline tokens/s" in out and "matmul" in out and "not in ops" in out
    assert "(precision bf16_loop/bf16) tokens/s" in out  # the A/B of precisions, same weights, steps alternating
    versus = out.split("precision=bf16): ")[1].split("first loss ")[1]
    assert float(versus.split()[0]) == pytest.approx(float(versus.split("(ours ")[1].split(")")[0]), rel=1e-2)
    first = out.split("first loss ours ")[1]
    assert float(first.split(",")[0]) == pytest.approx(float(first.split("plain ")[1].split()[0]), rel=1e-2)


@pytest.mark.slow
def test_bench_mfu_versus_another_setting_trains_the_same_weights(monkeypatch):
    # kernels=triton on CPU runs Triton's interpreter: the A/B of kernels item 3 of #22 asks for.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_mfu.py"), "--model", "tiny", "--device", "cpu", "--seq", "16",
         "--steps", "1", "--warmup", "1", "--versus", "kernels=triton"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    assert "(kernels torch/triton) tokens/s" in out, out
    versus = out.split("kernels=triton): ")[1].split("first loss ")[1]
    assert float(versus.split()[0]) == pytest.approx(float(versus.split("(ours ")[1].split(")")[0]), rel=1e-3)
    with pytest.raises(subprocess.CalledProcessError) as refused:
        subprocess.run([sys.executable, str(BENCHMARKS / "bench_mfu.py"), "--device", "cpu", "--versus", "kernel=x"],
                       capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    assert "--versus takes KEY=VALUE" in refused.value.stderr
