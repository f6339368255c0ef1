# ouro-train developer commands. `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
# DeepSpeed picks its accelerator at import; on machines without CUDA we say so explicitly.
export DS_ACCELERATOR ?= cpu
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-fast test-slurm demo demo-single repro-mano repro-depth check lint format dry-run clean

setup: $(STAMP)

# Re-installs only when the dependency files change. torch==2.13.0 resolves to the CPU
# wheel on these machines (pip's find-links); on a CUDA box pip takes the CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(PY) -c "import torch, deepspeed, megatron.core, hydra, webdataset, wandb, triton, tokenizers, safetensors, datasets; print('setup ok: torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'megatron-core', megatron.core.__version__)"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=15 tests

# The inner loop: unit and parity tests, less those marked slow (subprocess CLI runs, spawned
# processes, anything over ~5 s). `make test` still runs everything.
test-fast: setup
	$(PY) -m pytest -q -n 2 -m "not slow" tests/unit tests/parity

# launch/slurm.sbatch on a real two-node SLURM cluster started here (Debian's slurm-wlm and munge,
# installed by apt-get when missing; root). tests/slurm/test_slurm.py, which `make test` skips.
test-slurm: setup
	PY=$(PY) tests/slurm/run.sh

# Every stage of the Ouro pipeline at toy scale on CPU (recipes/pipeline/demo.yaml); again: skips/resumes.
demo: setup
	$(VENV)/bin/ouro-pipeline pipeline=demo

# One stage only: a 1-layer LoopLM trained for 500 steps (recipes/demo.yaml).
demo-single: setup
	$(VENV)/bin/ouro-train --config-name demo

# The Mano result of the paper (§6) at CPU scale: flat 2x1, looped 2x4, flat 8x1 on the same data
# (data_tools/repro_mano.py, recipes/repro_mano.yaml); report.md/.json and accuracy.png in runs/repro_mano.
# DEVICE=cuda: the GPU-scale recipe (recipes/repro_mano_gpu.yaml: F_23, L = 8, wider models, ~8 min
# of one H100/H200) into runs/repro_mano_cuda.
DEVICE ?= cpu
repro-mano: setup
	$(PY) -m data_tools.repro_mano --device $(DEVICE)

# Does looping buy depth? Variable chains whose answer needs 1..H look-ups in a row, flat k x 1,
# looped k x R, flat kR x 1, two seeds (data_tools/repro_depth.py, recipes/repro_depth.yaml);
# report.md/.json and accuracy.png in runs/repro_depth.
repro-depth: setup
	$(PY) -m data_tools.repro_depth --run-dir runs/repro_depth

# The released sizes and the plans of both pipelines (stage table, memory per GPU, commands).
dry-run: setup
	$(VENV)/bin/ouro-train model=ouro_1p4b dry_run=true
	$(VENV)/bin/ouro-train model=ouro_2p6b dry_run=true
	$(VENV)/bin/ouro-pipeline pipeline=ouro_1p4b dry_run=true data_root=.
	$(VENV)/bin/ouro-pipeline pipeline=ouro_2p6b dry_run=true data_root=.

lint: setup
	$(VENV)/bin/ruff check ouro_train data_tools tests benchmarks
	$(VENV)/bin/ruff format --check ouro_train data_tools tests benchmarks

format: setup
	$(VENV)/bin/ruff format ouro_train data_tools tests benchmarks
	$(VENV)/bin/ruff check --fix ouro_train data_tools tests benchmarks

check: lint test

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
