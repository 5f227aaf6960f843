# Shared by cluster.sh (one node) and multinode.sh (simulated nodes): sourced, not run.
#   alive PID / running PIDFILE  the process (named by the pid file) lives and is not a zombie
#   stop_pid PIDFILE           TERM, up to 3 s, then KILL; removes the pid file
#   install_slurm [PKG ...]    slurm-wlm and munge (and PKG) with apt-get where missing
#   start_munge RUN            munged as user munge unless one answers; its pid in RUN/munged.pid when started here
#   common_conf                the slurm.conf lines both clusters share (root daemons, munge, no cgroups or
#                              accounting, cons_tres by CPU, backfill every 2 s, requeue allowed)
#   clean_stale_shm            removes MPICH shared-memory segments that no process maps (see below)

# a zombie is not running: a killed daemon whose parent was init stays one where init does not reap (a container)
alive() { local st; st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) && [ -n "$st" ] && [ "$st" != Z ]; }
running() { [ -s "$1" ] && alive "$(cat "$1")"; }

stop_pid() {
  local pidfile=$1 pid
  if running "$pidfile"; then
    pid=$(cat "$pidfile"); kill "$pid" 2>/dev/null || true
    for _ in $(seq 30); do alive "$pid" || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true  # a wedged slurmstepd can keep slurmd from exiting
  fi
  rm -f "$pidfile"
}

install_slurm() {
  local need=("$@") c
  for c in slurmctld slurmd sbatch; do command -v $c >/dev/null || { need+=(slurm-wlm); break; }; done
  command -v munged >/dev/null || need+=(munge)
  if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]} ..."
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
}

start_munge() {  # clients use the compiled-in socket under /run/munge (a Unix socket: every namespace reaches it)
  local run=$1
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key --force
  chown munge:munge /etc/munge /etc/munge/munge.key; chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid --log-file=/var/log/munge/munged.log
    for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
    cp /run/munge/munged.pid "$run/munged.pid"  # ours: stop ends it
  fi
  munge -n | unmunge >/dev/null
}

common_conf() {
  cat <<'CONF'
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
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
InactiveLimit=0
Waittime=0
MinJobAge=300
JobRequeue=1
CONF
}

# MPICH names a node's shared-memory segment after its PMI job (/dev/shm/mpich_shm_<hash of the job id>_<n>) and
# unlinks it only in MPI_Finalize, so a job killed on the node leaves it behind; a later job whose id hashes the
# same - a fresh test cluster numbers jobs from 1 again - attaches to the stale segment and dies in MPI_Init
# ("Message from rank 1 and tag 7 truncated", "UCX ERROR failed to unpack address"). Both clusters call this when
# they start and stop: it removes the segments no live process maps that are older than 5 s (one being created
# right now is left alone). A real cluster's job ids do not repeat, and its epilog usually empties /dev/shm.
clean_stale_shm() {
  local mapped f n=0
  mapped=$(cat /proc/[0-9]*/maps 2>/dev/null | grep -o '/dev/shm/mpich_shm_[0-9a-f]*_[0-9]*' | sort -u || true)
  for f in /dev/shm/mpich_shm_*; do
    [ -e "$f" ] || continue
    grep -qxF "$f" <<<"$mapped" && continue
    [ $(( $(date +%s) - $(stat -c %Y "$f" 2>/dev/null || date +%s) )) -gt 5 ] || continue
    rm -f "$f" && n=$((n + 1))
  done
  [ "$n" = 0 ] || echo "removed $n stale MPICH shared-memory segment(s) from /dev/shm"
}
