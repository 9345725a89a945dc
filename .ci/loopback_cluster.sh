#!/usr/bin/env bash
# A two-"node" cluster on this machine's loopback, for the launcher tests (tests/test_launchers.py):
#   bash .ci/loopback_cluster.sh up      # as root: hosts, ssh keys + sshd, munge, slurmctld + 2 slurmd
#   bash .ci/loopback_cluster.sh down    # stops the daemons this script started (by their pid files)
#   bash .ci/loopback_cluster.sh status
# Needs Debian's openssh-server, pdsh, openmpi-bin, munge, slurmctld, slurmd, slurm-client (.ci/run installs them).
# The nodes: c2r-node1 = 127.0.0.1 and c2r-node2 = 127.0.0.2 (appended to /etc/hosts once). sshd listens on port
# 2222 of both addresses only, root logs in with a key made here (never a password); a marked block in
# ~/.ssh/config sends ssh to the two names there. Slurm runs one slurmd per node name on this host (`slurmd -N`,
# own port each), configured in /etc/slurm/slurm.conf, which this script writes only if it is absent or its own.
# Nothing listens on or points at a non-loopback address.
set -euo pipefail
STATE="${C2R_CLUSTER_STATE:-/var/lib/c2r-loopback}"
NODES=(c2r-node1 c2r-node2)
ADDRS=(127.0.0.1 127.0.0.2)
SSH_PORT=2222
SLURM_CONF=/etc/slurm/slurm.conf
MARK="# written by c2r .ci/loopback_cluster.sh"
KEY="$HOME/.ssh/c2r_loopback_ed25519"

die() { echo "loopback_cluster.sh: $*" >&2; exit 1; }

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll until COMMAND succeeds
    local seconds="$1" what="$2"
    shift 2
    for _ in $(seq $((seconds * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    die "$what did not come up within ${seconds}s (logs in $STATE)"
}

hosts_up() {
    for i in "${!NODES[@]}"; do
        grep -qE "^${ADDRS[$i]//./\\.}[[:space:]]+${NODES[$i]}\$" /etc/hosts \
            || echo "${ADDRS[$i]} ${NODES[$i]}" >>/etc/hosts
    done
}

ssh_up() {
    mkdir -p "$STATE" "$HOME/.ssh" /run/sshd
    chmod 700 "$STATE" "$HOME/.ssh"
    [ -f "$KEY" ] || ssh-keygen -q -t ed25519 -N '' -C c2r-loopback -f "$KEY"
    [ -f "$STATE/ssh_host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$STATE/ssh_host_ed25519_key"
    cp "$KEY.pub" "$STATE/authorized_keys"
    cat >"$STATE/sshd_config" <<EOF
$MARK
Port $SSH_PORT
ListenAddress ${ADDRS[0]}
ListenAddress ${ADDRS[1]}
HostKey $STATE/ssh_host_ed25519_key
PidFile $STATE/sshd.pid
AuthorizedKeysFile $STATE/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
X11Forwarding no
EOF
    # The client side: a marked block (replaced on every run) so that plain `ssh c2r-node2`, as pdsh and mpirun run
    # it, reaches this sshd with this key and without a host-key prompt.
    local config="$HOME/.ssh/config" block
    block="$(printf '%s\nHost %s\n    HostName %%h\n    Port %s\n    User root\n    IdentityFile %s\n    IdentitiesOnly yes\n    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n# end c2r loopback' \
        "$MARK" "${NODES[*]}" "$SSH_PORT" "$KEY")"
    touch "$config"
    # First in the file: ssh takes the first value it sees for each option.
    { echo "$block"; awk -v m="$MARK" '$0 == m {skip = 1} !skip {print} $0 == "# end c2r loopback" {skip = 0}' "$config"; } \
        >"$config.new"
    mv "$config.new" "$config"
    chmod 600 "$config"
    running "$STATE/sshd.pid" || /usr/sbin/sshd -f "$STATE/sshd_config" -E "$STATE/sshd.log"
    for node in "${NODES[@]}"; do
        wait_for 20 "ssh to $node" ssh -o BatchMode=yes "$node" true
    done
}

munge_up() {
    [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile /etc/munge/munge.key && chown munge:munge /etc/munge/munge.key; }
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    running /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
    wait_for 20 munged sh -c 'munge -n | unmunge'
}

slurm_up() {
    if [ -f "$SLURM_CONF" ] && ! grep -qx "$MARK" "$SLURM_CONF"; then
        die "$SLURM_CONF exists and is not ours; move it away to run the loopback cluster"
    fi
    mkdir -p "$STATE/slurmctld" /etc/slurm
    cat >"$SLURM_CONF" <<EOF
$MARK
# Two node names on this one host, one slurmd each (slurmd -N NAME, its own port), on loopback addresses.
ClusterName=c2r-loopback
SlurmctldHost=$(hostname -s)(${ADDRS[0]})
MailProg=/bin/true
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerType=sched/builtin
NodeName=${NODES[0]} NodeAddr=${ADDRS[0]} NodeHostname=$(hostname) Port=6818 CPUs=2 State=UNKNOWN
NodeName=${NODES[1]} NodeAddr=${ADDRS[1]} NodeHostname=$(hostname) Port=6819 CPUs=2 State=UNKNOWN
PartitionName=loopback Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP
EOF
    running "$STATE/slurmctld.pid" || /usr/sbin/slurmctld
    wait_for 30 slurmctld scontrol ping
    for node in "${NODES[@]}"; do
        running "$STATE/slurmd-$node.pid" || /usr/sbin/slurmd -N "$node"
    done
    wait_for 60 "both slurmd" sh -c '[ "$(sinfo -h -N -o %T | grep -cE "^(idle|mixed|allocated)")" = 2 ]'
}

stop_pidfile() {
    if running "$1"; then
        local pid
        pid="$(cat "$1")"
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$1"
}

case "${1:-}" in
    up)
        [ "$(id -u)" = 0 ] || die "run as root (it edits /etc/hosts and starts sshd, munged, slurmctld, slurmd)"
        for tool in /usr/sbin/sshd pdsh mpirun /usr/sbin/munged /usr/sbin/slurmctld /usr/sbin/slurmd sbatch; do
            command -v "$tool" >/dev/null || die "$tool not found (apt-get install openssh-server pdsh openmpi-bin munge slurmctld slurmd slurm-client)"
        done
        hosts_up
        ssh_up
        munge_up
        slurm_up
        echo "loopback cluster up: ${NODES[*]} (${ADDRS[*]}); sshd :$SSH_PORT, slurm partition 'loopback'"
        ;;
    down)
        for node in "${NODES[@]}"; do stop_pidfile "$STATE/slurmd-$node.pid"; done
        stop_pidfile "$STATE/slurmctld.pid"
        stop_pidfile /run/munge/munged.pid
        stop_pidfile "$STATE/sshd.pid"
        echo "loopback cluster down"
        ;;
    status)
        for f in "$STATE/sshd.pid" /run/munge/munged.pid "$STATE/slurmctld.pid" "$STATE"/slurmd-*.pid; do
            if running "$f"; then echo "running: $f ($(cat "$f"))"; else echo "stopped: $f"; fi
        done
        ;;
    *)
        die "usage: loopback_cluster.sh up|down|status"
        ;;
esac
