#!/usr/bin/env bash
# slurm_local.sh — a real single-node SLURM cluster on localhost, for tests/CI.
#
# Usage: scripts/slurm_local.sh start|stop|restart|status|env|help
#
#   start    install slurm-wlm + munge if missing (Debian/apt, needs root), write
#            slurm.conf/cgroup.conf, start munged, slurmctld and slurmd, and wait
#            until `sinfo` shows the node idle. Idempotent (exit 0 if running).
#   stop     kill the daemons started by `start` (by pid file), clean runtime state
#            (spool, job state, sockets, pid files). Idempotent (exit 0 if stopped).
#   restart  stop, then start.
#   status   print sinfo + squeue, exit 0; print "not running" and exit 3 otherwise.
#   env      print the export lines for clients: eval "$(scripts/slurm_local.sh env)"
#
# Every file lives in $SLURM_LOCAL_DIR (default: <repo>/.slurm-local):
#   etc/slurm.conf etc/cgroup.conf  spool/ctld spool/slurmd  log/*.log  run/*.pid
#   munge/munge.key munge/munge.seed munge/munge.socket.2  bin/sacct (stand-in)
# Nothing is written to /etc; the system's own munge/slurm services are not used.
#
# Environment knobs (all optional):
#   SLURM_LOCAL_DIR          state folder                        [<repo>/.slurm-local]
#   SLURM_LOCAL_CTLD_PORT    slurmctld port                      [6817]
#   SLURM_LOCAL_SLURMD_PORT  slurmd port                         [6818]
#   SLURM_LOCAL_CPUS         CPUs of the node                    [$(nproc)]
#   SLURM_LOCAL_MEM_MB       RealMemory of the node in MiB       [total of `free -m`]
#   SLURM_LOCAL_TIMEOUT      seconds `start` waits for idle      [60]
#   SLURM_LOCAL_NO_INSTALL=1 never run apt-get (fail if binaries are missing)
#   SLURM_LOCAL_SACCT_SHIM=0 `env` does not put the sacct stand-in on PATH
#
# Limitations:
# - root only (SlurmUser=root, munged --force).
# - No accounting database, so the real sacct fails ("Slurm accounting storage
#   is disabled"). `env` puts bin/sacct first on PATH: a stand-in answering from
#   `scontrol show job` (jobs that ended within the last hour, MinJobAge=3600)
#   so that submitit sees job states. Without it submitit warns "Bypassing
#   sacct error" and notices the end of a job only from its result file (a job
#   killed before writing one would be waited for forever).
# - No cgroup confinement (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none):
#   --mem/--cpus-per-task are scheduling quantities, not enforced limits.
# - Job IDs restart at 1 after stop (job state is wiped).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
STATE_DIR="${SLURM_LOCAL_DIR:-$REPO_DIR/.slurm-local}"
case "$STATE_DIR" in /*) ;; *) STATE_DIR="$PWD/$STATE_DIR" ;; esac
STATE_DIR="${STATE_DIR%/}"

ETC_DIR="$STATE_DIR/etc"
LOG_DIR="$STATE_DIR/log"
RUN_DIR="$STATE_DIR/run"
SPOOL_DIR="$STATE_DIR/spool"
MUNGE_DIR="$STATE_DIR/munge"
BIN_DIR="$STATE_DIR/bin"
CONF="$ETC_DIR/slurm.conf"
CGROUP_CONF="$ETC_DIR/cgroup.conf"
MUNGE_KEY="$MUNGE_DIR/munge.key"
MUNGE_SEED="$MUNGE_DIR/munge.seed"
MUNGE_PID="$RUN_DIR/munged.pid"
CTLD_PID="$RUN_DIR/slurmctld.pid"
SLURMD_PID="$RUN_DIR/slurmd.pid"
CTLD_PORT="${SLURM_LOCAL_CTLD_PORT:-6817}"
SLURMD_PORT="${SLURM_LOCAL_SLURMD_PORT:-6818}"
TIMEOUT="${SLURM_LOCAL_TIMEOUT:-60}"

# Unix sockets are limited to 108 bytes: keep munge's socket and slurmd's
# spool (slurmstepd sockets live there) under a short path when the state dir
# is deep.
if [ "${#STATE_DIR}" -le 60 ]; then
  SOCK_DIR="$MUNGE_DIR"
  SLURMD_SPOOL="$SPOOL_DIR/slurmd"
else
  _h="$(printf '%s' "$STATE_DIR" | md5sum | cut -c1-10)"
  SOCK_DIR="/tmp/slurm-local-$_h/munge"
  SLURMD_SPOOL="/tmp/slurm-local-$_h/slurmd"
fi
MUNGE_SOCKET="$SOCK_DIR/munge.socket.2"
CTLD_SPOOL="$SPOOL_DIR/ctld"

log() { printf '[slurm_local] %s\n' "$*" >&2; }
die() { printf '[slurm_local] ERROR: %s\n' "$*" >&2; exit 1; }

export SLURM_CONF="$CONF"

# ---------------------------------------------------------------- install
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else die "need root to run: $*"; fi
}

ensure_installed() {
  local missing=()
  for b in munged mungekey slurmctld slurmd sinfo sbatch squeue scontrol; do
    command -v "$b" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$b" >/dev/null 2>&1 || missing+=("$b")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  [ "${SLURM_LOCAL_NO_INSTALL:-0}" = 1 ] && die "missing binaries: ${missing[*]} (install slurm-wlm munge)"
  command -v apt-get >/dev/null 2>&1 || die "missing binaries: ${missing[*]}; no apt-get to install slurm-wlm munge"
  log "installing slurm-wlm munge (missing: ${missing[*]})"
  local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge)
  if ! as_root "${apt[@]}" >"/tmp/slurm_local_apt.$$.log" 2>&1; then
    log "apt-get install failed; running apt-get update and retrying"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >>"/tmp/slurm_local_apt.$$.log" 2>&1 || true
    as_root "${apt[@]}" >>"/tmp/slurm_local_apt.$$.log" 2>&1 \
      || { tail -n 30 "/tmp/slurm_local_apt.$$.log" >&2; die "apt-get install slurm-wlm munge failed"; }
  fi
  rm -f "/tmp/slurm_local_apt.$$.log"
  # Debian's postinst may have started the system munged/slurm services when
  # an init system is present; ours do not use them (own key, socket, ports).
}

# ---------------------------------------------------------------- helpers
pid_alive() {  # pidfile expected-comm
  local f="$1" name="$2" pid comm
  [ -s "$f" ] || return 1
  pid="$(tr -dc '0-9' <"$f")"
  [ -n "$pid" ] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
  [ "$comm" = "$name" ]
}

all_running() {
  pid_alive "$MUNGE_PID" munged && pid_alive "$CTLD_PID" slurmctld && pid_alive "$SLURMD_PID" slurmd
}
any_running() {
  pid_alive "$MUNGE_PID" munged || pid_alive "$CTLD_PID" slurmctld || pid_alive "$SLURMD_PID" slurmd
}

port_busy() {  # port
  if command -v ss >/dev/null 2>&1; then
    ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}

tail_logs() {
  local f
  for f in "$LOG_DIR/munged.log" "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log"; do
    [ -f "$f" ] || continue
    printf '\n===== tail -n 25 %s =====\n' "$f" >&2
    tail -n 25 "$f" >&2
  done
}

print_env() {
  echo "export SLURM_CONF=$CONF"
  if [ "${SLURM_LOCAL_SACCT_SHIM:-1}" != 0 ]; then
    # shellcheck disable=SC2016
    printf 'case ":$PATH:" in *":%s:"*) ;; *) export PATH="%s:$PATH" ;; esac\n' "$BIN_DIR" "$BIN_DIR"
  fi
}

# ---------------------------------------------------------------- config
detect_cpus() { echo "${SLURM_LOCAL_CPUS:-$(nproc)}"; }
detect_mem_mb() {
  # total of `free -m`, but never more than what slurmd itself will report
  # (a node configured with more RealMemory than it has is drained).
  local m d
  if [ -n "${SLURM_LOCAL_MEM_MB:-}" ]; then echo "$SLURM_LOCAL_MEM_MB"; return; fi
  m="$(free -m | awk '/^Mem:/ {print $2}')"
  d="$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1 || true)"
  [ -n "$m" ] || m="${d:-1024}"
  if [ -n "$d" ] && [ "$d" -lt "$m" ]; then m="$d"; fi
  echo "$m"
}

write_config() {
  local host cpus mem defmem
  host="$(hostname -s)"
  cpus="$(detect_cpus)"
  mem="$(detect_mem_mb)"
  defmem=$(( mem / cpus ))
  mkdir -p "$ETC_DIR"
  cat >"$CONF" <<EOF
# Generated by scripts/slurm_local.sh — single-node local cluster. Do not edit:
# it is rewritten on every start.
ClusterName=locality-local
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${MUNGE_SOCKET}
StateSaveLocation=${CTLD_SPOOL}
SlurmdSpoolDir=${SLURMD_SPOOL}
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=${defmem}
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=3600
SlurmdTimeout=300
InactiveLimit=0
KillWait=10
Waittime=0
NodeName=${host} NodeAddr=127.0.0.1 NodeHostname=${host} CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE DefaultTime=INFINITE State=UP OverSubscribe=NO
EOF
  cat >"$CGROUP_CONF" <<EOF
# Generated by scripts/slurm_local.sh
CgroupPlugin=cgroup/v1
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF
}

# A stand-in for `sacct` (there is no accounting database): it answers the
# query submitit makes (`sacct -o JobID,State,NodeList --parsable2 -j ID ...`)
# from `scontrol show job`, which keeps finished jobs for MinJobAge seconds.
# Without it submitit only learns that a job ended from its result pickle, so a
# job killed before writing one (scancel, crash, node failure) would be waited
# for forever. Disable with SLURM_LOCAL_SACCT_SHIM=0.
write_sacct_shim() {
  mkdir -p "$BIN_DIR"
  cat >"$BIN_DIR/sacct" <<'EOF'
#!/usr/bin/env bash
# sacct stand-in written by scripts/slurm_local.sh (no accounting storage):
# supports -o/--format FIELDS, -j/--jobs IDS, -n/--noheader; output is always
# --parsable2 style (|-separated).
fields="JobID,JobName,Partition,State,ExitCode,NodeList"; ids=""; header=1
while [ $# -gt 0 ]; do
  case "$1" in
    -o|--format) fields="$2"; shift 2 ;;
    --format=*) fields="${1#*=}"; shift ;;
    -j|--jobs) ids="$ids,$2"; shift 2 ;;
    --jobs=*) ids="$ids,${1#*=}"; shift ;;
    -n|--noheader) header=0; shift ;;
    *) shift ;;
  esac
done
scontrol show job -o 2>/dev/null | awk -v fields="$fields" -v ids="$ids" -v header="$header" '
BEGIN {
  nf = split(fields, F, ","); n = split(ids, I, ","); nwant = 0
  for (i = 1; i <= n; i++) if (I[i] != "") { want[I[i]] = 1; nwant++ }
  if (header) { line = ""; for (i = 1; i <= nf; i++) line = line (i > 1 ? "|" : "") F[i]; print line }
}
/^JobId=/ {
  split("", R)
  for (i = 1; i <= NF; i++) { eq = index($i, "="); if (eq) R[substr($i, 1, eq - 1)] = substr($i, eq + 1) }
  id = R["JobId"]; aid = R["ArrayJobId"]; tid = R["ArrayTaskId"]
  if (aid != "") { jid = (tid ~ /[-,%]/) ? aid "_[" tid "]" : aid "_" tid } else jid = id
  if (nwant && !((id in want) || (aid in want) || (jid in want))) next
  line = ""
  for (i = 1; i <= nf; i++) {
    f = tolower(F[i]); v = ""
    if (f == "jobid") v = jid
    else if (f == "jobidraw") v = id
    else if (f == "state") v = R["JobState"]
    else if (f == "nodelist") v = (R["NodeList"] == "(null)" || R["NodeList"] == "") ? "None assigned" : R["NodeList"]
    else if (f == "exitcode") v = R["ExitCode"]
    else if (f == "jobname") v = R["JobName"]
    else if (f == "partition") v = R["Partition"]
    else if (f == "user") { v = R["UserId"]; sub(/\(.*/, "", v) }
    else if (f == "elapsed") v = R["RunTime"]
    else if (f == "start") v = R["StartTime"]
    else if (f == "end") v = R["EndTime"]
    line = line (i > 1 ? "|" : "") v
  }
  print line
}'
EOF
  chmod 755 "$BIN_DIR/sacct"
}

# ---------------------------------------------------------------- daemons
start_munge() {
  mkdir -p "$MUNGE_DIR" "$SOCK_DIR" "$RUN_DIR" "$LOG_DIR"
  chmod 700 "$MUNGE_DIR"
  chmod 755 "$SOCK_DIR"
  if [ ! -s "$MUNGE_KEY" ]; then
    log "creating munge key $MUNGE_KEY"
    if ! mungekey --create --keyfile="$MUNGE_KEY" --bits=1024 2>/dev/null; then
      dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
    fi
  fi
  chmod 400 "$MUNGE_KEY"
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  munged --force \
    --socket="$MUNGE_SOCKET" \
    --key-file="$MUNGE_KEY" \
    --pid-file="$MUNGE_PID" \
    --log-file="$LOG_DIR/munged.log" \
    --seed-file="$MUNGE_SEED" \
    >>"$LOG_DIR/munged.log" 2>&1 || { tail_logs; die "munged failed to start"; }
  local i
  for i in $(seq 1 50); do
    [ -S "$MUNGE_SOCKET" ] && pid_alive "$MUNGE_PID" munged && break
    sleep 0.1
  done
  munge -n --socket="$MUNGE_SOCKET" | unmunge --socket="$MUNGE_SOCKET" >/dev/null 2>&1 \
    || { tail_logs; die "munge self-test failed (socket $MUNGE_SOCKET)"; }
}

start_slurm() {
  mkdir -p "$CTLD_SPOOL" "$SLURMD_SPOOL" "$LOG_DIR" "$RUN_DIR"
  chmod 755 "$CTLD_SPOOL" "$SLURMD_SPOOL"
  # slurmctld/slurmd daemonize themselves and write the pid files of slurm.conf.
  slurmctld -f "$CONF" >>"$LOG_DIR/slurmctld.log" 2>&1 || { tail_logs; die "slurmctld failed to start"; }
  local i
  for i in $(seq 1 100); do
    scontrol ping 2>/dev/null | grep -q 'is UP' && break
    pid_alive "$CTLD_PID" slurmctld || { [ "$i" -gt 20 ] && { tail_logs; die "slurmctld exited"; }; }
    sleep 0.2
  done
  slurmd -f "$CONF" >>"$LOG_DIR/slurmd.log" 2>&1 || { tail_logs; die "slurmd failed to start"; }
}

wait_idle() {
  local deadline=$(( SECONDS + TIMEOUT )) st
  while [ "$SECONDS" -lt "$deadline" ]; do
    st="$(sinfo -h -N -o '%T' 2>/dev/null | head -n1 || true)"
    case "$st" in
      idle|mixed|allocated|completing) return 0 ;;
      inval*) break ;;  # registration rejected (e.g. Low RealMemory): no use waiting
      *) ;;             # unknown/down*/drain*: slurmd may still be registering
    esac
    sleep 1
  done
  log "node not idle (state: '${st:-no answer}', waited up to ${TIMEOUT}s)"
  sinfo -N -l -R 2>&1 | sed 's/^/  /' >&2 || true
  scontrol show node 2>&1 | sed 's/^/  /' >&2 || true
  tail_logs
  cmd_stop >/dev/null 2>&1 || true
  die "cluster did not come up; stopped it again (logs kept in $LOG_DIR)"
}

kill_pidfile() {  # pidfile name
  local f="$1" name="$2" pid i
  pid_alive "$f" "$name" || { rm -f "$f"; return 0; }
  pid="$(tr -dc '0-9' <"$f")"
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name ($pid) did not exit on TERM; sending KILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.2
  fi
  rm -f "$f"
}

# ---------------------------------------------------------------- commands
cmd_start() {
  if all_running && sinfo -h >/dev/null 2>&1; then
    log "already running (state in $STATE_DIR)"
    print_env
    return 0
  fi
  if any_running; then
    log "partially running; stopping the leftovers first"
    cmd_stop
  fi
  ensure_installed
  for p in "$CTLD_PORT" "$SLURMD_PORT"; do
    port_busy "$p" && die "port $p is in use (another slurm?). Stop it or set SLURM_LOCAL_CTLD_PORT/SLURM_LOCAL_SLURMD_PORT"
  done
  mkdir -p "$ETC_DIR" "$LOG_DIR" "$RUN_DIR" "$SPOOL_DIR"
  write_config
  if [ "${SLURM_LOCAL_SACCT_SHIM:-1}" != 0 ]; then write_sacct_shim; else rm -f "$BIN_DIR/sacct"; fi
  log "starting munged (socket $MUNGE_SOCKET)"
  start_munge
  log "starting slurmctld + slurmd ($(detect_cpus) CPUs, $(detect_mem_mb) MiB, partition debug)"
  start_slurm
  wait_idle
  log "cluster is up:"
  sinfo >&2
  log "to use it from this shell:  eval \"\$($0 env)\""
  print_env
}

cmd_stop() {
  local was=0
  any_running && was=1
  # Cancel jobs while the controller still answers, then slurmd, the
  # controller and munge.
  if pid_alive "$CTLD_PID" slurmctld; then
    scancel --quiet --full --signal=KILL --user="$(id -un)" 2>/dev/null || true
    timeout 10 scancel --quiet --user="$(id -un)" 2>/dev/null || true
  fi
  kill_pidfile "$SLURMD_PID" slurmd
  kill_pidfile "$CTLD_PID" slurmctld
  kill_pidfile "$MUNGE_PID" munged
  # Leftover job steps (proctrack/linuxproc does not always reap them): ours
  # inherited SLURM_CONF=$CONF from slurmd.
  local p
  for p in $(pgrep -x slurmstepd 2>/dev/null || true); do
    if tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$CONF"; then
      kill -KILL "$p" 2>/dev/null || true
    fi
  done
  rm -rf "$CTLD_SPOOL" "$SLURMD_SPOOL" "$RUN_DIR"
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  [ "$SOCK_DIR" != "$MUNGE_DIR" ] && rm -rf "$(dirname "$SOCK_DIR")"
  if [ "$was" = 1 ]; then log "stopped"; else log "not running"; fi
  return 0
}

cmd_status() {
  if ! all_running; then
    any_running && log "partially running (see $RUN_DIR); run: $0 restart"
    echo "not running"
    return 3
  fi
  if ! sinfo >/dev/null 2>&1; then
    echo "not running (daemons alive but sinfo does not answer; see $LOG_DIR)"
    return 3
  fi
  echo "SLURM_CONF=$CONF"
  sinfo
  echo
  squeue
}

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

case "${1:-}" in
  start)   cmd_start ;;
  stop)    cmd_stop ;;
  restart) cmd_stop; cmd_start ;;
  status)  cmd_status ;;
  env)     print_env ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
