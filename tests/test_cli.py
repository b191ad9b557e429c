"""The command line a newcomer meets (issue 15; items 5 and 6 of issue 16), through real processes.

- `--help` exits 0 and lists the flags; bad input of every kind (config file missing or raising, unknown
  field, workdir that is a file or not writable, data_dir that is a file, a full disk) is one `error:`
  line with exit 2, no traceback (one with --verbosity=1), and the workdir hashes the same afterwards;
- SIGTERM before training starts exits 0 with a message and writes nothing;
- Ctrl-C saves and exits 0; the resumed run ends bitwise equal to an uninterrupted one, TensorBoard holds
  each step once, the console stays short and free of library log lines (they go to WORKDIR/jaxddpm.log);
  re-running the finished job writes nothing; a missing final grid is produced, with the same bytes;
- two sampling configurations write side by side; a chain run in segments gives the same samples.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import runner

M = runner.REFERENCE_STEPS
ABSL_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")  # absl's log-line prefix


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return runner.session_data_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return runner.shared_dir(tmp_path_factory, "jax_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  wd, r = runner.reference_run(tmp_path_factory)
  assert r.returncode == 0, r.stderr[-3000:]
  return wd


def _default_console(cmd):
  """The command as a user types it: without the tests' --verbosity."""
  return [a for a in cmd if a not in runner.QUIET]


def _run_all(cmds, env, timeout=120):
  """Runs the commands concurrently; returns their Results in order."""
  procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
           for c in cmds]
  out = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=timeout)
    out.append(runner.Result(p.returncode, stdout, stderr, 0.0))
  return out


def _assert_one_error_line(r, code, text):
  assert r.returncode == code, r.output[-3000:]
  assert "Traceback" not in r.output, r.output[-3000:]
  errors = r.stderr.strip().splitlines()
  assert len(errors) == 1 and errors[0].startswith("error: ") and text in errors[0], r.stderr[-3000:]


def test_help_and_config_errors(tmp_path):
  env = runner.env(tmp_path / "cache")
  raising = tmp_path / "raising.py"
  raising.write_text("def get_config():\n  return {}\n\nraise RuntimeError('a config that fails')\n")
  wd = tmp_path / "wd"
  base = [sys.executable, "-m", "jaxddpm", f"--workdir={wd}"]
  cmds = {
      "help": [sys.executable, "-m", "jaxddpm", "--help"],
      "missing": base + [f"--config={tmp_path / 'nope.py'}"],
      "raising": base + [f"--config={raising}"],
      "raising_verbose": base + [f"--config={raising}", "--verbosity=1"],
      "unknown_field": base + [f"--config={runner.TEST_CONFIG}", "--config.training.num_stepz=5"],
  }
  r = dict(zip(cmds, _run_all(list(cmds.values()), env)))
  assert r["help"].returncode == 0, r["help"].output[-2000:]
  for flag in ("--config", "--workdir", "--mode", "--config.SECTION.FIELD=VALUE", "--verbosity"):
    assert flag in r["help"].stdout, r["help"].stdout
  _assert_one_error_line(r["missing"], 2, f"--config={tmp_path / 'nope.py'}: no such file")
  _assert_one_error_line(r["raising"], 2, f"the config file {raising} raised RuntimeError: a config that fails")
  _assert_one_error_line(r["unknown_field"], 2,
                         "--config.training.num_stepz: the config has no field 'num_stepz'; did you mean 'num_steps'?")
  v = r["raising_verbose"]
  assert v.returncode == 2 and "Traceback" in v.stderr and v.stderr.strip().splitlines()[-1].startswith("error: ")
  assert not wd.exists()


FULL_DISK = textwrap.dedent("""
    import collections, shutil, sys
    from jaxddpm import main
    Usage = collections.namedtuple("Usage", "total used free")
    shutil.disk_usage = lambda path: Usage(10 ** 12, 10 ** 12 - 5 * 2 ** 20, 5 * 2 ** 20)  # 5 MiB free
    sys.argv = {argv}
    main.run()
""")


def test_workdir_and_data_errors_change_nothing(reference, data_dir, tmp_path):
  """A workdir that is a file or is not writable (by a user without root's override of file
  permissions), a data_dir that is a file, a full disk: one line, exit 2, nothing changed."""
  env = runner.env(tmp_path / "cache")
  root = tmp_path / "world"
  root.mkdir()
  a_file = root / "a_file"
  a_file.write_text("not a directory\n")
  locked = root / "locked"
  shutil.copytree(reference / "checkpoints" / "4", locked / "checkpoints" / "4")
  full = root / "full"
  shutil.copytree(reference / "checkpoints" / "4", full / "checkpoints" / "4")
  cmd = lambda wd, *extra: runner.command(wd, data_dir, *extra)
  unprivileged = []
  if os.getuid() == 0:  # root passes every permission check: drop the capabilities that let it
    if not shutil.which("setpriv"):
      pytest.skip("running as root without setpriv: cannot test an unwritable workdir")
    unprivileged = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
  os.chmod(locked, 0o555)
  script = tmp_path / "full_disk.py"
  script.write_text(FULL_DISK.format(argv=["jaxddpm", *cmd(full)[3:]]))
  cases = {
      "workdir_is_a_file": (cmd(a_file), f"--workdir={a_file} is a file, not a directory"),
      "workdir_not_writable": (unprivileged + cmd(locked), f"--workdir={locked} is not writable by this user"),
      "data_dir_is_a_file": (runner.command(root / "new", str(a_file)), "config.data.data_dir"),
      "full_disk": ([sys.executable, str(script)], "the disk is full (5.0 MiB free"),
  }
  before = runner.tree_digest(root)
  try:
    results = _run_all([c for c, _ in cases.values()], env)
  finally:
    os.chmod(locked, 0o755)
  for (name, (_, text)), r in zip(cases.items(), results):
    _assert_one_error_line(r, 2, text)
  assert runner.tree_digest(root) == before


def test_sigterm_before_training_starts(reference, data_dir, cache_dir, tmp_path):
  wd = tmp_path / "wd"
  shutil.copytree(reference / "checkpoints" / "4", wd / "checkpoints" / "4")
  before = runner.tree_digest(wd)
  p = runner.Proc(_default_console(runner.command(wd, data_dir, "training.num_steps=8")), runner.env(cache_dir),
                  tmp_path / "term")
  assert p.wait_for(lambda: "jaxddpm train:" in p.stdout, timeout=120), p.stderr[-3000:]
  p.signal(signal.SIGTERM)
  r = p.wait(timeout=120)
  assert r.returncode == 0, r.output[-3000:]
  assert "stopped by SIGTERM before training started; nothing was written" in r.stdout, r.output[-3000:]
  assert not runner.steps_printed(r.stdout) and "Traceback" not in r.output
  assert runner.tree_digest(wd) == before


def _event_steps(workdir):
  """(tag, step) of every scalar event in every event file, in order, and the number of files."""
  from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader  # noqa: PLC0415
  files = sorted(workdir.glob("events.out.tfevents.*"))
  seen = []
  for f in files:
    for event in LegacyEventFileLoader(str(f)).Load():
      seen += [(v.tag, event.step) for v in event.summary.value if v.HasField("simple_value")]
  return seen, len(files)


def test_ctrl_c_resume_finished_run_and_missing_grid(reference, data_dir, cache_dir, tmp_path):
  env = runner.env(cache_dir)
  wd = tmp_path / "wd"
  cmd = _default_console(runner.command(wd, data_dir, f"training.num_steps={M}", *runner.REFERENCE_OVERRIDES))
  # 1. Ctrl-C: the step finishes, a checkpoint is saved, exit 0.
  p = runner.Proc(cmd, env, tmp_path / "ctrl_c")
  assert p.wait_for(lambda: max(runner.steps_printed(p.stdout), default=0) >= 5, timeout=300), p.stderr[-3000:]
  p.signal(signal.SIGINT)
  r = p.wait(timeout=120)
  assert r.returncode == 0 and "Traceback" not in r.output, r.output[-3000:]
  stopped = [line for line in r.stdout.splitlines() if line.startswith("preempted: saved checkpoint at step ")]
  assert len(stopped) == 1 and "Ctrl-C" in stopped[0], r.stdout[-2000:]
  s = int(stopped[0].split()[5].rstrip(";"))
  assert 5 <= s < M and max(runner.checkpoint_steps(wd)) == s
  # 2. The same command resumes and ends bitwise equal to the uninterrupted reference run.
  r = runner.run(cmd, env)
  assert r.returncode == 0, r.output[-3000:]
  assert f"resumed from step {s} in {wd}" in r.stdout
  assert runner.steps_printed(r.stdout) == list(range(s + 1, M + 1))
  for step in (M,):
    runner.assert_trees_equal(runner.load_state(wd, step), runner.load_state(reference, step), f"step {step}")
  # A short console: the steps and a dozen lines, no library log lines (they are in the log file).
  lines = r.output.strip().splitlines()
  assert len(lines) <= (M - s) + 12, r.output
  assert not [line for line in lines if ABSL_LINE.match(line)], r.output
  assert "orbax" in (wd / "jaxddpm.log").read_text()
  # TensorBoard: each scalar of each step once, over two event files (one per run that logged).
  seen, files = _event_steps(wd)
  assert len(seen) == len(set(seen)) and files == 2, (files, sorted(seen))
  assert sorted(step for tag, step in seen if tag == "loss") == list(range(1, M + 1))
  # 3. The finished job says so and writes nothing.
  before = runner.tree_digest(wd)
  r = runner.run(cmd, env)
  assert r.returncode == 0 and f"training already finished at step {M}/{M}; nothing to do" in r.stdout, r.output
  assert runner.tree_digest(wd) == before
  # 4. A job killed between its final checkpoint and its final grid: the grid is written on resume, the
  # same bytes as the uninterrupted run's.
  grid = f"samples/step{M:08d}_ancestral20_seed0_n8.png"
  (wd / grid).unlink()
  r = runner.run(cmd, env)
  assert r.returncode == 0 and "writing the missing sample grid" in r.stdout, r.output[-3000:]
  assert (wd / grid).read_bytes() == (reference / grid).read_bytes()
  after = runner.tree_digest(wd)
  changed = {k for k in after if before.get(k) != after[k]}
  assert changed - {grid, "jaxddpm.log"} <= {k for k in after if k.startswith("events.out")}, changed


def test_two_sampling_configurations_side_by_side(reference, cache_dir, tmp_path):
  """--mode sample with ancestral sampling, then DDIM on 5 steps: both sets of files stay, each named by
  step, method, steps, seed and count. (The same command rewriting the same bytes: the final grid in
  test_ctrl_c_resume_finished_run_and_missing_grid, and `test_npz_bytes_depend_only_on_the_arrays`.)"""
  wd = tmp_path / "wd"
  shutil.copytree(reference / "checkpoints" / str(M), wd / "checkpoints" / str(M))
  env = runner.env(cache_dir)
  base = runner.command(wd, None, "sample.num_samples=8", mode="sample")
  r = runner.run(base, env)
  assert r.returncode == 0, r.output[-3000:]
  first = runner.tree_digest(wd / "samples")
  r = runner.run(base + ["--config.sample.method=ddim", "--config.sample.timesteps=ddim5"], env)
  assert r.returncode == 0, r.output[-3000:]
  after = runner.tree_digest(wd / "samples")
  assert {k: after[k] for k in first} == first  # untouched by DDIM
  a, d = f"step{M:08d}_ancestral20_seed0_n8", f"step{M:08d}_ddim5_seed0_n8"
  assert sorted(after) == sorted([f"{a}.npz", f"{a}_grid000.png", f"{d}.npz", f"{d}_grid000.png"])
  xa, xd = (np.load(wd / "samples" / f"{t}.npz")["samples"] for t in (a, d))
  assert xa.shape == xd.shape == (8, 8, 8, 1) and not np.array_equal(xa, xd)


def test_npz_bytes_depend_only_on_the_arrays(tmp_path, monkeypatch):
  """Two writes of the same samples at different clock times give the same bytes (no time stamp in
  the zip entries), through a temporary file that does not stay."""
  import time  # noqa: PLC0415
  from jaxddpm import generate  # noqa: PLC0415
  x = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8, 1)
  paths = (tmp_path / "a.npz", tmp_path / "b.npz")
  for path, now in zip(paths, (1.0e9, 1.7e9)):
    monkeypatch.setattr(time, "time", lambda now=now: now)
    generate.save_npz(str(path), samples=x)
  monkeypatch.undo()
  assert paths[0].read_bytes() == paths[1].read_bytes()
  np.testing.assert_array_equal(np.load(paths[1])["samples"], x)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz"]  # no temporary file left


def test_builtin_dataset_build_says_what_it_does(tmp_path, capsys):
  from jaxddpm import builtin_datasets  # noqa: PLC0415
  builtin_datasets.builtin_builder("digits", str(tmp_path))
  out = capsys.readouterr().out
  assert "Downloading" not in out and "downloaded" not in out, out
  assert f"building the built-in dataset jaxddpm_digits (no download: from data shipped in scikit-learn) into " \
         f"{tmp_path}" in out, out


def test_stop_signals_first_requests_a_stop_second_aborts():
  from jaxddpm import stop  # noqa: PLC0415
  said = []
  s = stop.StopSignals(announce=said.append)
  try:
    os.kill(os.getpid(), signal.SIGINT)
    assert s.requested == "Ctrl-C" and len(said) == 1
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    s.close()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_chain_in_segments_gives_the_same_samples():
  """`sample_batched` with a progress callback runs each batch's chain in equal jitted segments: the
  samples (and snapshots) are bitwise those of the single scan, and the callback sees every segment."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from jaxddpm import sampling  # noqa: PLC0415
  from jaxddpm.schedule import make_schedule  # noqa: PLC0415
  sched = make_schedule("cosine", 20)
  apply_fn = lambda p, x, t: jnp.tanh(x * p["w"] + 0.01 * t[:, None, None, None])
  params, key = {"w": jnp.float32(0.7)}, jax.random.PRNGKey(3)
  for kw in (dict(method="ancestral", snapshot_every=3), dict(method="dpm_solver_pp")):  # multistep state too
    whole = sampling.sample_batched(apply_fn, params, sched, (6, 4, 4, 1), key, batch_size=4, **kw)
    calls = []
    parts = sampling.sample_batched(apply_fn, params, sched, (6, 4, 4, 1), key, batch_size=4, max_segments=7,
                                    on_steps=lambda done, K: calls.append((done, K)), **kw)
    K, L = 20, sampling.segment_length(20, 7)
    assert L == 4 and sampling.segment_length(1000, 10) == 100 and sampling.segment_length(13, 10) == 13
    assert calls == 2 * [(d, K) for d in range(L, K + 1, L)]
    assert whole.keys() == parts.keys()
    for k in whole:
      np.testing.assert_array_equal(np.asarray(whole[k]), np.asarray(parts[k]), err_msg=k)
