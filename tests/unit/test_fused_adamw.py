"""optim.fused: torch's fused AdamW kernel is the default; it makes the foreach implementation's
update (to float rounding), keeps the guard's skip semantics, and a checkpoint saved under either
resumes under the other."""

import copy

import torch
from test_stability_guard import assert_same, batches, config, snapshot

from ouro_train.config.resolve import resolve
from ouro_train.model import LoopLM
from ouro_train.train.engine import LocalEngine
from ouro_train.train.trainer import Trainer


def trainer(fused: bool, model: LoopLM) -> Trainer:
    cfg = config()
    cfg.optim.fused = fused
    return Trainer(cfg, copy.deepcopy(model), batches(), resolved=resolve(cfg))


def force_skip(engine) -> None:
    """The next steps are skipped as if the guard said so."""
    step = engine.step
    engine.step = lambda skip=False, grad_norm=None: step(skip=True, grad_norm=grad_norm)


def test_fused_adamw_makes_the_foreach_update_and_skips_alike():
    torch.manual_seed(0)
    model = LoopLM(config().model)
    fused, foreach = trainer(True, model), trainer(False, model)
    assert fused.engine.optimizer.param_groups[0]["fused"] and not foreach.engine.optimizer.param_groups[0]["fused"]
    for step in range(6):
        for t in (fused, foreach):
            if step == 3:  # the guard's verdict: nothing may change
                before = snapshot(t)
                force_skip(t.engine)
            metrics = t.train_step()
            if step == 3:
                assert metrics["skipped"] == 1
                assert_same(before[0], snapshot(t)[0])
                assert_same(before[1], snapshot(t)[1])
                del t.engine.step
            t.guard.record(t.state.step, metrics["loss"], t.pending_verdict)
    for (name, a), b in zip(fused.model.named_parameters(), foreach.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not all(torch.equal(a, b) for a, b in zip(fused.model.parameters(), model.parameters()))


def test_a_checkpoint_resumes_under_the_other_kernel():
    torch.manual_seed(0)
    model = LoopLM(config().model)
    saved = trainer(False, model)
    for _ in range(2):
        saved.train_step()
    state = copy.deepcopy(saved.engine.state_dict())  # as a foreach run (every checkpoint before optim.fused) saved it
    resumed = trainer(True, model)
    engine: LocalEngine = resumed.engine
    engine.load_state_dict(state)
    resumed.state.step = 2
    for _ in range(2 * resumed.resolved.grad_accum_steps):  # the data position of step 2
        next(resumed.train_batches)
    assert engine.optimizer.param_groups[0]["fused"] and engine.optimizer.param_groups[0]["foreach"] is None
    steps = [s["step"] for s in engine.optimizer.state.values()]
    assert all(float(s) == 2 and s.dtype == torch.float32 for s in steps)
    for t in (resumed, saved):
        t.train_step()
    for a, b in zip(resumed.model.parameters(), saved.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
