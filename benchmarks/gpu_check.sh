#!/usr/bin/env bash
# The whole GPU check in one command: every GPU-marked test, then the MFU, kernel and attention
# benchmarks, each log under $OUT (default gpu_check/) and a summary at the end. Each step is
# time-boxed (STEP_LIMIT seconds, default 150); `run --quick` fits in about 8 minutes.
#
#   On a machine with CUDA, torch and triton (e.g. the device machine: Python 3.12, no internet):
#       bash benchmarks/gpu_check.sh run [--quick] [--train] [--mano]
#   Beforehand, where pip reaches PyPI, fetch the few pure wheels the checked code imports beyond
#   torch and triton (pytest, omegaconf and their needs) into .whl/, which `run` installs first:
#       bash benchmarks/gpu_check.sh fetch [--train]
#   (.whl/ is ignored by git; carry it to the GPU machine with the working tree.)
#
#   --train (fetch): also the wheels a single-process `ouro-train` run needs there (hydra-core,
#     webdataset/wids, DeepSpeed built as a pure wheel with DS_BUILD_OPS=0, pydantic, wandb and
#     their import-time needs), and into .whl/fallback/<module>/ the wheels of packages the device
#     image already holds (matplotlib and its needs, psutil, msgpack...): `run` installs one of
#     those only where `import <module>` fails there. With megatron-core (2.6 MB): a ZeRO run,
#     even on one process, makes its process groups through megatron's parallel_state.
#   --quick (run): skips the 64K MFU run.
#   ONLY="NAME ..." (run): only these steps (gpu_tests, mfu_ab, train_zero1, ...: the names in the
#     summary); GPU_TESTS="FILE ...": gpu_tests runs these test files only; STEP_LIMIT (150) and
#     TRAIN_LIMIT (420, 300) cap each step's seconds, DEADLINE_S the whole run's; RUNS: where --train's
#     run directories go (default $OUT).
#   --train (run): `ouro-train` itself under launch/torchrun.sh (NCCL), Ouro-1.4B at 4K on the demo
#     corpus: benchmarks/train_check.py trains 8 steps with a checkpoint at 4, resumes it in a new
#     launch and requires steps 5-8 bit for bit; ZeRO-1 with bf16_loop and compiled layers, then
#     ZeRO-3 with bf16. Prints the trainer's tokens/s beside bench_mfu's. Needs `fetch --train`.
#   --mano (run): last, `make repro-mano DEVICE=cuda` (python -m data_tools.repro_mano --device
#     cuda, recipes/repro_mano_gpu.yaml: three trainings side by side, ~8 minutes) into
#     $OUT/repro_mano_cuda, its report.md copied into the summary. Needs `fetch --train`'s wheels.
#
# The checked paths (model, kernels, attention, objective) import neither DeepSpeed nor megatron-core;
# the distributed paths are covered by the CPU suite over gloo. flash-attn has no wheel on PyPI (it
# compiles against CUDA, see the Dockerfile): where it is missing, its tests and rows say so and skip.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
[ $# -gt 0 ] && shift
quick= mano= train= trainer=
for arg in "$@"; do
    case "$mode:$arg" in
        run:--quick) quick=--quick ;;
        run:--mano) mano=--mano ;;
        run:--train) trainer=--train ;;
        fetch:--train) train=--train ;;
        *) echo "usage: $0 fetch [--train] | run [--quick] [--train] [--mano] (got '$mode $arg')" >&2; exit 2 ;;
    esac
done
case "$mode" in run|fetch) ;; *) echo "usage: $0 fetch [--train] | run [--quick] [--train] [--mano]" >&2; exit 2 ;; esac
PYTHON=${PYTHON:-python3}

# `fetch --train`, installed always (versions: constraints.txt). Each line's comment: who imports it.
train_wheels=(
    hydra-core==1.3.8                    # ouro_train.config.store (omegaconf, antlr4: the base list)
    megatron-core==0.16.1                # parallel/groups.py: any DeepSpeed (ZeRO) run's process groups
    webdataset==1.0.2 wids==0.1.11       # data/tokenize.py, data/source.py (shards)
    braceexpand==0.1.7                   # webdataset, wids
    hjson==3.1.0                         # deepspeed (built below)
    pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
    typing_extensions==4.16.0            # pydantic 2.14 needs >= 4.16: newer than torch's
    wandb==0.31.0                        # train/callbacks.py, only with logging.wandb=true (offline there)
    platformdirs==4.14.7 protobuf==7.36.2 googleapis-common-protos==1.76.0
    opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
    opentelemetry-proto==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2
    opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-http-transport==0.66b2
    opentelemetry-exporter-otlp-common==0.66b2
)
# `fetch --train`, installed only where the image lacks the module: "module wheel...".
fallback_wheels=(
    "matplotlib matplotlib==3.11.2"      # train/report.py, data_tools/repro.py (plots)
    "contourpy contourpy==1.3.3"
    "cycler cycler==0.12.1"
    "fontTools fonttools==4.68.0"
    "kiwisolver kiwisolver==1.5.1"
    "PIL pillow==13.0.0"
    "pyparsing pyparsing==3.3.3"
    "dateutil python-dateutil==4.0.0 tzdata==2026.6"
    "psutil psutil==7.2.2"               # deepspeed
    "msgpack msgpack==1.2.4"             # deepspeed
    "cpuinfo py-cpuinfo==9.0.0"          # deepspeed
    "tqdm tqdm==4.70.1"                  # deepspeed
    "einops einops==0.8.2"               # deepspeed
    "click click==8.5.1"                 # wandb
    "xxhash xxhash==4.1.0"               # wandb
)
DEEPSPEED=deepspeed==0.19.8  # sdist only on PyPI: built here as a pure wheel (no ops compiled)

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
    if [ -n "$train" ]; then
        $PYTHON -m pip download -q --no-deps --only-binary=:all: "${platform[@]}" -d .whl "${train_wheels[@]}" || exit 1
        ls .whl/deepspeed-*.whl > /dev/null 2>&1 ||
            DS_BUILD_OPS=0 $PYTHON -m pip wheel -q --no-deps -w .whl "$DEEPSPEED" || exit 1
        for entry in "${fallback_wheels[@]}"; do
            read -r module specs <<< "$entry"
            mkdir -p ".whl/fallback/$module"
            # shellcheck disable=SC2086  # specs: one or more requirements
            $PYTHON -m pip download -q --no-deps --only-binary=:all: "${platform[@]}" -d ".whl/fallback/$module" \
                $specs || exit 1
        done
    fi
    ls -1 .whl .whl/fallback/* 2>/dev/null
    du -sh .whl
    exit 0
fi

OUT=${OUT:-gpu_check}
RUNS=${RUNS:-$OUT}  # --train's run directories (checkpoints of tens of GB: keep them off a small $OUT)
mkdir -p "$OUT" "$RUNS"
site=/tmp/gpu_check_site
if [ -d .whl ]; then
    wheels=(.whl/*.whl)
    for dir in .whl/fallback/*/; do  # only where the image lacks the module
        [ -d "$dir" ] || continue
        $PYTHON -c "import $(basename "$dir")" 2>/dev/null || wheels+=("$dir"*.whl)
    done
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --upgrade --target $site "${wheels[@]}" || exit 1
    export PYTHONPATH=$site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
export WANDB_MODE=offline  # no internet there; a run with logging.wandb=true logs under its run dir
unset TRITON_INTERPRET
summary=$OUT/summary.txt
: > "$summary"
STEP_LIMIT=${STEP_LIMIT:-150}  # seconds per step: one hung or slow step cannot eat the device allotment
DEADLINE_S=${DEADLINE_S:-}  # seconds: each step's limit is cut so that the whole run ends by then
ONLY=${ONLY:-}  # names of the steps to run, space-separated (default: all), e.g. ONLY="mfu_ab train_zero1"
step() {  # step NAME COMMAND...: run (time-boxed), keep the log, record the status (124: timed out)
    local name=$1; shift
    [ -z "$ONLY" ] || [[ " $ONLY " == *" $name "* ]] || return 0
    local limit=$STEP_LIMIT
    if [ -n "$DEADLINE_S" ]; then  # never past the whole run's deadline (seconds from the start)
        limit=$(( DEADLINE_S - SECONDS < limit ? DEADLINE_S - SECONDS : limit ))
        if [ "$limit" -lt 20 ]; then echo "== $name: skipped, past DEADLINE_S=$DEADLINE_S" | tee -a "$summary"; return 0; fi
    fi
    echo "== $name (limit $limit s): $*" | tee -a "$summary"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    tail -n "${SUMMARY_LINES:-25}" "$OUT/$name.log" >> "$summary"
    echo "== $name: exit $status, $((SECONDS - start)) s" | tee -a "$summary"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PYTHON -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >> "$summary" 2>&1
# Only files that hold GPU tests (the rest import DeepSpeed, webdataset, ...: CPU suite).
gpu_files=${GPU_TESTS:-$(grep -rl "pytest.mark.gpu" tests | sort)}  # GPU_TESTS: some of these files only
step gpu_tests $PYTHON -m pytest -q -p no:cacheprovider -m gpu $gpu_files
# First the A/B that decides the GPU recipes' precision (#22), in one process on the same weights,
# steps alternating: the compiled step under bf16_loop (shared weights cast once per optimizer step,
# fp32 GEMM-accumulated gradients), under bf16 autocast, and a plain PyTorch Ouro
# (benchmarks/plain_ouro.py, compiled per layer); then where our step's GPU time goes (matmul,
# attention, elementwise, optimizer, casts, idle).
step mfu_ab $PYTHON benchmarks/bench_mfu.py --model ouro_1p4b --seq 4096 --attention sdpa --compile \
    --precision bf16_loop --versus precision=bf16 --baseline --profile
step mfu_bf16_loop_mb2 $PYTHON benchmarks/bench_mfu.py --model ouro_1p4b --seq 4096 --attention sdpa --compile \
    --precision bf16_loop --micro-batch 2
# Micro-batch 2 inside 80 GiB (an H100's; 80.7 GiB without checkpointing): selective checkpointing
# keeps matmul/attention outputs only, against none, on the same weights.
step mfu_mb2_selective_ab $PYTHON benchmarks/bench_mfu.py --model ouro_1p4b --seq 4096 --attention sdpa \
    --compile --precision bf16_loop --micro-batch 2 --checkpointing selective --versus checkpointing=none
# The stage recipes' setting (4K x 4 rows, `layer` checkpointing, compiled layers): bf16_loop (its
# checkpoint around the compiled layer) against bf16 (traced inside): decides the recipes' precision.
step mfu_layer_ckpt_ab $PYTHON benchmarks/bench_mfu.py --model ouro_1p4b --seq 4096 --attention sdpa \
    --compile --micro-batch 4 --checkpointing layer --precision bf16_loop --versus precision=bf16
step bench_kernels $PYTHON benchmarks/bench_kernels.py --device cuda --dtype bf16
if [ "$quick" = --quick ]; then seqs=4096,16384; else seqs=4096,8192,16384,32768,65536; fi
step bench_attention $PYTHON benchmarks/bench_attention.py --device cuda --dtype bf16 --heads 16 --head-dim 128 \
    --seqs $seqs --max-gib 40
step mfu_sdpa_eager $PYTHON benchmarks/bench_mfu.py --model ouro_1p4b --seq 4096 --attention sdpa
# Kernels and attention chosen by measurement (#22 item 3), each an A/B in one process on the same
# weights: our Triton kernels against inductor's fusion, then flex against sdpa on packed rows.
step mfu_kernels_ab $PYTHON benchmarks/bench_mfu.py --model ouro_1p4b --seq 4096 --attention sdpa --compile \
    --precision bf16_loop --versus kernels=triton
step mfu_attention_ab $PYTHON benchmarks/bench_mfu.py --model ouro_1p4b --seq 4096 --docs 4 --attention sdpa \
    --compile --precision bf16_loop --versus attention=flex
# The fused exit-weighted objective (all R steps in one chunked pass through the head) against
# per-step logits (the plain model's naive CE, and linear_cross_entropy once per step), at Ouro-1.4B's
# head (4K tokens, vocab 49152, hidden 2048, bf16): time and CUDA peak above the inputs (#22 item 3).
step loss_ab $PYTHON benchmarks/bench_loss_memory.py --device cuda --dtype bf16 --tokens 4096 --vocab 49152 \
    --hidden 2048 --chunk 4096 --repeats 1 --iters 5
# FP8 (#22 item 6, opt-in): the compiled step against bf16_loop on the same weights, then the loss
# curves of the two over 300 steps of a learnable synthetic language.
step mfu_fp8_ab $PYTHON benchmarks/bench_mfu.py --model ouro_1p4b --seq 4096 --attention sdpa --compile \
    --precision fp8 --versus precision=bf16_loop
step fp8_convergence $PYTHON benchmarks/bench_fp8.py --hidden 1024 --layers 4 --seq 1024 --rows 8 --steps 300
# The trainer's step reads the device once (the guard's verdict): its host reads and CUDA syncs
# counted, and an A/B against the same step with a sync where the old step read (#22 item 7).
step host_reads_ab $PYTHON benchmarks/bench_host_reads.py --hidden 2048 --layers 4 --seq 4096 --rows 1 \
    --steps 16 --block 4
if [ "$quick" != --quick ]; then
    step mfu_longct_64k $PYTHON benchmarks/bench_mfu.py --model ouro_1p4b --seq 65536 --attention sdpa \
        --checkpointing layer --kernels triton --steps 2 --warmup 1
fi
trainer_missing() {  # prints what `ouro-train` needs and cannot import here (fetch --train's wheels)
    $PYTHON -c "
import importlib.util as u
print(' '.join(m for m in ('hydra', 'omegaconf', 'deepspeed', 'megatron', 'pydantic', 'wids', 'webdataset',
                           'matplotlib') if u.find_spec(m) is None))"
}
if [ -n "$trainer" ]; then
    if missing=$(trainer_missing) && [ -z "$missing" ]; then
        export PYTHON  # launch/torchrun.sh runs the workers with it
        # (the demo corpus: 15% of its documents held out, so that one 4K evaluation window fits;
        # no document masking: each row one causal sequence, bench_mfu.py's attention work at --docs 1,
        # where packed rows ran sdpa one document segment at a time)
        ouro_4k="model=ouro_1p4b train.device=cuda train.seq_len=4096 train.micro_batch_size=1 train.global_batch_size=1
                 data.val_fraction=0.15 data.document_masking=false"
        # (45 lines of each log into the summary: the resumed steps, the profile of steps 3-4, tokens/s)
        SUMMARY_LINES=45 STEP_LIMIT=${TRAIN_LIMIT:-420} step train_zero1 $PYTHON benchmarks/train_check.py --out "$RUNS/train_zero1" -- $ouro_4k \
            parallel=zero1 train.precision=bf16_loop
        # (the zero3 preset: the layers gathered once per pass, compiled; bf16_loop is refused there)
        SUMMARY_LINES=45 STEP_LIMIT=${TRAIN_LIMIT:-300} step train_zero3 $PYTHON benchmarks/train_check.py --out "$RUNS/train_zero3" -- $ouro_4k \
            parallel=zero3 train.precision=bf16
    else
        echo "== train: skipped, not importable: ${missing:-?} (bash benchmarks/gpu_check.sh fetch --train)" \
            | tee -a "$summary"
    fi
fi
if [ -n "$mano" ]; then  # last: ~8 minutes of training, and it needs `fetch --train`'s wheels
    if missing=$(trainer_missing) && [ -z "$missing" ]; then
        STEP_LIMIT=600 step repro_mano_cuda $PYTHON -m data_tools.repro_mano --device cuda --run-dir "$OUT/repro_mano_cuda"
        if [ -f "$OUT/repro_mano_cuda/report.md" ]; then
            { echo "== repro_mano_cuda: report.md"; cat "$OUT/repro_mano_cuda/report.md"; } >> "$summary"
        fi
    else
        echo "== repro_mano_cuda: skipped, not importable: ${missing:-?} (bash benchmarks/gpu_check.sh fetch --train)" \
            | tee -a "$summary"
    fi
fi
echo "logs in $OUT/"
cat "$summary"
