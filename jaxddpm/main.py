"""Command line: `python -m jaxddpm --config configs/X.py --workdir DIR [--mode train|sample|evaluate]`.

Config fields are overridden on the command line, e.g. `--config.training.batch_size=64`. The same
command runs on a laptop CPU, one GPU, or on every worker of a TPU pod (where JAX finds its peers
itself); several GPU hosts pass --coordinator_address, --num_processes and --process_id.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train", "sample", "evaluate")

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples (local or gs://).")
_MODE = flags.DEFINE_string("mode", "train", f"One of {MODES}.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                                   "host:port of process 0, for several GPU hosts (multi-controller JAX).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", "0")) or None,
                                      "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", int(os.environ["JAX_PROCESS_ID"])
                                   if os.environ.get("JAX_PROCESS_ID") else None,
                                   "This process's index (with --coordinator_address).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout", 100,
                                  "Multi-process runs: seconds without a heartbeat after which a process is "
                                  "declared dead; the other processes then stop with an error.")


def _cpu_devices(config) -> int:
  """config.system.cpu_devices, or (0) one CPU device per core as far as the batch sizes divide."""
  sizes, requested = (config.training.batch_size, config.eval.batch_size), config.system.cpu_devices
  is_int = lambda v, lo: isinstance(v, int) and not isinstance(v, bool) and v >= lo
  if not (is_int(requested, 0) and all(is_int(b, 1) for b in sizes)):
    return 1  # config.validate names the bad field before anything compiles
  from jaxddpm import parallel  # noqa: PLC0415
  return parallel.cpu_device_count(sizes, requested=requested)


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _MODE.value not in MODES:
    raise app.UsageError(f"--mode must be one of {MODES}, got {_MODE.value!r}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required (a configs/*.py file)")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  from jaxddpm import parallel  # noqa: PLC0415  (import jax only after flags are parsed)
  config = _CONFIG.value
  parallel.use_cpu_devices(_cpu_devices(config))
  try:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    heartbeat_timeout_s=_HEARTBEAT.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  import jax  # noqa: PLC0415
  logging.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.default_backend())
  from jaxddpm import workdir_lock  # noqa: PLC0415
  lock = None
  try:
    lock = workdir_lock.for_run(_WORKDIR.value, _MODE.value)  # one job per workdir, until this one ends
    if _MODE.value == "train":
      from jaxddpm import train  # noqa: PLC0415
      train.run(config, _WORKDIR.value)
    elif _MODE.value == "sample":
      from jaxddpm import generate  # noqa: PLC0415
      generate.run(config, _WORKDIR.value)
    else:
      from jaxddpm import evaluate  # noqa: PLC0415
      evaluate.run(config, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2 if isinstance(e, (ValueError, FileNotFoundError)) else 3
  except Exception as e:  # noqa: BLE001
    if jax.process_count() == 1:
      raise
    # A failed collective or barrier almost always means that another process died. Say so and exit at
    # once: a normal exit would wait in jax.distributed.shutdown for the dead process.
    print(f"error: process {jax.process_index()} of {jax.process_count()} stops: {type(e).__name__}: "
          f"{str(e)[:2000]}\n(in a multi-process run this usually means that another process failed or was "
          "killed; see its log)", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(4)  # the kernel drops the lock; the next run takes the file over
  finally:
    if lock is not None:
      lock.release()
  return 0


def run():
  """Console-script entry point."""
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
