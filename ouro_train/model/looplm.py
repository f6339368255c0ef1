"""The Ouro looped language model (LoopLM), plain single-device PyTorch.

    embed once
    for t in 1..R:                       # the same layers, R times
        h = layers(h); h = norm(h)       # the shared final norm runs inside the loop
        logits_t = lm_head(h)            # read out at every step (by the objective, chunked)
        lambda_t = sigmoid(gate(h))      # per-token exit probability

Parallelism (tensor parallel, ZeRO, activation checkpointing) is applied from outside by
`ouro_train.parallel`; nothing here knows about it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ouro_train.config.schema import ModelConfig
from ouro_train.kernels.attention import AttentionPlan, plan_attention
from ouro_train.model.init import Init, draw_model_seed, initial_value
from ouro_train.model.layers import DecoderLayer, KVCacheSlot, LMHead, RMSNorm, RotaryEmbedding


@dataclass
class LoopOutput:
    # One (B, S, H) tensor per recurrent step: the normalised state h_t that feeds step t+1
    # and the LM head. Logits are not materialised here (R x vocab x tokens is too large).
    hidden_states: list[torch.Tensor]
    # (R, B, S) exit-gate logits, fp32; lambda_t = sigmoid(gate_logits[t]).
    gate_logits: torch.Tensor


class ExitGate(nn.Linear):
    """Linear(H -> 1, bias) computed in fp32 whatever the parameters' dtype: lambda_t feeds a product
    of R-1 survival terms and log p, where bf16's 3 significant digits are too few. fp32 weights
    are used as they are; bf16 ones (a model cast with `.to(torch.bfloat16)`) are upcast here."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(h.float(), self.weight.float(), bias)


class LoopTrunk(nn.Module):
    """Everything but the LM head. Named `model` inside LoopLM so that keys read
    `model.layers.0...` exactly as in the released checkpoints."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.kernels)
        self.early_exit_gate = ExitGate(cfg.hidden_size, 1, bias=True)
        self.rotary_emb = RotaryEmbedding(cfg.resolved_head_dim, cfg.rope_theta)


class LoopLM(nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int | None = None) -> None:
        """`seed`: the model seed of the initial weights (model/init.py); None draws it from torch's
        global generator, so `torch.manual_seed(s); LoopLM(cfg)` gives the same weights for the same s.
        Under `with torch.device("meta")` nothing is initialised (ouro_train.parallel.materialize
        fills the shards later from the same `initial_value`, using `init_seed`)."""
        super().__init__()
        self.config = cfg
        self.init_seed = draw_model_seed() if seed is None else seed
        # nn.Linear draws its own (overwritten) init from the global generator: fork it, so that
        # building consumes exactly the one draw above, on any device or under ZeRO-3's zero.Init.
        with torch.random.fork_rng(devices=[]):
            self.model = LoopTrunk(cfg)
            self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size)
        self.reset_parameters()

    def init_rules(self) -> dict[str, Init]:
        """How each parameter starts, by name. The reference's init by default: N(0, init_std) weights
        of linears and the embedding, zero biases (the exit gate's), unit norms. `embed_init_std`,
        `branch_norm_init` and `exit_gate_bias_init` change the embedding's std, the weight of the
        sandwich norms that close each residual branch and the exit gate's bias (ModelConfig)."""
        cfg = self.config
        closing = {id(norm) for layer in self.model.layers for norm in layer.branch_norms()}
        rules: dict[str, Init] = {}
        for prefix, module in self.named_modules():
            prefix = f"{prefix}." if prefix else ""
            if isinstance(module, nn.Embedding):
                rules[f"{prefix}weight"] = ("normal", cfg.embed_init_std or cfg.init_std)
            elif isinstance(module, nn.Linear):
                rules[f"{prefix}weight"] = ("normal", cfg.init_std)
                if getattr(module, "bias", None) is not None:
                    bias = cfg.exit_gate_bias_init if isinstance(module, ExitGate) else 0.0
                    rules[f"{prefix}bias"] = ("constant", bias)
            elif isinstance(module, RMSNorm):
                rules[f"{prefix}weight"] = ("constant", cfg.branch_norm_init if id(module) in closing else 1.0)
        unknown = sorted({name for name, _ in self.named_parameters()} - set(rules))
        if unknown:
            raise TypeError(f"no initialisation rule for {unknown[:4]}: add its module type to LoopLM.init_rules")
        return rules

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every parameter from `initial_value(name, ...)`. Skipped: parameters on the meta device
        and ZeRO-3 partitions (built under zero.Init), which materialize.py fills shard by shard."""
        for name, rule in self.init_rules().items():
            param = self.get_parameter(name)
            if param.is_meta or hasattr(param, "ds_id"):
                continue
            param.copy_(initial_value(name, param.shape, rule, self.init_seed))

    @torch.no_grad()
    def init_buffers(self, device: torch.device | str) -> None:
        """Recompute the buffers (derived from the config, never saved) on `device`: after a build
        on the meta device, whose buffers hold no values."""
        with torch.device(device):
            self.model.rotary_emb = RotaryEmbedding(self.config.resolved_head_dim, self.config.rope_theta)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        recurrent_steps: int | None = None,
    ) -> LoopOutput:
        """input_ids: (B, S). position_ids: (B, S), default 0..S-1 (restart them per document for
        packed data). doc_ids: (B, S), restricts attention to the same document (a run of equal ids).
        recurrent_steps: override R (evaluation at fewer or more loops)."""
        steps = self.config.recurrent_steps if recurrent_steps is None else recurrent_steps
        if steps < 1:
            raise ValueError(f"recurrent_steps must be >= 1, got {steps}")
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        h = self.model.embed_tokens(input_ids)  # (B, S, H)
        cos, sin = self.model.rotary_emb(position_ids)  # (B, S, D) fp32, shared by every step
        # The documents in the form the attention backend takes, once for all L x R attention calls.
        plan = plan_attention(self.config.attention, *input_ids.shape, doc_ids, device=input_ids.device)
        *hidden_states, gate_logits = self.recurrence(h, cos, sin, plan, steps)
        return LoopOutput(hidden_states=hidden_states, gate_logits=gate_logits)

    def recurrence(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: AttentionPlan | None, steps: int
    ) -> tuple[torch.Tensor, ...]:
        """The R recurrent steps from the embedded tokens h (B, S, H), where each shared weight is used
        R times -> (state of step 1, ..., state of step R, gate logits (R, B, S)), flat, so that a hook
        on a module that runs this sees every tensor. A method of its own so that ZeRO-3 can gather
        the layers' weights once around all R steps (ouro_train/parallel/zero3.py)."""
        hidden_states: list[torch.Tensor] = []
        gate_logits: list[torch.Tensor] = []
        for _ in range(steps):
            h = self.recurrent_step(h, cos, sin, plan)
            out = self.readout(h)
            hidden_states.append(out)
            gate_logits.append(self.gate_logits(out))
        return (*hidden_states, torch.stack(gate_logits))

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """Where a step's state leaves the loop for the LM head and the gate: the identity here;
        sequence parallelism (ouro_train.parallel) gathers the sequence shards at this point."""
        return h

    def recurrent_step(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: AttentionPlan | None,
        caches: Sequence[KVCacheSlot] | None = None,
    ) -> torch.Tensor:
        """One loop: every layer in order, then the shared final norm. (B, S, H) -> (B, S, H).
        A method of its own so that activation checkpointing can wrap a whole step. `caches`: one
        slot per layer, for this step (inference: ouro_train.inference)."""
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, plan) if caches is None else layer(h, cos, sin, plan, caches[i])
        return self.model.norm(h)

    def gate_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, S, H) -> (B, S) fp32. The exit distribution multiplies R-1 survival terms and
        the entropy needs log p: bf16 would quantise lambda to ~3 significant digits (ExitGate)."""
        with torch.autocast(device_type=h.device.type, enabled=False):
            return self.model.early_exit_gate(h).squeeze(-1)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM-head logits for one step's hidden state (B, S, H) -> (B, S, V). For inference and
        tests; training computes cross-entropy without materialising these."""
        return self.lm_head(h)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
