"""A training step reads the device back on the host once from Python: the stability guard's verdict needs the
step's loss and weight norm before the optimizer applies the update (#22 item 7: "no host sync per
step beyond what the guard needs"). Everything else the step reports (the loss-token count, the
metrics, the gradient norm) travels in that one read, and a one-rank run decides its step boundary
(signal, time-based save) with no collective at all. Counted on CPU by
ouro_train/utils/host_reads.py; the GPU-marked test counts real synchronisations with CUDA's sync
debug mode, which would also see one inside an op (the objective's loss-token selection had a
`nonzero`, once per micro-batch, until its loss went dense)."""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny_models import TRAINABLE, tiny_config

from ouro_train.config import Config, OptimConfig, TrainConfig
from ouro_train.config.resolve import resolve
from ouro_train.model import LoopLM
from ouro_train.train.callbacks import Throughput
from ouro_train.train.trainer import Callback, Trainer
from ouro_train.utils.host_reads import counting_host_reads, cuda_synchronisations


def make_trainer(accum: int = 2, grad_clip: float = 1.0, callbacks=(), steps: int = 3) -> Trainer:
    torch.manual_seed(0)
    cfg = Config(
        model=tiny_config(**TRAINABLE),
        optim=OptimConfig(grad_clip=grad_clip),
        train=TrainConfig(steps=steps, micro_batch_size=2, grad_accum_steps=accum, seq_len=16),
    )
    tokens = torch.randint(0, 64, (2, 17))
    mask = torch.rand(2, 16) < 0.7
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask}
    return Trainer(cfg, LoopLM(cfg.model), itertools.repeat(batch), callbacks=list(callbacks), resolved=resolve(cfg))


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_a_step_reads_the_device_once_whatever_its_micro_batches(grad_clip):
    trainer = make_trainer(accum=2, grad_clip=grad_clip)
    trainer.train_step()  # the first step may build lazy state
    with counting_host_reads() as reads:
        metrics = trainer.train_step()
    assert len(reads) == 1, reads
    assert reads[0][1].startswith("ouro_train.train.trainer:")
    # What used to be read separately is all there, and right.
    assert metrics["grad_norm"] > 0 and metrics["param_norm"] > 0 and metrics["loss"] > 0
    assert set(metrics) >= {"ce_step1", "p_step1", "entropy", "update_ratio_max"}


def test_fit_reads_once_per_step_with_the_usual_callbacks():
    """A one-rank run agrees with itself: its step boundary (stop? save?) needs no collective."""

    class SaveAtStep2(Callback):
        def wants_save(self, trainer):
            return trainer.state.step == 2

    decisions = []

    class Decisions(Callback):
        def on_step_decision(self, trainer, decision):
            decisions.append(decision.save)

    trainer = make_trainer(callbacks=[Throughput(1e9, 1, None), SaveAtStep2(), Decisions()], steps=4)
    trainer.train_step()
    trainer.state.step = 0
    with counting_host_reads() as reads:
        trainer.fit()
    # 4 steps, then the final evaluation (none here: no eval data).
    assert [where for _, where in reads] == [reads[0][1]] * 4, reads
    assert decisions == [False, True, False, False]


def test_the_gradient_norm_and_clipping_are_those_of_torch_clip_grad_norm():
    """The engine clips with the norm the trainer read (no second read): the same update as
    torch.nn.utils.clip_grad_norm_ on the same gradients, bitwise."""
    ours = make_trainer(accum=1, grad_clip=0.05)
    theirs = make_trainer(accum=1, grad_clip=0.05)
    batch = next(ours.train_batches)
    ours.train_step()
    out = theirs._loss(batch)
    tokens = int((batch["loss_mask"] & (batch["labels"] != -100)).sum())
    (out.loss_sum * torch.tensor(1 / tokens, dtype=torch.float32)).backward()  # the trainer's scaling
    params = [p for group in theirs.engine.optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, 0.05)
    theirs.engine.optimizer.step()
    assert ours.engine.get_global_grad_norm() == float(norm) > 0.05  # clipping did act
    for a, b in zip(ours.model.parameters(), theirs.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_non_finite_gradient_still_skips_the_update():
    trainer = make_trainer(accum=1)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    handle = trainer.model.lm_head.weight.register_hook(lambda grad: grad * float("nan"))
    metrics = trainer.train_step()
    handle.remove()
    assert metrics["skipped"] == 1 and metrics["skip_reason"] == "nonfinite_grad_norm"
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_step_synchronises_once():
    cfg = Config(
        model=tiny_config(**TRAINABLE),
        train=TrainConfig(steps=3, micro_batch_size=2, grad_accum_steps=2, seq_len=16, device="cuda"),
    )
    torch.manual_seed(0)
    tokens = torch.randint(0, 64, (2, 17))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    trainer = Trainer(cfg, LoopLM(cfg.model), itertools.repeat(batch), resolved=resolve(cfg))
    trainer.train_step()
    syncs = cuda_synchronisations(trainer.train_step)
    # The step's one read: the objective takes its loss over every position, masked, without the
    # `nonzero` that cost one more per micro-batch (tests/unit/test_objective.py has the CPU proxy).
    assert len(syncs) == 1, syncs
