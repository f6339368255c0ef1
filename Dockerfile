# ouro-train for GPU clusters. CUDA 12.8 devel (flash-attn compiles against it), Python 3.11
# (megatron-core 0.16.x; 0.17+ needs Python 3.12). Versions pinned by constraints.txt, plus
# flash-attn, which only installs where CUDA is present.
#   docker build -t ouro-train .
#   docker run --gpus all --ipc=host -v $PWD/runs:/workspace/ouro-train/runs ouro-train \
#       ouro-pipeline pipeline=ouro_1p4b dry_run=true
#   docker run ... ouro-train ouro-pipeline pipeline=ouro_1p4b nproc=8 data_root=/data/shards train.device=cuda
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    WANDB_MODE=offline \
    MAX_JOBS=8
RUN apt-get update && apt-get install -y --no-install-recommends \
        software-properties-common git ninja-build && \
    add-apt-repository -y ppa:deadsnakes/ppa && apt-get update && \
    apt-get install -y --no-install-recommends python3.11 python3.11-dev python3.11-venv && \
    rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /workspace/ouro-train
COPY pyproject.toml constraints.txt README.md ./
# torch==2.13.0 from PyPI on linux x86_64 is the CUDA build; the CPU-only pins of this file
# otherwise match what CI tests.
RUN pip install --upgrade pip && pip install -c constraints.txt torch==2.13.0 packaging wheel
COPY . .
RUN pip install -c constraints.txt -e ".[dev]" && \
    pip install --no-build-isolation flash-attn==2.8.3.post2
# The image is only good if everything imports.
RUN python -c "import torch, deepspeed, megatron.core, hydra, webdataset, wandb, triton, flash_attn, tokenizers, safetensors; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__, \
'megatron-core', megatron.core.__version__, 'flash-attn', flash_attn.__version__, 'triton', triton.__version__)"
