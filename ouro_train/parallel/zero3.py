"""ZeRO-3 that gathers each shared layer once per pass, not once per use.

DeepSpeed's ZeRO-3 gathers a module's parameters in a hook before each call of the module and
frees them after it. A LoopLM calls each decoder layer R times per forward (and R times again in
backward), so per-module gathering all-gathers every layer's weights R times per pass where a
plain transformer does it once, runs its hooks' host work L x R times per pass, and splits a
compiled model's graph at every layer call.

`parallel.zero3_gather=trunk` makes the decoder layers (`LoopTrunk.layers`) one DeepSpeed "leaf"
module, called once per forward around all R steps (`LoopLM.recurrence`): the layers' weights are
gathered once for the forward and once for the backward and held across the R steps, and no hook
runs inside a layer. The embedding, the LM head, the final norm and the exit gate keep DeepSpeed's
per-module gathering (the last two are below its persistence threshold at every Ouro size: kept
whole, never gathered). What it costs: every layer's weights held gathered during each pass, where
per-module gathering holds about one layer's; ZeRO-3's parameter memory saving still holds between
passes (the optimizer step, the head's loss). Gradients: DeepSpeed reduce-scatters a leaf's
gradients together once the gradient of its input (the embedded tokens) is computed, i.e. after the
last layer use's backward. That is why the leaf is the layers and not the whole LoopTrunk: a leaf
whose inputs need no gradient (token ids) gets that hook at its outputs' gradients, before anything
inside it ran backward, and DeepSpeed then reduced zeros and freed the weights the backward needed.
"""

from __future__ import annotations

from ouro_train.model.looplm import LoopLM


def gather_layers_once(model: LoopLM) -> LoopLM:
    """Route `LoopLM.recurrence` through a call of the layers' ModuleList and mark it a ZeRO-3 leaf.
    Before deepspeed.initialize, which registers its hooks on the modules it finds (none inside a
    leaf); after activation checkpointing and compilation, which wrap what `recurrence` calls.
    Parameters and state-dict keys are unchanged."""
    from deepspeed.utils import set_z3_leaf_module

    layers = model.model.layers
    # Instance attributes, as activation checkpointing's wrappers are: calling the ModuleList runs
    # the model's own recurrence (and whatever wraps recurrent_step), inside DeepSpeed's hooks.
    layers.forward = model.recurrence

    def recurrence(*args, **kwargs):
        return layers(*args, **kwargs)

    model.recurrence = recurrence
    set_z3_leaf_module(layers, True)
    return model
