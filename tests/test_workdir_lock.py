"""One job per workdir (issue 16, item 2).

A real second process holds the lock (`jaxddpm.workdir_lock.acquire`, as process 0 of a run does): this
process is refused with that process's pid and host, in the library and through the real command line
(exit 2, one line, the workdir unchanged). Killed with SIGKILL, the holder leaves its lock file behind:
the next job takes it over and names the dead job. Released, the file is gone.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

import runner
from jaxddpm import workdir_lock

HOLDER = textwrap.dedent("""
    import sys
    from jaxddpm import workdir_lock
    lock = workdir_lock.acquire(sys.argv[1], "train")
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin (or kills us)
    lock.release()
""")


class Holder:
  """A separate process holding WORKDIR's lock until `stop()` or `kill()`."""

  def __init__(self, workdir, cache_dir):
    self.p = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=runner.env(cache_dir))
    assert self.p.stdout.readline() == "held\n"

  def stop(self):
    self.p.stdin.close()
    assert self.p.wait(timeout=60) == 0

  def kill(self):
    self.p.kill()
    self.p.wait(timeout=60)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return runner.session_data_dir(tmp_path_factory)


def test_held_lock_refuses_a_second_job_and_a_dead_holders_lock_is_taken_over(tmp_path):
  wd = tmp_path / "wd"
  holder = Holder(wd, tmp_path / "cache")
  try:
    with pytest.raises(workdir_lock.WorkdirInUse) as e:
      workdir_lock.acquire(str(wd), "sample")
    msg = str(e.value)
    assert f"pid {holder.p.pid} on host {socket.gethostname()}" in msg and "mode train" in msg, msg
    assert str(wd) in msg
  finally:
    holder.kill()  # SIGKILL: no cleanup, the file stays with the dead job's pid
  lock_file = wd / workdir_lock.LOCK_NAME
  assert json.loads(lock_file.read_text())["pid"] == holder.p.pid
  with workdir_lock.acquire(str(wd), "train") as lock:
    assert lock.previous["pid"] == holder.p.pid and lock.previous["host"] == socket.gethostname()
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    with pytest.raises(workdir_lock.WorkdirInUse, match=f"pid {os.getpid()} "):
      workdir_lock.acquire(str(wd), "evaluate")  # a second descriptor, even in this process, is refused
  assert not lock_file.exists()
  # a holder that ends normally removes its file; the workdir it created is removed when left empty
  holder = Holder(tmp_path / "new" / "wd", tmp_path / "cache")
  holder.stop()
  assert not (tmp_path / "new" / "wd").exists()


def test_unusable_and_remote_workdirs(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match=r"cannot lock workdir .*file/wd .*writable folder"):
    workdir_lock.acquire(str(tmp_path / "file" / "wd"), "train")
  lock = workdir_lock.acquire("gs://some-bucket/wd", "train")  # no file locks on object stores
  assert lock.path == "" and lock.previous == {}
  lock.release()


def test_command_line_is_refused_while_another_job_holds_the_workdir(tmp_path, data_dir):
  """`python -m jaxddpm` on a workdir that another process holds: exit 2, one line naming that process,
  no traceback, nothing in the workdir changed."""
  mine = tmp_path / "wd"
  (mine / "samples").mkdir(parents=True)
  (mine / "samples" / "step_00000002.png").write_bytes(b"an output of the other job")
  holder = Holder(mine, tmp_path / "cache")
  try:
    before = runner.tree_digest(mine)
    r = runner.run(runner.command(mine, data_dir, mode="sample"), runner.env(tmp_path / "cache"), timeout=120)
    assert r.returncode == 2, r.output[-3000:]
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.output, r.output[-3000:]
    assert f"in use by another jaxddpm job: pid {holder.p.pid} on host {socket.gethostname()}" in r.stderr
    assert runner.tree_digest(mine) == before
  finally:
    holder.stop()
  assert not (mine / workdir_lock.LOCK_NAME).exists()


def test_two_process_run_is_refused_by_process_0s_verdict(tmp_path, data_dir):
  """A two-process run (jax.distributed on 127.0.0.1) on a held workdir: process 0 tries the lock once
  for the run; both processes exit 2 at once with the holder's pid, none waits for the other."""
  from conftest import free_port  # noqa: PLC0415
  wd = tmp_path / "wd"
  holder = Holder(wd, tmp_path / "cache")
  try:
    address = f"127.0.0.1:{free_port()}"
    env = runner.env(tmp_path / "cache", devices=1)
    procs = [runner.Proc(runner.command(wd, data_dir, process=(address, 2, i)), env, tmp_path / f"p{i}")
             for i in range(2)]
    results = [p.wait(timeout=120) for p in procs]
  finally:
    holder.stop()
  for i, r in enumerate(results):
    assert r.returncode == 2, (i, r.output[-3000:])
    assert f"in use by another jaxddpm job: pid {holder.p.pid}" in r.stderr and "Traceback" not in r.output, r.output
    assert r.seconds < 60, (i, r.seconds)
