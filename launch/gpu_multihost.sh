#!/usr/bin/env bash
# Train jaxddpm on several GPU hosts: one process per host, each driving all of its local GPUs, joined
# by jax.distributed (the program's --coordinator_address, --num_processes, --process_id flags).
#
# Two ways to use it:
#   on each host:  gpu_multihost.sh --coordinator HOST0:PORT --num-hosts N --host-index I [options]
#                  (from your own scheduler: pdsh, srun, a terminal per host, ...; runs in the foreground)
#   from one host: gpu_multihost.sh --hostfile hosts.txt [options]
#                  (starts the line above on every host of the file over ssh, in the background)
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

usage() {
  cat <<EOF
Usage: $PROG --coordinator HOST:PORT --num-hosts N --host-index I --config ... --workdir ... [options]
       $PROG --hostfile FILE [--port PORT] --config ... --workdir ... [options]
       $PROG --hostfile FILE --stop

Every host needs the same source tree, virtualenv and config (a shared file system, or the same paths
on each), and --workdir must be one directory that every host sees (NFS, or gs:// with gcsfs
installed): checkpoints are written by all processes together and resume needs all of them.

On one host (foreground; the training command is that of gpu.sh plus the distributed flags):
  --coordinator HOST:PORT  address of host 0, where process 0 runs the coordination service; PORT must
                           be free there and reachable from every host
  --num-hosts N            number of hosts (processes), N >= 1
  --host-index I           this host's index, 0 <= I < N (process 0 must run on the coordinator host)

From one host over ssh (background, nohup, one log per host):
  --hostfile FILE          one ssh destination ([user@]host) per line, host 0 first; # comments allowed
  --port PORT              coordinator port on host 0 (default 12355); or give --coordinator HOST:PORT
  --remote-dir DIR         source tree on the hosts (default: this one, $REPO_ROOT)
  --log-dir DIR            jaxddpm-host-I.log and .pid on each host (default ~/jaxddpm-logs)
  --stop                   send SIGTERM to the training process on every host instead (each saves its
                           part of a checkpoint at the current step and exits 0)

$COMMON_HELP

$GPU_HELP
  (--install is refused with --hostfile: install once per file system, with gpu.sh --install)

Example (two hosts):
  $PROG --hostfile hosts.txt --config configs/cifar10.py --workdir /nfs/runs/cifar10
  $PROG --hostfile hosts.txt --stop          # later: the same start command resumes the run
EOF
}

COORDINATOR=''
NUM_HOSTS=''
HOST_INDEX=''
HOSTFILE=''
PORT=''
REMOTE_DIR=''
TILDE='~' # expands on the hosts, not here
LOG_DIR=$TILDE/jaxddpm-logs
STOP=0

normalize_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
  esac
  if parse_common "$@" || parse_gpu "$@"; then
    shift "$CONSUMED"
    continue
  fi
  case $1 in
    --coordinator | --num-hosts | --host-index | --hostfile | --port | --remote-dir | --log-dir)
      need_value "$1" $# "${2-}"
      [[ -n $2 ]] || die "option $1 must not be empty"
      case $1 in
        --coordinator) COORDINATOR=$2 ;;
        --num-hosts) NUM_HOSTS=$2 ;;
        --host-index) HOST_INDEX=$2 ;;
        --hostfile) HOSTFILE=$2 ;;
        --port) PORT=$2 ;;
        --remote-dir) REMOTE_DIR=$2 ;;
        --log-dir) LOG_DIR=$2 ;;
      esac
      shift 2
      ;;
    --stop)
      STOP=1
      shift
      ;;
    -*) die "unknown option $1" ;;
    *) die "unexpected argument '$1' (options start with --)" ;;
  esac
done

valid_port() { [[ $1 =~ ^[0-9]{1,5}$ ]] && ((10#$1 >= 1 && 10#$1 <= 65535)); }

if [[ -n $COORDINATOR ]]; then
  host_port_re='^([A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):([0-9]+)$'
  if ! [[ $COORDINATOR =~ $host_port_re ]] || ! valid_port "${BASH_REMATCH[2]}"; then
    die "option --coordinator must be HOST:PORT with PORT in 1..65535, got '$COORDINATOR'"
  fi
fi
if [[ -n $NUM_HOSTS ]]; then
  if ! [[ $NUM_HOSTS =~ ^[0-9]{1,6}$ ]] || ((10#$NUM_HOSTS < 1)); then
    die "option --num-hosts must be a whole number >= 1, got '$NUM_HOSTS'"
  fi
  NUM_HOSTS=$((10#$NUM_HOSTS))
fi

# ------------------------------------------------------------------------------- one host
if [[ -z $HOSTFILE ]]; then
  [[ -z $PORT ]] || die "option --port goes with --hostfile (on one host, give --coordinator HOST:PORT)"
  [[ -z $REMOTE_DIR ]] || die "option --remote-dir goes with --hostfile"
  ((!STOP)) || die "option --stop goes with --hostfile (on one host, send SIGTERM to the process)"
  [[ -n $COORDINATOR ]] || die "option --coordinator is required (or --hostfile)"
  [[ -n $NUM_HOSTS ]] || die "option --num-hosts is required (or --hostfile)"
  [[ -n $HOST_INDEX ]] || die "option --host-index is required (or --hostfile)"
  if ! [[ $HOST_INDEX =~ ^[0-9]{1,6}$ ]] || ((10#$HOST_INDEX >= NUM_HOSTS)); then
    die "option --host-index must be a whole number in 0..$((NUM_HOSTS - 1)) (--num-hosts $NUM_HOSTS), got '$HOST_INDEX'"
  fi
  require_training_options
  HOST_INDEX=$((10#$HOST_INDEX))
  DIST_FLAGS=("--coordinator_address=$COORDINATOR" "--num_processes=$NUM_HOSTS" "--process_id=$HOST_INDEX")

  run cd "$REPO_ROOT"
  gpu_install
  gpu_command
  if ! ((DRY_RUN)); then
    if [[ $PY_BIN == */* ]]; then
      [[ -x $PY_BIN ]] || fail "no Python at $PY_BIN on $(hostname): install with gpu.sh --install, or pass --venv DIR / --python PY"
    else
      command -v "$PY_BIN" >/dev/null 2>&1 || fail "no Python interpreter '$PY_BIN' on PATH (option --python)"
    fi
    exec "${COMMAND[@]}"
  fi
  run "${COMMAND[@]}"
  exit 0
fi

# ------------------------------------------------------------------------------- every host, over ssh
[[ -z $HOST_INDEX ]] || die "option --host-index is set per host by --hostfile: drop it"
((!INSTALL)) || die "option --install is refused with --hostfile (hosts that share a file system would install into one virtualenv at once): run gpu.sh --install once per file system"
[[ -f $HOSTFILE && -r $HOSTFILE ]] || die "option --hostfile: cannot read '$HOSTFILE'"
[[ -z $PORT ]] || valid_port "$PORT" || die "option --port must be in 1..65535, got '$PORT'"
[[ -z $PORT || -z $COORDINATOR ]] || die "options --port and --coordinator exclude each other"

HOSTS=()
lineno=0
while IFS= read -r line || [[ -n $line ]]; do
  lineno=$((lineno + 1))
  line=${line%%#*}
  read -r -a words <<<"$line" || true
  case ${#words[@]} in
    0) continue ;;
    1) HOSTS+=("${words[0]}") ;;
    *) die "option --hostfile: line $lineno of $HOSTFILE has more than one host: '$line'" ;;
  esac
done <"$HOSTFILE"
((${#HOSTS[@]} >= 1)) || die "option --hostfile: no hosts in $HOSTFILE"
if [[ -n $NUM_HOSTS ]] && ((NUM_HOSTS != ${#HOSTS[@]})); then
  die "option --num-hosts $NUM_HOSTS disagrees with the ${#HOSTS[@]} hosts of --hostfile $HOSTFILE"
fi
NUM_HOSTS=${#HOSTS[@]}
if [[ -z $COORDINATOR ]]; then
  host0=${HOSTS[0]#*@}
  COORDINATOR=$host0:${PORT:-12355}
fi
REMOTE_DIR=${REMOTE_DIR:-$REPO_ROOT}

# the options of the per-host command, as given here
forwarded_options() {
  FWD=(--config "$CONFIG" --workdir "$WORKDIR")
  if [[ -n $MODE ]]; then FWD+=(--mode "$MODE"); fi
  if [[ -n $DATA_DIR ]]; then FWD+=(--data-dir "$DATA_DIR"); fi
  if [[ -n $VENV ]]; then FWD+=(--venv "$VENV"); fi
  if [[ -n $PYTHON ]]; then FWD+=(--python "$PYTHON"); fi
  if [[ -n $GPUS ]]; then FWD+=(--gpus "$GPUS"); fi
  if [[ -n $MEM_FRACTION ]]; then FWD+=(--mem-fraction "$MEM_FRACTION"); fi
  local e
  for e in PYTHONUNBUFFERED=1 ${ENVS[@]+"${ENVS[@]}"}; do FWD+=(--env "$e"); done
  FWD+=(${OVERRIDES[@]+"${OVERRIDES[@]}"})
  if ((${#EXTRA[@]})); then FWD+=(-- "${EXTRA[@]}"); fi
}

# shellcheck disable=SC2016
start_script() { # start_script I: the shell command that host I runs
  local s
  s="set -eu; L=$(rpath "$LOG_DIR"); mkdir -p \"\$L\"; cd $(rpath "$REMOTE_DIR")"
  s+="; P=\"\$L/jaxddpm-host-$1.pid\"; O=\"\$L/jaxddpm-host-$1.log\""
  s+='; if [ -f "$P" ] && kill -0 "$(cat "$P")" 2>/dev/null; then echo "jaxddpm is already running on $(hostname) (pid $(cat "$P")): stop it first" >&2; exit 1; fi'
  s+='; echo "=== $(date -u) launch on $(hostname) ===" >> "$O"'
  s+="; nohup bash launch/gpu_multihost.sh $(quote_cmd --coordinator "$COORDINATOR" --num-hosts "$NUM_HOSTS" --host-index "$1" "${FWD[@]}")"
  s+=' >> "$O" 2>&1 < /dev/null & echo $! > "$P"; echo "jaxddpm started on $(hostname): pid $!, log $O"'
  printf '%s' "$s"
}

# shellcheck disable=SC2016
stop_script() {
  local s
  s="L=$(rpath "$LOG_DIR"); P=\"\$L/jaxddpm-host-$1.pid\""
  s+='; if [ -f "$P" ] && kill -0 "$(cat "$P")" 2>/dev/null; then kill -TERM "$(cat "$P")"; echo "SIGTERM sent to jaxddpm (pid $(cat "$P")) on $(hostname)"; else echo "jaxddpm is not running on $(hostname)"; fi'
  printf '%s' "$s"
}

if ((STOP)); then
  for i in "${!HOSTS[@]}"; do run ssh -o BatchMode=yes "${HOSTS[$i]}" "$(stop_script "$i")"; done
  exit 0
fi

require_training_options
forwarded_options
# host 0 first: it serves the coordinator the others connect to
for i in "${!HOSTS[@]}"; do
  run ssh -o BatchMode=yes "${HOSTS[$i]}" "$(start_script "$i")"
done
