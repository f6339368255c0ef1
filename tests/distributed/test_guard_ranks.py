"""The stability guard on two gloo processes: a NaN loss or an inf gradient on ONE rank skips
that step's update on both (ZeRO 0, 1 and 3), the ranks stay in step, and the run continues
exactly as a single process whose same step was skipped. Also in this pair of processes: an
evaluation where one rank has no batch at all (a small eval set on many ranks) under ZeRO-3
finishes, with the metrics of one process evaluating every batch."""

import pytest
import torch

from ouro_train.checkpoint.weights import full_state_dict
from ouro_train.config import Config, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from ouro_train.config.resolve import resolve
from ouro_train.model import LoopLM
from ouro_train.parallel import destroy_parallel, init_parallel, parallelize
from ouro_train.parallel.testing import run_distributed
from ouro_train.train.trainer import Trainer

pytestmark = pytest.mark.slow  # 2 spawned processes

VOCAB, SEQ, ROWS, STEPS, BAD_STEP = 64, 16, 4, 5, 3


def make_config(zero: int, rows: int) -> Config:
    return Config(
        model=ModelConfig(
            name="t", vocab_size=VOCAB, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=96
        ),
        optim=OptimConfig(lr=1e-2, grad_clip=1.0),
        train=TrainConfig(steps=STEPS, micro_batch_size=rows, seq_len=SEQ),
        parallel=ParallelConfig(zero_stage=zero),
    )


def global_batch(step: int) -> dict:
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=g)
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def poisoned_run(zero: int, poison: str, poisoned_rank: int, layout=None) -> dict:
    """Train STEPS steps; at BAD_STEP, `poisoned_rank` alone gets a NaN loss or an inf gradient."""
    world = layout.world_size if layout is not None else 1
    cfg = make_config(zero, ROWS // world)
    torch.manual_seed(0)
    model = LoopLM(cfg.model)
    engine = parallelize(model, cfg, layout, resolve(cfg, layout.dp)) if layout is not None else None
    rank = layout.dp_rank if layout is not None else 0
    rows = ROWS // world
    batches = ({k: v[rank * rows : (rank + 1) * rows] for k, v in global_batch(s).items()} for s in range(STEPS))
    trainer = Trainer(
        cfg, model, batches, engine=engine, resolved=resolve(cfg, engine.dp_size if engine is not None else 1)
    )
    if rank == poisoned_rank:
        if poison == "loss":
            trainer.engine.module.model.embed_tokens.register_forward_hook(
                lambda m, i, out: out * float("nan") if trainer.state.step + 1 == BAD_STEP else None
            )
        else:
            param = next(p for p in trainer.engine.module.parameters() if p.requires_grad)
            param.register_hook(lambda g: g * float("inf") if trainer.state.step + 1 == BAD_STEP else g)
    out = {"loss": [], "skipped": [], "reason": [], "weights": []}
    for _ in range(STEPS):
        metrics = trainer.train_step()
        trainer.guard.record(trainer.state.step, metrics["loss"], trainer.pending_verdict)
        out["loss"].append(metrics["loss"])
        out["skipped"].append(metrics["skipped"])
        out["reason"].append(metrics.get("skip_reason"))
        full = full_state_dict(trainer.engine.module)  # collective under ZeRO-3
        main = layout is None or layout.rank == 0
        out["weights"].append({k: v.clone() for k, v in full.items()} if main else None)  # not views
    out["counters"] = trainer.guard.metrics()
    return out


CASES = {
    "zero0-nan-loss": (0, "loss"),
    "zero1-nan-loss": (1, "loss"),
    "zero1-inf-grad": (1, "grad"),
    "zero3-inf-grad": (3, "grad"),
}


def evaluate_uneven(layout=None) -> dict:
    """Rank 0 holds both eval batches, rank 1 none; ZeRO-3 gathers parameters in every forward."""
    cfg = make_config(3 if layout is not None else 0, ROWS)
    torch.manual_seed(0)
    model = LoopLM(cfg.model)
    engine = parallelize(model, cfg, layout, resolve(cfg, layout.dp)) if layout is not None else None
    mine = [global_batch(10), global_batch(11)] if layout is None or layout.dp_rank == 0 else []
    return Trainer(
        cfg,
        model,
        iter(()),
        eval_batches=lambda: mine,
        engine=engine,
        resolved=resolve(cfg, engine.dp_size if engine is not None else 1),
    ).evaluate()


def sweep() -> dict:
    """Every case in one pair of processes (DeepSpeed's import dominates a spawn)."""
    cfg = make_config(0, ROWS // 2)
    layout = init_parallel(cfg.parallel, cfg.model, "cpu")
    try:
        out = {name: poisoned_run(zero, poison, 1, layout) for name, (zero, poison) in CASES.items()}
        return out | {"eval": evaluate_uneven(layout)}
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def single() -> dict:
    """One process, the whole batch, the same step skipped (NaN loss)."""
    return poisoned_run(0, "loss", 0)


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_distributed(sweep, 2)


@pytest.mark.parametrize("case", list(CASES))
def test_one_bad_rank_skips_the_step_on_every_rank(single, two_ranks, case):
    poison = CASES[case][1]
    ranks = [by_case[case] for by_case in two_ranks]
    expected_reason = "nonfinite_loss" if poison == "loss" else "nonfinite_grad_norm"
    for out in ranks:
        assert out["skipped"] == [0, 0, 1, 0, 0]
        assert out["reason"][BAD_STEP - 1] == expected_reason
        assert out["counters"]["guard/skipped_steps"] == 1 and out["counters"]["guard/consecutive_bad"] == 0
    weights = ranks[0]["weights"]
    # The bad step changed nothing; the steps around it did.
    assert all(torch.equal(weights[BAD_STEP - 2][k], weights[BAD_STEP - 1][k]) for k in weights[0])
    assert not all(torch.equal(weights[BAD_STEP - 1][k], weights[BAD_STEP][k]) for k in weights[0])
    # Both ranks saw the same (all-reduced) losses, and they are the single process's, the bad step excepted.
    good = [s for s in range(STEPS) if s != BAD_STEP - 1]
    for out in ranks:
        assert [out["loss"][s] for s in good] == pytest.approx([single["loss"][s] for s in good], rel=5e-5)
    for key, value in weights[-1].items():
        torch.testing.assert_close(
            value, single["weights"][-1][key], rtol=5e-5, atol=2e-5
        )  # summation order, magnified by Adam


def test_evaluation_with_a_rank_that_has_no_batch_finishes_and_counts_every_token(two_ranks):
    expected = evaluate_uneven()
    for by_case in two_ranks:
        got = by_case["eval"]
        assert got.keys() == expected.keys() and "eval/loss" in got
        assert [got[k] for k in sorted(got)] == pytest.approx([expected[k] for k in sorted(got)], rel=1e-5)
