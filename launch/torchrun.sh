#!/usr/bin/env bash
# One node: ouro-train on NPROC processes, one per GPU (or gloo processes on CPU).
#   launch/torchrun.sh 8 model=ouro_1p4b parallel.zero_stage=1 train.precision=bf16
#   launch/torchrun.sh 2 parallel.tensor_parallel=2           # CPU: two gloo processes
# The data-parallel size is NPROC / parallel.tensor_parallel; a size that does not divide fails
# at start-up on every rank with the key to change.
set -euo pipefail
NPROC=${1:?usage: launch/torchrun.sh NPROC [ouro-train overrides...]}
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
extra=()
# What this torch offers: a GPU, and torchrun's --shutdown-timeout (torch >= 2.12).
read -r cuda shutdown < <("$PYTHON" -c "
import torch
from torch.distributed.run import get_args_parser
print(int(torch.cuda.is_available()), int('--shutdown-timeout' in get_args_parser()._option_string_actions))")
if [ "$cuda" = 1 ]; then
    [[ " $* " == *" train.device="* ]] || extra+=(train.device=cuda)
else
    export DS_ACCELERATOR=cpu
fi
wait=()
[ "$shutdown" = 1 ] && wait=(--shutdown-timeout="${SHUTDOWN_TIMEOUT:-300}")
export WANDB_MODE=${WANDB_MODE:-offline}
# torchrun passes on to the workers only the signals of --signals-to-handle (its default lacks
# SIGUSR1, of which torchrun would die at once, leaving the workers training), then waits
# --shutdown-timeout seconds for them to save and exit before it kills them. An older torchrun has
# no such flag and waits its own fixed 30 s: a save of a large model may be cut short there (the
# checkpoint is then left incomplete and never resumed from; the previous one stays).
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 "${wait[@]}" \
    -m ouro_train.cli.train "${extra[@]}" "$@"
