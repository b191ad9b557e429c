# shellcheck shell=bash
# shellcheck disable=SC2034  # globals set here are read by the scripts that source this file
#
# Helpers shared by launch/tpu_vm.sh, launch/gpu.sh and launch/gpu_multihost.sh: option errors, shell
# quoting, --dry-run, and the options common to every launcher (the training command's --config,
# --workdir, --mode, --data-dir, --config.* overrides, --env, arguments after `--`).
#
# Written for bash >= 3.2 (macOS laptops run tpu_vm.sh): no associative arrays, no mapfile, and every
# possibly-empty array is expanded as ${a[@]+"${a[@]}"} so that `set -u` accepts it.

PROG=${PROG:-$(basename "$0")}
LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd)

# A bad or missing option: message naming it, exit 2 (before anything is run).
die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  printf "Run '%s --help' for usage.\n" "$PROG" >&2
  exit 2
}

# A failure at run time (not a usage error): exit 1.
fail() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 1
}

warn() {
  printf '%s: warning: %s\n' "$PROG" "$*" >&2
}

# need_value OPTION NARGS [NEXT]: OPTION must be followed by a value that is not another option.
need_value() {
  if (($2 < 2)); then
    die "option $1 needs a value"
  fi
  case ${3-} in
    --*) die "option $1 needs a value (got the option '$3')" ;;
  esac
}

# shquote STRING: STRING as one POSIX shell word (unchanged when it needs no quoting).
shquote() {
  local s=$1 safe='^[A-Za-z0-9_./:=@%+,-]+$'
  if [[ $s =~ $safe ]]; then
    printf '%s' "$s"
    return
  fi
  local out="'" rest=$s
  while [[ $rest == *"'"* ]]; do
    out+="${rest%%"'"*}'\\''"
    rest=${rest#*"'"}
  done
  printf '%s' "$out$rest'"
}

# quote_cmd ARG...: the arguments as one shell command line.
quote_cmd() {
  local sep='' a
  for a in "$@"; do
    printf '%s%s' "$sep" "$(shquote "$a")"
    sep=' '
  done
}

# rpath PATH: PATH for a remote shell; a leading ~/ stays unquoted so that it expands there.
rpath() {
  local tilde='~'
  case $1 in
    "$tilde") printf '%s' "$tilde" ;;
    "$tilde"/*) printf '%s/%s' "$tilde" "$(shquote "${1#"$tilde"/}")" ;;
    *) shquote "$1" ;;
  esac
}

DRY_RUN=0

# run ARG...: run the command, or with --dry-run print it as a shell command line.
run() {
  if ((DRY_RUN)); then
    quote_cmd "$@"
    printf '\n'
  else
    "$@"
  fi
}

# normalize_args ARG...: sets ARGS, with --option=value split into --option value (--config.* overrides
# and everything after `--` are kept as given).
normalize_args() {
  ARGS=()
  while (($#)); do
    case $1 in
      --)
        ARGS+=("$@")
        return
        ;;
      --config.*) ARGS+=("$1") ;;
      --*=*) ARGS+=("${1%%=*}" "${1#*=}") ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
}

# ---------------------------------------------------------------- options of the training command
CONFIG=''
WORKDIR=''
MODE=''
DATA_DIR=''
OVERRIDES=()
ENVS=()
EXTRA=()

COMMON_HELP='Training command (python -m jaxddpm ...):
  --config PATH         config file, relative to the source tree (e.g. configs/cifar10.py; PATH:ARG allowed)
  --workdir DIR         checkpoints, logs, samples; an interrupted job resumes from its latest checkpoint
  --mode MODE           train (the program'"'"'s default), sample or evaluate
  --data-dir DIR        tfds data_dir, passed as --config.data.data_dir=DIR
  --config.FIELD=VALUE  config override, passed through (also --config.FIELD VALUE); repeatable
  --env NAME=VALUE      environment variable for the training process; repeatable
  -- ARG...             further flags appended to the training command as they are
  --dry-run             print the exact commands instead of running them
  -h, --help            this help'

# parse_common ARG...: if ARG is a common option, consume it (CONSUMED = number of words) and return 0.
parse_common() {
  local field_re='^--config\.[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$' env_re='^[A-Za-z_][A-Za-z0-9_]*='
  CONSUMED=2
  case $1 in
    --config)
      need_value "$1" $# "${2-}"
      case $2 in
        *.py | *.py:*) ;;
        *) die "option --config must name a .py config file (optionally PATH:ARG), got '$2'" ;;
      esac
      CONFIG=$2
      ;;
    --workdir)
      need_value "$1" $# "${2-}"
      [[ -n $2 ]] || die "option --workdir must not be empty"
      WORKDIR=$2
      ;;
    --mode)
      need_value "$1" $# "${2-}"
      case $2 in
        train | sample | evaluate) MODE=$2 ;;
        *) die "option --mode must be one of train, sample, evaluate; got '$2'" ;;
      esac
      ;;
    --data-dir)
      need_value "$1" $# "${2-}"
      [[ -n $2 ]] || die "option --data-dir must not be empty"
      DATA_DIR=$2
      ;;
    --env)
      need_value "$1" $# "${2-}"
      [[ $2 =~ $env_re ]] || die "option --env needs NAME=VALUE with NAME a shell variable name, got '$2'"
      ENVS+=("$2")
      ;;
    --config.*)
      local field=${1%%=*}
      [[ $field =~ $field_re ]] || die "override $field is not of the form --config.FIELD[.SUBFIELD...]=VALUE"
      if [[ $1 == *=* ]]; then
        OVERRIDES+=("$1")
        CONSUMED=1
      elif (($# >= 2)) && [[ $2 != --* ]]; then
        OVERRIDES+=("$1=$2")
      else
        OVERRIDES+=("$1")
        CONSUMED=1
      fi
      ;;
    --dry-run)
      DRY_RUN=1
      CONSUMED=1
      ;;
    --)
      shift
      EXTRA+=("$@")
      CONSUMED=$(($# + 1))
      ;;
    *) return 1 ;;
  esac
  return 0
}

require_training_options() {
  [[ -n $CONFIG ]] || die "option --config is required"
  [[ -n $WORKDIR ]] || die "option --workdir is required"
}

DIST_FLAGS=()

# jaxddpm_args: sets JAXDDPM_ARGS to the arguments after `python`: the program's own flags (then
# DIST_FLAGS, the distributed ones of gpu_multihost.sh), then the config overrides, then the arguments
# after `--`.
# absl lets a later flag win, so an explicit --config.data.data_dir=... override beats --data-dir.
jaxddpm_args() {
  JAXDDPM_ARGS=(-m jaxddpm --config "$CONFIG" --workdir "$WORKDIR")
  if [[ -n $MODE ]]; then JAXDDPM_ARGS+=(--mode "$MODE"); fi
  JAXDDPM_ARGS+=(${DIST_FLAGS[@]+"${DIST_FLAGS[@]}"})
  if [[ -n $DATA_DIR ]]; then JAXDDPM_ARGS+=("--config.data.data_dir=$DATA_DIR"); fi
  JAXDDPM_ARGS+=(${OVERRIDES[@]+"${OVERRIDES[@]}"} ${EXTRA[@]+"${EXTRA[@]}"})
}

# ------------------------------------------------------------------ options of the GPU launchers
VENV=''
PYTHON=''
INSTALL=0
GPUS=''
MEM_FRACTION=''

GPU_HELP='Python environment and GPUs:
  --venv DIR            virtualenv with jaxddpm installed (default: <repo>/.venv)
  --python PY           run this interpreter instead of a virtualenv'"'"'s; with --install, the interpreter
                        that creates the virtualenv (default python3; must be >= 3.11)
  --install             create the virtualenv if missing and pip install -e '"'"'.[cuda]'"'"' (jax[cuda12]) first
  --gpus LIST           only these GPUs, e.g. 0,1 (sets CUDA_VISIBLE_DEVICES; default: all GPUs)
  --mem-fraction F      XLA_PYTHON_CLIENT_MEM_FRACTION, in (0, 1] (default: the environment'"'"'s, else 0.90)'

parse_gpu() {
  CONSUMED=2
  case $1 in
    --venv)
      need_value "$1" $# "${2-}"
      [[ -n $2 ]] || die "option --venv must not be empty"
      VENV=$2
      ;;
    --python)
      need_value "$1" $# "${2-}"
      [[ -n $2 ]] || die "option --python must not be empty"
      PYTHON=$2
      ;;
    --install)
      INSTALL=1
      CONSUMED=1
      ;;
    --gpus)
      need_value "$1" $# "${2-}"
      [[ $2 =~ ^[0-9]+(,[0-9]+)*$ ]] || die "option --gpus needs a comma-separated list of GPU indices, got '$2'"
      GPUS=$2
      ;;
    --mem-fraction)
      need_value "$1" $# "${2-}"
      [[ $2 =~ ^(0?\.[0-9]*[1-9][0-9]*|1|1\.0*)$ ]] || die "option --mem-fraction must be a number in (0, 1], got '$2'"
      MEM_FRACTION=$2
      ;;
    *) return 1 ;;
  esac
  return 0
}

# gpu_command: sets COMMAND to the training command on this host (env ... python -m jaxddpm ...) and
# PY_BIN to its interpreter. Env set here, and why:
#   XLA_PYTHON_CLIENT_MEM_FRACTION  XLA preallocates 75% of each GPU by default; the training process
#                                   is the only GPU user, so 90% leaves room for cuDNN workspaces and
#                                   NCCL buffers, which live outside XLA's pool, and fits larger batches.
#   TF_FORCE_GPU_ALLOW_GROWTH=true  tensorflow-datasets imports TensorFlow when it is installed; a GPU
#                                   build of it would otherwise grab all free GPU memory for its own.
gpu_command() {
  local py=$PYTHON fraction=${MEM_FRACTION:-${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}}
  if [[ -z $py ]]; then py=${VENV:-$REPO_ROOT/.venv}/bin/python; fi
  COMMAND=(env "XLA_PYTHON_CLIENT_MEM_FRACTION=$fraction" TF_FORCE_GPU_ALLOW_GROWTH=true)
  if [[ -n $GPUS ]]; then COMMAND+=("CUDA_VISIBLE_DEVICES=$GPUS"); fi
  PY_BIN=$py
  COMMAND+=(${ENVS[@]+"${ENVS[@]}"} "$py")
  jaxddpm_args
  COMMAND+=("${JAXDDPM_ARGS[@]}")
}

# gpu_install: with --install, create the virtualenv if missing and install the project with the cuda
# extra (jax[cuda12]) from the source tree this script is in.
gpu_install() {
  ((INSTALL)) || return 0
  local venv=${VENV:-$REPO_ROOT/.venv} py=${PYTHON:-python3}
  if [[ ! -x $venv/bin/python ]]; then
    if ! ((DRY_RUN)); then
      command -v "$py" >/dev/null 2>&1 || fail "--install: no Python interpreter '$py' (pass --python PY)"
      "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        fail "--install: $py is Python $("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])'); jaxddpm needs >= 3.11 (pass --python python3.11 or newer)"
    fi
    run "$py" -m venv "$venv"
  fi
  run "$venv/bin/python" -m pip install --upgrade pip
  run "$venv/bin/python" -m pip install -e '.[cuda]'
  # the training command then runs the virtualenv's interpreter
  VENV=$venv
  PYTHON=''
}
