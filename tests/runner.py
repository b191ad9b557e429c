"""Subprocess runs of `python -m jaxddpm` for the system tests, and helpers to inspect their workdirs.

Every run is a real process (own flags, own devices, own signals) under a timeout. Runs are kept cheap:
the tiny configs/test.py, a data_dir and a JAX persistent compilation cache shared by the whole test
session (and by the pytest-xdist workers of one session), so only the first run of a program compiles it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from jaxddpm import builtin_datasets

REPO = Path(__file__).resolve().parents[1]
TEST_CONFIG = REPO / "configs" / "test.py"
# Quiet, deterministic subprocess output: absl at WARNING, no C++ INFO logs.
QUIET = ("--verbosity=-1",)
# For in-process compiles of a few steps of a tiny model: unoptimised XLA code compiles in half the time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def shared_dir(tmp_path_factory, name: str) -> Path:
  """A directory shared by every test of the session (and by all xdist workers of the session)."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  path = root / name
  path.mkdir(parents=True, exist_ok=True)
  return path


def session_data_dir(tmp_path_factory) -> str:
  """The session's tfds data_dir with the built-in digits prepared (built once, under a file lock)."""
  path = shared_dir(tmp_path_factory, "tfds")
  from jaxddpm import data  # noqa: PLC0415
  data.dataset_info("digits", str(path))
  return str(path)


# The reference run shared by test_e2e and test_resume: uninterrupted, REFERENCE_STEPS steps of
# configs/test.py, a checkpoint every REFERENCE_EVERY steps, a console line every step.
REFERENCE_STEPS, REFERENCE_EVERY = 24, 4
REFERENCE_OVERRIDES = ("training.log_every=1", f"training.checkpoint_every={REFERENCE_EVERY}",
                       "training.keep_checkpoints=10")


def reference_run(tmp_path_factory) -> tuple[Path, "Result"]:
  """(workdir, result) of the session's reference run; the first test (of any xdist worker) to ask runs
  it, the others wait and reuse it. Its workdir must only be read."""
  root = shared_dir(tmp_path_factory, "reference")
  data_dir, cache = session_data_dir(tmp_path_factory), shared_dir(tmp_path_factory, "jax_cache")
  wd, done = root / "wd", root / "result.json"
  with builtin_datasets.file_lock(root / ".lock"):
    if not done.exists():
      shutil.rmtree(wd, ignore_errors=True)
      r = run(command(wd, data_dir, f"training.num_steps={REFERENCE_STEPS}", *REFERENCE_OVERRIDES), env(cache))
      done.write_text(json.dumps(dataclasses.asdict(r)))
  return wd, Result(**json.loads(done.read_text()))


def env(cache_dir, devices: int = 1, **extra) -> dict:
  """Environment of a subprocess: `devices` fake CPU devices and the persistent compilation cache."""
  e = dict(os.environ)
  flags = [f for f in e.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  # Unoptimised CPU code: these runs take a few steps, and XLA compiles the test model's train step in
  # less than half the time (about 8 s instead of 20 s of CPU).
  flags += ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
  e["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  e.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1",
           JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  e.update({k: str(v) for k, v in extra.items()})
  return e


def command(workdir, data_dir=None, *overrides: str, mode: str = "train", config=TEST_CONFIG,
            process: tuple[str, int, int] | None = None) -> list[str]:
  """argv of `python -m jaxddpm`; overrides like "training.num_steps=10"; process = (address, n, id)."""
  cmd = [sys.executable, "-m", "jaxddpm", f"--config={config}", f"--workdir={workdir}", f"--mode={mode}",
         *QUIET]
  if data_dir is not None:
    cmd.append(f"--config.data.data_dir={data_dir}")
  cmd += [f"--config.{o}" for o in overrides]
  if process is not None:
    cmd += [f"--coordinator_address={process[0]}", f"--num_processes={process[1]}", f"--process_id={process[2]}"]
  return cmd


@dataclasses.dataclass
class Result:
  returncode: int
  stdout: str
  stderr: str
  seconds: float

  @property
  def output(self) -> str:
    return self.stdout + self.stderr


def run(cmd, env, timeout: float = 240) -> Result:
  """Runs to completion (killed after `timeout` s, which fails the test)."""
  t0 = time.monotonic()
  p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd="/")
  return Result(p.returncode, p.stdout, p.stderr, time.monotonic() - t0)


class Proc:
  """A background run whose stdout/stderr go to files that the test can poll."""

  def __init__(self, cmd, env, log_prefix):
    self.out_path, self.err_path = Path(f"{log_prefix}.out"), Path(f"{log_prefix}.err")
    self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
    self.t0 = time.monotonic()
    self.popen = subprocess.Popen(cmd, env=env, stdout=self._out, stderr=self._err, cwd="/")

  @property
  def stdout(self) -> str:
    return self.out_path.read_text()

  @property
  def stderr(self) -> str:
    return self.err_path.read_text()

  def poll(self):
    return self.popen.poll()

  def wait_for(self, predicate, timeout: float = 120, interval: float = 0.005) -> bool:
    """Polls predicate() until true (True) or the process ended / timeout passed (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
      if predicate():
        return True
      if self.popen.poll() is not None:
        return bool(predicate())
      time.sleep(interval)
    return False

  def signal(self, sig=signal.SIGKILL):
    if self.popen.poll() is None:
      self.popen.send_signal(sig)

  def wait(self, timeout: float = 120) -> Result:
    try:
      rc = self.popen.wait(timeout=timeout)
    finally:
      if self.popen.poll() is None:
        self.popen.kill()
        self.popen.wait()
      self._out.close()
      self._err.close()
    return Result(rc, self.stdout, self.stderr, time.monotonic() - self.t0)


def steps_printed(text: str) -> list[int]:
  """Steps of the console lines `step N/M loss ...` of process 0."""
  return [int(line.split()[1].split("/")[0]) for line in text.splitlines() if line.startswith("step ")]


def console_metric(text: str, name: str) -> dict[int, float]:
  """step -> value of `name` in the console lines `step N/M ... name value ...`."""
  out = {}
  for line in text.splitlines():
    if line.startswith("step "):
      words = line.split()
      out[int(words[1].split("/")[0])] = float(words[words.index(name) + 1])
  return out


def iterator_state(step: int, batch_size: int = 16) -> dict:
  """The data state a checkpoint of configs/test.py (batch 16) holds after `step` steps: the input
  pipeline's position, step x batch examples into this process's stream."""
  from jaxddpm import batching  # noqa: PLC0415
  return {"iterator": {"kind": batching.STATE_KIND, "examples": step * batch_size}}


def checkpoint_steps(workdir) -> list[int]:
  """Committed checkpoint steps on disk (integer-named folders)."""
  d = Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def load_state(workdir, step: int) -> dict:
  """The saved TrainState of a step as a nested dict of numpy arrays (read with orbax, no template)."""
  import jax  # noqa: PLC0415
  import orbax.checkpoint as ocp  # noqa: PLC0415
  path = Path(workdir) / "checkpoints" / str(step) / "state"
  meta = ocp.PyTreeCheckpointer().metadata(path)
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def assert_trees_equal(a, b, what: str = "") -> None:
  """Bitwise equality of two pytrees of arrays (same structure, dtypes and bytes)."""
  import jax  # noqa: PLC0415
  fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [jax.tree_util.keystr(p) for p, _ in fa] == [jax.tree_util.keystr(p) for p, _ in fb], what
  bad = [jax.tree_util.keystr(p) for (p, x), (_, y) in zip(fa, fb)
         if np.asarray(x).dtype != np.asarray(y).dtype or np.asarray(x).tobytes() != np.asarray(y).tobytes()]
  assert not bad, f"{what}: {len(bad)} of {len(fa)} leaves differ, e.g. {bad[:3]}"


def tree_digest(root) -> dict[str, str]:
  """path -> sha256 of every file (and '<dir>' for every folder) under root: compare before/after."""
  root = Path(root)
  if not root.exists():
    return {}
  out = {}
  for p in sorted(root.rglob("*")):
    rel = str(p.relative_to(root))
    out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
  return out
