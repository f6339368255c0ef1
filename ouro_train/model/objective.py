"""Training objectives of the LoopLM (OURO_SPEC "Objective").

Exit distribution per token, from gate probabilities lambda_t = sigmoid(g_t):
    S_0 = 1, S_t = prod_{j<=t} (1 - lambda_j)
    p(t) = lambda_t S_{t-1} for t < R,  p(R) = S_{R-1}   (lambda_R unused)
Stage I:  loss = mean over loss tokens of [ sum_t p(t) CE_t - beta H(p) ]
Stage II: LM frozen; I_t = max(0, CE_{t-1} - CE_t) (detached), w_t = sigmoid(k (I_t - gamma)),
          loss = (1/R) sum_{t=2..R} BCE(1 - lambda_t, w_t), averaged over loss tokens.

The p-weighted cross-entropy of all steps is one fused, chunked pass through the LM head
(`exit_weighted_cross_entropy`): at most one chunk of one step's logits exists at once, and its
gradients are computed in that same pass (p does not depend on CE), so the logits are never
recomputed. The entropy term is plain autograd through p.
Both losses return the *sum* over loss tokens plus the token count, so a trainer can divide
by the token count of the whole (accumulated, data-parallel) batch rather than average
per micro-batch averages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ouro_train.kernels.exit_weighted_cross_entropy import exit_weighted_cross_entropy
from ouro_train.kernels.linear_cross_entropy import IGNORE_INDEX
from ouro_train.model.looplm import LoopOutput


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # scalar, differentiable: sum over loss tokens
    num_tokens: torch.Tensor  # () int64 on the device: loss tokens in this batch
    ce_per_step: torch.Tensor  # (R,) summed CE per step over loss tokens (detached)
    exit_prob_per_step: torch.Tensor  # (R,) summed p(t) over loss tokens (detached)
    entropy: torch.Tensor  # scalar, summed H(p) over loss tokens (detached)

    @property
    def loss(self) -> torch.Tensor:
        """Mean over this batch's loss tokens."""
        return self.loss_sum / self.num_tokens.clamp(min=1)


def exit_log_distribution(gate_logits: torch.Tensor) -> torch.Tensor:
    """(R, ...) gate logits -> (R, ...) log p(t), computed in log space.

    log p(t) = log lambda_t + sum_{j<t} log(1 - lambda_j), with log lambda = logsigmoid(g) and
    log(1 - lambda) = logsigmoid(-g): exact for any gate value, so the entropy needs no clamp and
    p never underflows to a 0 whose log would be -inf.
    """
    g = gate_logits.to(torch.promote_types(gate_logits.dtype, torch.float32))  # fp32 at least; fp64 stays
    log_continue = F.logsigmoid(-g)  # (R, ...)
    # log S_{t-1}: 0 for the first step, then the running sum of log(1 - lambda_j), j < t.
    log_survival_before = torch.cat([torch.zeros_like(g[:1]), log_continue[:-1].cumsum(0)], dim=0)
    log_exit_here = F.logsigmoid(g)
    # The last step takes all remaining mass: p(R) = S_{R-1}.
    log_exit_here = torch.cat([log_exit_here[:-1], torch.zeros_like(g[-1:])], dim=0)
    return log_exit_here + log_survival_before


def loss_token_mask(
    labels: torch.Tensor, loss_mask: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Which tokens carry loss: a label that is not `ignore_index`, inside `loss_mask` when given.
    The one definition for the losses here and the trainer's token count that normalises them."""
    valid = labels != ignore_index
    if loss_mask is not None:
        valid = valid & loss_mask.bool()
    return valid


@dataclass
class LossTokens:
    """Where the loss is taken, in one of two forms (`_loss_tokens`).

    Dense (`index` None: no loss mask, i.e. pretraining, where nearly every token carries loss):
    every position, the ignored ones with target `ignore_index` and `valid` False, so that their
    CE, exit weights and entropy count as 0. Nothing here depends on how many tokens carry loss,
    so the host never waits for the device (a `nonzero` would: its output size lives on the GPU).

    The dense form runs the LM head on the ignored positions too (an evaluation padding batch with
    every label ignored costs a full head pass), and a non-finite state there reaches the loss
    value (0 x inf) where the selected form would drop it; the weight gradients get it in either
    form (the model's backward multiplies the zero gradient there by that position's activations).

    Selected (`index`: with a loss mask, i.e. SFT, whose prompt tokens, often half, would cost the
    LM head's work for nothing): only the loss tokens, gathered; one host sync for `nonzero`."""

    index: torch.Tensor | None  # (n,) flat positions of the loss tokens, or None: all positions
    targets: torch.Tensor  # (n,)
    valid: torch.Tensor | None  # (n,) bool: dense form only
    num_tokens: torch.Tensor  # () int64, on the device

    def select(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """`t` with all B x S positions along `dim` -> the loss positions along it."""
        return t if self.index is None else t.index_select(dim, self.index)

    def mask(self, t: torch.Tensor) -> torch.Tensor:
        """Zero where a dense position carries no loss (last dimension n)."""
        return t if self.valid is None else t * self.valid


def _loss_tokens(labels: torch.Tensor, loss_mask: torch.Tensor | None, ignore_index: int) -> LossTokens:
    valid = loss_token_mask(labels, loss_mask, ignore_index).flatten()
    num_tokens = valid.sum()
    if loss_mask is None:  # the ignored labels already hold ignore_index
        return LossTokens(index=None, targets=labels.flatten(), valid=valid, num_tokens=num_tokens)
    index = valid.nonzero().squeeze(1)
    return LossTokens(index=index, targets=labels.flatten()[index], valid=None, num_tokens=num_tokens)


Head = torch.Tensor | nn.Module


def exit_weighted_head_cross_entropy(
    head: Head,
    output: LoopOutput,
    tokens: LossTokens,
    exit_weights: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (sum_t sum_i p_ti CE_ti, CE (R, n) detached) of every step on the loss positions
    (dense: CE 0 where none is taken). `head` is the head's weight, or a head module called as
    `head(states, targets, exit_weights=p)`: the model's LMHead, or the vocab-parallel head of
    ouro_train.parallel (whose weight holds one shard of the vocabulary); through the module call so
    that ZeRO-3 gathers its weight."""
    states = [tokens.select(h.flatten(0, 1), 0) for h in output.hidden_states]  # R x (n, H)
    if isinstance(head, torch.Tensor):
        return exit_weighted_cross_entropy(states, head, tokens.targets, exit_weights, chunk_size=chunk_size)
    return head(states, targets=tokens.targets, exit_weights=exit_weights, chunk_size=chunk_size)


def looplm_loss(
    output: LoopOutput,
    head: Head,
    labels: torch.Tensor,
    beta: float,
    loss_mask: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 4096,
) -> LossOutput:
    """Stage I: sum_t p(t) CE_t - beta H(p). labels (B, S) are already shifted (label of
    position i is token i+1); `ignore_index` and `loss_mask` (B, S) exclude tokens."""
    tokens = _loss_tokens(labels, loss_mask, ignore_index)
    log_p = exit_log_distribution(tokens.select(output.gate_logits.flatten(1), 1))  # (R, n)
    p = log_p.exp()
    # The fused CE weighs each position's CE by p and takes none where the target is ignored.
    expected_ce_sum, ce = exit_weighted_head_cross_entropy(head, output, tokens, p, chunk_size)  # (), (R, n)
    entropy = tokens.mask(-(p * log_p).sum(0))  # (n,)
    loss_sum = expected_ce_sum - beta * entropy.sum()
    return LossOutput(
        loss_sum=loss_sum,
        num_tokens=tokens.num_tokens,
        ce_per_step=ce.detach().sum(1),
        exit_prob_per_step=tokens.mask(p.detach()).sum(1),
        entropy=entropy.detach().sum(),
    )


def gate_loss(
    output: LoopOutput,
    head: Head,
    labels: torch.Tensor,
    k: float = 50.0,
    gamma: float = 0.005,
    loss_mask: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 4096,
) -> LossOutput:
    """Stage II (adaptive gate training). The CE targets carry no gradient; the trainer freezes
    every parameter but the gate (`objective.kind=gate`), so only the gate learns."""
    steps = len(output.hidden_states)
    if steps < 2:
        raise ValueError("the gate loss compares consecutive steps: it needs recurrent_steps >= 2")
    tokens = _loss_tokens(labels, loss_mask, ignore_index)
    g = tokens.select(output.gate_logits.flatten(1), 1)  # (R, n)
    with torch.no_grad():
        log_p = exit_log_distribution(g)  # (R, n)
        p = log_p.exp()
        # The fused pass under no_grad computes only the CE: no graph, no gradient work.
        _, ce = exit_weighted_head_cross_entropy(head, output, tokens, p, chunk_size)  # (R, n)
        improvement = (ce[:-1] - ce[1:]).clamp_min(0)  # I_t for t = 2..R: (R-1, n)
        continue_target = torch.sigmoid(k * (improvement - gamma))
    # BCE on the continuation probability 1 - lambda_t = sigmoid(-g_t), from logits for stability.
    bce = F.binary_cross_entropy_with_logits(-g[1:], continue_target, reduction="none")  # steps 2..R: (R-1, n)
    loss_sum = tokens.mask(bce.sum(0)).sum() / steps
    return LossOutput(
        loss_sum=loss_sum,
        num_tokens=tokens.num_tokens,
        ce_per_step=ce.sum(1),
        exit_prob_per_step=tokens.mask(p).sum(1),
        entropy=tokens.mask(-(p * log_p).sum(0)).sum(),
    )
