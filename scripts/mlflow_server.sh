#!/usr/bin/env bash
# mlflow_server.sh — an MLflow tracking server that SLURM jobs on other nodes
# (or local multirun workers) can log to over HTTP, artifacts included.
#
# Usage:
#   scripts/mlflow_server.sh [start] [OPTIONS] [-- EXTRA_MLFLOW_SERVER_ARGS...]
#   scripts/mlflow_server.sh stop   [--port P] [--run-dir D]
#   scripts/mlflow_server.sh status [--port P] [--run-dir D]
#
# `start` (the default) runs in the foreground (Ctrl-C stops it) unless
# --background is given, in which case it detaches, writes a pid file and a log
# and returns once the server answers /health. Either way it prints
#   tracking.uri=http://HOST:PORT
#   export MLFLOW_TRACKING_URI=http://HOST:PORT
#   export MLFLOW_DISABLE_TELEMETRY=true
# once the server is up.
#
# Options (environment variable in brackets, then default):
#   --backend-store-uri URI    [MLFLOW_BACKEND_STORE_URI]   sqlite:///<repo>/outputs/mlflow.db
#                              any SQLAlchemy URI (postgresql://..., mysql://...) works
#   --artifacts-destination D  [MLFLOW_ARTIFACTS_DESTINATION] <repo>/outputs/mlartifacts
#                              local dir or URI (s3://...); clients upload through the
#                              server (--serve-artifacts, artifact root mlflow-artifacts:/)
#   --host HOST                [MLFLOW_SERVER_HOST]         127.0.0.1 (0.0.0.0: all interfaces)
#   --port PORT                [MLFLOW_SERVER_PORT]         5000
#   --workers N                [MLFLOW_SERVER_WORKERS]      2
#   --allowed-hosts LIST       [MLFLOW_SERVER_ALLOWED_HOSTS] MLflow's default (localhost +
#                              private IPs); when --host is not a loopback address this
#                              script adds this machine's host names to it
#   --background               detach; pid file + log in the run dir
#   --run-dir DIR              [MLFLOW_SERVER_RUN_DIR]      <repo>/outputs/mlflow-server
#                              (mlflow-PORT.pid, mlflow-PORT.log)
#   --timeout S                [MLFLOW_SERVER_TIMEOUT]      60 s to wait for /health
#   -h, --help
# The mlflow executable is $MLFLOW_BIN (default <repo>/.venv/bin/mlflow, else
# `mlflow` on PATH). MLFLOW_SERVER_ENABLE_JOB_EXECUTION defaults to false here:
# MLflow 3's GenAI job runner (7 huey consumer processes) is not needed for
# tracking and triples the start-up time on a 2-core machine; export it =true
# to get it back. MLFLOW_DISABLE_TELEMETRY also defaults to true (server side).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"

log() { printf '[mlflow_server] %s\n' "$*" >&2; }
die() { printf '[mlflow_server] ERROR: %s\n' "$*" >&2; exit 1; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

if [ -z "${MLFLOW_BIN:-}" ]; then
  if [ -x "$REPO_DIR/.venv/bin/mlflow" ]; then MLFLOW_BIN="$REPO_DIR/.venv/bin/mlflow"
  else MLFLOW_BIN="$(command -v mlflow || true)"; fi
fi

export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
# MLflow 3's usage telemetry: no use without internet, and its background
# thread races with HTTP requests in clients (see print_uri).
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"

BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$REPO_DIR/outputs/mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-$REPO_DIR/outputs/mlartifacts}"
HOST="${MLFLOW_SERVER_HOST:-127.0.0.1}"
PORT="${MLFLOW_SERVER_PORT:-5000}"
WORKERS="${MLFLOW_SERVER_WORKERS:-2}"
ALLOWED_HOSTS="${MLFLOW_SERVER_ALLOWED_HOSTS:-}"
RUN_DIR="${MLFLOW_SERVER_RUN_DIR:-$REPO_DIR/outputs/mlflow-server}"
TIMEOUT="${MLFLOW_SERVER_TIMEOUT:-60}"
BACKGROUND=0
EXTRA=()

CMD=start
case "${1:-}" in
  start|stop|status) CMD="$1"; shift ;;
  -h|--help|help) usage; exit 0 ;;
esac

need_arg() { [ $# -ge 2 ] || die "option $1 needs a value"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --backend-store-uri) need_arg "$@"; BACKEND="$2"; shift 2 ;;
    --artifacts-destination) need_arg "$@"; ARTIFACTS="$2"; shift 2 ;;
    --host) need_arg "$@"; HOST="$2"; shift 2 ;;
    --port) need_arg "$@"; PORT="$2"; shift 2 ;;
    --workers) need_arg "$@"; WORKERS="$2"; shift 2 ;;
    --allowed-hosts) need_arg "$@"; ALLOWED_HOSTS="$2"; shift 2 ;;
    --run-dir) need_arg "$@"; RUN_DIR="$2"; shift 2 ;;
    --timeout) need_arg "$@"; TIMEOUT="$2"; shift 2 ;;
    --background|-d) BACKGROUND=1; shift ;;
    --foreground) BACKGROUND=0; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
done
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"

mkdir -p "$RUN_DIR"
RUN_DIR="$(cd "$RUN_DIR" && pwd)"
PID_FILE="$RUN_DIR/mlflow-$PORT.pid"
LOG_FILE="$RUN_DIR/mlflow-$PORT.log"

# Where clients reach the server.
case "$HOST" in
  0.0.0.0|::|'[::]') PUBLIC_HOST="$(hostname -f 2>/dev/null || hostname)"; PROBE_HOST=127.0.0.1 ;;
  *:*) PUBLIC_HOST="[$HOST]"; PROBE_HOST="[$HOST]" ;;
  *) PUBLIC_HOST="$HOST"; PROBE_HOST="$HOST" ;;
esac
URI="http://$PUBLIC_HOST:$PORT"
PROBE_URL="http://$PROBE_HOST:$PORT/health"

is_loopback() { case "$1" in 127.*|localhost|::1|'[::1]') return 0 ;; *) return 1 ;; esac; }

server_pid() {  # prints the pid if the pid file names a live process
  [ -s "$PID_FILE" ] || return 1
  local pid; pid="$(tr -dc '0-9' <"$PID_FILE")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

healthy() {
  if command -v curl >/dev/null 2>&1; then
    curl -fsS -m 2 "$PROBE_URL" >/dev/null 2>&1
  else
    python3 - "$PROBE_URL" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=2).read()
EOF
  fi
}

port_busy() {
  if command -v ss >/dev/null 2>&1; then ss -Hltn "sport = :$PORT" 2>/dev/null | grep -q .
  else (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; fi
}

kill_group() {  # pid: TERM the process group it leads (mlflow + its workers), then KILL
  local pid="$1" i
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do
    kill -0 -- "-$pid" 2>/dev/null || kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  log "server $pid did not exit on TERM; sending KILL"
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
}

print_uri() {
  echo "tracking.uri=$URI"
  echo "export MLFLOW_TRACKING_URI=$URI"
  # Clients: MLflow 3.17's telemetry thread unsets an environment variable
  # while requests iterates os.environ -> sporadic "API request ... failed with
  # exception '_MLFLOW_TELEMETRY_SESSION_ID'" on machines without internet.
  echo "export MLFLOW_DISABLE_TELEMETRY=true"
}

cmd_stop() {
  local pid
  if pid="$(server_pid)"; then
    kill_group "$pid"
    rm -f "$PID_FILE"
    log "stopped server on port $PORT (pid $pid)"
  else
    rm -f "$PID_FILE"
    log "no server running on port $PORT (pid file $PID_FILE)"
  fi
}

cmd_status() {
  local pid
  if pid="$(server_pid)" && healthy; then
    echo "running (pid $pid) on port $PORT"
    print_uri
    return 0
  fi
  echo "not running"
  return 3
}

cmd_start() {
  if [ -z "$MLFLOW_BIN" ] || [ ! -x "$MLFLOW_BIN" ]; then
    die "mlflow not found (MLFLOW_BIN='$MLFLOW_BIN'); set MLFLOW_BIN or create $REPO_DIR/.venv"
  fi
  local pid
  if pid="$(server_pid)"; then
    if healthy; then
      log "already running (pid $pid) on port $PORT"
      print_uri
      return 0
    fi
    die "pid $pid from $PID_FILE is alive but $PROBE_URL does not answer; run: $0 stop --port $PORT"
  fi
  port_busy && die "port $PORT is already in use"

  # Local storage: absolute paths, folders created.
  if [[ "$BACKEND" == sqlite:///* ]]; then
    local db="${BACKEND#sqlite:///}"
    [[ "$db" == /* ]] || db="$PWD/$db"
    mkdir -p "$(dirname "$db")"
    BACKEND="sqlite:///$db"
  fi
  if [[ "$ARTIFACTS" != *://* ]]; then
    mkdir -p "$ARTIFACTS"
    ARTIFACTS="$(cd "$ARTIFACTS" && pwd)"
  fi

  local args=(server
    --backend-store-uri "$BACKEND"
    --serve-artifacts --artifacts-destination "$ARTIFACTS"
    --host "$HOST" --port "$PORT" --workers "$WORKERS")
  # MLflow >= 3.x rejects Host headers other than localhost/private IPs (DNS
  # rebinding protection). Bound to a non-loopback address, clients on other
  # nodes use this machine's name: allow it (plus MLflow's defaults).
  if [ -z "$ALLOWED_HOSTS" ] && ! is_loopback "$HOST"; then
    local names=() n i
    for n in "$(hostname -s 2>/dev/null)" "$(hostname 2>/dev/null)" "$(hostname -f 2>/dev/null)" \
             $(hostname -I 2>/dev/null) "$HOST"; do
      n="${n#[}"; n="${n%]}"
      case "$n" in ''|0.0.0.0|::) continue ;; esac
      case " ${names[*]:-} " in *" $n "*|*" [$n] "*) continue ;; esac
      if [[ "$n" == *:* ]]; then names+=("[$n]" "[[]$n]:*")  # IPv6 literal
      else names+=("$n" "$n:*"); fi
    done
    local pats=(localhost 'localhost:*' 127.0.0.1 '127.0.0.1:*' '[::1]' '[[]::1]:*' "${names[@]}" '10.*' '192.168.*')
    for i in $(seq 16 31); do pats+=("172.$i.*"); done
    ALLOWED_HOSTS="$(IFS=,; echo "${pats[*]}")"
  fi
  [ -n "$ALLOWED_HOSTS" ] && args+=(--allowed-hosts "$ALLOWED_HOSTS")
  args+=("${EXTRA[@]}")

  log "backend store:  $BACKEND"
  log "artifacts:      $ARTIFACTS (served via mlflow-artifacts:/)"
  log "listening on:   $HOST:$PORT  (log: $LOG_FILE)"

  # setsid: the server leads its own process group, so stop can end it and its
  # workers together without touching anything else.
  if [ "$BACKGROUND" = 1 ]; then
    setsid "$MLFLOW_BIN" "${args[@]}" </dev/null >>"$LOG_FILE" 2>&1 &
  else
    setsid "$MLFLOW_BIN" "${args[@]}" </dev/null > >(tee -a "$LOG_FILE" >&2) 2>&1 &
  fi
  pid=$!
  echo "$pid" >"$PID_FILE"
  if [ "$BACKGROUND" = 0 ]; then
    trap 'kill_group "$pid"; rm -f "$PID_FILE"; exit 130' INT TERM HUP
  fi

  local deadline=$(( SECONDS + TIMEOUT ))
  until healthy; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PID_FILE"
      tail -n 30 "$LOG_FILE" >&2 || true
      die "mlflow server exited during startup (log: $LOG_FILE)"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 30 "$LOG_FILE" >&2 || true
      kill_group "$pid"; rm -f "$PID_FILE"
      die "mlflow server did not answer $PROBE_URL within ${TIMEOUT}s"
    fi
    sleep 0.5
  done
  log "up (pid $pid)"
  print_uri
  if [ "$BACKGROUND" = 1 ]; then
    local hint="$0 stop --port $PORT"
    [ "$RUN_DIR" = "$REPO_DIR/outputs/mlflow-server" ] || hint+=" --run-dir $RUN_DIR"
    log "stop with: $hint"
    return 0
  fi
  local rc=0
  wait "$pid" || rc=$?
  rm -f "$PID_FILE"
  return "$rc"
}

case "$CMD" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
esac
