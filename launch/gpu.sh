#!/usr/bin/env bash
# Train (or sample, or evaluate) jaxddpm on one host with all of its local GPUs (jax[cuda12]).
# One process drives every GPU of the host: jax.jit shards the batch over a ("data",) mesh of them.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

usage() {
  cat <<EOF
Usage: $PROG --config configs/NAME.py --workdir DIR [options] [--config.FIELD=VALUE ...] [-- ARG...]

Runs, from the source tree this script is in, in the foreground:
  env XLA_PYTHON_CLIENT_MEM_FRACTION=... TF_FORCE_GPU_ALLOW_GROWTH=true \\
    VENV/bin/python -m jaxddpm --config ... --workdir ... [--mode ...] [overrides]
Run it again with the same --workdir to resume from the latest checkpoint (SIGTERM, e.g. kill PID, saves one first).

$COMMON_HELP

$GPU_HELP

Examples:
  $PROG --install --config configs/cifar10.py --workdir /data/runs/cifar10
  $PROG --gpus 0 --config configs/cifar10.py --workdir /data/runs/c10 --config.training.batch_size=64
EOF
}

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
    -*) die "unknown option $1" ;;
    *) die "unexpected argument '$1' (options start with --)" ;;
  esac
done

require_training_options

run cd "$REPO_ROOT"
gpu_install
gpu_command
if ! ((DRY_RUN)); then
  if [[ $PY_BIN == */* ]]; then
    [[ -x $PY_BIN ]] || fail "no Python at $PY_BIN: pass --install to create the virtualenv, or --venv DIR / --python PY"
  else
    command -v "$PY_BIN" >/dev/null 2>&1 || fail "no Python interpreter '$PY_BIN' on PATH (option --python)"
  fi
  exec "${COMMAND[@]}"
fi
run "${COMMAND[@]}"
