"""Two processes on 127.0.0.1 (jax.distributed through the CLI flags), 2 fake devices each.

One launch serves two tests. The processes train configs/test.py with a checkpoint every 4 steps; once
checkpoint 4 is committed, process 1 is killed with SIGKILL. Then:
- process 0 must exit non-zero with a clear message within a bounded time: JAX's coordination service
  declares process 1 dead after --heartbeat_timeout seconds without a heartbeat (10 s here);
- checkpoint 4 (written by both processes) must equal, to float32 tolerance, a single-process reference
  on 4 devices fed the same global batches: process 0's local batch followed by process 1's, built with
  the data module's per-process iterators (each process shuffles its own shard, so one process alone would
  see other batches). The reference uses another reduction order (one process vs gloo across two), so
  the comparison is to tolerance, and a reference fed the one-process data order must be far off.
"""
import functools
import signal
import sys
import time

import jax
import numpy as np
import pytest

import runner

HEARTBEAT_S = 10
STEPS = 4
BOUND_S = HEARTBEAT_S + 50   # heartbeat timeout + detection, abort and slack for a loaded 2-core machine


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
  """Starts the two processes, waits for checkpoint STEPS, kills process 1, waits for process 0."""
  from conftest import free_port  # noqa: PLC0415
  data_dir = runner.session_data_dir(tmp_path_factory)
  cache = runner.shared_dir(tmp_path_factory, "jax_cache")
  tmp = tmp_path_factory.mktemp("multihost")
  wd = tmp / "wd"
  address = f"127.0.0.1:{free_port()}"
  env = runner.env(cache, devices=2)
  procs = [runner.Proc(runner.command(wd, data_dir, "training.num_steps=1000", "training.log_every=1",
                                      f"training.checkpoint_every={STEPS}", process=(address, 2, i))
                       + [f"--heartbeat_timeout={HEARTBEAT_S}"], env, tmp / f"process{i}") for i in range(2)]
  try:
    ok = procs[0].wait_for(lambda: STEPS in runner.checkpoint_steps(wd)
                           and max(runner.steps_printed(procs[0].stdout), default=0) >= STEPS + 2, timeout=400)
    assert ok, (procs[0].stderr[-3000:], procs[1].stderr[-3000:])
    assert procs[1].poll() is None and procs[0].poll() is None
    procs[1].signal(signal.SIGKILL)
    killed_at = time.monotonic()
    survivor = procs[0].wait(timeout=BOUND_S + 60)
    elapsed = time.monotonic() - killed_at
  finally:
    for p in procs:
      p.signal(signal.SIGKILL)
      p.wait(timeout=60)
  return dict(workdir=wd, data_dir=data_dir, survivor=survivor, elapsed=elapsed)


def test_survivor_exits_nonzero_with_message_within_bound(launch):
  r, elapsed = launch["survivor"], launch["elapsed"]
  print(f"process 0 exited {r.returncode} {elapsed:.1f} s after process 1 was killed")
  assert r.returncode != 0
  assert elapsed < BOUND_S, elapsed
  assert "another task died" in r.stderr or "another process failed" in r.stderr, r.stderr[-3000:]


@functools.cache
def _reference_setup():
  """configs/test.py's model, data arguments, initial state and jitted step on a 4-device mesh."""
  sys.path.insert(0, str(runner.REPO / "configs"))
  try:
    import test as test_config  # noqa: PLC0415
  finally:
    sys.path.pop(0)
  from jaxddpm import experiment, parallel, training  # noqa: PLC0415
  config = test_config.get_config()
  d = config.diffusion
  mesh = parallel.data_mesh(jax.devices()[:4])
  image_shape = (8, 8, 1)
  model, sched, optimizer, lr_fn = experiment.build(config, image_shape)
  init = functools.partial(training.init_train_state, model=model, optimizer=optimizer, image_shape=image_shape)
  state = jax.device_get(jax.jit(init)(jax.random.PRNGKey(config.training.seed)))
  step_fn = functools.partial(
      training.train_step, model=model, optimizer=optimizer, schedule=sched, mean_type=d.mean_type,
      var_type=d.var_type, loss_type=d.loss_type, weighting=d.weighting, t_sampling=d.t_sampling,
      min_snr_gamma=d.min_snr_gamma, p2_gamma=d.p2_gamma, p2_k=d.p2_k, ema=config.optim.ema_decay,
      ema_warmup=config.optim.ema_warmup, learning_rate=lr_fn)
  rep, bat = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
  batch = {"image": jax.ShapeDtypeStruct((config.training.batch_size,) + image_shape, np.float32, sharding=bat)}
  # a few steps of a tiny model: unoptimised XLA code compiles in half the time
  p_step = training.jit_train_step(step_fn, mesh).lower(abstract, batch).compile(compiler_options=runner.FAST_COMPILE)
  return config, mesh, state, p_step


def _reference(data_dir, *, process_count, steps=STEPS):
  """configs/test.py trained in this process on a 4-device mesh, each global batch the concatenated
  local batches of `process_count` per-process iterators. Returns (state, indices read per process)."""
  from jaxddpm import data, parallel  # noqa: PLC0415
  config, mesh, state, p_step = _reference_setup()
  tc = config.training
  state = jax.device_put(state, parallel.replicated(mesh))
  its = [data.make_train_iterator(config.data.name, split=config.data.split, data_dir=data_dir,
                                  global_batch_size=tc.batch_size, process_index=p, process_count=process_count,
                                  seed=tc.seed, random_flip=config.data.random_flip,
                                  image_size=config.data.image_size, num_threads=0, prefetch_batches=1)
         for p in range(process_count)]
  indices = [[] for _ in its]
  for _ in range(steps):
    local = [next(it) for it in its]
    for p, b in enumerate(local):
      indices[p].append(b["index"])
    batch = {"image": np.concatenate([b["image"] for b in local])}
    state, _ = p_step(state, jax.device_put(batch, parallel.batch_sharded(mesh)))
  return jax.device_get(state), [np.concatenate(i) for i in indices]


def _by_path(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _max_abs_diff(a, b):
  a, b = _by_path(a), _by_path(b)
  return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in b)


def test_two_processes_equal_one_process_with_same_global_batches(launch):
  saved = runner.load_state(launch["workdir"], STEPS)
  assert int(saved["step"]) == STEPS
  ref, indices = _reference(launch["data_dir"], process_count=2)
  for name in ("params", "ema_params"):
    got, want = _by_path(saved[name]), _by_path(getattr(ref, name))
    assert got.keys() == want.keys() and len(got) > 10
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=2e-6, err_msg=f"{name}{k}")
  # The data really mattered: the same steps on the one-process data order end far from the saved state.
  other, _ = _reference(launch["data_dir"], process_count=1)
  assert _max_abs_diff(saved["params"], other.params) > 100 * _max_abs_diff(saved["params"], ref.params)
  # Each process read its own part of the split: disjoint, inside its even share, no repeats.
  from jaxddpm import data  # noqa: PLC0415
  n = data.dataset_info("digits", launch["data_dir"]).num_examples["train"]
  for p, idx in enumerate(indices):
    lo, hi = data.shard_bounds(n, p, 2)
    assert len(idx) == STEPS * 8 and len(set(idx.tolist())) == len(idx)
    assert idx.min() >= lo and idx.max() < hi
  assert not set(indices[0].tolist()) & set(indices[1].tolist())
