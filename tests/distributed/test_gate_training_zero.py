"""Stage II (`objective.kind=gate`) under DeepSpeed ZeRO 1/2/3 on 2 gloo processes.

DeepSpeed builds its flat fp32 master copies, Adam moments and gradient partitions from the
optimizer's parameter groups, which hold the gate alone (optim/optimizer.py parameter_groups), so
the frozen LM must get none of them; ZeRO-3 still partitions the frozen parameters (here every
parameter, with the persistence threshold at 0, as at full size), which is fine. Tolerances as in
test_parallel.py: the runs differ from one process only in the order of float32 sums.
"""

import os
from pathlib import Path

import pytest
import torch
from tiny_models import GATE, TRAINABLE, handed_off_model, tiny_config

from ouro_train.config import Config, ObjectiveConfig, OptimConfig, ParallelConfig, TrainConfig
from ouro_train.config.resolve import resolve
from ouro_train.model import LoopLM
from ouro_train.parallel import destroy_parallel, init_parallel, parallelize
from ouro_train.parallel.testing import run_distributed
from ouro_train.train.trainer import Trainer

pytestmark = pytest.mark.slow  # spawned gloo processes

VOCAB, SEQ, GLOBAL_ROWS, STEPS = 64, 16, 4, 4


def make_config(zero: int, world: int) -> Config:
    return Config(
        model=tiny_config(**TRAINABLE, vocab_size=VOCAB),
        objective=ObjectiveConfig(kind="gate"),
        optim=OptimConfig(lr=1e-2, grad_clip=1.0),
        train=TrainConfig(
            steps=STEPS, global_batch_size=GLOBAL_ROWS, micro_batch_size=GLOBAL_ROWS // world, seq_len=SEQ
        ),
        parallel=ParallelConfig(zero_stage=zero),
    )


def global_batch(step: int) -> dict:
    g = torch.Generator().manual_seed(200 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_ROWS, SEQ + 1), generator=g)
    mask = torch.rand(GLOBAL_ROWS, SEQ, generator=g) < 0.8  # uneven loss tokens across ranks
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask}


def partition_everything() -> None:
    """ZeRO-3 keeps parameters under 1e5 elements whole on every rank (all of the tiny model's):
    partition them all, as the 1.4B model's are."""
    import ouro_train.parallel.engine as parallel_engine

    original = parallel_engine.deepspeed_config

    def config(cfg, resolved):
        out = original(cfg, resolved)
        out["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return out

    parallel_engine.deepspeed_config = config


def full_weights(module) -> dict:
    from ouro_train.checkpoint.weights import full_state_dict

    state = full_state_dict(module)  # collective; None off rank 0
    return {k: v.clone() for k, v in state.items()} if state is not None else {}


def build_trainer(cfg: Config, layout, model: LoopLM, start: int = 0) -> Trainer:
    from ouro_train.train.trainer import freeze_for_objective

    freeze_for_objective(model, cfg.objective.kind)  # as run_stage does, before parallelize
    engine = parallelize(model, cfg, layout, resolve(cfg, layout.dp)) if layout is not None else None
    dp, rank = (layout.dp, layout.dp_rank) if layout is not None else (1, 0)
    rows = GLOBAL_ROWS // dp
    batches = ({k: v[rank * rows : (rank + 1) * rows] for k, v in global_batch(s).items()} for s in range(start, STEPS))
    return Trainer(
        cfg, model, batches, engine=engine, resolved=resolve(cfg, engine.dp_size if engine is not None else 1)
    )


def optimizer_numel(engine) -> dict:
    """What this rank's ZeRO optimizer holds: elements of fp32 master copies, Adam moments and
    gradient partitions/buffers."""
    zero = engine.optimizer
    inner = zero.optimizer
    moments = sum(
        t.numel() for state in inner.state.values() for k, t in state.items() if k in ("exp_avg", "exp_avg_sq")
    )
    if engine.stage == 3:
        master = sum(t.numel() for t in zero.fp32_partitioned_groups_flat)
        grads = zero.grad_partitions_flat_buffer.numel()
    else:
        master = sum(t.numel() for t in zero.single_partition_of_fp32_groups)
        grads = sum(t.numel() for t in zero.bit16_groups_flat)  # the flat buffers gradients are reduced into
    frozen_grads = sum(1 for p in engine.module.parameters() if not p.requires_grad and p.grad is not None)
    return {"moments": moments, "master": master, "grads": grads, "frozen_grads": frozen_grads}


def gate_runs(zeros: list[int]) -> dict:
    """Each ZeRO stage: STEPS gate steps from the handed-off model; losses, grad norms, the
    consolidated weights before and after, and what the optimizer holds."""
    partition_everything()
    out = {}
    try:
        for zero in zeros:
            cfg = make_config(zero, int(os.environ["WORLD_SIZE"]))
            layout = init_parallel(cfg.parallel, cfg.model, "cpu")
            trainer = build_trainer(cfg, layout, handed_off_model(cfg.model))
            before = full_weights(trainer.engine.module)
            metrics = [trainer.train_step() for _ in range(STEPS)]
            out[f"zero{zero}"] = {
                "run": [(m["loss"], m["grad_norm"]) for m in metrics],
                "before": before,
                "after": full_weights(trainer.engine.module),
                "held": optimizer_numel(trainer.engine),
            }
        return out
    finally:
        destroy_parallel()


def single_process() -> dict:
    cfg = make_config(0, 1)
    trainer = build_trainer(cfg, None, handed_off_model(cfg.model))
    metrics = [trainer.train_step() for _ in range(STEPS)]
    return {
        "run": [(m["loss"], m["grad_norm"]) for m in metrics],
        "after": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
    }


def test_zero_1_2_3_train_the_gate_alone_and_match_one_process():
    reference = single_process()
    results = run_distributed(gate_runs, 2, [1, 2, 3])
    hidden = TRAINABLE["hidden_size"]
    for label, got in results[0].items():
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got["run"], reference["run"])):
            assert loss == pytest.approx(ref_loss, rel=5e-5), f"{label} step {step + 1}: loss"
            assert norm == pytest.approx(ref_norm, rel=5e-5), f"{label} step {step + 1}: grad norm"
        before, after = got["before"], got["after"]
        assert set(after) == set(reference["after"])
        for name in after:
            if name in GATE:
                assert not torch.equal(after[name], before[name]), f"{label}: {name} did not train"
                # Whole-tensor relative difference, as in test_parallel's resume test: Adam may flip
                # the sign of an update whose gradient is ~0; a wrong reduction is off by O(1).
                ref = reference["after"][name]
                assert ((after[name] - ref).norm() / ref.norm()).item() < 1e-3, f"{label}: {name}"
            else:
                assert torch.equal(after[name], before[name]), f"{label}: frozen {name} changed"
                assert torch.equal(after[name], reference["after"][name]), f"{label}: {name} not the handed-off LM"
        for rank, result in enumerate(results):
            held = result[label]["held"]
            # This rank's share of the gate's H + 1 parameters (plus DeepSpeed's alignment padding),
            # never of the LM's 80K: master copy, each moment and the gradient partition.
            assert held["frozen_grads"] == 0, (label, rank, held)
            assert 0 < held["master"] <= hidden + 1 + 8, (label, rank, held)
            assert held["moments"] == 2 * held["master"], (label, rank, held)
            assert 0 < held["grads"] <= hidden + 1 + 8, (label, rank, held)


def save_gate_checkpoint(zero: int, root: str) -> tuple[str, dict, list]:
    """2 ranks: 2 gate steps from the handed-off model, a checkpoint, 2 more -> (checkpoint, its
    weights, the losses of steps 3-4)."""
    from ouro_train.checkpoint.manager import Checkpointer

    partition_everything()
    cfg = make_config(zero, int(os.environ["WORLD_SIZE"]))
    layout = init_parallel(cfg.parallel, cfg.model, "cpu")
    try:
        trainer = build_trainer(cfg, layout, handed_off_model(cfg.model))
        for _ in range(2):
            trainer.train_step()
        saved = Checkpointer(cfg, Path(root), layout.rank, layout.world_size, resolved=resolve(cfg, layout.dp)).save(
            trainer, None
        )
        weights = full_weights(trainer.engine.module)
        return str(saved), weights, [trainer.train_step()["loss"] for _ in range(2)]
    finally:
        destroy_parallel()


def resume_gate_checkpoint(zero: int, saved: str) -> tuple[dict, list]:
    """Resume as run_stage does: a model built from the seed (not the checkpoint's LM), then the
    checkpoint loaded -> (the weights right after loading, the losses of steps 3-4)."""
    from ouro_train.checkpoint.manager import Checkpointer

    partition_everything()
    cfg = make_config(zero, int(os.environ["WORLD_SIZE"]))
    layout = init_parallel(cfg.parallel, cfg.model, "cpu")
    try:
        torch.manual_seed(0)
        trainer = build_trainer(cfg, layout, LoopLM(cfg.model), start=2)
        Checkpointer(cfg, Path(saved).parent, layout.rank, layout.world_size, resolved=resolve(cfg, layout.dp)).load(
            Path(saved), trainer, None
        )
        loaded = full_weights(trainer.engine.module)
        return loaded, [trainer.train_step()["loss"] for _ in range(2)]
    finally:
        destroy_parallel()


@pytest.mark.parametrize("zero", [2, 3])
def test_a_gate_checkpoint_resumes_on_two_and_elastically_on_one_process(tmp_path, zero):
    """Same layout (DeepSpeed's own files; ZeRO 2/3 keep frozen parameters as fragments) and one
    process (the universal checkpoint, which holds only the gate: the LM comes from model.safetensors)."""
    saved, weights, expected = run_distributed(save_gate_checkpoint, 2, zero, str(tmp_path))[0]
    for world in (2, 1):
        loaded, got = run_distributed(resume_gate_checkpoint, world, zero, saved)[0]
        assert set(loaded) == set(weights)
        for name, value in weights.items():
            assert torch.equal(loaded[name], value), f"world {world}: {name} not restored"
        if world == 2:
            assert got == expected
        else:  # another all-reduce split: float32 summation order only
            assert got == pytest.approx(expected, rel=1e-5)
