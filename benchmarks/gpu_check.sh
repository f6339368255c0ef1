#!/usr/bin/env bash
# The whole GPU check in one command: every GPU-marked test, then the kernel, attention and MFU
# benchmarks, each log under $OUT (default gpu_check/) and a summary at the end.
#
#   On a machine with CUDA, torch and triton (e.g. the device machine: Python 3.12, no internet):
#       bash benchmarks/gpu_check.sh run [--quick]
#   Beforehand, where pip reaches PyPI, fetch the few pure wheels the checked code imports beyond
#   torch and triton (pytest, omegaconf and their needs) into .whl/, which `run` installs first:
#       bash benchmarks/gpu_check.sh fetch
#   (.whl/ is ignored by git; carry it to the GPU machine with the working tree.)
#
# The checked paths (model, kernels, attention, objective) import neither DeepSpeed nor megatron-core;
# the distributed paths are covered by the CPU suite over gloo. flash-attn has no wheel on PyPI (it
# compiles against CUDA, see the Dockerfile): where it is missing, its tests and rows say so and skip.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
quick=${2:-}
PYTHON=${PYTHON:-python3}

if [ "$mode" = fetch ]; then
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    platform=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
              --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    for pkg in pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.3 omegaconf==2.3.1 PyYAML==6.0.3; do
        $PYTHON -m pip download -q --no-deps --only-binary=:all: "${platform[@]}" -d .whl "$pkg" || exit 1
    done
    # antlr4 4.9.3 (omegaconf's parser runtime) is published as a source archive only: build its pure wheel.
    $PYTHON -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 || exit 1
    ls -1 .whl
    exit 0
fi

OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
if [ -d .whl ]; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/gpu_check_site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
summary=$OUT/summary.txt
: > "$summary"
step() {  # step NAME COMMAND...: run, keep the log, record the status
    local name=$1; shift
    echo "== $name: $*" | tee -a "$summary"
    local start=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    tail -n 25 "$OUT/$name.log" >> "$summary"
    echo "== $name: exit $status, $((SECONDS - start)) s" | tee -a "$summary"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PYTHON -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >> "$summary" 2>&1
# Only files that hold GPU tests (the rest import DeepSpeed, webdataset, ...: CPU suite).
gpu_files=$(grep -rl "pytest.mark.gpu" tests | sort)
step gpu_tests $PYTHON -m pytest -q -p no:cacheprovider -m gpu $gpu_files
step bench_kernels $PYTHON benchmarks/bench_kernels.py --device cuda --dtype bf16
if [ "$quick" = --quick ]; then seqs=4096,16384; else seqs=4096,8192,16384,32768,65536; fi
step bench_attention $PYTHON benchmarks/bench_attention.py --device cuda --dtype bf16 --heads 16 --head-dim 128 \
    --seqs $seqs --max-gib 40
step mfu_sdpa_eager $PYTHON benchmarks/bench_mfu.py --model ouro_1p4b --seq 4096 --attention sdpa
step mfu_best $PYTHON benchmarks/bench_mfu.py --model ouro_1p4b --seq 4096 --attention sdpa --kernels triton --compile
step mfu_flex_packed $PYTHON benchmarks/bench_mfu.py --model ouro_1p4b --seq 4096 --docs 4 --attention flex \
    --kernels triton --compile
if [ "$quick" != --quick ]; then
    step mfu_longct_64k $PYTHON benchmarks/bench_mfu.py --model ouro_1p4b --seq 65536 --attention sdpa \
        --checkpointing layer --kernels triton --steps 2 --warmup 1
fi
echo "logs in $OUT/"
cat "$summary"
