"""Saving and resuming a run: the Checkpointer (engine state, RNG per rank, train state, loader position).

Every rank calls `save`/`load` together (the engine's state is sharded under ZeRO); rank 0
writes the shared files and commits. Loading reads only weights-only torch files and JSON.
What the train state records of the config is in config_hash.py, the RNG state in rng.py, the
free-space checks of a save in disk_space.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from functools import partial
from pathlib import Path

import torch

from ouro_train.checkpoint.config_hash import LENGTH_KEYS, config_hash, training_config
from ouro_train.checkpoint.disk_space import check_free_space, estimate_checkpoint_bytes, write_error
from ouro_train.checkpoint.errors import CheckpointError
from ouro_train.checkpoint.rng import rng_state, seed_everything, set_rng_state
from ouro_train.checkpoint.store import (
    TRAIN_STATE,
    apply_retention,
    commit,
    read_train_state,
    temporary_dir,
)
from ouro_train.checkpoint.training_tokenizer import save_checkpoint_tokenizer
from ouro_train.checkpoint.weights import WEIGHTS, full_state_dict, save_weights
from ouro_train.config.resolve import Resolved
from ouro_train.config.schema import Config


def code_version() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        return (
            subprocess.run(
                ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def saved_layout(path: Path, state: dict) -> tuple:
    """(world size, tensor parallel, ZeRO stage, engine kind) that wrote the checkpoint."""
    kind = state.get("engine") or ("local" if (path / "engine" / "engine.pt").is_file() else "deepspeed")
    return state["world_size"], state["tensor_parallel"], state["zero_stage"], kind


class NonFiniteWeights(RuntimeError):
    """The weights hold NaN or inf: no checkpoint is written from them."""

    PREFIX = "non-finite weights: "


class Checkpointer:
    def __init__(self, cfg: Config, root: Path, rank: int = 0, world_size: int = 1, *, resolved: Resolved) -> None:
        """`resolved`: what start-up derived (config/resolve.py), at this launch's data-parallel size."""
        self.cfg = cfg
        self.root = Path(root)
        self.rank = rank
        self.world_size = world_size
        self.resolved = resolved
        # The run's rollbacks (checkpoint/rollback.py), carried into every checkpoint it saves; a
        # rollback being made now lets the resume differ from the checkpoint in its peak LR.
        self.rollbacks: list[dict] = []
        self.rolling_back = False
        self.extension = ""  # set by a resume that makes the run longer (check_compatible)

    def save(self, trainer, loader_state: dict | None, final: bool = False) -> Path:
        """`final`: the stage's last checkpoint, which also carries the layout-free optimizer state
        (optimizer.safetensors) that a next stage or ouro-upcycle starts from.

        Never from non-finite weights (NonFiniteWeights, nothing written), and a full disk is found
        before writing where possible (the previous checkpoint's size against the free space) and
        otherwise where a rank writes: either way the partial save is removed, every rank raises a
        CheckpointError naming the path and the space needed, and the previous checkpoint stays."""
        from ouro_train.optim.schedules import lr_at

        step = trainer.state.step
        tmp = temporary_dir(self.root, step)
        error = ""
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():  # left by a save that was killed
                    shutil.rmtree(tmp)
                check_free_space(
                    self.root,
                    estimate_checkpoint_bytes(
                        self.root, trainer.engine.module, final, self.cfg.parallel.tensor_parallel
                    ),
                    step,
                )
                (tmp / "rng").mkdir(parents=True)
            except OSError as exc:
                error = write_error(exc, tmp, step)
            except CheckpointError as exc:
                error = str(exc)
        self._agree(trainer, error, tmp)
        full = full_state_dict(trainer.engine.module)  # collective: every rank takes part
        if self.rank == 0:
            bad = [name for name, tensor in full.items() if not torch.isfinite(tensor).all()]
            if bad:
                error = NonFiniteWeights.PREFIX + (
                    f"step {step}: {len(bad)} weight tensors hold NaN or inf (e.g. {bad[0]}); no checkpoint is "
                    f"written from them. The newest checkpoint in {self.root} is from before: resume from it "
                    "with a lower optim.lr"
                )
            else:
                error = self._write(partial(save_weights, full, tmp / WEIGHTS, self.cfg.model), tmp, step)
                # The tokenizer of the training data, copied in (committed with the rest; see training_tokenizer.py).
                error = error or self._write(partial(save_checkpoint_tokenizer, tmp, self.cfg), tmp, step)
        del full
        self._agree(trainer, error, tmp)
        if final:
            from ouro_train.checkpoint.optimizer_state import OPTIMIZER, full_optimizer_state, save_optimizer_state

            moments = full_optimizer_state(trainer.engine)  # collective
            if self.rank == 0:
                error = self._write(partial(save_optimizer_state, moments, tmp / OPTIMIZER), tmp, step)
            del moments
            self._agree(trainer, error, tmp)
        # DeepSpeed's save has collectives inside (a barrier at its end): a rank whose write fails
        # there reports it here only if DeepSpeed returns; the free-space check above is what
        # makes that rare.
        error = self._write(lambda: trainer.engine.save_checkpoint(tmp / "engine"), tmp, step)
        error = error or self._write(
            lambda: torch.save(rng_state(), tmp / "rng" / f"rank_{self.rank:05d}.pt"), tmp, step
        )
        if self.rank == 0 and not error:
            health = trainer.guard.health(step)
            state = {
                "stage": self.cfg.stage_name,
                "step": step,
                "steps": self.resolved.steps,
                "tokens": trainer.state.tokens,
                # The learning rate the schedule gives the next step: where init_schedule=keep starts.
                "next_lr": lr_at(step, self.resolved.lr, self.resolved.steps, self.cfg.schedule),
                "final": final,
                "loader": loader_state,
                # Healthy: its weights can be trained on (every update in them passed the guard);
                # `health` says why (optim/guard.py). Retention keeps the newest healthy checkpoint
                # whatever keep_last says, and a rollback goes to it.
                "healthy": health["healthy"],
                "health": health,
                "guard": trainer.guard.state_dict(),
                "rollbacks": self.rollbacks,
                "config_hash": config_hash(self.cfg, self.resolved),
                "config": training_config(self.cfg, self.resolved),
                "code_version": code_version(),
                "world_size": self.world_size,
                "tensor_parallel": self.cfg.parallel.tensor_parallel,
                "zero_stage": self.cfg.parallel.zero_stage,
                "engine": trainer.engine.kind,
            }
            error = self._write(
                lambda: (tmp / TRAIN_STATE).write_text(json.dumps(state, indent=1, default=str)), tmp, step
            )
        self._agree(trainer, error, tmp)
        done = self.root / tmp.name.removeprefix(".tmp-")
        if self.rank == 0:
            try:
                commit(self.root, tmp, step)
            except OSError as exc:
                error = write_error(exc, tmp, step)
            else:
                ckpt = self.cfg.checkpoint
                apply_retention(self.root, ckpt.keep_last, ckpt.keep_every)
        self._agree(trainer, error, tmp)
        return done

    @staticmethod
    def _write(write, tmp: Path, step: int) -> str:
        """Run a write; -> "" or the message of what it raised (a full disk, a quota...)."""
        try:
            write()
        except (OSError, RuntimeError) as exc:
            return write_error(exc, tmp, step)
        return ""

    def _agree(self, trainer, error: str, tmp: Path) -> None:
        """Every rank learns whether any rank failed; then all raise (rank 0 removes the partial save)."""
        failed = bool(trainer.engine.all_reduce_max(torch.tensor(float(bool(error)), device=trainer.device)) > 0)
        if not failed:
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        message = error or f"rank {self.rank}: another rank failed to save the checkpoint (its message says why)"
        if message.startswith(NonFiniteWeights.PREFIX):
            raise NonFiniteWeights(message.removeprefix(NonFiniteWeights.PREFIX))
        raise CheckpointError(message)

    def load(self, path: Path, trainer, loader) -> dict:
        """Restore engine, RNG, step counters and the loader position from `path` (every rank).

        At the saved layout DeepSpeed (or the local engine) loads its own files. At another
        data-parallel size, ZeRO stage (1/2/3) or tensor-parallel size, the ZeRO shards go through
        DeepSpeed's universal checkpoint (converted once and cached, see universal.py); the loader
        position is global, so the data order continues unchanged.
        """
        state = read_train_state(path)
        self.check_compatible(path, state)
        if self.extension and self.rank == 0:
            print(self.extension)
        saved = saved_layout(path, state)
        now = (
            self.world_size,
            self.cfg.parallel.tensor_parallel,
            self.cfg.parallel.zero_stage,
            trainer.engine.kind,
        )
        if saved == now:
            trainer.engine.load_checkpoint(path / "engine")
        else:
            self._load_elsewhere(path, trainer, saved, now)
        rng_file = path / "rng" / f"rank_{self.rank:05d}.pt"
        if saved[0] == self.world_size and rng_file.is_file():
            from ouro_train.checkpoint.safety import safe_torch_load

            set_rng_state(safe_torch_load(rng_file, mmap=False))
        else:  # another world: per-rank streams cannot carry over; derive them from the seed
            seed_everything(self.cfg.train.seed + 1000003 * state["step"] + self.rank)
        trainer.state.step = state["step"]
        trainer.state.tokens = state["tokens"]
        trainer.guard.load_state_dict(state.get("guard"))
        if state["loader"] is not None and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(state["loader"])
        return state

    def _load_elsewhere(self, path: Path, trainer, saved: tuple, now: tuple) -> None:
        describe = lambda lay: f"{lay[0]} processes, tensor parallel {lay[1]}, ZeRO {lay[2]} ({lay[3]} engine)"  # noqa: E731
        change = f"{path}: saved by {describe(saved)}, resumed by {describe(now)}"
        if "local" in (saved[3], now[3]):
            raise CheckpointError(
                f"{change}; the single-process engine's optimizer state only resumes on one process: relaunch "
                "with the saved layout, or start from its weights with checkpoint.init_from (fresh optimizer); "
                "runs meant to change size should use parallel.zero_stage >= 1"
            )
        if saved[2] == 0 and now[2] == 0 and saved[1] == now[1]:
            # Without ZeRO every data-parallel rank holds the whole optimizer: DeepSpeed loads it at any size.
            trainer.engine.load_checkpoint(path / "engine")
            return
        if 0 in (saved[2], now[2]):
            raise CheckpointError(
                f"{change}; only ZeRO 1/2/3 optimizer shards convert to another layout (through DeepSpeed's "
                "universal checkpoint): keep parallel.zero_stage and parallel.tensor_parallel as saved, or resume "
                "with zero_stage >= 1 from a ZeRO checkpoint, or start from its weights with "
                f"checkpoint.init_from={path}"
            )
        if saved[1] > 1 or now[1] > 1:
            # ds_to_universal (deepspeed 0.19.8) fails on megatron-core's tensor-parallel slices, at
            # another TP size and also at the same TP size with another data-parallel size (4 -> 2
            # processes at TP 2 under ZeRO-1: "'NoneType' object has no attribute 'float'"); the weights
            # are consolidated in every checkpoint, so another layout can start from them.
            raise CheckpointError(
                f"{change}; with tensor parallelism the optimizer state resumes only at the layout that saved it "
                f"(DeepSpeed's universal conversion does not handle tensor-parallel shards): relaunch with "
                f"{saved[0]} processes and parallel.tensor_parallel={saved[1]}, or start from its weights with "
                f"checkpoint.init_from={path} (fresh optimizer)"
            )
        if (saved[2] == 3) != (now[2] == 3):
            # DeepSpeed's universal checkpoint of ZeRO-3 holds no whole-model file, which ZeRO 1/2 need.
            raise CheckpointError(
                f"{change}; ZeRO-3 optimizer shards convert only to ZeRO-3 (any data-parallel size), and ZeRO 1/2 "
                "shards only to ZeRO 1/2: keep parallel.zero_stage on the same side, or start from its weights with "
                f"checkpoint.init_from={path}"
            )
        from ouro_train.checkpoint.universal import ensure_universal, restore_frozen_parameters

        universal = ensure_universal(path, self.rank, trust=self.cfg.checkpoint.trust_engine_files)
        trainer.engine.load_checkpoint(universal, universal=True)
        # The universal checkpoint covers only the optimizer's parameters (stage II: the exit gate).
        restore_frozen_parameters(trainer.engine.module, path, self.rank)  # tensor parallel 1 here: rank = dp rank
        if self.rank == 0:
            print(f"resumed {change} (through {universal})")

    def _extend(self, path: Path, state: dict, saved_steps: int) -> str:
        """A resume that changes only the run's length (train.steps / train.tokens) continues the same
        run when the schedule gives every step already trained the same learning rate at the new
        length: constant phases extend (schedule.kind=constant; wsd before its decay starts), a
        started cosine or decay does not. -> the line that says so, or CheckpointError with the
        command that continues from this checkpoint as a new stage instead."""
        from ouro_train.checkpoint.rollback import rerun_command
        from ouro_train.optim.schedules import lr_at

        steps, done, peak, schedule = self.resolved.steps, int(state["step"]), self.resolved.lr, self.cfg.schedule
        for step in range(done):
            before, after = lr_at(step, peak, saved_steps, schedule), lr_at(step, peak, steps, schedule)
            if before != after:
                settings = {
                    "run_dir": f"{self.root.parent}-continued",
                    "train.tokens": "null",  # a stage recipe's length; the new stage's is train.steps
                    "train.steps": str(max(steps - done, 1)),
                    "checkpoint.init_from": str(path),
                    "checkpoint.init_schedule": "keep",
                    "checkpoint.init_data_position": "true",
                }
                if state.get("final"):  # only a stage's final checkpoint carries the layout-free moments
                    settings["checkpoint.init_optimizer"] = "true"
                raise CheckpointError(
                    f"{path}: train.steps {saved_steps} -> {steps}: at the new length the {schedule.kind} schedule "
                    f"gives the {done} steps already trained other learning rates (step {step + 1}: {before:.4g} -> "
                    f"{after:.4g}), so this is not the same run made longer; a run extends while its schedule is "
                    "constant (schedule.kind=constant, or wsd before its decay starts). To go on from this "
                    f"checkpoint for {max(steps - done, 1)} more steps as a new stage, at the learning rate it "
                    f"reached:\n  {rerun_command(settings)}"
                )
        return (
            f"extending the run: train.steps {saved_steps} -> {steps} (the {schedule.kind} schedule gives the "
            f"{done} steps already trained the same learning rates)"
        )

    def check_compatible(self, path: Path, state: dict) -> None:
        if state.get("config_hash") == config_hash(self.cfg, self.resolved):
            return
        saved, now = state.get("config", {}), training_config(self.cfg, self.resolved)
        # A rollback changes the peak learning rate on purpose (checkpoint.rollback_lr), nothing else.
        ignored = {"optim.lr"} if self.rolling_back else set()
        changed = sorted(k for k in set(saved) | set(now) if str(saved.get(k)) != str(now.get(k)) and k not in ignored)
        if not changed:
            return
        if set(changed) <= LENGTH_KEYS:
            self.extension = self._extend(path, state, int(saved["train.steps"]))
            return
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:8])
        raise CheckpointError(
            f"{path}: the training config changed since this checkpoint ({details}); resume with the saved config, "
            "or start a new run directory (or a new stage) for a changed one"
            + (
                f"; to go on from it with another peak learning rate, roll back: checkpoint.resume={path} "
                "checkpoint.rollback_lr=<new rate> (optim.lr stays as saved)"
                if changed == ["optim.lr"]
                else ""
            )
            + (
                "; at another data-parallel size set train.global_batch_size to the saved global_batch_rows "
                "so the accumulation steps are derived"
                if "train.global_batch_rows" in changed
                else ""
            )
        )
