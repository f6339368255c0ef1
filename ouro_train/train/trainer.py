"""The training loop: batches in, engine steps, metrics out to callbacks.

Plug-in points for the later layers of the stack:
  * data: any iterator of batch dicts {input_ids, labels[, position_ids, doc_ids, loss_mask]};
  * engine: any `Engine` (train/engine.py): `LocalEngine` here, a DeepSpeed engine from `ouro_train.parallel`;
  * callbacks: logging, checkpointing, profiling attach via `Callback` hooks.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

from ouro_train.config.resolve import Resolved
from ouro_train.config.schema import LOOP_PRECISIONS, Config
from ouro_train.kernels.linear_cross_entropy import IGNORE_INDEX
from ouro_train.model.looplm import LoopLM
from ouro_train.model.objective import LossOutput, gate_loss, looplm_loss, loss_token_mask
from ouro_train.optim.guard import (
    NONFINITE_GRAD,
    StabilityGuard,
    TrainingDiverged,
    adamw_update_bound,
)
from ouro_train.optim.optimizer import build_optimizer
from ouro_train.optim.schedules import lr_at
from ouro_train.train.engine import Engine, LocalEngine, trained_numel
from ouro_train.train.signals import StopOnSignal

Batch = dict[str, torch.Tensor]

# The largest relative update a suggested rollback learning rate allows (Trainer.suggested_lr):
# a tenth of the weights, an order of magnitude above what LM training usually runs at.
SANE_UPDATE_RATIO = 0.1


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # input tokens consumed


@dataclass(frozen=True)
class StepDecision:
    """What every rank agreed at the end of a step (one collective where there are several ranks:
    Trainer._decide)."""

    stop: bool  # a SIGTERM / SIGUSR1 reached some rank: every rank stops after this step
    save: bool  # some rank's clock says a time-based checkpoint is due: every rank saves now


class Callback:
    """Hooks the trainer calls; override what you need. Runs on every rank: guard rank-0 work.

    At the end of each step, in this order, each hook over the callbacks sorted by `order`:
      1. `step_metrics`: return metrics derived from the step's (throughput, MFU...); merged in;
      2. `on_step_end`: observe the step's metrics, read-only (loggers);
      3. one collective decides the step (`StepDecision`), asking `wants_save` of each callback;
      4. `on_step_decision`: act on what all ranks agreed (checkpoints).
    So a step is logged before any checkpoint holds it, whatever order callbacks were added in.
    The trainer also accepts objects with only some of these hooks."""

    # Ties keep the order in which callbacks were given. Producers of metrics first, then loggers,
    # then what saves (it also sees the metrics, read-only).
    METRICS, LOG, SAVE = 0, 50, 100
    order: int = LOG

    def on_train_start(self, trainer: Trainer) -> None: ...

    def step_metrics(self, trainer: Trainer, metrics: Mapping) -> dict:
        return {}

    def on_step_end(self, trainer: Trainer, metrics: Mapping) -> None: ...

    def wants_save(self, trainer: Trainer) -> bool:
        """This rank's own view that a checkpoint is due now (e.g. by its clock)."""
        return False

    def on_step_decision(self, trainer: Trainer, decision: StepDecision) -> None: ...

    def on_eval_end(self, trainer: Trainer, metrics: Mapping) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...


def _hooks(callbacks: list, name: str) -> list[Callable]:
    """The bound `name` hook of each callback that has one, in `order` (stable)."""
    ordered = sorted(callbacks, key=lambda callback: getattr(callback, "order", Callback.LOG))
    return [getattr(callback, name) for callback in ordered if hasattr(callback, name)]


def count_loss_tokens(batches: list[Batch]) -> torch.Tensor:
    """Loss tokens of some batches, by the objective's own definition (`loss_token_mask`): 0-d int64
    on their device (no host read)."""
    return sum(loss_token_mask(batch["labels"], batch.get("loss_mask")).sum() for batch in batches)


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
        engine: Engine | None = None,
        *,
        resolved: Resolved,
    ) -> None:
        """`resolved`: what start-up derived (config/resolve.py), at the engine's data-parallel size."""
        self.cfg = cfg
        self.device = torch.device(cfg.train.device)
        self.model = model.to(self.device)
        freeze_for_objective(self.model, cfg.objective.kind)
        if cfg.train.precision in LOOP_PRECISIONS and getattr(model, "loop_precision", None) is None:
            raise ValueError(
                f"train.precision={cfg.train.precision} but the model's shared linears are plain: build the model "
                "through ouro_train.parallel.parallelize (or apply_loop_precision) first"
            )
        if engine is not None and resolved.dp_size != engine.dp_size:
            raise ValueError(
                f"resolved.dp_size={resolved.dp_size} but the engine's dp_size={engine.dp_size}: "
                "resolve the config at the engine's data-parallel size (resolve(cfg, engine.dp_size))"
            )
        self.resolved = resolved
        self.engine: Engine = engine or LocalEngine(
            self.model,
            build_optimizer(self.model, cfg.optim),
            cfg.optim.grad_clip,
            self.resolved.grad_accum_steps,
        )
        self.train_batches = train_batches
        self.eval_batches = eval_batches
        self.callbacks = callbacks or []
        self.state = TrainState()
        self.guard = StabilityGuard(cfg.guard)
        self.pending_verdict: str | None = None
        # What the update check needs (optim/guard.py): AdamW's per-element bound and the size of
        # what is trained (the exit gate alone in stage II).
        self.update_bound = adamw_update_bound(cfg.optim.beta1, cfg.optim.beta2)
        self.trained_numel = trained_numel(self.engine.module, cfg.parallel.tensor_parallel)
        self.last_update_ratio: float | None = None
        self.last_lr: float | None = None  # the learning rate that ratio was computed at
        # Fields for the next step's metrics only (a rollback says so in the step after it).
        self.annotations: dict = {}
        # Mark the step's phases for the profiler (train/profiling.py sets it for its window only).
        self.profiling = False

    def phase(self, name: str):
        """A context marking one phase of the step (`ouro/...`, train/profiling.py PHASES) in the
        profiler's trace while `profiling`; nothing otherwise (no record_function's dispatch)."""
        return torch.profiler.record_function(name) if self.profiling else contextlib.nullcontext()

    def update_ratio(self, lr: float, param_norm: float) -> float | None:
        """The largest ||dw|| / ||w|| AdamW can make at `lr`: each element of its normalised update
        is at most `update_bound` (whatever the gradient), decoupled weight decay adds lr * wd * w.
        None: not judged (unbounded betas, or no weights to compare with)."""
        if self.update_bound is None or not param_norm > 0 or not math.isfinite(param_norm):
            return None
        return lr * (self.update_bound * math.sqrt(self.trained_numel) / param_norm + self.cfg.optim.weight_decay)

    def suggested_lr(self, reason: str | None) -> float:
        """The peak learning rate a rollback should try: half the current one, and at most the peak
        at which the largest update is a tenth of the weights where the run stopped
        (SANE_UPDATE_RATIO; the bound scales with the learning rate, so it is judged at the peak,
        not at the warmup's rate of the last step). `reason`: the last bad step's."""
        peak = self.resolved.lr
        suggestion = peak / 2
        if self.last_update_ratio and self.last_lr:
            suggestion = min(suggestion, self.last_lr * SANE_UPDATE_RATIO / self.last_update_ratio)
        return float(f"{suggestion:.3g}")

    def _autocast(self):
        if self.cfg.train.precision in ("bf16", *LOOP_PRECISIONS):
            # Selective checkpointing replays the forward's ops in backward one for one; autocast's
            # cache of weight casts (filled by a shared layer's first use, hit by the others) would
            # make the replay cast where the forward did not.
            cache = self.cfg.parallel.activation_checkpointing != "selective"
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, cache_enabled=cache)
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
                    model.lm_head,
                    batch["labels"],
                    objective.gate_k,
                    objective.gate_gamma,
                    **common,
                )
            return looplm_loss(output, model.lm_head, batch["labels"], objective.beta, **common)

    def _to_device(self, batch: Batch) -> Batch:
        """The batch on the training device. To a GPU through pinned memory: a copy from pageable
        memory waits for everything queued on the stream before it starts (CUDA's rule), which
        would stall the host at each micro-batch until the previous step's optimizer is done;
        from pinned memory the copy is queued and the host goes on to launch the forward. torch's
        pinned-memory allocator keeps each buffer until its copy has run."""
        pin = self.device.type == "cuda"
        return {
            key: (value.pin_memory() if pin and value.device.type == "cpu" else value).to(
                self.device, non_blocking=True
            )
            for key, value in batch.items()
        }

    def train_step(self) -> dict:
        """One optimizer step over `grad_accum_steps` micro-batches; returns its metrics.

        The device is read back on the host once per step (a GPU idles at each read while the host
        prepares what comes next): the guard must judge the step before the optimizer applies it,
        so the loss totals, ||w||, the loss-token count and the gradient norm come back together,
        in one `tolist`, between the last backward and the optimizer step. Nothing after it reads
        the device: the optimizer step runs while the host logs and fetches the next batch."""
        started = time.perf_counter()
        with self.phase("ouro/data"):
            micro_batches = [self._to_device(next(self.train_batches)) for _ in range(self.resolved.grad_accum_steps)]
        # The host's wait for the data (reading, packing, the copies queued): on a GPU it idles
        # behind this only where it exceeds the previous step's optimizer kernels still running.
        data_wait = time.perf_counter() - started
        # Normalise by the loss tokens of the whole step on every data-parallel rank, not per
        # micro-batch: with loss masks (SFT) a mean of means would over-weight short answers.
        # The engine averages gradients over dp ranks, hence the factor dp_size. The count stays
        # on the device (the scale is a 0-d tensor), exact in int64 whatever the batch.
        step_tokens = self.engine.all_reduce_sum(count_loss_tokens(micro_batches))
        scale = (self.engine.dp_size / step_tokens.clamp(min=1).double()).float()
        lr = lr_at(self.state.step, self.resolved.lr, self.resolved.steps, self.cfg.schedule)
        self.engine.set_lr(lr)
        self.engine.module.train()
        totals = None
        for index, batch in enumerate(micro_batches):
            with self.phase("ouro/forward"):
                out = self._loss(batch)
            with self.phase("ouro/backward"):
                self.engine.backward(out.loss_sum * scale)
            totals = self._accumulate(totals, out)
            verdict = grad_norm = None
            if index == len(micro_batches) - 1:
                with self.phase("ouro/host_read"):
                    # The step's loss over every rank, before the optimizer step, so that the guard can
                    # cancel the update everywhere (the same all-reduce gives the metrics and ||w||).
                    reduced = self.engine.all_reduce_sum(
                        torch.cat([totals, self.engine.param_norm_sq_share().reshape(1).to(totals)])
                    )
                    norm = self.engine.boundary_grad_norm()
                    measured = norm is not None  # else the engine measures it inside its step (DeepSpeed ZeRO)
                    if not measured:
                        norm = torch.full((), math.nan, device=reduced.device)
                    host = torch.cat([reduced.double(), torch.stack([step_tokens.double(), norm.double()])])
                    values = host.tolist()  # the step's one host read
                    loss_sum, param_norm, num_tokens = values[0], math.sqrt(values[-3]), values[-2]
                    grad_norm = values[-1] if measured else None
                    ratio = self.update_ratio(lr, param_norm)
                    if ratio is not None:  # kept from the last step whose weights could be measured
                        self.last_update_ratio, self.last_lr = ratio, lr
                    verdict = self.guard.verdict(loss_sum / max(num_tokens, 1.0), param_norm, ratio)
            with self.phase("ouro/engine_step"):
                self.engine.step(skip=verdict is not None, grad_norm=grad_norm)
        if verdict is None and self.engine.update_skipped:
            verdict = NONFINITE_GRAD
        input_tokens = sum(batch["input_ids"].numel() for batch in micro_batches) * self.engine.dp_size
        self.state.step += 1
        self.state.tokens += input_tokens
        elapsed = time.perf_counter() - started
        metrics = (
            self._metrics(values[:-3], num_tokens)
            | {
                "step": self.state.step,
                "tokens": self.state.tokens,
                "lr": lr,
                "grad_norm": self.engine.get_global_grad_norm(),
                "param_norm": param_norm,
                "update_ratio_max": ratio,
                "tokens_per_s": input_tokens / elapsed,
                "step_time_s": elapsed,
                "data_wait_s": data_wait,
            }
            | self.annotations
        )
        self.annotations = {}
        self.pending_verdict = verdict
        metrics["skipped"] = int(verdict is not None)
        if verdict is not None:
            metrics["skip_reason"] = verdict
        return metrics

    @staticmethod
    def _accumulate(totals: torch.Tensor | None, out: LossOutput) -> torch.Tensor:
        """[loss, CE per step (R), p per step (R), entropy] summed over loss tokens, one vector
        so that data-parallel ranks combine it with a single all-reduce."""
        row = torch.cat(
            [
                out.loss_sum.detach().reshape(1).float(),
                out.ce_per_step.float(),
                out.exit_prob_per_step.float(),
                out.entropy.reshape(1).float(),
            ]
        )
        return row if totals is None else totals + row

    @staticmethod
    def _metrics(totals: list[float], num_tokens: float) -> dict:
        """The step's (or evaluation's) per-token figures from `_accumulate`'s totals, read back."""
        n = max(num_tokens, 1.0)
        steps = (len(totals) - 2) // 2
        values = [value / n for value in totals]
        metrics = {"loss": values[0], "entropy": values[-1]}
        metrics |= {f"ce_step{t + 1}": values[1 + t] for t in range(steps)}
        metrics |= {f"p_step{t + 1}": values[1 + steps + t] for t in range(steps)}
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.eval_batches is None:
            return {}
        self.engine.module.eval()
        batches = [self._to_device(batch) for batch in self.eval_batches() if len(batch["input_ids"])]
        # Every rank takes part in every collective, whatever its share of a small eval set: ranks
        # agree on the number of forward passes (ZeRO-3 gathers parameters in each), and a rank
        # with fewer batches runs the extra ones with every label ignored (they add nothing).
        count = int(self.engine.all_reduce_max(torch.tensor(float(len(batches)), device=self.device)))
        if count == 0:
            return {}
        width = 2 * self.cfg.model.recurrent_steps + 2
        # float64: the token count (and the sums) stay exact past 2^24 tokens
        totals = torch.zeros(width, dtype=torch.float64, device=self.device)
        num_tokens = torch.zeros(1, dtype=torch.float64, device=self.device)
        for index in range(count):
            batch = batches[index] if index < len(batches) else self._padding_batch(batches)
            out = self._loss(batch)
            num_tokens = num_tokens + out.num_tokens.to(num_tokens)
            totals = totals + self._accumulate(None, out).to(totals.device)
        totals = self.engine.all_reduce_sum(torch.cat([totals, num_tokens]))
        values = totals.tolist()
        metrics = {f"eval/{key}": value for key, value in self._metrics(values[:-1], values[-1]).items()}
        metrics["step"] = self.state.step
        for hook in _hooks(self.callbacks, "on_eval_end"):
            hook(self, MappingProxyType(metrics))
        return metrics

    def _padding_batch(self, batches: list[Batch]) -> Batch:
        """A batch that counts for nothing: this rank's first one (or one row of padding) with no label."""
        if batches:
            batch = dict(batches[0])
        else:
            shape = (self.cfg.train.micro_batch_size, self.cfg.train.seq_len)
            batch = {"input_ids": torch.zeros(shape, dtype=torch.long, device=self.device)}
        batch["labels"] = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        return batch

    def last_step_of_launch(self) -> int:
        """The step `fit` trains to from where the trainer stands: `train.steps`, or
        `train.max_steps_this_run` more if that comes first."""
        last = self.resolved.steps
        if self.cfg.train.max_steps_this_run is not None:
            last = min(last, self.state.step + self.cfg.train.max_steps_this_run)
        return last

    def fit(self, signals: StopOnSignal | None = None) -> dict:
        """Train to `train.steps` (or `train.max_steps_this_run` more); returns the final eval metrics.
        SIGTERM / SIGUSR1 end the run at the next step boundary, on every rank at the same step.
        `signals`: a StopOnSignal the caller holds (from before start-up to after the final save,
        so that no signal in those windows kills the process); by default fit holds its own."""
        cfg = self.cfg.train
        stop = self.last_step_of_launch()
        for hook in _hooks(self.callbacks, "on_train_start"):
            hook(self)
        self.stopped_by_signal: int | None = None
        with StopOnSignal() if signals is None else contextlib.nullcontext(signals) as signals:
            while self.state.step < stop:
                try:
                    metrics = self.train_step()
                except TrainingDiverged as error:  # the optimizer itself overflowed (optim/optimizer.py)
                    for hook in _hooks(self.callbacks, "on_train_end"):
                        hook(self)
                    error.rollback_lr = self.suggested_lr(error.reason)
                    raise
                diverged = None
                try:
                    self.guard.record(self.state.step, metrics["loss"], self.pending_verdict)
                except TrainingDiverged as error:
                    error.rollback_lr = self.suggested_lr(error.reason)
                    diverged = error
                metrics |= self.guard.metrics()
                with self.phase("ouro/callbacks"):
                    for hook in _hooks(self.callbacks, "step_metrics"):
                        metrics |= hook(self, MappingProxyType(metrics))
                    for hook in _hooks(self.callbacks, "on_step_end"):
                        hook(self, MappingProxyType(metrics))
                if diverged is not None:  # after every callback saw the step; no final evaluation or save
                    for hook in _hooks(self.callbacks, "on_train_end"):
                        hook(self)
                    raise diverged
                with self.phase("ouro/callbacks"):
                    decision = self._decide(signals)
                for hook in _hooks(self.callbacks, "on_step_decision"):
                    hook(self, decision)
                if decision.stop:
                    self.stopped_by_signal = signals.requested or -1
                    break
                if cfg.eval_every and self.state.step % cfg.eval_every == 0 and self.state.step < stop:
                    self.evaluate()
        final = self.evaluate() if self.stopped_by_signal is None else {}
        for hook in _hooks(self.callbacks, "on_train_end"):
            hook(self)
        return final

    def _decide(self, signals: StopOnSignal) -> StepDecision:
        """What all ranks must agree on at a step boundary, in one all-reduce (max) of two numbers:
        whether any rank received SIGTERM / SIGUSR1 (all stop after this same step, else the next
        collective would hang) and whether any rank's clock says a time-based checkpoint is due
        (clocks differ between ranks; saving is collective). One small collective per step instead
        of one per question: each is a launch, a round trip and a host sync (tens of µs on NCCL,
        more on gloo), on the critical path of every step. The step's other collectives are its
        arithmetic (the loss-token count before backward, the loss totals before the update).
        A run of one rank agrees with itself: no collective, no host sync (the step's one is the
        guard's, train_step)."""
        wants_save = any(hook(self) for hook in _hooks(self.callbacks, "wants_save"))
        stop = signals.requested is not None
        if self.engine.world_size == 1:
            return StepDecision(stop=stop, save=wants_save)
        flags = torch.tensor([float(stop), float(wants_save)], device=self.device)
        stop, save = (value > 0 for value in self.engine.all_reduce_max(flags).tolist())
        return StepDecision(stop=stop, save=save)
