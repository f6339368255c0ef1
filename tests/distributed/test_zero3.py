"""ZeRO-3 on a LoopLM: what it gathers per training step, on 2 gloo processes.

Each decoder layer runs R times per pass. DeepSpeed's per-module gathering (zero3_gather=layer)
all-gathers a layer's weights at each use; zero3_gather=trunk (parallel/zero3.py) gathers them once
for the forward and once for the backward, so the all-gathers of a step do not grow with R. That
the runs train what one process trains is tests/distributed/test_parallel.py's ZeRO sweep.
"""

import pytest
import torch
from test_parallel import (
    assert_same_graphs_on_every_rank,
    assert_same_run,
    compiled_graphs,
    destroy_parallel,
    train_losses,
)

from ouro_train.parallel.testing import run_distributed
from ouro_train.train.trainer import Trainer

STEPS = (1, 2, 4)


def allgathers_per_step() -> dict:
    """{(zero3_gather, R): (all-gathers in the second training step (torch.profiler's c10d records),
    the two steps' metrics)}.
    DeepSpeed is told to keep nothing gathered between module calls (no prefetch, no reuse: at this
    size its defaults keep the whole model gathered all step) and to keep the norms and the exit gate
    whole, as its default persistence threshold does at every Ouro size (they are 64 wide here)."""
    import ouro_train.parallel.engine as engine_module

    plain_config, plain_step = engine_module.deepspeed_config, Trainer.train_step

    def release_after_each_call(cfg, resolved):
        config = plain_config(cfg, resolved)
        config["zero_optimization"].update(
            stage3_param_persistence_threshold=100,
            stage3_max_live_parameters=0,
            stage3_max_reuse_distance=0,
            stage3_prefetch_bucket_size=0,
        )
        return config

    counts: list[int] = []

    def profiled_step(trainer):
        with torch.profiler.profile() as prof:
            metrics = plain_step(trainer)
        counts.append(sum("allgather" in event.name for event in prof.events()))
        return metrics

    engine_module.deepspeed_config, Trainer.train_step = release_after_each_call, profiled_step
    result = {}
    try:
        for gather in ("trunk", "layer"):
            for steps in STEPS:
                run = train_losses(1, 3, "none", steps=2, teardown=False, zero3_gather=gather, recurrent_steps=steps)
                result[gather, steps] = (counts[-1], run)
        # Compiled layers (and `layer` checkpointing) gather and release the same way, in one graph.
        run = train_losses(1, 3, "layer", steps=2, teardown=False, compile_=True, recurrent_steps=STEPS[-1])
        result["trunk-compiled", STEPS[-1]] = (counts[-1], run)
        result["dynamo"] = compiled_graphs()
    finally:
        engine_module.deepspeed_config, Trainer.train_step = plain_config, plain_step
        destroy_parallel()
    return result


@pytest.mark.slow
def test_zero3_trunk_gathering_issues_as_many_all_gathers_per_step_at_any_R():
    results = run_distributed(allgathers_per_step, 2)
    assert_same_graphs_on_every_rank(results)
    assert not results[0]["dynamo"]["graph_breaks"], results[0]["dynamo"]["graph_breaks"]
    runs = [{key: value for key, value in result.items() if key != "dynamo"} for result in results]
    gathers = {key: count for key, (count, _) in runs[0].items()}
    assert gathers == {key: count for key, (count, _) in runs[1].items()}
    assert gathers["trunk-compiled", 4] == gathers["trunk", 4], gathers
    # With every layer weight really partitioned, gathered and released: both train what one process
    # trains (the ZeRO sweep of test_parallel.py runs the tiny model's weights unpartitioned, below
    # DeepSpeed's default persistence threshold).
    for steps in STEPS:
        one_process = train_losses(1, 0, "none", steps=2, recurrent_steps=steps)
        for gather in ("trunk", "layer", "trunk-compiled")[: 3 if steps == STEPS[-1] else 2]:
            assert_same_run(runs[0][gather, steps][1], one_process, f"{gather} R={steps}")
    # trunk: the embedding (forward), the layers (forward, backward) and the head (forward, backward).
    assert gathers["trunk", 1] == gathers["trunk", 2] == gathers["trunk", 4] > 0, gathers
    # layer: every use of every layer module gathers again.
    assert gathers["layer", 1] < gathers["layer", 2] < gathers["layer", 4], gathers
    assert gathers["layer", 4] > 4 * gathers["trunk", 4], gathers
