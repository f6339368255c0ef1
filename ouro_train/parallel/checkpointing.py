"""Activation checkpointing and compilation, applied from outside the model.

Checkpointing: recompute in backward instead of saving.

`layer`: each use of each decoder layer saves only its input (R x L saved states).
`step`:  each recurrent step (all layers + final norm) saves only its input (R saved states;
         the layers are recomputed one step at a time in backward). The cheaper in memory for
         long sequences (LongCT at 64K), at the same recomputation cost.
`selective`: each use of each decoder layer keeps its matmul and attention outputs (the
         expensive part to recompute) and recomputes the rest (norms, RoPE, SwiGLU's product,
         casts) in backward: torch's selective activation checkpointing, as torchtitan's op-level
         policy. Less memory than `none` for one matmul-free elementwise pass more per layer.
Non-reentrant checkpointing: it works with inputs that need no grad, with ZeRO-3's parameter
hooks (submodules are called normally during recomputation), and with a shared block.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ouro_train.model.looplm import LoopLM


def _saved_ops() -> set:
    """The ops whose outputs `selective` keeps: matmuls and attention kernels (those of this torch
    build; flash-attn's own ops, when installed, by their registered names)."""
    aten = torch.ops.aten
    names = [
        "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_flash_attention_forward", "_efficient_attention_forward",
    ]  # fmt: skip
    ops = {getattr(aten, name).default for name in names if hasattr(aten, name)}
    flash = getattr(torch.ops, "flash_attn", None)
    for name in ("_flash_attn_forward", "_flash_attn_varlen_forward"):
        if flash is not None and hasattr(flash, name):
            ops.add(getattr(flash, name).default)
    return ops


def _selective_context():
    saved = _saved_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _checkpointed(forward, policy: str, **options):
    """`forward` run under non-reentrant checkpointing. A plain function, not a functools.partial of
    `checkpoint`: torch.compile of the layer steps into this frame and traces the checkpoint as one
    region, where a partial of `checkpoint` (which torch marks as not to trace) left the whole layer
    running eagerly. Marked with its `policy` and the `inner` forward it wraps (apply_compile
    reads them)."""

    def checkpointed_forward(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **options, **kwargs)

    checkpointed_forward.policy = policy
    checkpointed_forward.inner = forward
    return checkpointed_forward


def apply_activation_checkpointing(model: LoopLM, policy: str) -> LoopLM:
    if policy == "none":
        return model
    if policy in ("selective", "layer"):
        options = {"context_fn": _selective_context} if policy == "selective" else {}
        for layer in model.model.layers:
            # An instance attribute shadows the class's forward; state-dict keys are unchanged.
            layer.forward = _checkpointed(layer.forward, policy, **options)
    elif policy == "step":
        model.recurrent_step = _checkpointed(model.recurrent_step, policy)
    else:
        raise ValueError(f"unknown activation checkpointing policy {policy!r}; use none, selective, layer or step")
    return model


def apply_compile(model: LoopLM) -> LoopLM:
    """torch.compile each decoder layer in place (`nn.Module.compile`: parameters and state-dict keys
    unchanged). After activation checkpointing, so a recomputed layer is the compiled one too (dynamo
    traces the checkpoint wrapper); before DeepSpeed. The layers share one code object, so the first
    compiles and the others reuse its graph. Attention over packed rows with `sdpa` / `flash` runs
    outside the graph (kernels/attention.py), the rest of the layer inside.

    One exception: `layer` checkpointing of a model under train.precision=bf16_loop / fp8 stays
    outside the compiled layer (an eager checkpoint around the compiled forward, as `step` is). Traced
    inside, AOTAutograd recomputes the attention kernel (tagged random: it has a dropout argument)
    with its RNG state saved after the tensors it exempts from the version check, which are the
    gradient accumulators the backward updates in place: the check then fails at the second use of
    a layer (torch 2.13). Outside, the recomputation re-runs the compiled forward graph: one
    forward more per layer use, as inside."""
    from ouro_train.kernels.attention import prepare_for_compile

    prepare_for_compile()
    loop_precision = getattr(model, "loop_precision", None) is not None
    for layer in model.model.layers:
        wrapper = layer.__dict__.get("forward")
        if loop_precision and getattr(wrapper, "policy", None) == "layer":
            if getattr(wrapper.inner, "__func__", None) is not type(layer).forward:
                raise ValueError(
                    "apply_compile: this layer's checkpointed forward wraps something other than its class's "
                    "forward, which compiling the class's forward would drop"
                )
            layer.forward = _checkpointed(functools.partial(_compiled_forward(type(layer)), layer), "layer")
        else:
            layer.compile()
    return model


@functools.cache
def _compiled_forward(layer_class: type):
    """One compiled function for every layer of a class, called with the layer as its first
    argument: one graph for all of them (dynamo lifts the module's parameters and buffers as
    inputs), as `nn.Module.compile` of each layer gives."""
    return torch.compile(layer_class.forward)
