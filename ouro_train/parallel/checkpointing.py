"""Activation checkpointing and compilation, applied from outside the model.

Checkpointing: recompute in backward instead of saving.

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


def apply_compile(model: LoopLM) -> LoopLM:
    """torch.compile each decoder layer in place (`nn.Module.compile`: parameters and state-dict keys
    unchanged). After activation checkpointing, so a recomputed layer is the compiled one too (dynamo
    traces the checkpoint wrapper); before DeepSpeed. The layers share one code object, so the first
    compiles and the others reuse its graph. Attention over packed rows with `sdpa` / `flash` runs
    outside the graph (kernels/attention.py), the rest of the layer inside."""
    from ouro_train.kernels.attention import prepare_for_compile

    prepare_for_compile()
    for layer in model.model.layers:
        layer.compile()
    return model
