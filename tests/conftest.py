import os
import sys

import torch

# Triton kernels run on CPU tensors only through Triton's interpreter. Triton 3.9 reads
# TRITON_INTERPRET when `@triton.jit` decorates a function, not at launch, and it decorates its own
# helpers (tl.sum, tl.sigmoid, ...) when triton is first imported: so the variable is set here, at
# conftest import, which pytest does before it imports any test module (and so before anything
# imports triton; checked below). On a CUDA machine the kernels are compiled and tested on the GPU.
if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    if "triton" in sys.modules:
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"
