"""One job per workdir: a lock file that a run (train, sample or evaluate) holds while it works (floor 3).

Two jobs writing one workdir delete each other's unfinished checkpoints and overwrite each other's
outputs, so the second is refused at once, with the first one's pid, host, mode and start time. The lock
is `WORKDIR/.jaxddpm.lock`, held with an exclusive `flock` by process 0 of the run (once per run, not per
process; the other processes learn process 0's verdict through JAX's coordination service). The kernel
drops a flock when its process dies, however it dies, so a lock left by a dead job (kill -9, a crash) is
taken over, and the file names who held it. Released (the file removed) when the job ends: normally, by
an error, or by SIGTERM (the train loop turns SIGTERM into a normal return).

Remote workdirs (gs://...) have no file locks: there the run goes on without one and says so.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time

LOCK_NAME = ".jaxddpm.lock"


class WorkdirInUse(ValueError):
  """Another live job holds the workdir's lock (a ValueError: the command line exits 2 on it)."""


def is_local(workdir: str) -> bool:
  return "://" not in os.fspath(workdir)


def _owner(mode: str) -> dict:
  return {"pid": os.getpid(), "host": socket.gethostname(), "mode": mode,
          "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _read(fd: int) -> dict:
  try:
    return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
  except (ValueError, OSError):
    return {}


def _who(owner: dict) -> str:
  return (f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} (mode {owner.get('mode', '?')}, "
          f"since {owner.get('started', '?')})")


class Lock:
  """A held workdir lock; `release()` (idempotent; also on leaving a `with` block) unlocks and removes
  the file, and the workdir if acquiring created it and it is still empty."""

  def __init__(self, path: str, fd: int | None, previous: dict, created_dir: str | None = None):
    self.path, self._fd, self._created_dir = path, fd, created_dir
    self.previous = previous  # who held the file before, if a dead job left it ({} if none)

  def release(self) -> None:
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.unlink(self.path)  # still holding the flock: nobody can have taken this file meanwhile
    except FileNotFoundError:
      pass
    finally:
      os.close(fd)  # drops the flock
    if self._created_dir:
      with contextlib.suppress(OSError):  # not empty: the job wrote there
        os.rmdir(self._created_dir)

  def __enter__(self) -> "Lock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def acquire(workdir: str, mode: str) -> Lock:
  """Locks WORKDIR for this process (creating WORKDIR if needed), or raises WorkdirInUse naming the job
  that holds it. A file left by a dead job is taken over (Lock.previous names that job)."""
  workdir = os.fspath(workdir)
  if not is_local(workdir):
    return Lock("", None, {})
  path = os.path.join(workdir, LOCK_NAME)
  created = None if os.path.isdir(workdir) else workdir
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = _open_locked(path, workdir)
  except OSError as e:
    raise ValueError(f"cannot lock workdir {workdir} (--workdir must be a writable folder): "
                     f"{e.strerror or e}: {e.filename or path}") from None
  previous = _read(fd)
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(_owner(mode)).encode(), 0)
  return Lock(path, fd, previous, created)


def _open_locked(path: str, workdir: str) -> int:
  """A descriptor of the lock file at `path`, flocked by us, or WorkdirInUse."""
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = _read(fd)
      os.close(fd)
      raise WorkdirInUse(f"workdir {workdir} is in use by another jaxddpm job: {_who(owner)}. Wait for it to "
                         "end or use another --workdir; nothing was changed.") from None
    except BaseException:
      os.close(fd)
      raise
    try:
      same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same_file = False
    if same_file:
      return fd
    os.close(fd)  # the holder removed the file between our open and flock: lock the new one


def _share_verdict(error: str) -> str:
  """Process 0's error message ('' when it holds the lock), given to every process of the run."""
  import jax  # noqa: PLC0415
  if jax.process_count() == 1:
    return error
  from jax._src import distributed  # noqa: PLC0415  (the coordination service's key-value store)
  client, key = distributed.global_state.client, "jaxddpm_workdir_lock_verdict"
  if client is None:  # several processes without jax.distributed's service: each goes by its own verdict
    return error
  if jax.process_index() == 0:
    client.key_value_set(key, "ok:" + error)
    return error
  return client.blocking_key_value_get(key, 300_000)[len("ok:"):]


def for_run(workdir: str, mode: str) -> Lock:
  """The run's lock on WORKDIR (release it when the job ends, or use it as a context manager): process 0
  acquires it and every process raises WorkdirInUse if that failed. Other processes and remote workdirs
  get a Lock that holds nothing."""
  import jax  # noqa: PLC0415
  lock, failure = Lock("", None, {}), None
  if jax.process_index() == 0:
    try:
      lock = acquire(workdir, mode)
    except ValueError as e:  # WorkdirInUse, or a workdir that cannot be written
      failure = e
  verdict = _share_verdict(str(failure) if failure else "")
  if failure:
    raise failure
  if verdict:
    raise WorkdirInUse(verdict)
  if jax.process_index() == 0:
    if not is_local(workdir):
      print(f"note: {workdir} is not a local path: no lock keeps a second job out of it", flush=True)
    elif lock.previous:
      print(f"note: took over the lock of {workdir} left by a job that is no longer running: "
            f"{_who(lock.previous)}", flush=True)
  return lock
