"""The training loop: batches in, engine steps, metrics out to callbacks.

Plug-in points for the later layers of the stack:
  * data: any iterator of batch dicts {input_ids, labels[, position_ids, doc_ids, loss_mask]};
  * engine: `LocalEngine` here, a DeepSpeed engine from `ouro_train.parallel` (same surface);
  * callbacks: logging, checkpointing, profiling attach via `Callback` hooks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ouro_train.config.schema import Config
from ouro_train.kernels.linear_cross_entropy import IGNORE_INDEX
from ouro_train.model.looplm import LoopLM
from ouro_train.model.objective import LossOutput, gate_loss, looplm_loss
from ouro_train.train.engine import LocalEngine, build_optimizer
from ouro_train.train.schedules import lr_at

Batch = dict[str, torch.Tensor]


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # input tokens consumed


class Callback:
    """Hooks the trainer calls; override what you need. Runs on every rank: guard rank-0 work."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, metrics: dict) -> None: ...

    def on_eval_end(self, trainer: Trainer, metrics: dict) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...


def count_loss_tokens(batch: Batch) -> int:
    valid = batch["labels"] != IGNORE_INDEX
    if "loss_mask" in batch:
        valid = valid & batch["loss_mask"].bool()
    return int(valid.sum())


def freeze_for_objective(model: nn.Module, kind: str) -> None:
    """Stage II trains the exit gate alone: freeze everything else."""
    for name, param in model.named_parameters():
        param.requires_grad_(kind != "gate" or name.startswith("model.early_exit_gate."))


class Trainer:
    def __init__(
        self,
        cfg: Config,
        model: LoopLM,
        train_batches: Iterator[Batch],
        eval_batches: Callable[[], Iterable[Batch]] | None = None,
        callbacks: list[Callback] | None = None,
        engine: LocalEngine | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.train.device)
        self.model = model.to(self.device)
        freeze_for_objective(self.model, cfg.objective.kind)
        self.engine = engine or LocalEngine(
            self.model,
            build_optimizer(self.model, cfg.optim),
            cfg.optim.grad_clip,
            cfg.train.grad_accum_steps,
        )
        self.train_batches = train_batches
        self.eval_batches = eval_batches
        self.callbacks = callbacks or []
        self.state = TrainState()

    def _autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss(self, batch: Batch) -> LossOutput:
        model: LoopLM = self.engine.module
        objective = self.cfg.objective
        with self._autocast():
            output = self.engine(
                batch["input_ids"], position_ids=batch.get("position_ids"), doc_ids=batch.get("doc_ids")
            )
            common = dict(loss_mask=batch.get("loss_mask"), chunk_size=objective.ce_chunk_size)
            if objective.kind == "gate":
                return gate_loss(
                    output,
                    model.lm_head.weight,
                    batch["labels"],
                    objective.gate_k,
                    objective.gate_gamma,
                    **common,
                )
            return looplm_loss(output, model.lm_head.weight, batch["labels"], objective.beta, **common)

    def _to_device(self, batch: Batch) -> Batch:
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}

    def train_step(self) -> dict:
        """One optimizer step over `grad_accum_steps` micro-batches; returns its metrics."""
        started = time.perf_counter()
        micro_batches = [self._to_device(next(self.train_batches)) for _ in range(self.cfg.train.grad_accum_steps)]
        # Normalise by the loss tokens of the whole step, not per micro-batch: with loss masks
        # (SFT) a mean of micro-batch means would over-weight short answers.
        step_tokens = sum(count_loss_tokens(batch) for batch in micro_batches)
        lr = lr_at(self.state.step, self.cfg.optim.lr, self.cfg.train.steps, self.cfg.schedule)
        self.engine.set_lr(lr)
        self.engine.module.train()
        totals: dict[str, torch.Tensor | float] = {}
        for batch in micro_batches:
            out = self._loss(batch)
            self.engine.backward(out.loss_sum / max(step_tokens, 1))
            self.engine.step()
            for key, value in (
                ("loss", out.loss_sum.detach()),
                ("ce", out.ce_per_step),
                ("p", out.exit_prob_per_step),
                ("entropy", out.entropy),
            ):
                totals[key] = totals.get(key, 0.0) + value.float()
        input_tokens = sum(batch["input_ids"].numel() for batch in micro_batches)
        self.state.step += 1
        self.state.tokens += input_tokens
        elapsed = time.perf_counter() - started
        return self._metrics(totals, step_tokens) | {
            "step": self.state.step,
            "tokens": self.state.tokens,
            "lr": lr,
            "grad_norm": self.engine.get_global_grad_norm(),
            "tokens_per_s": input_tokens / elapsed,
            "step_time_s": elapsed,
        }

    @staticmethod
    def _metrics(totals: dict, num_tokens: int) -> dict:
        n = max(num_tokens, 1)
        ce = (totals["ce"] / n).tolist()
        p = (totals["p"] / n).tolist()
        metrics = {"loss": float(totals["loss"]) / n, "entropy": float(totals["entropy"]) / n}
        metrics |= {f"ce_step{t + 1}": value for t, value in enumerate(ce)}
        metrics |= {f"p_step{t + 1}": value for t, value in enumerate(p)}
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.eval_batches is None:
            return {}
        self.engine.module.eval()
        totals: dict = {}
        num_tokens = 0
        for batch in self.eval_batches():
            batch = self._to_device(batch)
            out = self._loss(batch)
            num_tokens += out.num_tokens
            for key, value in (
                ("loss", out.loss_sum),
                ("ce", out.ce_per_step),
                ("p", out.exit_prob_per_step),
                ("entropy", out.entropy),
            ):
                totals[key] = totals.get(key, 0.0) + value.float()
        metrics = {f"eval/{key}": value for key, value in self._metrics(totals, num_tokens).items()}
        metrics["step"] = self.state.step
        for callback in self.callbacks:
            callback.on_eval_end(self, metrics)
        return metrics

    def fit(self) -> dict:
        """Train to `train.steps` (or `train.max_steps_this_run` more); returns the final eval metrics."""
        cfg = self.cfg.train
        stop = cfg.steps
        if cfg.max_steps_this_run is not None:
            stop = min(stop, self.state.step + cfg.max_steps_this_run)
        for callback in self.callbacks:
            callback.on_train_start(self)
        while self.state.step < stop:
            metrics = self.train_step()
            for callback in self.callbacks:
                callback.on_step_end(self, metrics)
            if cfg.eval_every and self.state.step % cfg.eval_every == 0 and self.state.step < stop:
                self.evaluate()
        final = self.evaluate()
        for callback in self.callbacks:
            callback.on_train_end(self)
        return final
