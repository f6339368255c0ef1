#!/usr/bin/env bash
# `make test-slurm`: launch/slurm.sbatch on a real two-node SLURM cluster started on this machine.
# Installs Debian's slurm-wlm and munge when they are missing (apt-get, quietly; once), starts the
# cluster under a temporary directory (tests/slurm/cluster.sh), runs tests/slurm/test_slurm.py
# against it, and stops it (and removes its state) whatever happens.
# Skipped, with exit status 0 and a message saying why, only where SLURM cannot be had: not root
# (the daemons and munge need it) or the packages cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}

skip() {
    echo "test-slurm: SKIPPED: $*"
    exit 0
}

have_slurm() {
    local c
    for c in slurmctld slurmd sbatch scontrol munged; do
        command -v "$c" >/dev/null 2>&1 || [[ -x /usr/sbin/$c ]] || return 1
    done
}

export PATH=$PATH:/usr/sbin:/sbin
[[ $(id -u) == 0 ]] || skip "needs root (munged, slurmctld and slurmd are started here as root)"
if ! have_slurm; then
    command -v apt-get >/dev/null || skip "slurm-wlm and munge are not installed and there is no apt-get"
    echo "test-slurm: installing slurm-wlm and munge with apt-get..."
    log=$(mktemp)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge; } >"$log" 2>&1; then
        tail -n 5 "$log"
        rm -f "$log"
        skip "apt-get could not install slurm-wlm and munge"
    fi
    rm -f "$log"
    have_slurm || skip "slurm-wlm installed but its daemons are not on PATH"
fi
echo "test-slurm: $(slurmctld -V), $(munged --version 2>&1 | head -n 1)"

DIR=$(mktemp -d /tmp/ouro-slurm.XXXXXX)
trap 'tests/slurm/cluster.sh stop "$DIR"' EXIT
trap 'exit 130' INT # (the EXIT trap runs on these too)
trap 'exit 143' TERM
tests/slurm/cluster.sh start "$DIR"
export OURO_SLURM_CLUSTER=$DIR SLURM_CONF=$DIR/etc/slurm.conf
# One pytest worker per test: they wait on their jobs side by side.
"$PY" -m pytest -q -p no:cacheprovider -n 7 --durations=0 tests/slurm/test_slurm.py "$@"
