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

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_one() {
  local pidfile=$1 pid
  if running "$pidfile"; then
    pid=$(cat "$pidfile"); kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true   # a wedged slurmstepd can keep slurmd from exiting
  fi
  rm -f "$pidfile"
}
if [ "${1:-}" = stop ]; then
  for d in slurmd slurmctld munged; do stop_one "$RUN/$d.pid"; done
  echo "slurm stopped"; exit 0
fi
[ "$(id -u)" = 0 ] || { echo "needs root (installs packages and runs the daemons as root)"; exit 3; }

# 1. packages
need=()
for c in slurmctld slurmd sbatch; do command -v $c >/dev/null || { need+=(slurm-wlm); break; }; done
command -v munged >/dev/null || need+=(munge)
[ "$PMIX" = 1 ] && [ ! -e /usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.so ] && need+=(libpmix-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} ..."
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
mkdir -p "$STATE/etc" "$RUN" "$LOG" "$STATE/ctld" "$STATE/spool"

# 2. munge: clients use the compiled-in socket under /run/munge
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key --force
chown munge:munge /etc/munge /etc/munge/munge.key; chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 755 /run/munge
install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid --log-file=/var/log/munge/munged.log
  for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  cp /run/munge/munged.pid "$RUN/munged.pid"
fi
munge -n | unmunge >/dev/null

# 3. slurm.conf: one node, no cgroups, requeue allowed, short credential expiry so requeued jobs start soon
MEM=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 ))
EXTRA=""; [ "$CPUS" -gt "$(nproc)" ] && EXTRA="SlurmdParameters=config_overrides"
cat > "$CONF.new" <<EOF
ClusterName=fedhypevae-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
MinJobAge=300
KillWait=5
InactiveLimit=0
MessageTimeout=10
Waittime=0
MaxArraySize=1001
JobRequeue=1
$EXTRA
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
[ -f "$STATE/etc/cgroup.conf" ] || echo "CgroupPlugin=autodetect" > "$STATE/etc/cgroup.conf"
if cmp -s "$CONF.new" "$CONF"; then rm -f "$CONF.new"; else
  mv "$CONF.new" "$CONF"; stop_one "$RUN/slurmd.pid"; stop_one "$RUN/slurmctld.pid"
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
