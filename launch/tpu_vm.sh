#!/usr/bin/env bash
# Run jaxddpm on a Cloud TPU VM or pod slice: create it, install the project on every worker, start the
# same training command on all workers, tail the logs, stop (checkpoint and exit), delete.
# Every worker runs the same command; the program calls jax.distributed.initialize(), which finds the
# other workers of the slice by itself on TPU.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

usage() {
  cat <<EOF
Usage: $PROG COMMAND --name NAME --zone ZONE [options] [--config.FIELD=VALUE ...] [-- ARG...]

Commands (every option is accepted by every command, so one set of options serves them all):
  create   create the TPU VM / pod slice (needs --accelerator-type)
  install  put the source tree on every worker and install it with the [tpu] extra into a virtualenv
  train    start the training command on all workers, in the background (nohup), logging to a file
           on each worker, so that a dropped ssh connection does not stop training
  up       create, install and train
  logs     tail the log of worker 0 (or --worker N / --worker all)
  stop     send SIGTERM to the training process on all workers (it saves a checkpoint at the current
           step and exits 0) and wait for it to exit
  status   print the state of the TPU VM (READY, CREATING, PREEMPTED, ...)
  delete   delete the TPU VM (gcloud asks for confirmation unless --yes)

TPU VM:
  --name NAME              TPU VM name (lower-case letters, digits, -)
  --zone ZONE              e.g. us-central2-b
  --project PROJECT        Google Cloud project (default: gcloud's configured project)
  --accelerator-type TYPE  e.g. v4-8, v4-32, v5litepod-16, v5p-32, v6e-8
  --version VERSION        TPU software version (runtime image). Default by TPU generation:
                           v2/v3/v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                           v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --spot                   Spot VM (cheaper, can be preempted at any time)
  --preemptible            preemptible VM (the older kind of Spot)

Install (on every worker):
  --src DIR                copy this source tree (default: the one this script is in: $REPO_ROOT)
  --repo URL               git clone URL instead of copying a local tree
  --ref REF                branch, tag or commit of --repo to check out (default: its default branch)
  --python-version X.Y     Python of the virtualenv, made with uv (default 3.11; uv fetches it if the
                           image lacks it)
  --extras LIST            extras of jaxddpm to install (default tpu: jax[tpu] with libtpu)
  --pip SPEC               one more package to install; repeatable (gcsfs is always installed: gs://
                           workdirs and data dirs need it)

Paths on the workers:
  --remote-dir DIR         source tree (default ~/jaxddpm); the training command runs there
  --venv DIR               virtualenv (default ~/jaxddpm-venv)
  --log-dir DIR            jaxddpm.log and jaxddpm.pid (default ~/jaxddpm-logs)

logs, stop, delete:
  --worker N|all           worker(s) whose log to tail (default 0)
  --lines N                lines of log to show first (default 100)
  --no-follow              print the last lines and return instead of following the log
  --timeout SECONDS        how long stop waits for the process to exit (default 300)
  --yes                    delete without asking

$COMMON_HELP

Examples:
  T=(--name ddpm --zone us-central2-b --accelerator-type v4-32 --spot)
  $PROG up "\${T[@]}" --config configs/cifar10.py --workdir gs://BUCKET/ddpm/cifar10
  $PROG logs "\${T[@]}"
  $PROG stop "\${T[@]}" && $PROG delete "\${T[@]}" --yes
EOF
}

COMMANDS='create install train up logs stop status delete'
CMD=''
NAME=''
ZONE=''
PROJECT=''
ACCEL=''
VERSION=''
PROVISIONING=''
SRC=''
REPO=''
REF=''
PY_VERSION=3.11
EXTRAS=tpu
PIPS=()
TILDE='~' # expands on the workers, not here
REMOTE_DIR=$TILDE/jaxddpm
VENV_DIR=$TILDE/jaxddpm-venv
LOG_DIR=$TILDE/jaxddpm-logs
WORKER=0
LINES=100
FOLLOW=1
TIMEOUT=300
YES=0
REMOTE_TARBALL=/tmp/jaxddpm-src.tar.gz

normalize_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
  esac
  if parse_common "$@"; then
    shift "$CONSUMED"
    continue
  fi
  case $1 in
    --name | --zone | --project | --accelerator-type | --version | --src | --repo | --ref | \
      --python-version | --extras | --pip | --remote-dir | --venv | --log-dir | --worker | --lines | --timeout)
      need_value "$1" $# "${2-}"
      [[ -n $2 ]] || die "option $1 must not be empty"
      case $1 in
        --name) NAME=$2 ;;
        --zone) ZONE=$2 ;;
        --project) PROJECT=$2 ;;
        --accelerator-type) ACCEL=$2 ;;
        --version) VERSION=$2 ;;
        --src) SRC=$2 ;;
        --repo) REPO=$2 ;;
        --ref) REF=$2 ;;
        --python-version) PY_VERSION=$2 ;;
        --extras) EXTRAS=$2 ;;
        --pip) PIPS+=("$2") ;;
        --remote-dir) REMOTE_DIR=$2 ;;
        --venv) VENV_DIR=$2 ;;
        --log-dir) LOG_DIR=$2 ;;
        --worker) WORKER=$2 ;;
        --lines) LINES=$2 ;;
        --timeout) TIMEOUT=$2 ;;
      esac
      shift 2
      ;;
    --spot | --preemptible)
      [[ -z $PROVISIONING || $PROVISIONING == "$1" ]] || die "options --spot and --preemptible exclude each other"
      PROVISIONING=$1
      shift
      ;;
    --no-follow)
      FOLLOW=0
      shift
      ;;
    --yes)
      YES=1
      shift
      ;;
    -*) die "unknown option $1" ;;
    *)
      [[ -z $CMD ]] || die "unexpected argument '$1' after the command $CMD"
      case " $COMMANDS " in
        *" $1 "*) CMD=$1 ;;
        *) die "unknown command '$1' (one of: $COMMANDS)" ;;
      esac
      shift
      ;;
  esac
done

# ------------------------------------------------------------------------------------ validation
[[ -n $CMD ]] || die "a command is required (one of: $COMMANDS)"
[[ -n $NAME ]] || die "option --name is required"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "option --name must be lower-case letters, digits and -, starting with a letter, got '$NAME'"
[[ -n $ZONE ]] || die "option --zone is required"
[[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "option --zone must be a zone such as us-central2-b, got '$ZONE'"
[[ -z $PROJECT || $PROJECT =~ ^[a-z][-a-z0-9:.]*[a-z0-9]$ ]] || die "option --project is not a project id: '$PROJECT'"
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "option --worker must be a worker index or all, got '$WORKER'"
[[ $LINES =~ ^[0-9]+$ ]] || die "option --lines must be a number, got '$LINES'"
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "option --timeout must be a number of seconds, got '$TIMEOUT'"
[[ $PY_VERSION =~ ^3\.[0-9]+$ ]] || die "option --python-version must look like 3.11, got '$PY_VERSION'"
[[ $EXTRAS =~ ^[a-z0-9_-]+(,[a-z0-9_-]+)*$ ]] || die "option --extras must be a comma-separated list such as tpu,tf, got '$EXTRAS'"
dir_re='^(~/|/)[A-Za-z0-9_.-][A-Za-z0-9_./-]*$' dots_re='(^|/)\.\.?(/|$)'
for opt in --remote-dir --venv --log-dir; do
  case $opt in
    --remote-dir) dir=$REMOTE_DIR ;;
    --venv) dir=$VENV_DIR ;;
    --log-dir) dir=$LOG_DIR ;;
  esac
  [[ $dir =~ $dir_re && ! $dir =~ $dots_re ]] ||
    die "option $opt must be a directory below ~/ or an absolute path (letters, digits, _ . - /), got '$dir'"
done
for opt in --venv --log-dir; do
  if [[ $opt == --venv ]]; then dir=${VENV_DIR%/}; else dir=${LOG_DIR%/}; fi
  case $dir/ in
    "${REMOTE_DIR%/}"/*) die "option $opt must be outside --remote-dir, which install replaces: got '$dir'" ;;
  esac
done
[[ -z $SRC || -z $REPO ]] || die "options --src and --repo exclude each other"
[[ -z $REF || -n $REPO ]] || die "option --ref needs --repo"

needs() { case " $2 " in *" $CMD "*) return 0 ;; esac; return 1; }

if needs create 'create up'; then
  [[ -n $ACCEL ]] || die "option --accelerator-type is required by $CMD"
fi
if [[ -n $ACCEL ]]; then
  [[ $ACCEL =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
    die "option --accelerator-type must look like v4-32, v5litepod-16, v5p-32 or v6e-8, got '$ACCEL'"
  if [[ -z $VERSION ]]; then
    case $ACCEL in
      v2-* | v3-* | v4-*) VERSION=tpu-ubuntu2204-base ;;
      v5litepod-* | v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
      v5p-*) VERSION=v2-alpha-tpuv5 ;;
      v6e-*) VERSION=v2-alpha-tpuv6e ;;
      *) die "no default TPU software version for '$ACCEL': pass option --version" ;;
    esac
  fi
fi
if needs train 'train up'; then
  require_training_options
  case $WORKDIR in
    gs://*) ;;
    *) warn "--workdir $WORKDIR is not on GCS: the workers of a pod slice do not share disks and a deleted VM loses its own, so checkpoints there cannot resume the job; use gs://BUCKET/..." ;;
  esac
fi
if needs install 'install up' && [[ -z $REPO ]]; then
  SRC=${SRC:-$REPO_ROOT}
  [[ -f $SRC/pyproject.toml ]] || die "option --src must be a jaxddpm source tree (no pyproject.toml in '$SRC')"
  SRC=$(cd "$SRC" && pwd)
fi

# ------------------------------------------------------------------------------------ gcloud
gcloud_tpu() { # gcloud_tpu VERB ARG...: gcloud compute tpus tpu-vm VERB NAME --zone=ZONE [--project=...] ARG...
  local verb=$1
  shift
  local cmd=(gcloud compute tpus tpu-vm "$verb")
  if [[ $verb == scp ]]; then
    cmd+=("$@" "--zone=$ZONE")
  else
    cmd+=("$NAME" "--zone=$ZONE" "$@")
  fi
  if [[ -n $PROJECT ]]; then cmd+=("--project=$PROJECT"); fi
  run "${cmd[@]}"
}

on_workers() { # on_workers WORKER SCRIPT: run the shell SCRIPT on the given worker(s) over ssh
  gcloud_tpu ssh "--worker=$1" --command "$2"
}

# The scripts below run on the workers, in their login shell; $VARIABLES in single quotes expand there.
paths_script() {
  printf 'D=%s; V=%s; L=%s' "$(rpath "$REMOTE_DIR")" "$(rpath "$VENV_DIR")" "$(rpath "$LOG_DIR")"
}

# shellcheck disable=SC2016
install_script() {
  local s pkgs
  s="set -eu; $(paths_script); rm -rf \"\$D.new\""
  if [[ -n $REPO ]]; then
    s+="; git clone --quiet $(shquote "$REPO") \"\$D.new\""
    if [[ -n $REF ]]; then s+="; git -C \"\$D.new\" checkout --quiet $(shquote "$REF")"; fi
  else
    s+="; mkdir -p \"\$D.new\"; tar -xzf $REMOTE_TARBALL -C \"\$D.new\"; rm -f $REMOTE_TARBALL"
  fi
  s+='; rm -rf "$D"; mv "$D.new" "$D"'
  # uv makes the virtualenv with the wanted Python even where the image has an older one
  s+='; PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --user --quiet --upgrade uv'
  s+="; if [ ! -x \"\$V/bin/python\" ]; then python3 -m uv venv --python $PY_VERSION \"\$V\"; fi"
  pkgs=$(quote_cmd ".[$EXTRAS]" gcsfs ${PIPS[@]+"${PIPS[@]}"})
  s+="; cd \"\$D\"; python3 -m uv pip install --python \"\$V/bin/python\" -e $pkgs"
  s+='; "$V/bin/python" -c '\''import jax, jaxddpm; print("jaxddpm installed on", __import__("socket").gethostname(), "with jax", jax.__version__)'\'
  printf '%s' "$s"
}

# shellcheck disable=SC2016
train_script() {
  local s env_prefix=''
  jaxddpm_args
  env_prefix=$(quote_cmd env PYTHONUNBUFFERED=1 ${ENVS[@]+"${ENVS[@]}"})
  s="set -eu; $(paths_script); cd \"\$D\"; mkdir -p \"\$L\""
  s+='; if [ -f "$L/jaxddpm.pid" ] && kill -0 "$(cat "$L/jaxddpm.pid")" 2>/dev/null; then echo "jaxddpm is already running on $(hostname) (pid $(cat "$L/jaxddpm.pid")): stop it first" >&2; exit 1; fi'
  s+='; echo "=== $(date -u) launch on $(hostname) ===" >> "$L/jaxddpm.log"'
  s+="; nohup $env_prefix \"\$V/bin/python\" $(quote_cmd "${JAXDDPM_ARGS[@]}") >> \"\$L/jaxddpm.log\" 2>&1 < /dev/null &"
  s+=' echo $! > "$L/jaxddpm.pid"; echo "jaxddpm started on $(hostname): pid $!, log $L/jaxddpm.log"'
  printf '%s' "$s"
}

# shellcheck disable=SC2016
logs_script() {
  local follow=''
  if ((FOLLOW)); then follow=' -F'; fi
  printf '%s; tail -n %s%s "$L/jaxddpm.log"' "$(paths_script)" "$LINES" "$follow"
}

# shellcheck disable=SC2016
stop_script() {
  local s
  s="$(paths_script); P=\"\$L/jaxddpm.pid\""
  s+='; if [ -f "$P" ] && kill -0 "$(cat "$P")" 2>/dev/null; then pid=$(cat "$P"); kill -TERM "$pid"'
  s+="; echo \"SIGTERM sent to jaxddpm (pid \$pid) on \$(hostname); waiting up to $TIMEOUT s for its checkpoint\"; i=0"
  s+="; while kill -0 \"\$pid\" 2>/dev/null; do if [ \"\$i\" -ge $TIMEOUT ]; then echo \"jaxddpm (pid \$pid) still running on \$(hostname) after $TIMEOUT s\" >&2; exit 1; fi; sleep 1; i=\$((i + 1)); done"
  s+='; echo "jaxddpm stopped on $(hostname)"; else echo "jaxddpm is not running on $(hostname)"; fi'
  printf '%s' "$s"
}

do_create() {
  local flags=("--accelerator-type=$ACCEL" "--version=$VERSION")
  if [[ -n $PROVISIONING ]]; then flags+=("$PROVISIONING"); fi
  gcloud_tpu create "${flags[@]}"
}

do_install() {
  if [[ -z $REPO ]]; then
    local tarball="${TMPDIR:-/tmp}/jaxddpm-src-$NAME.tar.gz"
    # COPYFILE_DISABLE keeps macOS tar from adding ._* metadata files
    run env COPYFILE_DISABLE=1 tar -czf "$tarball" --exclude=.git '--exclude=.venv*' --exclude=venv \
      --exclude=__pycache__ '--exclude=*.egg-info' --exclude=.pytest_cache -C "$SRC" .
    gcloud_tpu scp "$tarball" "$NAME:$REMOTE_TARBALL" --worker=all
    if ! ((DRY_RUN)); then rm -f "$tarball"; fi
  fi
  on_workers all "$(install_script)"
}

do_train() { on_workers all "$(train_script)"; }

if ! ((DRY_RUN)) && ! command -v gcloud >/dev/null 2>&1; then
  fail "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), or use --dry-run"
fi

case $CMD in
  create) do_create ;;
  install) do_install ;;
  train) do_train ;;
  up)
    do_create
    do_install
    do_train
    ;;
  logs) on_workers "$WORKER" "$(logs_script)" ;;
  stop) on_workers all "$(stop_script)" ;;
  status) gcloud_tpu describe '--format=value(state)' ;;
  delete)
    if ((YES)); then gcloud_tpu delete --quiet; else gcloud_tpu delete; fi
    ;;
esac
