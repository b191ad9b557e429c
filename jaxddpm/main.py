"""Train, sample from or evaluate a diffusion model.

  python -m jaxddpm --config configs/NAME.py --workdir DIR [--mode train|sample|evaluate]
                    [--config.SECTION.FIELD=VALUE ...]

Any config field is overridden on the command line, e.g. --config.training.batch_size=64 or
--config.sample.method=ddim --config.sample.timesteps=ddim50 (sections: data, model, diffusion, training,
optim, sample, eval, system). Running the same command again with the same --workdir resumes.

The console shows the run's summary, progress, where outputs went and the scores; library log lines go
to DIR/jaxddpm.log (--verbosity=0 shows them on the console too, --verbosity=1 adds tracebacks to
errors). Exit codes: 0 done (also after SIGTERM / Ctrl-C, which save a checkpoint first), 2 bad input,
3 training stopped by non-finite steps, 4 a multi-process run lost a peer, 130 aborted by a second Ctrl-C.
Several GPU hosts pass --coordinator_address, --num_processes and --process_id; a TPU pod finds its
peers itself.
"""
from __future__ import annotations

import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train", "sample", "evaluate")
EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_PEER_LOST, EXIT_ABORTED = 2, 3, 4, 130

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file (required).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples, local or gs:// "
                               "(required).")
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
HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "-?")


class BadInput(Exception):
  """A command line or config that cannot run: one `error:` line, exit 2."""


# ---------------------------------------------------------------------------------------- messages
def _verbosity(argv) -> int | None:
  """--verbosity / -v as given on the command line (None if absent); readable before flags are parsed."""
  for i, a in enumerate(argv):
    m = re.fullmatch(r"(?:--verbosity|-v)(?:=(-?\d+))?", a)
    if m:
      v = m.group(1) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else "")
      try:
        return int(v)
      except ValueError:
        return None
  return None


def _fail(message: str, code: int, argv=None) -> None:
  """Prints `error: message` (one line; the traceback first with --verbosity >= 1) and exits."""
  if (_verbosity(argv if argv is not None else sys.argv) or 0) >= 1 and sys.exc_info()[0] is not None:
    traceback.print_exc()
  sys.stdout.flush()
  print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
  sys.exit(code)


def _config_path(argv) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _parse_error(e: BaseException, argv) -> str:
  """One line for an exception raised while the flags (and the config file) were parsed."""
  text = str(e.args[0]) if isinstance(e, (KeyError, AttributeError)) and e.args else str(e)
  unknown = re.match(r"""'(\w+)'\s*Did you mean "(\w+)" instead""", text.strip("'\"").replace("\\'", "'")
                     .replace("\\n", " "))
  if unknown:
    bad = [a.split("=")[0] for a in argv if a.startswith("--config.") and unknown.group(1) in a]
    where = bad[0] if bad else f"--config...{unknown.group(1)}"
    return f"{where}: the config has no field {unknown.group(1)!r}; did you mean {unknown.group(2)!r}?"
  if isinstance(e, (KeyError, AttributeError)) and "--config." in " ".join(argv):
    return f"a --config.FIELD override names no field of the config ({text.strip()})"
  tb = traceback.extract_tb(e.__traceback__)
  path = _config_path(argv)
  if path and any(os.path.abspath(f.filename) == os.path.abspath(path) for f in tb):
    return f"the config file {path} raised {type(e).__name__}: {text}"
  if isinstance(e, flags.Error):
    return text
  return f"{type(e).__name__}: {text}"


def help_text() -> str:
  """What `--help` prints: the usage above and this program's own flags."""
  own = flags.FLAGS.module_help(sys.modules[__name__])
  return (__doc__.strip() + "\n\nflags:\n" + own + "\n  --verbosity: 0 shows library INFO logs on the console, 1 also "
          "tracebacks\n\n--helpfull lists every flag of every library.\n")


def parse_flags(argv):
  """absl's flag parsing with --help that exits 0 and parse errors as one line (exit 2)."""
  if any(a in HELP_FLAGS for a in argv[1:]):
    sys.stdout.write(help_text())
    sys.exit(0)
  path = _config_path(argv)
  if path is not None and not os.path.isfile(path):
    _fail(f"--config={path}: no such file" + (" (a directory)" if os.path.isdir(path) else ""), EXIT_BAD_INPUT,
          argv)
  try:
    rest = flags.FLAGS(argv)
  except SystemExit:
    raise
  except Exception as e:  # noqa: BLE001  (ml_collections raises KeyError/AttributeError/IOError, files anything)
    _fail(_parse_error(e, argv), EXIT_BAD_INPUT, argv)
  return rest


# -------------------------------------------------------------------------------------------- run
def _cpu_devices(config) -> int:
  """config.system.cpu_devices, or (0) one CPU device per core as far as the batch sizes divide."""
  sizes, requested = (config.training.batch_size, config.eval.batch_size), config.system.cpu_devices
  is_int = lambda v, lo: isinstance(v, int) and not isinstance(v, bool) and v >= lo
  if not (is_int(requested, 0) and all(is_int(b, 1) for b in sizes)):
    return 1  # config.validate names the bad field before anything compiles
  from jaxddpm import parallel  # noqa: PLC0415
  return parallel.cpu_device_count(sizes, requested=requested)


def _multi_process_env() -> bool:
  """True when JAX will run several processes (then JAX's preemption service owns SIGTERM)."""
  from jaxddpm import parallel  # noqa: PLC0415
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return bool(_COORDINATOR.value) or "," in hosts or any(os.environ.get(k) for k in parallel.MULTI_HOST_ENV[1:])


def summary(config, mode: str, workdir: str) -> str:
  """The run in two lines: what, where, and the settings a person checks first."""
  c = config
  first = f"jaxddpm {mode}: {_config_path(sys.argv) or 'config'} -> {workdir}"
  d, m, t, s = c.data, c.model, c.training, c.sample
  diff = f"diffusion {c.diffusion.schedule} T={c.diffusion.num_timesteps} {c.diffusion.mean_type}/{c.diffusion.var_type}"
  if mode == "train":
    what = (f"batch {t.batch_size}, {t.num_steps} steps, lr {c.optim.lr:g}, seed {t.seed}, checkpoint every "
            f"{t.checkpoint_every}")
  else:
    what = f"sampler {s.method} {s.timesteps or 'all steps'}, {s.num_samples} samples, seed {s.seed}"
  return f"{first}\n  data {d.name}, model {m.preset}, {diff}, {what}"


def main(argv) -> int:
  if len(argv) > 1:
    raise BadInput(f"unexpected arguments {argv[1:]}: flags are written --name=value")
  if _MODE.value not in MODES:
    raise BadInput(f"--mode={_MODE.value}: allowed values are {', '.join(MODES)}")
  if _CONFIG.value is None:
    raise BadInput("--config is required (a configs/*.py file)")
  if not _WORKDIR.value:
    raise BadInput("--workdir is required")
  from jaxddpm import logger, stop  # noqa: PLC0415  (light: no jax)
  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  logger.quiet_console(verbosity=flags.FLAGS.verbosity if flags.FLAGS["verbosity"].present else None)
  # Installed before JAX starts, so that a stop request during start-up is honoured (train only).
  signals = stop.StopSignals(sigterm=not _multi_process_env()) if mode == "train" else None
  from jaxddpm import parallel  # noqa: PLC0415  (import jax only after flags are parsed)
  parallel.use_cpu_devices(_cpu_devices(config))
  try:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    heartbeat_timeout_s=_HEARTBEAT.value)
  except ValueError as e:
    raise BadInput(str(e)) from None
  import jax  # noqa: PLC0415
  if jax.process_index() == 0:
    print(summary(config, mode, workdir), flush=True)
  # --- devices: one line (backend, device kind and count, processes) ---
  logging.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.default_backend())
  if jax.process_index() == 0:  # what runs: backend, devices, the network's compute dtype
    from jaxddpm import config as config_lib  # noqa: PLC0415
    dtype = config_lib.resolve_dtype(config.model.dtype).name if config.model.dtype in config_lib.DTYPES else "?"
    print(f"  devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"{jax.process_count()} process{'es' if jax.process_count() > 1 else ''}; network computes in "
          f"{dtype} (model.dtype={config.model.dtype!r}), diffusion math in float32", flush=True)
  from jaxddpm import workdir_lock  # noqa: PLC0415
  lock = None
  try:
    from jaxddpm import experiment  # noqa: PLC0415
    experiment.check_workdir(workdir)  # a file, or not writable: say so before the lock tries to create it
    lock = workdir_lock.for_run(workdir, mode)  # one job per workdir, until this one ends
    if mode == "train":
      from jaxddpm import train  # noqa: PLC0415
      train.run(config, workdir, signals=signals)
    elif mode == "sample":
      from jaxddpm import generate  # noqa: PLC0415
      generate.run(config, workdir)
    else:
      from jaxddpm import evaluate  # noqa: PLC0415
      evaluate.run(config, workdir)
  except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
    raise BadInput(str(e)) from e
  except FloatingPointError as e:
    _fail(str(e), EXIT_NONFINITE)
  except (KeyboardInterrupt, BadInput):
    raise
  except Exception as e:  # noqa: BLE001
    if jax.process_count() == 1:
      raise
    # A failed collective or barrier almost always means that another process died. Say so and exit at
    # once: a normal exit would wait in jax.distributed.shutdown for the dead process.
    print(f"error: process {jax.process_index()} of {jax.process_count()} stops: {type(e).__name__}: "
          f"{str(e)[:2000]}\n(in a multi-process run this usually means that another process failed or was "
          "killed; see its log)", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_PEER_LOST)  # the kernel drops the lock; the next run takes the file over
  finally:
    if lock is not None:
      lock.release()
    if signals is not None:
      signals.close()
  return 0


def _main_with_errors(argv) -> None:
  try:
    code = main(argv)
  except BadInput as e:
    _fail(str(e), EXIT_BAD_INPUT)
  except KeyboardInterrupt:
    _fail("aborted by Ctrl-C (in training: nothing saved since the newest checkpoint)", EXIT_ABORTED)
  except Exception as e:  # noqa: BLE001  (a bug: one line here, the traceback in the log file)
    logging.log(logging.INFO, "uncaught exception", exc_info=True)
    _fail(f"{type(e).__name__}: {e} (--verbosity=1 prints the traceback; it is also in the log file "
          "WORKDIR/jaxddpm.log when the run had opened it)", 1)
  sys.exit(code)


def run():
  """Console-script entry point."""
  app.run(_main_with_errors, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
