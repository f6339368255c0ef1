#!/usr/bin/env bash
# A real two-node SLURM cluster on this machine, for tests/slurm/test_slurm.py (`make test-slurm`).
#   tests/slurm/cluster.sh start DIR   # munged, slurmctld, slurmd x 2 (node1, node2); state in DIR
#   tests/slurm/cluster.sh stop DIR    # stops what `start DIR` started, removes DIR
# Debian's slurm-wlm is built with MULTIPLE_SLURMD: two slurmd on one host, each with its own
# port, are two nodes. Each node has 32 CPUs and 4 fake GPUs (character devices like /dev/null,
# listed in gres.conf), as configured, not as detected (SlurmdParameters=config_overrides), so
# launch/slurm.sbatch runs with its own #SBATCH header and `--gpus-per-node` works.
# Everything (configuration, munge key and socket, spools, logs, pid files) lives under DIR;
# clients find the cluster through SLURM_CONF=DIR/slurm.conf. Needs root (munged runs as munge).
set -euo pipefail

cmd=${1:?usage: cluster.sh start|stop DIR}
DIR=${2:?usage: cluster.sh start|stop DIR}

stop() {
    set +e # best effort, to the end
    local pidfile pid proc env_file jobs
    local pidfiles=("$DIR"/run/slurmd-node*.pid "$DIR"/run/slurmctld.pid "$DIR"/munge/munged.pid)
    # Jobs still there (a test that failed mid-job): cancel them while the daemons are up.
    jobs=$([[ -f $DIR/etc/slurm.conf ]] && SLURM_CONF=$DIR/etc/slurm.conf squeue -h -o %i 2>/dev/null)
    if [[ -n $jobs ]]; then
        # shellcheck disable=SC2086
        SLURM_CONF=$DIR/etc/slurm.conf scancel --full --signal=KILL $jobs 2>/dev/null # running ones
        # shellcheck disable=SC2086
        SLURM_CONF=$DIR/etc/slurm.conf scancel $jobs 2>/dev/null # pending ones
        for _ in $(seq 50); do
            [[ -z $(SLURM_CONF=$DIR/etc/slurm.conf squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.1
        done
    fi
    # The daemons, by their pid files (never by name: other clusters may run on this host).
    for pidfile in "${pidfiles[@]}"; do
        [[ -f $pidfile ]] && pid=$(cat "$pidfile" 2>/dev/null) && [[ -n $pid ]] && kill "$pid" 2>/dev/null
    done
    for _ in $(seq 50); do
        local alive=0
        for pidfile in "${pidfiles[@]}"; do
            [[ -f $pidfile ]] && pid=$(cat "$pidfile" 2>/dev/null) && [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && alive=1
        done
        ((alive)) || break
        sleep 0.1
    done
    for pidfile in "${pidfiles[@]}"; do
        [[ -f $pidfile ]] && pid=$(cat "$pidfile" 2>/dev/null) && [[ -n $pid ]] && kill -9 "$pid" 2>/dev/null
    done
    # Anything a job of this cluster left behind: its slurmstepd (working directory under DIR,
    # like the slurmd that started it) and processes of a job (SLURM_JOB_ID set) submitted with
    # SLURM_CONF pointing here.
    for env_file in /proc/[0-9]*/environ; do
        proc=${env_file#/proc/}
        proc=${proc%/environ}
        [[ $proc == "$$" ]] && continue
        if [[ $(readlink "/proc/$proc/cwd" 2>/dev/null) == "$DIR"/* ]] ||
            { grep -qzx "SLURM_CONF=$DIR/etc/slurm.conf" "$env_file" 2>/dev/null &&
                grep -qz "^SLURM_JOB_ID=" "$env_file" 2>/dev/null; }; then
            kill -9 "$proc" 2>/dev/null
        fi
    done
    [[ -f $DIR/.ouro-slurm-cluster ]] && rm -rf "$DIR" # only a directory `start` made
    return 0
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    mkdir -p "$DIR"/{etc,run,log,state,spool/node1,spool/node2,dev,munge}
    touch "$DIR/.ouro-slurm-cluster"
    chmod 755 "$DIR"
    local host ctld_port port1 port2
    host=$(hostname -s)
    ctld_port=$(free_port)
    port1=$(free_port)
    port2=$(free_port)
    while [[ $port2 == "$port1" || $port2 == "$ctld_port" || $port1 == "$ctld_port" ]]; do
        port1=$(free_port)
        port2=$(free_port)
    done

    # munge: its own key, socket, pid and log under DIR, run as the munge user.
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chown -R munge:munge "$DIR/munge"
    chmod 700 "$DIR/munge"
    chmod 400 "$DIR/munge/munge.key"
    runuser -u munge -- munged --force \
        --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed"
    chmod 755 "$DIR/munge"  # clients (root here) reach the socket

    # Fake GPUs: character devices (1,3 is /dev/null's) that gres.conf lists as gpus.
    for i in 0 1 2 3 4 5 6 7; do
        mknod "$DIR/dev/gpu$i" c 1 3
    done

    cat >"$DIR/etc/slurm.conf" <<EOF
ClusterName=ourotest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobRequeue=1
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
ReturnToService=2
MinJobAge=600
KillWait=30
InactiveLimit=0
SlurmdTimeout=300
NodeName=node1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$port1 CPUs=32 RealMemory=8000 Gres=gpu:4 State=UNKNOWN
NodeName=node2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$port2 CPUs=32 RealMemory=8000 Gres=gpu:4 State=UNKNOWN
PartitionName=test Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    cat >"$DIR/etc/gres.conf" <<EOF
AutoDetect=off
NodeName=node1 Name=gpu File=$DIR/dev/gpu[0-3]
NodeName=node2 Name=gpu File=$DIR/dev/gpu[4-7]
EOF
    export SLURM_CONF=$DIR/etc/slurm.conf
    slurmctld -i
    slurmd -N node1
    slurmd -N node2
    # Ready when both nodes are idle.
    for _ in $(seq 300); do
        if [[ $(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c ' idle') == 2 ]]; then
            echo "slurm cluster up in $DIR: $(sinfo -h -N -o '%N %t %G' | tr '\n' ' ')"
            return 0
        fi
        sleep 0.1
    done
    echo "slurm cluster did not come up; logs:" >&2
    tail -n 30 "$DIR"/log/*.log "$DIR"/munge/munged.log >&2 || true
    return 1
}

case $cmd in
start) start ;;
stop) stop ;;
*)
    echo "usage: cluster.sh start|stop DIR" >&2
    exit 2
    ;;
esac
