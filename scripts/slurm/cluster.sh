#!/usr/bin/env bash
# A private single-node Slurm cluster, for CI and for trying the sbatch
# scripts on one machine. Debian bookworm's packages (Slurm 22.05, munge
# 0.5.15), run as root, without systemd: every daemon is started by hand
# with its configuration, state, sockets, pid files and logs under one
# folder, so nothing under /etc, /run or /var is used or changed.
#
#   cluster.sh install     apt-get the daemons and clients if missing
#   cluster.sh start DIR   write DIR/slurm.conf, start munged, slurmctld,
#                          slurmd; wait for the node to be idle; write
#                          DIR/env.sh (`source DIR/env.sh` sets SLURM_CONF)
#   cluster.sh stop DIR    cancel the jobs, stop the daemons by their pid
#                          files (TERM, 10 s, KILL); fine if some never ran
#   cluster.sh logs DIR    print the daemons' logs
#   cluster.sh status DIR  print sinfo and squeue
#
# DIR is created if needed; `start` first stops whatever an earlier start
# in the same DIR left running and wipes its state, so it can be rerun.
# Environment: AVP_SLURMCTLD_PORT (6817) and AVP_SLURMD_PORT (6818), the
# TCP ports of the two daemons; AVP_SLURM_START_TIMEOUT (60 s).
set -euo pipefail

CTLD_PORT=${AVP_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${AVP_SLURMD_PORT:-6818}
START_TIMEOUT=${AVP_SLURM_START_TIMEOUT:-60}

die() { echo "cluster.sh: $*" >&2; exit 1; }

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}

install() {
  local missing=() b
  for b in slurmctld slurmd sbatch munged; do
    command -v "$b" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$b" >/dev/null 2>&1 || missing+=("$b")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "slurm: already installed ($(slurmd -V 2>/dev/null), $(munged --version 2>&1 | awk "{print \$1; exit}"))"
    return 0
  fi
  echo "slurm: installing (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Recommends would add ~20 plugin and -dev packages nobody here uses.
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  echo "slurm: installed $(slurmd -V 2>/dev/null), $(munged --version 2>&1 | awk "{print \$1; exit}")"
}

# alive PID: the process exists and is not a zombie.
alive() {
  local pid=$1 state
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
  state=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

# stop_pid NAME PIDFILE: TERM, up to 10 s, then KILL.
stop_pid() {
  local name=$1 pidfile=$2 pid comm i
  if [ ! -s "$pidfile" ]; then
    echo "stop: $name: no pid file (not started)"
    return 0
  fi
  pid=$(tr -dc 0-9 < "$pidfile")
  if ! alive "$pid"; then
    echo "stop: $name: pid $pid not running"
    rm -f "$pidfile"
    return 0
  fi
  comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
  if [ "$comm" != "$name" ]; then
    echo "stop: $name: pid $pid is now '$comm', not ours; left alone"
    rm -f "$pidfile"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 100); do
    alive "$pid" || break
    sleep 0.1
  done
  if alive "$pid"; then
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.2
    echo "stop: $name: pid $pid killed (did not stop within 10 s of TERM)"
  else
    echo "stop: $name: pid $pid stopped"
  fi
  rm -f "$pidfile"
}

# Job steps (slurmstepd, and the job under it) outlive slurmd: those of
# this DIR's slurmd carry the marker it was started with in their
# environment; the job's processes are found as their descendants.
stray_steps() {
  local dir=$1 p pid
  local -a roots=()
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    [ "$(cat "$p/comm" 2>/dev/null)" = slurmstepd ] || continue
    if tr '\0' '\n' 2>/dev/null < "$p/environ" | grep -qxF "AVP_SLURM_CLUSTER=$dir"; then
      alive "$pid" && roots+=("$pid")
    fi
  done
  [ ${#roots[@]} -gt 0 ] || return 0
  # Every process whose chain of parents reaches a root.
  for p in /proc/[0-9]*; do
    sed -n 's/^\([0-9]*\) .*) [A-Za-z] \([0-9]*\) .*/\1 \2/p' "$p/stat" 2>/dev/null || true
  done | awk -v roots="${roots[*]}" '
    BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
    { parent[$1] = $2 }
    END {
      for (p in parent) {
        q = p
        for (d = 0; d < 64 && q > 1; d++) { if (q in keep) { print p; break } q = parent[q] }
      }
    }'
}

stop() {
  local dir=$1 pids i
  [ -d "$dir" ] || { echo "stop: $dir does not exist: nothing to stop"; return 0; }
  dir=$(cd "$dir" && pwd)
  # Cancel the jobs first, so that their steps end while slurmd can still
  # clean them up.
  if [ -f "$dir/slurm.conf" ] && [ -s "$dir/run/slurmctld.pid" ] && alive "$(cat "$dir/run/slurmctld.pid")"; then
    local n
    n=$(SLURM_CONF=$dir/slurm.conf timeout 10 squeue -h -t PENDING,RUNNING,REQUEUED,SUSPENDED,CONFIGURING -o %i 2>/dev/null | wc -l || echo 0)
    if [ "$n" -gt 0 ]; then
      echo "stop: cancelling $n unfinished job(s)"
      SLURM_CONF=$dir/slurm.conf timeout 10 scancel --user=root 2>/dev/null || true
      for i in $(seq 50); do
        [ -z "$(stray_steps "$dir")" ] && break
        sleep 0.2
      done
    fi
  fi
  stop_pid slurmd "$dir/run/slurmd.pid"
  stop_pid slurmctld "$dir/run/slurmctld.pid"
  stop_pid munged "$dir/munge/munged.pid"
  pids=$(stray_steps "$dir" | tr '\n' ' ')
  if [ -n "${pids// /}" ]; then
    echo "stop: killing leftover job processes: $pids"
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
  fi
}

logs() {
  local dir=$1 f
  for f in "$dir"/log/*.log; do
    [ -e "$f" ] || continue
    echo "----- $f (last 100 lines)"
    tail -n 100 "$f"
  done
}

status() {
  local dir=$1
  export SLURM_CONF=$dir/slurm.conf
  sinfo || true
  squeue -a || true
}

port_in_use() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

start() {
  local dir=$1 host cpus mem i state
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  # Leftovers of an earlier start in the same folder.
  stop "$dir" >/dev/null
  rm -rf "$dir/state" "$dir/spool" "$dir/log" "$dir/run" "$dir/munge" "$dir/slurm.conf" "$dir/cgroup.conf" \
      "$dir/plugstack.conf" "$dir/env.sh"
  for i in "$CTLD_PORT" "$SLURMD_PORT"; do
    port_in_use "$i" && die "port $i is in use (another slurm?); set AVP_SLURMCTLD_PORT/AVP_SLURMD_PORT"
  done
  # munged refuses a socket whose folders are not searchable by all, and a
  # key or socket folder writable by others.
  chmod 0755 "$dir"
  mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/run" "$dir/munge"
  chmod 0755 "$dir/munge"
  chmod 0700 "$dir/state" "$dir/spool"
  if command -v mungekey >/dev/null 2>&1; then
    mungekey --create --keyfile="$dir/munge/munge.key"
  else
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1 count=1024 status=none
  fi
  chmod 0400 "$dir/munge/munge.key"

  host=$(hostname -s)
  cpus=$(nproc)
  # slurmd -C prints the memory it will report; configure a bit less, or
  # the node is drained for "Low RealMemory".
  mem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
  [ -n "$mem" ] || mem=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)
  mem=$(( mem * 95 / 100 ))
  : > "$dir/plugstack.conf"
  # Not read with the plugins below; there so nothing looks in /etc/slurm.
  cat > "$dir/cgroup.conf" <<EOF
CgroupPlugin=autodetect
EOF
  cat > "$dir/slurm.conf" <<EOF
# Written by scripts/slurm/cluster.sh: one node, everything under $dir.
ClusterName=avp
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$dir/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Finished jobs stay visible to scontrol for an hour (there is no sacct).
MinJobAge=3600
ReturnToService=2
JobRequeue=1
# A cancelled or requeued task gets 5 s between TERM and KILL.
KillWait=5
InactiveLimit=0
Waittime=0
SlurmdTimeout=300
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  cat > "$dir/env.sh" <<EOF
# source this: the clients (sbatch, squeue, scontrol, sinfo) of $dir's cluster.
export SLURM_CONF=$dir/slurm.conf
EOF

  local t0=$SECONDS
  munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
      --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
      --seed-file="$dir/munge/munged.seed" \
    || { logs "$dir" >&2; die "munged did not start"; }
  # The daemons' environment marks their job steps for `stop`.
  export SLURM_CONF=$dir/slurm.conf AVP_SLURM_CLUSTER=$dir
  slurmctld -c -f "$dir/slurm.conf" || { logs "$dir" >&2; stop "$dir" >&2; die "slurmctld did not start"; }
  slurmd -c -f "$dir/slurm.conf" || { logs "$dir" >&2; stop "$dir" >&2; die "slurmd did not start"; }
  unset AVP_SLURM_CLUSTER
  state=
  for i in $(seq $(( START_TIMEOUT * 5 ))); do
    state=$(sinfo -h -n "$host" -o %t 2>/dev/null | head -1 || true)
    [ "$state" = idle ] && break
    sleep 0.2
  done
  if [ "$state" != idle ]; then
    echo "cluster.sh: node $host is '${state:-unknown}' after ${START_TIMEOUT}s, not idle" >&2
    sinfo -N -l >&2 || true
    logs "$dir" >&2
    stop "$dir" >&2
    exit 1
  fi
  echo "slurm: cluster avp up in $(( SECONDS - t0 ))s: node $host, $cpus CPUs, ${mem} MB; source $dir/env.sh"
}

[ $# -ge 1 ] || usage
cmd=$1
shift
case $cmd in
  install) install ;;
  start | stop | logs | status)
    [ $# -eq 1 ] || usage
    "$cmd" "$1"
    ;;
  *) usage ;;
esac
