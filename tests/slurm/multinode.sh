#!/usr/bin/env bash
# A simulated multi-node SLURM cluster on one root machine, for the multinode tests: a controller plus N compute
# "nodes", each in its own network namespace with its own hostname (a UTS namespace), its own address on a private
# bridge and its own slurmd. The nodes share the filesystem, as cluster nodes share a parallel filesystem, and the
# munge daemon (a Unix socket, reachable from every namespace). Idempotent: a second start with the same N checks
# what is there and starts what is missing.
#
#   bash tests/slurm/multinode.sh [--nodes N]      start (installs slurm-wlm and munge first if needed); the last
#                                                  line printed is SLURM_CONF=... to export
#   bash tests/slurm/multinode.sh stop             stop the daemons, remove namespaces, bridge and /etc/hosts lines
#   bash tests/slurm/multinode.sh run [--nodes N] -- CMD ...
#                                                  start, run CMD with SLURM_CONF set, and tear everything down
#                                                  on any exit of this script (a trap on EXIT, INT and TERM)
#   bash tests/slurm/multinode.sh kill-node NAME   SIGKILL the node's slurmd and every process in its namespace
#   bash tests/slurm/multinode.sh cut-node NAME    the node vanishes: its link goes down, its processes stay alive
#   bash tests/slurm/multinode.sh revive-node NAME link up again, slurmd restarted, node resumed
#
# Network safety: the subnet (FHV_MN_SUBNET, default 10.213.7.0/24; /24 only) is refused if any route other than
# our own bridge's covers or lies inside it. The namespaces get no default route, and nothing here enables
# forwarding or NAT, so their traffic cannot leave the bridge. A start that fails tears down what it made.
#
# Inside every node the interface is called fhv0 (same name on every node: one FI_TCP_IFACE / GLOO_SOCKET_IFNAME
# / btl_tcp_if_include for the whole job). Nodes are fhvn1..fhvnN at .11, .12, ...; the controller (slurmctld, in this machine's own namespace and under its hostname) listens on .1.
# Knobs: FHV_MN_STATE (/tmp/fedhypevae-multinode), FHV_MN_CPUS (2 per node), FHV_MN_SUBNET.
set -euo pipefail
STATE=${FHV_MN_STATE:-/tmp/fedhypevae-multinode}
CONF=$STATE/etc/slurm.conf
RUN=$STATE/run
LOG=$STATE/log
CPUS=${FHV_MN_CPUS:-2}
SUBNET=${FHV_MN_SUBNET:-10.213.7.0/24}
BR=fhvbr0
MARK="# fedhypevae-multinode"
export SLURM_CONF=$CONF DEBIAN_FRONTEND=noninteractive
PREFIX=${SUBNET%.*}           # 10.213.7
CTL_ADDR=$PREFIX.1
node_addr() { echo "$PREFIX.$((10 + ${1#fhvn}))"; }

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
nodes_made() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^fhvn[0-9]+$' || true; }
kill_netns_procs() {  # every process living in the node's network namespace (slurmd, slurmstepd, ranks)
  local pids; pids=$(ip netns pids "$1" 2>/dev/null || true)
  [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
}

teardown() {
  local n
  for n in $(nodes_made); do
    kill_netns_procs "$n"  # slurmd with the rest, at once (a TERM'd slurmd takes seconds to exit)
    stop_pid "$RUN/slurmd-$n.pid"
    ip netns del "$n" 2>/dev/null || true
    ip link del "v$n" 2>/dev/null || true
  done
  stop_pid "$RUN/slurmctld.pid"
  stop_pid "$RUN/munged.pid"  # only when this script started it
  ip link del "$BR" 2>/dev/null || true
  if grep -q "$MARK" /etc/hosts 2>/dev/null; then
    grep -v "$MARK" /etc/hosts > /etc/hosts.fhv-new || true
    cat /etc/hosts.fhv-new > /etc/hosts; rm -f /etc/hosts.fhv-new  # in place: /etc/hosts may be a bind mount
  fi
  clean_stale_shm
}

start_slurmd() {  # in the node's network namespace, with its own hostname
  local n=$1
  running "$RUN/slurmd-$n.pid" && return 0
  # nsenter, not `ip netns exec`: that remounts /sys, and slurmd wants the machine's /sys/fs/cgroup
  nsenter --net="/run/netns/$n" unshare --uts sh -c "hostname $n && exec /usr/sbin/slurmd -N $n -f $CONF"
}

case "${1:-start}" in
  stop) teardown; echo "multinode cluster stopped"; exit 0 ;;
  kill-node)  # SIGKILL, all at once: slurmd, slurmstepd and the job's processes in the node's namespace
    kill_netns_procs "$2"; rm -f "$RUN/slurmd-$2.pid"; echo "killed $2"; exit 0 ;;
  cut-node) ip netns exec "$2" ip link set fhv0 down; echo "cut $2 off the network"; exit 0 ;;
  revive-node)
    ip netns exec "$2" ip link set fhv0 up
    start_slurmd "$2"; scontrol update NodeName="$2" State=RESUME 2>/dev/null || true
    echo "revived $2"; exit 0 ;;
  run)
    shift; args=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do args+=("$1"); shift; done
    [ "${1:-}" = -- ] && shift
    [ $# -gt 0 ] || { echo "usage: $0 run [--nodes N] -- CMD ..."; exit 2; }
    trap 'bash "$0" stop >/dev/null 2>&1' EXIT
    trap 'exit 130' INT TERM
    bash "$0" "${args[@]}" | tail -n 1
    "$@"
    exit $? ;;
  start|--nodes) ;;
  *) echo "usage: $0 [--nodes N] | run [--nodes N] -- CMD | stop | kill-node NAME | cut-node NAME | revive-node NAME"
     exit 2 ;;
esac
N=3
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) N=$2; shift 2 ;;
    start) shift ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
done
[[ "$N" =~ ^[1-9][0-9]?$ ]] || { echo "--nodes must be 1-99; got $N"; exit 2; }
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces, a bridge, slurmd as root)"; exit 3; }
[[ "$SUBNET" =~ ^([0-9]+\.){3}0/24$ ]] || { echo "FHV_MN_SUBNET must be a /24 like 10.213.7.0/24; got $SUBNET"; exit 2; }
command -v ip >/dev/null && command -v unshare >/dev/null && command -v nsenter >/dev/null \
  || { echo "needs ip (iproute2), unshare and nsenter (util-linux)"; exit 3; }

# 0. the subnet must be ours alone: no route (other than our bridge's) that covers it or lies inside it
others=$( { ip -o route show match "$SUBNET"; ip -o route show root "$SUBNET"; } 2>/dev/null \
  | grep -v '^default' | grep -v " dev $BR " | sort -u | tr -s ' \n' ' ' || true)
if [ -n "$others" ]; then
  echo "subnet $SUBNET overlaps a route of this machine: $others (set FHV_MN_SUBNET)"; exit 4
fi
# a different N than a running cluster has: start again from nothing
have=$(nodes_made | wc -l)
if [ "$have" -ne 0 ] && [ "$have" -ne "$N" ]; then teardown; fi
trap 'status=$?; if [ $status -ne 0 ]; then echo "start failed ($status): tearing down"; teardown; fi' EXIT

# 1. packages
install_slurm
mkdir -p "$STATE/etc" "$RUN" "$LOG" "$STATE/ctld"

# 2. munge (a Unix socket under /run/munge: every namespace reaches it)
start_munge "$RUN"
clean_stale_shm

# 3. the network: a bridge with the controller's address, one namespace + veth pair per node
if ! ip link show "$BR" >/dev/null 2>&1; then
  ip link add "$BR" type bridge
  ip addr add "$CTL_ADDR/24" dev "$BR"
fi
ip link set "$BR" up
names=()
for i in $(seq "$N"); do
  n=fhvn$i; names+=("$n"); a=$(node_addr "$n")
  if ! ip netns list | awk '{print $1}' | grep -qx "$n"; then
    ip netns add "$n"
    ip link add "v$n" type veth peer name "p$n"
    ip link set "p$n" netns "$n"
    ip netns exec "$n" ip link set "p$n" name fhv0
    ip netns exec "$n" ip addr add "$a/24" dev fhv0
    ip netns exec "$n" ip link set lo up
    ip netns exec "$n" ip link set fhv0 up
    ip link set "v$n" master "$BR"
    ip link set "v$n" up
  fi
done
# names in /etc/hosts (shared by the namespaces); our lines carry a marker so that stop removes exactly them
{ grep -v "$MARK" /etc/hosts || true
  echo "$CTL_ADDR fhvctl $MARK"
  for n in "${names[@]}"; do echo "$(node_addr "$n") $n $MARK"; done
} > /etc/hosts.fhv-new
cat /etc/hosts.fhv-new > /etc/hosts; rm -f /etc/hosts.fhv-new

# 4. slurm.conf: one slurmd per node (spool, pid and log per node via %n), failures noticed in seconds
NODELIST="fhvn[1-$N]"; [ "$N" = 1 ] && NODELIST=fhvn1
{ common_conf; cat <<EOF
ClusterName=fedhypevae-multinode
SlurmctldHost=$(hostname -s)($CTL_ADDR)
AuthInfo=cred_expire=5
SlurmctldPort=6917
SlurmdPort=6918
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmdTimeout=10
MessageTimeout=5
TCPTimeout=3
KillWait=3
SlurmdParameters=config_overrides
NodeName=fhvn[1-$N] NodeAddr=$PREFIX.[$((10 + 1))-$((10 + N))] CPUs=$CPUS RealMemory=2000 State=UNKNOWN
PartitionName=mn Nodes=$NODELIST Default=YES MaxTime=INFINITE State=UP
EOF
} > "$CONF.new"
if [ "$N" = 1 ]; then sed -i "s/^NodeName=.*/NodeName=fhvn1 NodeAddr=$PREFIX.11 CPUs=$CPUS RealMemory=2000 State=UNKNOWN/" "$CONF.new"; fi
if cmp -s "$CONF.new" "$CONF"; then rm -f "$CONF.new"; else
  mv "$CONF.new" "$CONF"
  for n in "${names[@]}"; do stop_pid "$RUN/slurmd-$n.pid"; done
  stop_pid "$RUN/slurmctld.pid"
fi
for n in "${names[@]}"; do mkdir -p "$STATE/spool/$n"; done
[ -f "$STATE/etc/cgroup.conf" ] || echo "CgroupPlugin=autodetect" > "$STATE/etc/cgroup.conf"

# 5. daemons: slurmctld in this namespace on the bridge's address, one slurmd inside each node
running "$RUN/slurmctld.pid" || /usr/sbin/slurmctld -i -f "$CONF"
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
scontrol ping | grep -q 'is UP' || { echo "slurmctld did not come up"; tail -n 20 "$LOG/slurmctld.log"; exit 1; }
for n in "${names[@]}"; do start_slurmd "$n"; done

# 6. wait until every node is idle
for _ in $(seq 150); do
  bad=0
  for n in "${names[@]}"; do
    st=$(sinfo -h -N -n "$n" -o '%T' 2>/dev/null | head -n1 || true)
    case "$st" in
      idle|mixed|allocated) ;;
      *drain*|*down*|*inval*|*fail*) bad=1; scontrol update NodeName="$n" State=RESUME 2>/dev/null || true ;;
      *) bad=1 ;;
    esac
  done
  [ $bad = 0 ] && break
  sleep 0.2
done
if [ $bad != 0 ]; then
  echo "nodes not ready:"; sinfo -N; tail -n 20 "$LOG"/slurmctld.log; exit 1
fi
trap - EXIT
echo "SLURM_CONF=$CONF"
