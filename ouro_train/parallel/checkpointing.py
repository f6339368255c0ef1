"""Activation checkpointing from outside the model: recompute in backward instead of saving.

`layer`: each use of each decoder layer saves only its input (R x L saved states).
`step`:  each recurrent step (all layers + final norm) saves only its input (R saved states;
         the layers are recomputed one step at a time in backward). The cheaper in memory for
         long sequences (LongCT at 64K), at the same recomputation cost.
Non-reentrant checkpointing: it works with inputs that need no grad, with ZeRO-3's parameter
hooks (submodules are called normally during recomputation), and with a shared block.
"""

from __future__ import annotations

import functools

from torch.utils.checkpoint import checkpoint

from ouro_train.model.looplm import LoopLM


def apply_activation_checkpointing(model: LoopLM, policy: str) -> LoopLM:
    if policy == "none":
        return model
    if policy == "layer":
        for layer in model.model.layers:
            # An instance attribute shadows the class's forward; state-dict keys are unchanged.
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    elif policy == "step":
        model.recurrent_step = functools.partial(checkpoint, model.recurrent_step, use_reentrant=False)
    else:
        raise ValueError(f"unknown activation checkpointing policy {policy!r}; use none, layer or step")
    return model
