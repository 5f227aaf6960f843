#!/usr/bin/env bash
# A real one-node SLURM (Debian's slurm-wlm + munge) for the integration tests, on a root machine without
# systemd. Installs the packages when they are missing (apt-get), writes its own slurm.conf under $STATE,
# starts munged, slurmctld and slurmd, and waits until the node is idle. Idempotent.
#
#   bash tests/slurm/cluster.sh          start (install first if needed); prints the SLURM_CONF to export
#   bash tests/slurm/cluster.sh stop     stop the daemons it started
#
# Knobs: FHV_SLURM_STATE (/tmp/fedhypevae-slurm), FHV_SLURM_CPUS (4: lets 2 jobs of 2 ranks run side by side on
# 2 cores), FHV_SLURM_PMIX (0; 1 installs libpmix-dev so that `srun --mpi=pmix` works for Open MPI).
# No accounting daemon: the sweep reads job states from squeue/scontrol, not sacct.
set -euo pipefail
STATE=${FHV_SLURM_STATE:-/tmp/fedhypevae-slurm}
CONF=$STATE/etc/slurm.conf
RUN=$STATE/run
LOG=$STATE/log
NODE=$(hostname -s)
CPUS=${FHV_SLURM_CPUS:-4}
PMIX=${FHV_SLURM_PMIX:-0}
export SLURM_CONF=$CONF DEBIAN_FRONTEND=noninteractive

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [ "${1:-}" = stop ]; then
  for d in slurmd slurmctld munged; do stop_pid "$RUN/$d.pid"; done
  clean_stale_shm
  echo "slurm stopped"; exit 0
fi
[ "$(id -u)" = 0 ] || { echo "needs root (installs packages and runs the daemons as root)"; exit 3; }

# 1. packages
pkgs=()
[ "$PMIX" = 1 ] && [ ! -e /usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.so ] && pkgs+=(libpmix-dev)
install_slurm "${pkgs[@]}"
mkdir -p "$STATE/etc" "$RUN" "$LOG" "$STATE/ctld" "$STATE/spool"

# 2. munge
start_munge "$RUN"
clean_stale_shm

# 3. slurm.conf: one node, no cgroups, requeue allowed, short credential expiry so requeued jobs start soon
MEM=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 ))
EXTRA=""; [ "$CPUS" -gt "$(nproc)" ] && EXTRA="SlurmdParameters=config_overrides"
{ common_conf; cat <<EOF
ClusterName=fedhypevae-ci
SlurmctldHost=$NODE(127.0.0.1)
AuthInfo=cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
KillWait=5
MessageTimeout=10
MaxArraySize=1001
$EXTRA
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
} > "$CONF.new"
[ -f "$STATE/etc/cgroup.conf" ] || echo "CgroupPlugin=autodetect" > "$STATE/etc/cgroup.conf"
if cmp -s "$CONF.new" "$CONF"; then rm -f "$CONF.new"; else
  mv "$CONF.new" "$CONF"; stop_pid "$RUN/slurmd.pid"; stop_pid "$RUN/slurmctld.pid"
fi

# 4. daemons (both fork and write their pid files)
running "$RUN/slurmctld.pid" || /usr/sbin/slurmctld -i
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
running "$RUN/slurmd.pid" || /usr/sbin/slurmd -N "$NODE"

# 5. wait for an idle node
st=""
for _ in $(seq 150); do
  st=$(sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1 || true)
  case "$st" in
    idle|mixed|allocated) break ;;
    *drain*|*down*|*inval*|*fail*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.2
done
if [[ ! "$st" =~ ^(idle|mixed|allocated)$ ]]; then
  echo "slurm node not ready: '$st'"; tail -n 20 "$LOG"/slurm*.log; exit 1
fi
echo "SLURM_CONF=$CONF"
