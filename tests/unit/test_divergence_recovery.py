"""Healthy means trainable (issue: recovering from a divergence). The update is judged before it is
applied, by AdamW's own bound (optim/guard.py adamw_update_bound), so an absurd learning rate
never writes blown-up weights; a numeric overflow in the optimizer is a divergence, not a
traceback; every torch file of a checkpoint is read weights-only, and a refused one makes the
checkpoint broken (resume falls back) with no advice to unpickle it fully. The rollback command
end to end is in tests/integration/test_rollback.py."""

import json
import math
import shlex

import pytest
import torch
from hostile_pickles import hostile_pickle, replace_pickle
from test_checkpoint_store import fake_save
from test_stability_guard import assert_same, batches, config, snapshot

from ouro_train.checkpoint.errors import CheckpointError
from ouro_train.checkpoint.rollback import rollback_command
from ouro_train.checkpoint.safety import safe_torch_load
from ouro_train.checkpoint.store import checkpoint_problem, find_latest, rollback_target
from ouro_train.config import GuardConfig
from ouro_train.config.resolve import resolve
from ouro_train.model import LoopLM
from ouro_train.optim.guard import (
    NONFINITE_WEIGHTS,
    UPDATE_TOO_LARGE,
    StabilityGuard,
    TrainingDiverged,
    adamw_update_bound,
)
from ouro_train.optim.optimizer import build_optimizer
from ouro_train.train.engine import LocalEngine
from ouro_train.train.stage import resolve_resume
from ouro_train.train.trainer import Trainer

TORCH_ADVICE = ("weights_only=False", "weights_only` set to `False", "will likely succeed")


def test_the_adamw_bound_holds_for_torch_adamw_on_adversarial_gradients():
    """|dw_i + lr wd w_i| <= lr * bound for every element and step, whatever the gradients: quiet
    stretches followed by a sudden large one (the worst case of Adam's normalisation), sign flips,
    zeros. At step 1 the update is exactly lr * sign(g) (the bound is 1 there)."""
    betas, lr, wd = (0.9, 0.95), 1e-2, 0.1
    bound = adamw_update_bound(*betas)
    assert bound == pytest.approx(1.16496, abs=1e-5)
    param = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    optimizer = torch.optim.AdamW([param], lr=lr, betas=betas, eps=1e-30, weight_decay=wd)
    g = torch.Generator().manual_seed(0)
    worst = []
    for step in range(1, 200):
        quiet = torch.full((6,), 1e-6, dtype=torch.float64)
        burst = torch.randn(6, generator=g, dtype=torch.float64) * 10 ** torch.randint(-3, 4, (6,), generator=g)
        grad = burst if step % 37 in (0, 1, 2) or step == 1 else quiet * torch.sign(torch.randn(6, generator=g))
        grad[step % 6] = 0.0 if step % 11 == 0 else grad[step % 6]
        before = param.detach().clone()
        param.grad = grad
        optimizer.step()
        adam_part = (param.detach() - before * (1 - lr * wd)).abs().max().item() / lr
        worst.append(adam_part)
        assert adam_part <= bound * (1 + 1e-9), f"step {step}: {adam_part} > {bound}"
    assert worst[0] == pytest.approx(1.0)
    assert max(worst) > 1.0  # the bound is not loose by more than the sup over t implies
    assert adamw_update_bound(0.9, 0.8) is None and adamw_update_bound(0.9, 0.0) is None  # beta1^2 >= beta2


def test_an_absurd_learning_rate_is_skipped_before_it_is_applied():
    torch.manual_seed(0)
    cfg = config()
    cfg.optim.lr = 1e6
    trainer = Trainer(cfg, LoopLM(cfg.model), batches(), resolved=resolve(cfg))
    before = snapshot(trainer)
    metrics = trainer.train_step()
    assert metrics["skipped"] == 1 and metrics["skip_reason"] == UPDATE_TOO_LARGE
    assert_same(before[0], snapshot(trainer)[0])
    assert_same(before[1], snapshot(trainer)[1])
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in params))
    numel = sum(p.numel() for p in params)
    assert metrics["param_norm"] == pytest.approx(norm, rel=1e-5)
    expected = 1e6 * (adamw_update_bound(0.9, 0.95) * math.sqrt(numel) / norm + cfg.optim.weight_decay)
    assert metrics["update_ratio_max"] == pytest.approx(expected, rel=1e-5)


def test_accepted_updates_stay_within_the_ratio_the_guard_judged():
    """What the guard accepts is what happens: the measured ||dw|| / ||w|| of each accepted step
    is at most the bound it was judged by (so a checkpoint after it holds trainable weights)."""
    torch.manual_seed(0)
    cfg = config()
    trainer = Trainer(cfg, LoopLM(cfg.model), batches(), resolved=resolve(cfg))
    for _ in range(6):
        before = [p.detach().clone() for p in trainer.model.parameters()]
        metrics = trainer.train_step()
        assert metrics["skipped"] == 0
        delta = math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(trainer.model.parameters(), before)))
        measured = delta / metrics["param_norm"]
        assert 0 < measured <= metrics["update_ratio_max"]
        trainer.guard.record(trainer.state.step, metrics["loss"], trainer.pending_verdict)


def test_lr_1e39_ends_as_a_divergence_with_a_rollback_rate_not_an_overflow_traceback():
    torch.manual_seed(0)
    cfg = config(max_consecutive_bad=2)
    cfg.optim.lr = 1e39
    trainer = Trainer(cfg, LoopLM(cfg.model), batches(), resolved=resolve(cfg))
    with pytest.raises(TrainingDiverged, match="update too large") as diverged:
        trainer.fit()
    assert diverged.value.reason == UPDATE_TOO_LARGE
    assert 1e-4 < diverged.value.rollback_lr < 1e-1  # its largest update a tenth of the weights
    # With the update check off, what the optimizer makes of it is still a divergence (exit 3): the
    # foreach kernel's overflow, the fused kernel's non-finite weights, judged at the next step.
    outcomes = {False: ("optimizer overflowed", "optimizer_overflow"), True: ("NaN or inf", NONFINITE_WEIGHTS)}
    for fused, (message, reason) in outcomes.items():
        cfg = config(max_update_ratio=0.0)
        cfg.optim.lr, cfg.optim.fused = 1e39, fused
        trainer = Trainer(cfg, LoopLM(cfg.model), batches(), resolved=resolve(cfg))
        with pytest.raises(TrainingDiverged, match=message) as diverged:
            trainer.fit()
        assert diverged.value.reason == reason and 1e-4 < diverged.value.rollback_lr < 1e-1


def test_weights_that_are_not_finite_end_the_run_at_once_and_health_says_why():
    guard = StabilityGuard(GuardConfig())
    assert guard.health(0) == {
        "healthy": True,
        "weights_of_step": 0,
        "bad_steps_pending": 0,
        "why": "no update accepted yet: the weights are the initial ones",
    }
    assert guard.verdict(3.0, 12.5, 0.02) is None
    guard.record(1, 3.0, None)
    assert guard.verdict(3.0, 12.5, 3.9) is None and guard.verdict(3.0, 12.5, 4.5) == UPDATE_TOO_LARGE
    guard.record(2, 3.0, UPDATE_TOO_LARGE)
    health = guard.health(2)
    assert health["healthy"] and health["weights_of_step"] == 1 and health["bad_steps_pending"] == 1
    assert "step 1, whose update passed the guard: loss 3, parameter norm 12.5, update at most 0.02" in health["why"]
    assert health["why"].endswith("steps 2-2 were bad and skipped")
    assert guard.verdict(3.0, float("nan"), None) == NONFINITE_WEIGHTS
    with pytest.raises(TrainingDiverged, match="NaN or inf"):
        guard.record(3, 3.0, NONFINITE_WEIGHTS)  # the first one: no skip can repair weights
    restored = StabilityGuard(GuardConfig())
    restored.load_state_dict(guard.state_dict())
    assert restored.last_accepted == guard.last_accepted
    restored.reset_streak()
    assert restored.healthy and restored.counts[UPDATE_TOO_LARGE] == 1


def test_refusals_never_pass_on_torch_advice_to_unpickle_fully(tmp_path):
    rng = tmp_path / "rank_00000.pt"
    torch.save({"torch": torch.zeros(3)}, rng)
    replace_pickle(rng, hostile_pickle("global", "top_level", tmp_path / "ran"))
    with pytest.raises(CheckpointError) as refused:
        safe_torch_load(rng)
    message = str(refused.value)
    assert message.startswith(f"{rng}: refused by torch's weights-only unpickler") and "posix.system" in message
    assert not any(advice in message for advice in TORCH_ADVICE)
    assert "trust_engine_files" not in message  # no switch reads this file fully
    # The local engine's file: the same reading, the same message.
    engine = tmp_path / "engine"
    engine.mkdir()
    torch.save({"module": {}}, engine / "engine.pt")
    replace_pickle(engine / "engine.pt", hostile_pickle("memo", "top_level", tmp_path / "ran"))
    cfg = config()
    model = LoopLM(cfg.model)
    with pytest.raises(CheckpointError) as local:
        LocalEngine(model, build_optimizer(model, cfg.optim), 1.0, 1).load_checkpoint(engine)
    assert "refused by torch's weights-only unpickler" in str(local.value) and "STACK_GLOBAL" in str(local.value)
    assert not any(advice in str(local.value) for advice in TORCH_ADVICE)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("damage", ["hostile_rng", "hostile_engine", "torn_tokenizer"])
def test_a_refused_or_unreadable_file_makes_the_checkpoint_broken(tmp_path, damage, capsys):
    older = fake_save(tmp_path, 2)
    newest = fake_save(tmp_path, 4)
    if damage == "torn_tokenizer":
        (newest / "tokenizer.json").write_text('{"model": {"vocab": ')
        named = newest / "tokenizer.json"
    else:
        named = newest / ("rng/rank_00000.pt" if damage == "hostile_rng" else "engine/engine.pt")
        replace_pickle(named, hostile_pickle("global", "top_level", tmp_path / "ran"))
    problem = checkpoint_problem(newest)
    assert problem is not None and problem.startswith(str(named))
    assert find_latest(tmp_path) == older  # auto: falls back, with a warning naming the file
    assert f"skipping checkpoint {newest}: {named}" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=f"checkpoint.resume={newest}: {named}"):
        resolve_resume(str(newest), tmp_path)  # named explicitly: exit 2 naming it
    assert rollback_target(tmp_path) == older
    assert not (tmp_path / "ran").exists()


def test_rollback_target_prefers_healthy_checkpoints_from_before_the_bad_stretch(tmp_path):
    calm = fake_save(tmp_path, 2)
    pending = fake_save(tmp_path, 4)
    state = json.loads((pending / "train_state.json").read_text())
    state["health"] = {"healthy": True, "bad_steps_pending": 2}
    (pending / "train_state.json").write_text(json.dumps(state))
    unhealthy = fake_save(tmp_path, 6, healthy=False)  # e.g. saved with the guard off
    assert rollback_target(tmp_path) == calm
    (calm / "COMPLETE").unlink()
    assert rollback_target(tmp_path) == pending  # healthy weights, saved during the bad stretch
    (pending / "COMPLETE").unlink()
    assert rollback_target(tmp_path) == unhealthy  # the newest usable one
    assert rollback_target(tmp_path / "nothing") is None


def test_the_rollback_command_is_the_run_command_with_the_rollback_keys_replaced(tmp_path):
    argv = ["--config-name", "demo", "run_dir=runs/a b", "optim.lr=1e6", "checkpoint.resume=auto", "+x=1"]
    command = rollback_command(tmp_path / "step_00000004", 0.00444, argv)
    assert command == (
        f"ouro-train --config-name demo 'run_dir=runs/a b' optim.lr=1e6 +x=1 "
        f"checkpoint.resume={tmp_path / 'step_00000004'} checkpoint.rollback_lr=0.00444"
    )
    again = rollback_command(tmp_path / "step_00000002", 1e-3, shlex.split(command)[1:])
    assert again.count("checkpoint.resume=") == 1 and again.endswith("checkpoint.rollback_lr=0.001")
    assert "<lower-rate>" in rollback_command(tmp_path, None, [])


def test_rolling_back_sets_the_later_checkpoints_aside_and_points_latest_back(tmp_path):
    from ouro_train.checkpoint.rollback import set_aside_newer
    from ouro_train.checkpoint.store import complete_checkpoints

    root = tmp_path / "checkpoints"
    target = fake_save(root, 2)
    fake_save(root, 4)
    fake_save(root, 6)
    (root / ".tmp-step_00000007").mkdir()  # leftover of a killed save: not a step_N directory
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 6, "loss": 1e13}\n')
    aside = set_aside_newer(root, {"from_step": 2, "from_checkpoint": target.name}, metrics)
    assert complete_checkpoints(root) == [target] and find_latest(root) == target
    assert (root / "latest").read_text() == target.name
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "step_00000004", "step_00000006"]
    assert aside.name.startswith("rolled_back-step_00000002-")
    assert set_aside_newer(root, {"from_step": 2, "from_checkpoint": target.name}, metrics) is None


def test_the_suggested_rate_is_judged_at_the_peak_not_at_the_warmup_rate_of_the_last_step():
    """Diverging during warmup, at a fraction of the peak: the suggested peak makes the largest
    update a tenth of the weights at the peak itself, the same rate as without warmup."""
    suggestions = []
    for warmup in (0, 1000):
        torch.manual_seed(0)
        cfg = config(max_consecutive_bad=2)
        cfg.optim.lr, cfg.schedule.warmup_steps = 1e6, warmup
        trainer = Trainer(cfg, LoopLM(cfg.model), batches(), resolved=resolve(cfg))
        with pytest.raises(TrainingDiverged) as diverged:
            trainer.fit()
        ratio_at_peak = trainer.last_update_ratio * cfg.optim.lr / trainer.last_lr
        assert diverged.value.rollback_lr * ratio_at_peak / cfg.optim.lr == pytest.approx(0.1, rel=1e-2)
        suggestions.append(diverged.value.rollback_lr)
    assert suggestions[0] == pytest.approx(suggestions[1], rel=1e-2)


def test_retention_keeps_the_newest_checkpoint_from_before_a_bad_stretch(tmp_path):
    from ouro_train.checkpoint.store import apply_retention, complete_checkpoints

    calm = fake_save(tmp_path, 2)
    for step in (4, 6):
        pending = fake_save(tmp_path, step)
        state = json.loads((pending / "train_state.json").read_text())
        state["health"] = {"healthy": True, "bad_steps_pending": step // 2 - 1}
        (pending / "train_state.json").write_text(json.dumps(state))
    apply_retention(tmp_path, keep_last=1, keep_every=0)
    assert [p.name for p in complete_checkpoints(tmp_path)] == [calm.name, "step_00000006"]
    assert rollback_target(tmp_path) == calm


def test_weights_found_non_finite_by_a_save_end_as_a_divergence_with_a_rollback(tmp_path):
    from ouro_train.checkpoint.manager import NonFiniteWeights
    from ouro_train.train.stage import diverging_ends_in_a_rollback

    target = fake_save(tmp_path, 2)
    cfg = config()
    trainer = Trainer(cfg, LoopLM(cfg.model), batches(), resolved=resolve(cfg))
    with pytest.raises(TrainingDiverged) as diverged, diverging_ends_in_a_rollback(trainer, tmp_path):
        raise NonFiniteWeights("step 3: 1 weight tensors hold NaN or inf")
    assert diverged.value.reason == NONFINITE_WEIGHTS and diverged.value.rollback_checkpoint == target
    assert diverged.value.rollback_lr == pytest.approx(cfg.optim.lr / 2)
