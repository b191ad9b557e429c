"""Interruptions never change the result (issues 5 and 7), run as real processes.

The reference is an uninterrupted run of the same command in its own workdir. Another workdir is
trained by a chain of interrupted runs — SIGTERM (preemption), SIGKILL in the middle of an asynchronous
checkpoint save, SIGKILL at a random moment, a run that simply ends after N steps — each resumed by the
same command; its train state (parameters, EMA, optimizer state, rng, counters) must equal the
reference's bit for bit at every checkpoint both runs wrote. Then the two newest checkpoints are damaged
(a file truncated, a file deleted) and a complete-looking unfinished save of a later step is planted: the
next run (to more steps than before) names both damaged checkpoints, resumes from the one before,
ignores the unfinished save, and again ends bitwise equal to the reference. Non-finite steps are injected into a real run through its
input (a wrapper around the data iterator installed by the test, no hook in the library).
"""
import contextlib
import io
import random
import shutil
import signal
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import runner

N = 20                            # steps of the interrupted chain; the reference runs further
M = runner.REFERENCE_STEPS        # 24: the chain's last run continues from N to M
EVERY = runner.REFERENCE_EVERY    # 4
COMMON = runner.REFERENCE_OVERRIDES


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return runner.session_data_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return runner.shared_dir(tmp_path_factory, "jax_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run of M steps (shared with test_e2e): its workdir."""
  wd, r = runner.reference_run(tmp_path_factory)
  assert r.returncode == 0, r.stderr[-3000:]
  assert runner.steps_printed(r.stdout) == list(range(1, M + 1))
  assert runner.checkpoint_steps(wd) == list(range(EVERY, M + 1, EVERY))
  return wd


def _committed(workdir):
  return set(runner.checkpoint_steps(workdir))


def _resumed_from(stdout):
  for line in stdout.splitlines():
    if line.startswith("resumed from step "):
      return int(line.split()[3])
    if line.startswith("starting from scratch"):
      return 0
  return None


def _biggest_file(folder: Path) -> Path:
  return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_interrupted_runs_end_bitwise_equal(reference, data_dir, cache_dir, tmp_path):
  """SIGTERM, SIGKILL during an async save, SIGKILL at a random moment, a run that stops after N steps,
  then damaged checkpoints and a planted unfinished save: every resume continues exactly."""
  seed = int(time.time())
  rng = random.Random(seed)
  info = f"(random seed {seed})"
  env = runner.env(cache_dir)
  wd = tmp_path / "wd"
  cmd = runner.command(wd, data_dir, f"training.num_steps={N}", *COMMON)
  ckdir = wd / "checkpoints"
  seen = set()  # every committed checkpoint ever observed: none may disappear (keep-K is 10 here)

  # 1. Preemption: SIGTERM mid-run -> checkpoint at the current step, exit 0.
  p = runner.Proc(cmd, env, tmp_path / "sigterm")
  assert p.wait_for(lambda: max(runner.steps_printed(p.stdout), default=0) >= 5, timeout=300), p.stderr[-3000:]
  p.signal(signal.SIGTERM)
  r = p.wait(timeout=120)
  assert r.returncode == 0, r.output[-3000:]
  assert _resumed_from(r.stdout) == 0
  preempted = [line for line in r.stdout.splitlines() if line.startswith("preempted: saved checkpoint at step ")]
  assert len(preempted) == 1, r.stdout[-2000:]
  s = int(preempted[0].split()[5].rstrip(";"))
  assert 5 <= s < N and max(runner.steps_printed(r.stdout)) == s
  assert max(_committed(wd)) == s, (s, _committed(wd))
  seen |= _committed(wd)

  # 2. SIGKILL while an asynchronous checkpoint save is in flight (its *.orbax-checkpoint-tmp exists).
  def unfinished():
    return [q.name for q in ckdir.iterdir() if "orbax-checkpoint-tmp" in q.name] if ckdir.exists() else []
  p = runner.Proc(cmd, env, tmp_path / "kill_save")
  assert p.wait_for(lambda: _resumed_from(p.stdout) is not None, timeout=300), p.stderr[-3000:]
  assert p.wait_for(lambda: bool(unfinished()), timeout=300, interval=0.002), p.stdout[-2000:]
  p.signal(signal.SIGKILL)
  r = p.wait(timeout=60)
  assert r.returncode == -signal.SIGKILL
  assert _resumed_from(r.stdout) == s
  left = unfinished()
  assert left, "the kill came after the save had finished"
  committed_before = max(_committed(wd))
  seen |= _committed(wd)

  # 3. SIGKILL at a random moment after training restarted (between steps, in a save, in logging, ...).
  p = runner.Proc(cmd, env, tmp_path / "kill_random")
  assert p.wait_for(lambda: _resumed_from(p.stdout) is not None, timeout=300), p.stderr[-3000:]
  assert _resumed_from(p.stdout) == committed_before, (left, committed_before, info)  # not the unfinished one
  extra = rng.randint(1, 4)
  p.wait_for(lambda: len(runner.steps_printed(p.stdout)) >= extra, timeout=300)
  time.sleep(rng.uniform(0.0, 0.5))
  p.signal(signal.SIGKILL)
  r = p.wait(timeout=60)
  assert r.returncode in (0, -signal.SIGKILL), r.output[-3000:]  # 0: it finished before the kill
  seen |= _committed(wd)

  # 4. The next run finishes: a normal stop after N steps.
  r = runner.run(cmd, env)
  assert r.returncode == 0, r.output[-3000:]
  assert max(_committed(wd)) == N
  seen |= _committed(wd)
  assert seen <= _committed(wd), f"good checkpoints disappeared: {sorted(seen - _committed(wd))}"
  for step in sorted(_committed(wd)):
    if step in _committed(reference):
      runner.assert_trees_equal(runner.load_state(wd, step), runner.load_state(reference, step),
                                f"step {step} {info}")
  runner.assert_trees_equal(runner.load_state(wd, N), runner.load_state(reference, N), f"step {N} {info}")

  # 5. Damage the two newest checkpoints (truncate a file, delete a file), plant a complete-looking
  # unfinished save of a later step, and resume to M steps.
  good, second, latest = sorted(_committed(wd))[-3:]
  truncated = _biggest_file(ckdir / str(latest) / "state")
  with open(truncated, "r+b") as f:
    f.truncate(truncated.stat().st_size // 2)
  _biggest_file(ckdir / str(second) / "state").unlink()
  shutil.copytree(reference / "checkpoints" / str(M), ckdir / f"{M}.orbax-checkpoint-tmp")
  r = runner.run(runner.command(wd, data_dir, f"training.num_steps={M}", *COMMON), env)
  assert r.returncode == 0, r.output[-3000:]
  warnings = [line for line in r.stdout.splitlines() if line.startswith("WARNING: checkpoint ")]
  assert len(warnings) == 2, r.stdout[-3000:]
  assert f"{ckdir / str(latest)} is damaged" in warnings[0] and f"{ckdir / str(second)} is damaged" in warnings[1]
  # one line each (issue 16): the truncated file by name and what is wrong with it, where the step went;
  # no tracebacks, no asyncio noise, nothing else but the run's own lines
  rel = truncated.relative_to(ckdir / str(latest))
  assert f"file {rel} is truncated" in warnings[0] and "cannot be read" in warnings[0], warnings[0]
  assert f"moved it to {ckdir / str(latest)}.damaged" in warnings[0]
  assert any(t in warnings[1] for t in ("missing", "cannot be read")), warnings[1]
  assert f"moved it to {ckdir / str(second)}.damaged" in warnings[1], warnings[1]
  assert "Traceback" not in r.output and "Event loop is closed" not in r.output, r.output[-3000:]
  other = [line for line in r.output.splitlines()
           if not line.startswith(("step ", "WARNING: checkpoint ", "resumed from ", "note: ", "wrote sample grid "))]
  assert len(other) <= 5, other
  assert _resumed_from(r.stdout) == good
  assert (ckdir / f"{latest}.damaged").is_dir() and (ckdir / f"{second}.damaged").is_dir()  # kept
  assert not list(ckdir.glob("*orbax-checkpoint-tmp*"))
  assert seen - {latest, second} <= _committed(wd)
  for step in (N, M):
    runner.assert_trees_equal(runner.load_state(wd, step), runner.load_state(reference, step),
                              f"step {step} after damage {info}")


def test_silently_corrupt_bytes_are_caught_by_the_fingerprint(reference, data_dir, tmp_path):
  """Bytes flipped inside an array's data (which the storage layer may read back without any error) make
  the step fail its fingerprint: restore_latest names it and returns the previous step. Reading, as
  sampling does, moves nothing."""
  from jaxddpm import checkpoint, experiment, parallel  # noqa: PLC0415
  sys.path.insert(0, str(runner.REPO / "configs"))
  try:
    import test as test_config  # noqa: PLC0415
  finally:
    sys.path.pop(0)
  c = test_config.get_config()
  c.data.data_dir = data_dir
  messages = []
  # Bit 0 of each of 64 bytes: a stored float32 changes by at most a factor 4, never to inf/nan. Where the
  # storage layer encodes a chunk (its layout varies from run to run), flipped bits can still decode to
  # non-finite values, which the finiteness check catches first; the next place is then tried, and at
  # least one place must be caught by the fingerprint alone.
  for attempt, fraction in enumerate((0.5, 0.3, 0.7, 0.4, 0.6, 0.2, 0.8)):
    wd = tmp_path / f"wd{attempt}"
    for step in (4, 8):
      shutil.copytree(reference / "checkpoints" / str(step), wd / "checkpoints" / str(step))
    data_file = _biggest_file(wd / "checkpoints" / "8" / "state" / "ocdbt.process_0" / "d")
    raw = bytearray(data_file.read_bytes())
    at = int(len(raw) * fraction)
    raw[at:at + 64] = bytes(b ^ 0x01 for b in raw[at:at + 64])
    data_file.write_bytes(bytes(raw))
    _, mesh, _, _, _, _, abstract, _, manager = experiment.prepare(c, str(wd))
    before = runner.tree_digest(wd)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      state, data_state, _ = checkpoint.restore_latest(manager, checkpoint.abstract_like(abstract, parallel.replicated(mesh)))
    manager.close()
    assert int(np.asarray(state.step.addressable_data(0))) == 4 and data_state == runner.iterator_state(4)
    assert f"checkpoint {wd / 'checkpoints' / '8'} is damaged" in out.getvalue(), out.getvalue()
    assert runner.tree_digest(wd) == before
    messages.append(out.getvalue())
    if "fingerprint" in out.getvalue():
      break
    assert "non-finite" in out.getvalue(), out.getvalue()
  assert "fingerprint" in messages[-1], messages


# ---- non-finite steps ---------------------------------------------------------------------------------

NAN_WRAPPER = textwrap.dedent("""
    import sys
    import numpy as np
    from jaxddpm import data, main

    NAN_STEPS = {nan_steps}
    real = data.make_train_iterator

    class NanAtSteps:
      # The real iterator, with its images replaced by NaN at the given (1-based) steps of this process.
      def __init__(self, it):
        self.it, self.n = it, 0
      def __iter__(self):
        return self
      def __next__(self):
        batch, self.n = next(self.it), self.n + 1
        if self.n in NAN_STEPS:
          batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        return batch
      def get_state(self):
        return self.it.get_state()
      def set_state(self, state):
        self.it.set_state(state)

    data.make_train_iterator = lambda *a, **k: NanAtSteps(real(*a, **k))
    sys.argv = {argv}
    main.run()
""")


def test_nonfinite_steps_are_skipped_counted_and_stop_training(data_dir, cache_dir, tmp_path):
  """A NaN batch at step 3 is skipped and counted, training goes on; NaN batches from step 7 on stop the
  run after max_nonfinite_streak = 3 in a row with a clear message and exit code 3; every checkpoint is
  finite and the skipped steps left parameters, EMA and optimizer state untouched."""
  wd = tmp_path / "wd"
  argv = runner.command(wd, data_dir, "training.num_steps=12", "training.log_every=1",
                        "training.checkpoint_every=2", "training.max_nonfinite_streak=3")
  script = tmp_path / "nan_run.py"
  script.write_text(NAN_WRAPPER.format(nan_steps={3, 7, 8, 9, 10, 11, 12}, argv=["jaxddpm", *argv[3:]]))
  r = runner.run([sys.executable, str(script)], runner.env(cache_dir))
  assert r.returncode == 3, r.output[-3000:]
  assert "3 non-finite training steps in a row" in r.stderr and "max_nonfinite_streak" in r.stderr, r.stderr[-2000:]
  assert f"the newest checkpoint, step 8, is kept in {wd / 'checkpoints'}" in r.stderr, r.stderr[-2000:]
  nonfinite = runner.console_metric(r.stdout, "nonfinite")
  assert nonfinite == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 1, 7: 2, 8: 3, 9: 4}, r.stdout
  loss = runner.console_metric(r.stdout, "loss")
  assert np.isnan(loss[3]) and all(np.isfinite(loss[i]) for i in (1, 2, 4, 5, 6))
  assert runner.checkpoint_steps(wd) == [2, 4, 6, 8]
  states = {s: runner.load_state(wd, s) for s in (2, 4, 6, 8)}
  for s, st in states.items():
    for name in ("params", "ema_params", "opt_state"):
      leaves = [np.asarray(x) for x in _leaves(st[name]) if np.asarray(x).dtype.kind == "f"]
      assert all(np.isfinite(x).all() for x in leaves), (s, name)
  # steps 7 and 8 were skipped: step 8's train state equals step 6's except the counters
  for name in ("params", "ema_params", "opt_state", "rng"):
    runner.assert_trees_equal(states[8][name], states[6][name], name)
  assert int(states[8]["step"]) == 8 and int(states[8]["nonfinite_streak"]) == 2
  assert int(states[8]["nonfinite_total"]) == 3 and int(states[4]["nonfinite_total"]) == 1
  # whereas normal steps do change the parameters
  assert not np.array_equal(_leaves(states[4]["params"])[0], _leaves(states[2]["params"])[0])


def _leaves(tree):
  import jax  # noqa: PLC0415
  return jax.tree.leaves(tree)


def test_checkpoint_save_refuses_nonfinite_parameters(tmp_path):
  """The last line of defence: checkpoint.save raises and writes nothing when parameters are not finite."""
  import jax.numpy as jnp  # noqa: PLC0415
  from jaxddpm import checkpoint, training  # noqa: PLC0415
  z = jnp.zeros((), jnp.int32)
  good = {"w": jnp.ones((3,))}
  for bad in ({"w": jnp.array([1.0, jnp.nan, 0.0])}, {"w": jnp.array([jnp.inf, 0.0, 0.0])}):
    for params, ema in ((bad, good), (good, bad)):
      state = training.TrainState(step=z, params=params, ema_params=ema, opt_state=(), rng=jnp.zeros(2, jnp.uint32),
                                  nonfinite_streak=z, nonfinite_total=z)
      manager = checkpoint.make_manager(str(tmp_path), async_save=False)
      with pytest.raises(FloatingPointError, match="not finite"):
        checkpoint.save(manager, 1, state, {}, {})
      assert not any((tmp_path / "checkpoints").iterdir()) if (tmp_path / "checkpoints").exists() else True


def test_stop_message_names_the_kept_checkpoint_or_none(reference, tmp_path):
  """The non-finite streak's stop says which checkpoint a resume would start from, or that there is none
  (issue 16): read from the workdir on disk, not assumed."""
  from jaxddpm import checkpoint, train  # noqa: PLC0415
  empty = tmp_path / "empty"
  msg = train.kept_checkpoint(checkpoint.make_manager(str(empty), read_only=True), str(empty))
  assert msg == f"no checkpoint was written in {empty}, so none is kept"
  wd = tmp_path / "wd"
  for step in (4, 8):
    shutil.copytree(reference / "checkpoints" / str(step), wd / "checkpoints" / str(step))
  msg = train.kept_checkpoint(checkpoint.make_manager(str(wd), read_only=True), str(wd))
  assert msg == f"the newest checkpoint, step 8, is kept in {wd / 'checkpoints'}"
