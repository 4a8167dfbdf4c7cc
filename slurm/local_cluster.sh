#!/usr/bin/env bash
# A real single-host Slurm 22.05 (Debian packages) with simulated nodes, to try
# slurm/train.sbatch on a laptop or in CI. Needs root. No systemd: the daemons
# run in the background with pid files and are stopped by pid.
#
#   bash slurm/local_cluster.sh start    # install if needed, start (no-op when up and unchanged)
#   bash slurm/local_cluster.sh status   # sinfo + daemon pids; exit 1 when not up
#   bash slurm/local_cluster.sh stop     # cancel jobs, stop every daemon it started
#   bash slurm/local_cluster.sh restart
#
# Knobs (environment):
#   SLURM_LOCAL_NODES=2            simulated nodes node1..nodeN (1: one node named `hostname -s`)
#   SLURM_LOCAL_CPUS=<nproc>       CPUs advertised per node (may exceed the real count)
#   SLURM_LOCAL_GPUS_PER_NODE=0    fake gres/gpu per node (jobs see CUDA_VISIBLE_DEVICES)
#   SLURM_LOCAL_PARTITION=debug    name of the default partition (a second one, `urgent`, preempts it)
#   SLURM_LOCAL_TIMEOUT=60         seconds any single wait may take
#
# Facts behind the settings: shared/notes/slurm-local.md (measured on this kind of machine).
set -euo pipefail

NODES=${SLURM_LOCAL_NODES:-2}
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
GPUS=${SLURM_LOCAL_GPUS_PER_NODE:-0}
PART=${SLURM_LOCAL_PARTITION:-debug}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}

ETC=/etc/slurm
RUN=/run/slurm
LOG=/var/log/slurm
STATE=/var/spool/slurmctld
FAKEGPU=/var/lib/slurm/fakegpu
HOST=$(hostname -s)
PACKAGES=(slurmctld slurmd slurm-client munge)

say() { echo "local_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "SLURM_LOCAL_NODES must be a positive integer, got '$NODES'"
[[ $CPUS =~ ^[1-9][0-9]*$ ]] || die "SLURM_LOCAL_CPUS must be a positive integer, got '$CPUS'"
[[ $GPUS =~ ^[0-9]+$ ]] || die "SLURM_LOCAL_GPUS_PER_NODE must be a non-negative integer, got '$GPUS'"
[[ $PART =~ ^[A-Za-z0-9_-]+$ && $PART != urgent ]] || die "bad SLURM_LOCAL_PARTITION '$PART'"

node_names() {  # one per line
    if ((NODES == 1)); then echo "$HOST"; else for ((k = 1; k <= NODES; k++)); do echo "node$k"; done; fi
}

# ---------------------------------------------------------------- waiting / pids
wait_for() {  # wait_for SECONDS DESCRIPTION CMD...: poll every 0.1 s, bounded
    local limit=$1 what=$2; shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || { say "timed out after ${limit}s waiting for $what"; return 1; }
        sleep 0.1
    done
}

live_pid() {  # live_pid PIDFILE COMM: print the pid if the file names a live process called COMM
    local pidfile=$1 comm=$2 pid
    [[ -r $pidfile ]] || return 1
    pid=$(tr -dc 0-9 <"$pidfile")
    [[ -n $pid && -r /proc/$pid/comm && $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
    echo "$pid"
}

gone() { [[ ! -e /proc/$1 ]] || [[ $(cat "/proc/$1/comm" 2>/dev/null) != "$2" ]]; }

stop_pids() {  # stop_pids LIMIT "pidfile:comm"...: TERM all, wait (bounded), then KILL stragglers
    local limit=$1; shift
    local spec pid comm pids=() comms=() i
    for spec in "$@"; do
        comm=${spec##*:}
        if pid=$(live_pid "${spec%:*}" "$comm"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid"); comms+=("$comm")
        fi
    done
    for i in "${!pids[@]}"; do
        if ! wait_for "$limit" "${comms[$i]} (pid ${pids[$i]}) to exit" gone "${pids[$i]}" "${comms[$i]}"; then
            say "sending SIGKILL to ${comms[$i]} (pid ${pids[$i]})"
            kill -KILL "${pids[$i]}" 2>/dev/null || true
            wait_for 5 "${comms[$i]} to die" gone "${pids[$i]}" "${comms[$i]}" || true
        fi
    done
    for spec in "$@"; do rm -f "${spec%:*}"; done
}

munged_pidfile=/run/munge/munged.pid
ctld_pidfile=$RUN/slurmctld.pid
slurmd_pidfile() { echo "$RUN/slurmd.$1.pid"; }

daemon_specs() {  # every pid file we manage, as pidfile:comm
    local n f
    for f in "$RUN"/slurmd.*.pid; do [[ -e $f ]] && echo "$f:slurmd"; done
    echo "$ctld_pidfile:slurmctld"
}

# ---------------------------------------------------------------- install
install_packages() {
    local missing=0 bin
    for bin in slurmctld slurmd sinfo munged; do
        command -v "$bin" >/dev/null 2>&1 || [[ -x /usr/sbin/$bin ]] || missing=1
    done
    ((missing)) || return 0
    command -v apt-get >/dev/null || die "Slurm is not installed and apt-get is missing (Debian/Ubuntu only)"
    say "installing ${PACKAGES[*]} (apt-get, --no-install-recommends)"
    # policy-rc.d (exit 101) keeps the packages' postinst from starting services; create one
    # only for the duration of the install when the machine has none.
    local made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
    fi
    local rc=0
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold "${PACKAGES[@]}")
    if [[ -z $(apt-cache policy slurmctld 2>/dev/null | awk '/Candidate:/ && $2 != "(none)"') ]]; then
        apt-get update -q >/dev/null || rc=$?
    fi
    if ((rc == 0)); then
        "${apt[@]}" >/dev/null || { say "install failed; running apt-get update and retrying"; apt-get update -q >/dev/null && "${apt[@]}" >/dev/null; } || rc=$?
    fi
    ((made_policy)) && rm -f /usr/sbin/policy-rc.d
    ((rc == 0)) || die "apt-get install ${PACKAGES[*]} failed (rc=$rc)"
}

# ---------------------------------------------------------------- config
real_memory_mb() { awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo; }

write_config() {  # write_config DIR: slurm.conf, cgroup.conf, gres.conf into DIR
    local dir=$1 mem nodes_line gres_line="" gpu_files=""
    mem=$(real_memory_mb)
    if ((GPUS > 0)); then
        gres_line=" Gres=gpu:$GPUS"
        gpu_files="$FAKEGPU/nvidia[0-$((GPUS - 1))]"
    fi
    if ((NODES == 1)); then
        nodes_line="NodeName=$HOST NodeAddr=127.0.0.1"
    else
        nodes_line="NodeName=node[1-$NODES] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[17001-$((17000 + NODES))]"
    fi
    cat >"$dir/slurm.conf" <<EOF
# Written by slurm/local_cluster.sh (settings: nodes=$NODES cpus=$CPUS gpus=$GPUS partition=$PART).
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
# A requeued job becomes eligible cred_expire+1 s later (default 120 -> ~150 s waits).
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.log
StateSaveLocation=$STATE
SlurmctldPidFile=$ctld_pidfile
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdSpoolDir=/var/spool/slurmd.%n
SlurmdPidFile=$RUN/slurmd.%n.pid
SlurmdLogFile=$LOG/slurmd.%n.log
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
KillWait=30
EnforcePartLimits=ALL
MailProg=/bin/true
MpiDefault=none
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
${gres_line:+GresTypes=gpu}
$nodes_line CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem$gres_line State=UNKNOWN
PartitionName=$PART Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
    # slurmd 22.05 always loads a cgroup plugin; autodetect dies without cgroup write access or
    # on hybrid layouts, cgroup/v1's init is a no-op (nothing is enforced: proctrack is linuxproc).
    printf 'CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n' >"$dir/cgroup.conf"
    if ((GPUS > 0)); then
        echo "Name=gpu File=$gpu_files" >"$dir/gres.conf"
    else
        : >"$dir/gres.conf"
    fi
}

config_changed() {  # compares freshly generated files with /etc/slurm
    local tmp f changed=1
    tmp=$(mktemp -d)
    write_config "$tmp"
    changed=0
    for f in slurm.conf cgroup.conf gres.conf; do cmp -s "$tmp/$f" "$ETC/$f" || changed=1; done
    rm -rf "$tmp"
    return $((1 - changed))
}

setup_hosts() {
    ((NODES > 1)) || return 0
    local n
    for n in $(node_names); do
        grep -qE "^[^#]*[[:space:]]$n([[:space:]]|\$)" /etc/hosts ||
            echo "127.0.0.1 $n" >>/etc/hosts || die "cannot write /etc/hosts; use SLURM_LOCAL_NODES=1"
    done
}

setup_fake_gpus() {
    ((GPUS > 0)) || return 0
    # gres/gpu in 22.05 drops file-less GPUs and rejects regular files; symlinks to /dev/null pass.
    mkdir -p "$FAKEGPU"
    local k
    for ((k = 0; k < GPUS; k++)); do ln -sfn /dev/null "$FAKEGPU/nvidia$k"; done
}

# ---------------------------------------------------------------- daemons
all_up() {
    live_pid "$munged_pidfile" munged >/dev/null || return 1
    live_pid "$ctld_pidfile" slurmctld >/dev/null || return 1
    local n
    for n in $(node_names); do live_pid "$(slurmd_pidfile "$n")" slurmd >/dev/null || return 1; done
}

munge_ok() { munge -n </dev/null | unmunge >/dev/null; }

start_munged() {
    if live_pid "$munged_pidfile" munged >/dev/null; then return 0; fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then mungekey -c -f -k /etc/munge/munge.key
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
        chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge 2>/dev/null || true
    runuser -u munge -- /usr/sbin/munged || die "munged failed to start (see /var/log/munge/munged.log)"
    wait_for "$TIMEOUT" "munged to answer" munge_ok || die "munged does not answer"
}

ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

nodes_idle() {  # every node idle or allocated/mixed (i.e. registered and usable)
    local want have
    want=$(node_names | wc -l)
    have=$(sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 ~ /^(idle|mix|alloc|comp)$/ {print $1}' | sort -u | wc -l)
    ((have == want))
}

start_daemons() {
    start_munged
    if ! live_pid "$ctld_pidfile" slurmctld >/dev/null; then
        /usr/sbin/slurmctld || die "slurmctld failed to start (see $LOG/slurmctld.log)"
    fi
    wait_for "$TIMEOUT" "slurmctld to answer" ctld_up || die "slurmctld does not answer (see $LOG/slurmctld.log)"
    local n
    for n in $(node_names); do
        live_pid "$(slurmd_pidfile "$n")" slurmd >/dev/null && continue
        if ((NODES == 1)); then /usr/sbin/slurmd || die "slurmd failed to start (see $LOG/slurmd.$n.log)"
        else /usr/sbin/slurmd -N "$n" || die "slurmd -N $n failed to start (see $LOG/slurmd.$n.log)"; fi
    done
    if ! wait_for "$TIMEOUT" "all nodes to become idle" nodes_idle; then
        # A node left DOWN/DRAIN by an earlier unclean stop: resume it once, then wait again.
        scontrol update NodeName="$(node_names | paste -sd,)" State=RESUME >/dev/null 2>&1 || true
        wait_for "$TIMEOUT" "all nodes to become idle" nodes_idle || { sinfo -N >&2 || true; die "nodes are not idle"; }
    fi
}

cancel_jobs() {
    ctld_up || return 0
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    [[ -n ${jobs// /} ]] || return 0
    say "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    # KillWait=30: a job that ignores SIGTERM is killed 30 s later.
    wait_for $((TIMEOUT > 45 ? TIMEOUT : 45)) "jobs to end" bash -c '[[ -z $(squeue -h -t R,CG,S -o %i 2>/dev/null) ]]' || true
}

do_stop() {
    cancel_jobs
    local specs
    mapfile -t specs < <(daemon_specs)
    stop_pids 15 "${specs[@]}"
    stop_pids 10 "$munged_pidfile:munged"
}

do_start() {
    [[ $(id -u) == 0 ]] || die "must run as root (installs packages and starts daemons)"
    if all_up && ! config_changed; then
        say "already up (nodes=$NODES cpus=$CPUS gpus=$GPUS partition=$PART)"
        return 0
    fi
    install_packages
    if config_changed; then
        if live_pid "$ctld_pidfile" slurmctld >/dev/null || [[ -n $(compgen -G "$RUN/slurmd.*.pid") ]]; then
            say "settings changed: restarting"
            do_stop
        fi
    fi
    mkdir -p "$ETC" "$RUN" "$LOG" "$STATE" /var/lib/slurm
    write_config "$ETC"
    setup_hosts
    setup_fake_gpus
    start_daemons
    say "up: $(node_names | paste -sd' ') (cpus=$CPUS gpus=$GPUS partition=$PART, urgent preempts it)"
}

do_status() {
    local spec pid ok=0
    for spec in "$munged_pidfile:munged" $(daemon_specs); do
        if pid=$(live_pid "${spec%:*}" "${spec##*:}"); then echo "${spec##*:} pid $pid (${spec%:*})"; fi
    done
    all_up || ok=1
    if ctld_up; then sinfo; else echo "slurmctld is not answering"; ok=1; fi
    return $ok
}

case "${1:-}" in
start) do_start ;;
stop) do_stop; say "stopped" ;;
restart) do_stop; do_start ;;
status) do_status ;;
*) echo "usage: $0 start|stop|restart|status" >&2; exit 2 ;;
esac
