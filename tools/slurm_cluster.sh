#!/usr/bin/env bash
# A real, local Slurm cluster for the tests: munge, MariaDB + slurmdbd (accounting, so that
# `sacct` and submitit work), slurmctld and one or two slurmd nodes on this host.
#
#   bash tools/slurm_cluster.sh start [--nodes 1|2]   # install if needed, start, wait until idle
#   bash tools/slurm_cluster.sh status                # daemons, nodes, exit 0 when up
#   bash tools/slurm_cluster.sh stop                  # cancel jobs, stop what `start` started
#   source "$(bash tools/slurm_cluster.sh env)"       # SLURM_CONF for sbatch/squeue/sacct
#
# Design choices:
# - Needs root (daemons, apt-get, /etc/hosts) and Debian packages; installs them with apt-get
#   when missing. Exit code 3 means "cannot run here" (no root or no apt-get): the test fixtures
#   turn that into a skip outside CI and into a failure when CI=true.
# - Everything lives under $SEG_SLURM_DIR (default /tmp/seg-slurm): configs, state, spool, logs,
#   the MariaDB data folder. Daemons and clients find the config through SLURM_CONF, so no file
#   in /etc/slurm is written. Non-default ports (slurmctld 16817, slurmdbd 16819, MariaDB 13306
#   on 127.0.0.1, slurmd 17001-17002) keep clear of a system Slurm.
# - Nodes are node1 (and node2): several slurmd on one host (MULTIPLE_SLURMD), each with its own
#   port, so multi-node jobs run for real. Jobs use node names as rendezvous hosts, so
#   `127.0.0.1 node1 node2` is added to /etc/hosts once (a marked line, left in place).
# - No systemd: each daemon is started here and its PID recorded in $SEG_SLURM_DIR/pids with its
#   command name; `stop` kills exactly those PIDs after checking /proc/PID/comm, never by name.
#   An already running munged is reused and left alone.
# - `start` always wipes the controller state (job ids restart at 1): tests use fresh output
#   folders. Changing the node count means stop + start (slurmctld cannot change nodes live).
# - Scheduling is tuned for fast tests: cred_expire=10 and bf_interval=2 make a requeued job
#   restart within about 15 s; config_overrides lets each node declare more CPUs than exist.
set -euo pipefail

STATE="${SEG_SLURM_DIR:-/tmp/seg-slurm}"
CONF="$STATE/etc/slurm.conf"
PIDS="$STATE/pids"
CPUS_PER_NODE="${SEG_SLURM_CPUS:-4}"
CTLD_PORT=16817 DBD_PORT=16819 DB_PORT=13306 SLURMD_PORT0=17000
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
export SLURM_CONF="$CONF"

log() { echo "[slurm_cluster] $*" >&2; }
die() { log "error: $1"; exit "${2:-1}"; }

cannot_run_here() {
  if [ "$(id -u)" != 0 ]; then echo "not root (daemons and apt-get need root)"; return 0; fi
  if ! command -v slurmctld >/dev/null || ! command -v mariadbd >/dev/null \
     || ! command -v slurmdbd >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || { echo "Slurm is not installed and there is no apt-get"; return 0; }
  fi
  return 1
}

install_packages() {
  local missing=0 b
  for b in slurmctld slurmd sbatch sacct munged mariadbd mariadb-install-db slurmdbd; do
    command -v "$b" >/dev/null || missing=1
  done
  [ "$missing" = 0 ] && return 0
  log "installing ${PACKAGES[*]} with apt-get (about 30 s)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >"$STATE/log/apt.log" 2>&1 || die "apt-get update failed; see $STATE/log/apt.log"
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >>"$STATE/log/apt.log" 2>&1 \
    || die "apt-get install ${PACKAGES[*]} failed; see $STATE/log/apt.log"
}

record() { # record NAME PID: remember a daemon we started; NAME is its command name (/proc/PID/comm)
  [ -n "$2" ] || die "$1 did not start; see $STATE/log/"
  local deadline=$((SECONDS + 10)) comm=""
  # A background start is briefly a forked shell: wait until the PID runs the daemon itself.
  until comm="$(cat "/proc/$2/comm" 2>/dev/null)" && [ "$comm" = "$1" ]; do
    [ -e "/proc/$2" ] || die "$1 (pid $2) exited at start; see $STATE/log/"
    [ "$SECONDS" -ge "$deadline" ] && die "pid $2 runs '$comm', not $1; see $STATE/log/"
    sleep 0.1
  done
  echo "$1 $2 $comm" >>"$PIDS"
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what="$2"; shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -ge "$deadline" ] && die "timed out waiting for $what; logs are in $STATE/log/"
    sleep 0.3
  done
}

pid_from_file() { wait_for 20 "pid file $1" test -s "$1"; tr -d ' \n' <"$1"; }

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then log "munged already running: reusing it"; return; fi
  mkdir -p /run/munge && chown munge: /run/munge
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged --force
  record munged "$(pid_from_file /run/munge/munged.pid)"
  wait_for 10 munge sh -c 'munge -n | unmunge'
}

start_mariadb() {
  local db="$STATE/mysql" sock="$STATE/run/mysqld.sock"
  mkdir -p "$db" && chown mysql: "$db" "$STATE/run"
  mariadb-install-db --user=mysql --datadir="$db" --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 \
    || die "mariadb-install-db failed; see $STATE/log/mariadb-install.log"
  setsid mariadbd --user=mysql --datadir="$db" --socket="$sock" --bind-address=127.0.0.1 \
    --port="$DB_PORT" --pid-file="$STATE/run/mariadbd.pid" --log-error="$db/mariadb.log" \
    </dev/null >/dev/null 2>&1 &
  record mariadbd "$!"
  wait_for 30 MariaDB mariadb --socket="$sock" -uroot -e 'SELECT 1'
  mariadb --socket="$sock" -uroot -e "
    CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'seg-slurm';
    CREATE USER 'slurm'@'localhost' IDENTIFIED BY 'seg-slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

write_configs() {
  local nodes="$1" host mem last
  host="$(hostname -s)"
  mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 8 / 10 / nodes ))
  last=$((SLURMD_PORT0 + nodes))
  cat >"$STATE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=seg-slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$STATE/etc/slurmdbd.conf"
  cat >"$CONF" <<EOF
# Written by tools/slurm_cluster.sh: a local test cluster of $nodes node(s) on $host.
ClusterName=segci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool/slurmd-%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=bf_interval=2
SlurmdParameters=config_overrides
MailProg=/bin/true
ReturnToService=2
MpiDefault=none
JobRequeue=1
MinJobAge=600
KillWait=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/none
NodeName=node[1-$nodes] NodeHostname=$host NodeAddr=127.0.0.1 Port=[$((SLURMD_PORT0 + 1))-$last] CPUs=$CPUS_PER_NODE Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS_PER_NODE ThreadsPerCore=1 RealMemory=$mem
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

ensure_hosts() {
  local names="" i
  for i in $(seq 1 "$1"); do getent hosts "node$i" >/dev/null || names="$names node$i"; done
  [ -z "$names" ] || { echo "127.0.0.1$names  # seg-slurm test nodes" >>/etc/hosts; log "added$names to /etc/hosts"; }
}

nodes_idle() {
  local states; states="$(sinfo -h -N -o %T 2>/dev/null | sort -u)"
  [ "$states" = idle ]
}

nodes_idle_or_busy() { # every node is up (idle, allocated, mixed, completing)
  local states; states="$(sinfo -h -N -o %T 2>/dev/null)" || return 1
  [ -n "$states" ] && ! grep -qE 'down|drain|unk|fail|not_responding|\*' <<<"$states"
}

cmd_start() {
  local nodes=2
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes) nodes="$2"; shift 2 ;;
      *) die "unknown option $1; usage: slurm_cluster.sh start [--nodes 1|2]" 2 ;;
    esac
  done
  case "$nodes" in 1|2) ;; *) die "--nodes $nodes: use 1 or 2" 2 ;; esac
  local why; if why="$(cannot_run_here)"; then die "cannot start a local Slurm cluster: $why" 3; fi
  if [ -s "$PIDS" ] && [ "$(sinfo -h -N -o %N 2>/dev/null | wc -l)" = "$nodes" ] && nodes_idle_or_busy; then
    log "already running with $nodes node(s) under $STATE"; echo "$STATE/env"; return 0
  fi
  [ -s "$PIDS" ] && cmd_stop
  local port
  for port in $DB_PORT $DBD_PORT $CTLD_PORT $(seq $((SLURMD_PORT0 + 1)) $((SLURMD_PORT0 + nodes))); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      die "port $port is already in use (a cluster left over from another state folder?): stop that process first" 1
    fi
  done
  rm -rf "$STATE"
  mkdir -p "$STATE"/{etc,state,spool,run,log}
  chmod 755 "$STATE"
  install_packages
  local t0=$SECONDS
  write_configs "$nodes"
  ensure_hosts "$nodes"
  : >"$PIDS"
  start_munge
  start_mariadb
  slurmdbd  # reads slurmdbd.conf next to $SLURM_CONF
  record slurmdbd "$(pid_from_file "$STATE/run/slurmdbd.pid")"
  wait_for 30 slurmdbd bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT"
  slurmctld -i -f "$CONF"
  record slurmctld "$(pid_from_file "$STATE/run/slurmctld.pid")"
  wait_for 30 slurmctld scontrol ping
  local i
  for i in $(seq 1 "$nodes"); do
    slurmd -N "node$i" -f "$CONF"
    record slurmd "$(pid_from_file "$STATE/run/slurmd-node$i.pid")"
  done
  wait_for 60 "nodes to be idle (sinfo -N)" nodes_idle
  wait_for 30 "accounting (sacct)" sacct -n -X
  echo "export SLURM_CONF=$CONF" >"$STATE/env"
  log "up in $((SECONDS - t0)) s: $nodes node(s), $CPUS_PER_NODE CPUs each; export SLURM_CONF=$CONF"
  echo "$STATE/env"
}

cmd_stop() {
  [ -s "$PIDS" ] || { log "nothing to stop ($PIDS is empty or missing)"; return 0; }
  if command -v squeue >/dev/null && scontrol ping >/dev/null 2>&1; then
    local jobs; jobs="$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')"
    if [ -n "${jobs// }" ]; then
      log "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      local deadline=$((SECONDS + 40))
      while [ -n "$(squeue -h -o %A 2>/dev/null)" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 1; done
    fi
  fi
  local name pid comm
  # Stop in reverse start order: nodes, controller, slurmdbd, MariaDB, munged.
  tac "$PIDS" | while read -r name pid comm; do
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$comm" ]; then
      log "$name (pid $pid) is no longer running"; continue
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ] || break; sleep 0.2; done
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]; then
      log "$name (pid $pid) ignored SIGTERM: sending SIGKILL"; kill -KILL "$pid" 2>/dev/null || true
    fi
    log "stopped $name (pid $pid)"
  done
  : >"$PIDS"
}

cmd_status() {
  if [ ! -s "$PIDS" ]; then echo "not running (no $PIDS)"; return 1; fi
  local name pid comm ok=0
  while read -r name pid comm; do
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]; then echo "$name pid $pid: running"
    else echo "$name pid $pid: NOT running"; ok=1; fi
  done <"$PIDS"
  sinfo -N -o "%N %T %c %m" 2>/dev/null || { echo "sinfo failed"; ok=1; }
  nodes_idle_or_busy || ok=1
  return "$ok"
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "$STATE/env" ;;
  can-run) if why="$(cannot_run_here)"; then echo "$why"; exit 3; fi; echo ok ;;
  *) echo "usage: $0 start [--nodes 1|2] | stop | status | env | can-run" >&2; exit 2 ;;
esac
