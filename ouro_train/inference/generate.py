"""Generation with a looped model: prefill, token-by-token decoding with a per-step KV cache, and an
early exit that skips the remaining recurrent steps of a token.

Exit policies (`ExitPolicy.parse`):
    all      every token computes all R steps and reads out the last (the training forward).
    step:N   every token computes steps 1..N only and reads out step N.
    q:Q      Q-exit: lambda_t = sigmoid(gate_t), CDF(t) = 1 - prod_{j<=t} (1 - lambda_j); a token
             exits at the first step with CDF(t) >= Q (at R at the latest) and its later steps are
             not computed. Decided in log space: log S_t = sum_{j<=t} logsigmoid(-g_j) <= log(1 - Q),
             so Q = 1 never exits early and Q = 0 always exits after step 1.

Unlike the released reference (which computes all R steps of every token and then picks one
step's logits), a token that exits at step n here costs n steps of the layers and one LM head.
What later tokens attend to at the steps it skipped is the KV policy's business (kv_cache.py).

A batch decodes in lock step over columns: prompts are left-padded (`attention_mask` 0 on the
padding), every row exits at its own step, and finished rows (EOS) drop out of the computation.
The prompt is prefilled at all R steps (one forward, as in training); the exit policy picks the
step whose logits give the first new token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ouro_train.inference.kv_cache import LoopKVCache
from ouro_train.model.looplm import LoopLM


@dataclass(frozen=True)
class ExitPolicy:
    kind: str  # "all" | "step" | "q"
    value: float = 0.0  # the step (1-based) for "step", the threshold for "q"

    @classmethod
    def parse(cls, text: str) -> ExitPolicy:
        """'all', 'step:N' (1-based) or 'q:Q' with 0 <= Q <= 1."""
        kind, _, value = text.partition(":")
        try:
            if kind == "all" and not value:
                return cls("all")
            if kind == "step":
                step = int(value)
                if step < 1:
                    raise ValueError
                return cls("step", step)
            if kind == "q":
                q = float(value)
                if not 0.0 <= q <= 1.0:
                    raise ValueError
                return cls("q", q)
        except ValueError:
            pass
        raise ValueError(f"exit policy {text!r}: use 'all', 'step:N' (N >= 1) or 'q:Q' (0 <= Q <= 1)")

    def __str__(self) -> str:
        return "all" if self.kind == "all" else f"{self.kind}:{self.value:g}"

    def check(self, steps: int) -> None:
        if self.kind == "step" and self.value > steps:
            raise ValueError(f"exit policy step:{int(self.value)}: the model has only {steps} recurrent steps")

    @property
    def log_survival_threshold(self) -> float:
        """Q-exit at step t when log S_t <= this: log(1 - Q); -inf for Q = 1 (never early)."""
        return math.log1p(-self.value) if self.value < 1.0 else -math.inf


def q_exit_steps(gate_logits: torch.Tensor, q: float) -> torch.Tensor:
    """(R, ...) gate logits -> (...) 0-based exit step: the first t with CDF(t) >= q, else R - 1.
    The decoder takes the same decision one step at a time, with the same arithmetic."""
    threshold = ExitPolicy("q", q).log_survival_threshold
    log_survival = F.logsigmoid(-gate_logits.float()).cumsum(0)  # (R, ...): log S_t
    below = log_survival <= threshold
    below[-1] = True  # the last step takes what is left
    return below.int().argmax(0)


def exit_steps(policy: ExitPolicy, gate_logits: torch.Tensor) -> torch.Tensor:
    """(R, ...) gate logits of fully computed tokens -> (...) 0-based step the policy reads out."""
    steps = gate_logits.shape[0]
    if policy.kind == "q":
        return q_exit_steps(gate_logits, policy.value)
    step = steps - 1 if policy.kind == "all" else int(policy.value) - 1
    return torch.full(gate_logits.shape[1:], step, dtype=torch.long, device=gate_logits.device)


@dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy. top_k 0 and top_p 1: no truncation."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling {self}: need temperature >= 0, top_k >= 0, 0 < top_p <= 1")


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, V) logits -> (n,) token ids."""
    logits = logits.float()
    if sampling.temperature == 0.0:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already hold top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= sampling.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@dataclass
class StepResult:
    """One position decoded for the rows in `rows`: logits (len(rows), V) fp32 at each row's exit
    step; exit_step (len(rows),) 0-based; gate_logits (R, len(rows)) fp32, NaN where a step was
    not computed; step_logits (R, len(rows), V) when recorded (NaN where not computed)."""

    rows: torch.Tensor
    logits: torch.Tensor
    exit_step: torch.Tensor
    gate_logits: torch.Tensor
    step_logits: torch.Tensor | None = None


class LoopDecoder:
    """Prefill once, then one column at a time. Holds the cache and each row's next position."""

    def __init__(
        self,
        model: LoopLM,
        batch: int,
        capacity: int,
        exit_policy: ExitPolicy | str = "all",
        kv_policy: str = "full",
        record_step_logits: bool = False,
    ) -> None:
        cfg = model.config
        self.model, self.steps = model, cfg.recurrent_steps
        self.exit = ExitPolicy.parse(exit_policy) if isinstance(exit_policy, str) else exit_policy
        self.exit.check(self.steps)
        self.record = record_step_logits
        weight = model.model.embed_tokens.weight
        self.cache = LoopKVCache(
            kv_policy,
            self.steps,
            cfg.num_layers,
            batch,
            capacity,
            cfg.num_kv_heads,
            cfg.resolved_head_dim,
            weight.dtype,
            weight.device,
        )
        self.device = weight.device
        self.position = torch.zeros(batch, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> StepResult:
        """(B, S) left-padded prompts -> the logits for each row's first new token."""
        model, cache = self.model, self.cache
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        positions = (attention_mask.long().cumsum(1) - 1).clamp_min(0)
        h = model.model.embed_tokens(input_ids.to(self.device))
        cos, sin = model.model.rotary_emb(positions)
        last_states, gates = [], []
        for step in range(self.steps):
            h = model.recurrent_step(h, cos, sin, None, cache.prefill_slots(step, attention_mask))
            last_states.append(h[:, -1])
            gates.append(model.gate_logits(h[:, -1:])[:, 0])
        cache.finish_prefill(attention_mask)
        self.position = attention_mask.long().sum(1)
        states, gate_logits = torch.stack(last_states), torch.stack(gates)  # (R, B, H), (R, B)
        exit_step = exit_steps(self.exit, gate_logits)
        rows = torch.arange(input_ids.shape[0], device=self.device)
        logits = model.logits(states[exit_step, rows]).float()
        step_logits = model.logits(states).float() if self.record else None
        return StepResult(rows, logits, exit_step, gate_logits, step_logits)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, rows: torch.Tensor) -> StepResult:
        """Decode one column: `tokens` (len(rows),) the new token of each row in `rows`."""
        model, cache = self.model, self.cache
        count = rows.numel()
        cache.begin_token(rows)
        h = model.model.embed_tokens(tokens.to(self.device))[:, None]  # (n, 1, H)
        cos, sin = model.model.rotary_emb(self.position[rows][:, None])
        active = torch.arange(count, device=self.device)  # indices into `rows` still computing
        exit_step = torch.full((count,), self.steps - 1, dtype=torch.long, device=self.device)
        out = torch.empty(count, h.shape[-1], dtype=h.dtype, device=self.device)
        gate_logits = torch.full((self.steps, count), math.nan, device=self.device)
        step_logits = None
        log_survival = torch.zeros(count, device=self.device)
        threshold = self.exit.log_survival_threshold if self.exit.kind == "q" else 0.0
        for step in range(self.steps):
            h = model.recurrent_step(h, cos, sin, None, cache.decode_slots(step, rows[active]))
            last = step == self.steps - 1
            if self.exit.kind == "q":
                gate = model.gate_logits(h)[:, 0]
                gate_logits[step, active] = gate
                log_survival[active] += F.logsigmoid(-gate)
                done = (log_survival[active] <= threshold) | last
            else:
                done = torch.full((active.numel(),), last or step == int(self.exit.value) - 1, device=self.device)
                if self.record or self.exit.kind == "all":
                    gate_logits[step, active] = model.gate_logits(h)[:, 0]
            if self.record:
                if step_logits is None:
                    step_logits = torch.full((self.steps, count, model.config.vocab_size), math.nan, device=self.device)
                step_logits[step, active] = model.logits(h[:, 0]).float()
            exit_step[active[done]] = step
            out[active[done]] = h[done, 0]
            keep = ~done
            if not keep.any():
                break
            active, h, cos, sin = active[keep], h[keep], cos[keep], sin[keep]
        full_exit = torch.full((cache.batch,), -1, dtype=torch.long, device=self.device)
        full_exit[rows] = exit_step
        cache.finish_token(full_exit, rows)
        self.position[rows] += 1
        return StepResult(rows, model.logits(out).float(), exit_step, gate_logits, step_logits)


@dataclass
class GenerationOutput:
    """tokens (B, new) the generated ids (`pad_id` after a row's EOS); exit_steps (B, new) the
    0-based step whose logits chose each token (-1 after EOS); lengths (B,) generated tokens per
    row, EOS included; step_logits: per new token (R, B, V) when recorded."""

    tokens: torch.Tensor
    exit_steps: torch.Tensor
    lengths: torch.Tensor
    step_logits: list[torch.Tensor] = field(default_factory=list)

    def mean_steps(self) -> float:
        """Mean recurrent steps used per generated token (1-based)."""
        used = self.exit_steps[self.exit_steps >= 0]
        return float(used.float().mean() + 1) if used.numel() else 0.0


@torch.no_grad()
def generate(
    model: LoopLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    exit_policy: ExitPolicy | str = "all",
    kv_policy: str = "full",
    sampling: Sampling | None = None,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    record_step_logits: bool = False,
) -> GenerationOutput:
    """(B, S) left-padded prompts (attention_mask 0 on padding) -> up to max_new_tokens each."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, prompt length >= 1), got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = sampling or Sampling()
    batch, prompt = input_ids.shape
    decoder = LoopDecoder(model, batch, prompt + max_new_tokens, exit_policy, kv_policy, record_step_logits)
    device = decoder.device
    tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    exits = torch.full((batch, max_new_tokens), -1, dtype=torch.long, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    recorded: list[torch.Tensor] = []
    result = decoder.prefill(input_ids, attention_mask)
    for index in range(max_new_tokens):
        rows = result.rows
        new = sample(result.logits, sampling, generator)
        tokens[rows, index], exits[rows, index] = new, result.exit_step
        lengths[rows] += 1
        if record_step_logits:
            full = torch.full((decoder.steps, batch, model.config.vocab_size), math.nan, device=device)
            full[:, rows] = result.step_logits
            recorded.append(full)
        going = ~torch.isin(new, eos)
        if index == max_new_tokens - 1 or not going.any():
            break
        result = decoder.step(new[going], rows[going])
    return GenerationOutput(tokens, exits, lengths, recorded)


@torch.no_grad()
def generate_uncached(
    model: LoopLM, input_ids: torch.Tensor, max_new_tokens: int, recurrent_steps: int | None = None
) -> torch.Tensor:
    """Greedy decoding by recomputing the whole prefix for every new token (no cache, one row at
    a time, all steps up to `recurrent_steps`): what sampling costs without this module. The
    benchmarks' baseline and the tests' reference. (1, S) -> (1, new)."""
    ids = input_ids
    for _ in range(max_new_tokens):
        out = model(ids, recurrent_steps=recurrent_steps)
        ids = torch.cat([ids, model.logits(out.hidden_states[-1][:, -1]).argmax(-1, keepdim=True)], dim=1)
    return ids[:, input_ids.shape[1] :]


@dataclass
class ScoreOutput:
    """Per sequence, per predicted token (len - 1): log p(next token) at the exit step, and the
    0-based exit step used."""

    logprobs: list[torch.Tensor]
    exit_steps: list[torch.Tensor]


@torch.no_grad()
def score(
    model: LoopLM,
    sequences: Sequence[torch.Tensor],
    exit_policy: ExitPolicy | str = "all",
    kv_policy: str = "full",
) -> ScoreOutput:
    """Teacher-forced decoding: each sequence is fed token by token through the same decoder as
    `generate` (its first token prefilled), so the exit decisions and the cache contents are the
    ones generation would have, and the log-probability of every next token is read at the exit
    step. What `ouro-eval` uses to measure quality under a real early exit."""
    lengths = [int(s.numel()) for s in sequences]
    if min(lengths, default=0) < 2:
        raise ValueError("score: every sequence needs at least 2 tokens")
    batch, longest = len(sequences), max(lengths)
    decoder = LoopDecoder(model, batch, longest, exit_policy, kv_policy)
    device = decoder.device
    padded = torch.zeros(batch, longest, dtype=torch.long, device=device)
    for row, seq in enumerate(sequences):
        padded[row, : lengths[row]] = seq.to(device)
    length = torch.tensor(lengths, device=device)
    logprobs = torch.zeros(batch, longest - 1, device=device)
    exits = torch.full((batch, longest - 1), -1, dtype=torch.long, device=device)
    result = decoder.prefill(padded[:, :1])
    for index in range(longest - 1):
        rows = result.rows
        target = padded[rows, index + 1]
        logprobs[rows, index] = result.logits.log_softmax(-1).gather(1, target[:, None])[:, 0]
        exits[rows, index] = result.exit_step
        going = rows[length[rows] > index + 2]
        if going.numel() == 0:
            break
        result = decoder.step(padded[going, index + 1], going)
    return ScoreOutput(
        [logprobs[row, : n - 1].cpu() for row, n in enumerate(lengths)],
        [exits[row, : n - 1].cpu() for row, n in enumerate(lengths)],
    )
