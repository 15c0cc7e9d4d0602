#!/usr/bin/env bash
# A real two-node SLURM cluster on loopback, for the launcher tests and for trying `pretrain run --launcher slurm`.
#
#   tools/slurm_localhost.sh up     # install Debian's packages if missing, start munged, slurmctld, slurmd n1 and n2
#   tools/slurm_localhost.sh down   # stop the daemons (by pid) and remove the state directory
#   tools/slurm_localhost.sh status
#
# Runs as root. Nodes n1 and n2 share NodeAddr=127.0.0.1 and listen on distinct ports; each offers 2 CPUs whatever
# the machine has (oversubscription is fine for CPU tests). No accounting: submitit warns about sacct on every poll
# and reports UNKNOWN states, but its results still arrive. `up` is idempotent; job ids restart at 1 after `down`.
set -euo pipefail

STATE_DIR=${SLURM_LOCALHOST_DIR:-/tmp/slurm-localhost}
CONF=/etc/slurm/slurm.conf
CTLD_PORT=${SLURM_LOCALHOST_PORT:-6817}
NODES=(n1 n2)
CPUS_PER_NODE=2

log() { echo "slurm_localhost: $*" >&2; }

need_root() {
    if [[ $(id -u) -ne 0 ]]; then
        log "must run as root (it installs packages and starts munged/slurmd)"
        exit 1
    fi
}

install_packages() {
    local missing=()
    for bin in slurmctld slurmd sinfo munged; do
        command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

# pid_alive PIDFILE: the process named in PIDFILE is running.
pid_alive() {
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

# stop_pid NAME PIDFILE: TERM, wait up to 10 s, then KILL.
stop_pid() {
    local name=$1 pidfile=$2 pid
    pid_alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name (pid $pid) ignored SIGTERM; killing"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

start_munge() {
    local pidfile=$STATE_DIR/munged.pid
    pid_alive "$pidfile" && return 0
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    # munged writes its own pid file; keep our copy so `down` stops exactly this process.
    runuser -u munge -- /usr/sbin/munged --force --pid-file=/run/munge/munged.pid
    for _ in $(seq 50); do
        [[ -s /run/munge/munged.pid ]] && break
        sleep 0.1
    done
    cp /run/munge/munged.pid "$pidfile"
    munge -n | unmunge >/dev/null || { log "munge does not work"; exit 1; }
}

write_conf() {
    local host mem_mb
    host=$(hostname -s)
    # Half the machine's memory per node, so jobs asking for --mem up to that are accepted on either node.
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
    mkdir -p /etc/slurm "$STATE_DIR/ctld" "$STATE_DIR/log"
    cat >"$CONF" <<EOF
# Written by tools/slurm_localhost.sh: a two-node test cluster on loopback. Do not use in production.
ClusterName=localhost
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Requeued jobs wait out the credential lifetime (120 s by default): keep it short so requeues restart in seconds.
AuthInfo=cred_expire=5
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
JobRequeue=1
ReturnToService=2
KillWait=30
MinJobAge=300
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=${STATE_DIR}/ctld
SlurmdSpoolDir=${STATE_DIR}/spool/%n
SlurmctldPidFile=${STATE_DIR}/slurmctld.pid
SlurmdPidFile=${STATE_DIR}/slurmd-%n.pid
SlurmctldLogFile=${STATE_DIR}/log/slurmctld.log
SlurmdLogFile=${STATE_DIR}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname=${host} Port=$((CTLD_PORT + 1)) CPUs=${CPUS_PER_NODE} RealMemory=${mem_mb} State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 NodeHostname=${host} Port=$((CTLD_PORT + 2)) CPUs=${CPUS_PER_NODE} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
    # A cgroup.conf is not needed (no cgroup plugins); an empty plugstack keeps spank quiet.
}

wait_ready() {
    for _ in $(seq 150); do
        if sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 ~ /^idle|^mix|^alloc/ {n++} END {exit !(n == 2)}'; then
            return 0
        fi
        sleep 0.2
    done
    log "nodes did not become idle; sinfo says:"
    sinfo -N >&2 || true
    tail -n 20 "$STATE_DIR"/log/*.log >&2 || true
    return 1
}

up() {
    need_root
    install_packages
    mkdir -p "$STATE_DIR"
    if pid_alive "$STATE_DIR/slurmctld.pid" && pid_alive "$STATE_DIR/slurmd-n1.pid" \
        && pid_alive "$STATE_DIR/slurmd-n2.pid" && sinfo >/dev/null 2>&1; then
        log "already up (state in $STATE_DIR)"
        return 0
    fi
    start_munge
    write_conf
    if ! pid_alive "$STATE_DIR/slurmctld.pid"; then
        # -c: clear the saved state, so each start is a fresh cluster (job ids restart at 1).
        /usr/sbin/slurmctld -c
    fi
    for node in "${NODES[@]}"; do
        mkdir -p "$STATE_DIR/spool/$node"
        pid_alive "$STATE_DIR/slurmd-$node.pid" || /usr/sbin/slurmd -N "$node"
    done
    wait_ready
    # Nodes left DOWN by an earlier unclean stop come back.
    scontrol update nodename=n1,n2 state=resume >/dev/null 2>&1 || true
    log "up: $(sinfo -h -o '%P %D nodes %t' | head -n 1) (state in $STATE_DIR)"
}

down() {
    need_root
    for node in "${NODES[@]}"; do
        stop_pid "slurmd $node" "$STATE_DIR/slurmd-$node.pid"
    done
    stop_pid slurmctld "$STATE_DIR/slurmctld.pid"
    stop_pid munged "$STATE_DIR/munged.pid"
    rm -rf "$STATE_DIR"
    log "down"
}

status() {
    for name in slurmctld slurmd-n1 slurmd-n2 munged; do
        if pid_alive "$STATE_DIR/$name.pid"; then echo "$name: running (pid $(cat "$STATE_DIR/$name.pid"))"
        else echo "$name: stopped"; fi
    done
    sinfo -N 2>/dev/null || true
}

case ${1:-} in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
