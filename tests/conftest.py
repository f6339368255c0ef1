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


# The longest tests (minutes each on 2 cores: `make test` prints the slowest), in this order at the
# head of the run. `make test` runs xdist's worksteal scheduler: each worker starts on its half of the
# list and an idle worker takes half of what the other has left. A multi-minute test that starts
# last keeps one worker busy after the other has run dry; started first, the rest balances around it.
LONGEST = (
    "test_pipeline.py::test_demo_pipeline_runs_every_stage_skips_and_resumes",
    "test_elastic_resume.py::test_zero_checkpoint_resumes_on_one_and_four_processes",
    "test_elastic_resume.py::test_zero_0_and_single_process_checkpoints",
    "test_handoff.py::test_hand_off_on_two_zero_ranks_matches_one_process",
    "test_pipeline.py::test_stages_run_on_two_processes_with_torchrun",
)


def pytest_collection_modifyitems(config, items):
    """The LONGEST tests first, then the others marked slow (CLI runs, spawned processes), then the
    rest, each group in file order."""

    def rank(item) -> tuple[int, int]:
        for index, name in enumerate(LONGEST):
            if name in item.nodeid:
                return 0, index
        return (1 if item.get_closest_marker("slow") else 2), 0

    items.sort(key=rank)
