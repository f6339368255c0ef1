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

# One intra-op thread per test process. `make test` runs 2 xdist workers on 2 cores, and many tests
# start 2-4 more processes (gloo ranks, CLI runs): with torch's default of a thread per core they
# oversubscribe the cores and OpenMP's spinning threads wait on each other (a tiny CLI run took
# 1.7x as long with 2 threads as with 1 on a loaded 2-core machine). Child processes inherit it.
# The tests use tiny tensors, where one thread loses nothing; a test that needs more sets its own.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    """Tests marked slow (minutes of CLI runs and spawned processes) first, the rest in file order.
    xdist hands tests out in collection order: a multi-minute test handed out last keeps one worker
    busy after the other has run dry, which ordering the long ones first avoids."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
