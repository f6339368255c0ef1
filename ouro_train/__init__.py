"""ouro-train: a PyTorch framework for looped language models (see README.md)."""

import logging
import warnings

# megatron-core warns at import, once per module, that Transformer Engine and Apex are not
# installed and it falls back to torch (its optimizer, clip_grads and Megatron-FSDP modules).
# We use neither package nor those code paths, so every stage of a run printed four lines of
# noise. Filtered here, where any import of ouro_train starts and so before megatron is
# imported, by that exact message from megatron's own modules: every other warning still shows.
warnings.filterwarnings(
    "ignore",
    message=r"Transformer Engine and Apex are not installed\. Falling back to ",
    category=UserWarning,
    module=r"megatron",
)
# Its Megatron-FSDP modules (imported with megatron.core.distributed, which we do not use) also
# log at INFO that they run without Transformer Engine and detected Megatron Core: three more
# lines per stage, since hydra sends INFO to the console. Only that subpackage is raised to WARNING.
logging.getLogger("megatron.core.distributed.fsdp").setLevel(logging.WARNING)
