"""The dry run's memory estimate (ouro_train/model/memory.py) against peaks measured on a GPU.

The figures are one H200's (2026-12-04, torch 2.11, benchmarks/README.md "GPU figures"):
`bench_mfu.py --model ouro_1p4b --seq 4096 --compile` (sdpa, no activation checkpointing, one
process, fused AdamW, the stage-I objective with 4,096-token CE chunks), each model's own peak.
The estimate is for what fits, so it may be a little low or high, but not by much."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ouro_train.config.schema import Config, ModelConfig, ParallelConfig, TrainConfig
from ouro_train.model.flops import count_model
from ouro_train.model.memory import estimate_memory

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "model"
MEASURED_GIB = {  # (train.precision, micro-batch) -> peak
    ("bf16", 1): 55.0,
    ("bf16", 2): 83.0,
    ("bf16_loop", 1): 52.7,
    ("bf16_loop", 2): 80.7,
}


def estimate(precision: str, micro_batch: int, zero_stage: int = 0) -> float:
    model = ModelConfig(**OmegaConf.to_container(OmegaConf.load(RECIPES / "ouro_1p4b.yaml")))
    train = TrainConfig(seq_len=4096, micro_batch_size=micro_batch, precision=precision, device="cuda")
    parallel = ParallelConfig(zero_stage=zero_stage)
    return estimate_memory(Config(model=model, train=train, parallel=parallel), world_size=1).total_gib


@pytest.mark.parametrize(("precision", "micro_batch"), sorted(MEASURED_GIB))
def test_ouro_1p4b_at_4k_is_within_7_percent_of_the_h200_peak(precision, micro_batch):
    measured = MEASURED_GIB[precision, micro_batch]
    assert estimate(precision, micro_batch) == pytest.approx(measured, rel=0.07)


def test_a_4k_row_costs_what_it_measured():
    # The activations' slope: 28.0 GiB per 4K row under both precisions.
    for precision in ("bf16", "bf16_loop"):
        slope = estimate(precision, 2) - estimate(precision, 1)
        assert slope == pytest.approx(MEASURED_GIB[precision, 2] - MEASURED_GIB[precision, 1], rel=0.02)


def test_ouro_train_under_zero1_is_within_7_percent_of_the_h200_peak_less_the_master_copy():
    # ouro-train itself under torchrun, DeepSpeed ZeRO-1 on one GPU, bf16_loop, compiled layers:
    # 58.48 GiB logged at every step, 5.8 GiB above bench_mfu's model alone, 5.3 GiB of it
    # DeepSpeed's fp32 master copy of the weights (4 bytes x 1.43B). The engine now makes the master
    # the weights' own partition (parallel/engine.py share_fp32_master; unmeasured on a GPU since):
    # the estimate is the measured peak less that copy, and the bare model's.
    assert estimate("bf16_loop", 1, zero_stage=1) == pytest.approx(58.48 - 5.3, rel=0.07)
    assert estimate("bf16_loop", 1, zero_stage=1) == pytest.approx(estimate("bf16_loop", 1), abs=0.01)


def test_fp8_counts_its_two_float8_copies_of_the_shared_weights():
    # Unmeasured on a GPU: bf16_loop's estimate plus 2 bytes per shared-layer parameter (the
    # (out, in) and (in, out) e4m3 copies; the activations it quantises are transient).
    model = ModelConfig(**OmegaConf.to_container(OmegaConf.load(RECIPES / "ouro_1p4b.yaml")))
    layer_params = count_model(model, 4096).layer_params
    assert (estimate("fp8", 1) - estimate("bf16_loop", 1)) * 2**30 == pytest.approx(2 * layer_params, rel=1e-6)


def test_tensor_parallel_divides_the_loop_precision_copies():
    # bf16_loop's copies and accumulators are of this rank's weight shards: 2 bytes per layer
    # parameter over bf16, divided by tensor_parallel like the weights themselves.
    model = ModelConfig(**OmegaConf.to_container(OmegaConf.load(RECIPES / "ouro_1p4b.yaml")))
    layer_params = count_model(model, 4096).layer_params

    def tp2(precision: str) -> float:
        train = TrainConfig(seq_len=4096, micro_batch_size=1, precision=precision, device="cuda")
        cfg = Config(model=model, train=train, parallel=ParallelConfig(tensor_parallel=2, zero_stage=1))
        return estimate_memory(cfg, world_size=2).total_gib

    assert (tp2("bf16_loop") - tp2("bf16")) * 2**30 == pytest.approx(2 * layer_params / 2, rel=1e-6)


def test_zero3_counts_the_layers_gathered_for_a_pass_and_their_whole_gradients():
    # Unmeasured on a GPU, from the code (parallel/zero3.py): at 8 ranks a ZeRO-3 rank holds 1/8 of
    # the states between passes, but during a pass the shared layers' whole gradients (autograd sums
    # each layer's R contributions before ZeRO reduce-scatters it) and, under zero3_gather=trunk,
    # their whole weights: 4 bytes per layer parameter each, less the rank's own eighth. ZeRO-2's
    # sharded gradients wait for the same sums.
    model = ModelConfig(**OmegaConf.to_container(OmegaConf.load(RECIPES / "ouro_1p4b.yaml")))
    layer_params = count_model(model, 4096).layer_params
    params = count_model(model, 4096).total_params

    def states(gather: str, stage: int = 3) -> float:
        train = TrainConfig(seq_len=4096, micro_batch_size=1, precision="bf16", device="cuda")
        parallel = ParallelConfig(zero_stage=stage, zero3_gather=gather, compile=gather == "trunk")
        return estimate_memory(Config(model=model, train=train, parallel=parallel), world_size=8).states_gib * 2**30

    assert states("layer") == pytest.approx(16 * params / 8 + 4 * layer_params * 7 / 8, rel=1e-6)
    assert states("trunk") - states("layer") == pytest.approx(4 * layer_params * 7 / 8, rel=1e-6)
    # ZeRO-2 shards gradients the same way, after the same sums.
    assert states("layer", stage=2) == pytest.approx(4 * params + 12 * params / 8 + 4 * layer_params * 7 / 8, rel=1e-6)
