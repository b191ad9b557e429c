"""The mixed-precision recipe (issue 7): bfloat16 activations, float32 parameters, optimizer state and
diffusion math (`config.model.dtype = "bfloat16"`, the default of the TPU/GPU presets).

200 steps on the built-in 8x8 digits with the small digits8 preset, narrowed to keep the test fast on CPU
(8 channels, one resolution, no attention: bfloat16 CPU code is slow to compile and to run), once in
bfloat16 and once in float32, on the same batches and random numbers: the bfloat16 run stays finite,
keeps float32 state, and its loss tracks the float32 run's (both fall well below where they started).
"""
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import runner

STEPS = 200


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return runner.session_data_dir(tmp_path_factory)


def _config(dtype):
  sys.path.insert(0, str(runner.REPO / "configs"))
  try:
    import test as test_config  # noqa: PLC0415
  finally:
    sys.path.pop(0)
  c = test_config.get_config()
  c.model.dtype = dtype
  c.model.ch, c.model.ch_mult, c.model.attn_resolutions = 8, (1,), ()
  c.diffusion.schedule, c.diffusion.num_timesteps = "linear", 1000
  return c


def _train(dtype, data_dir):
  from jaxddpm import data, experiment, training  # noqa: PLC0415
  c = _config(dtype)
  d = c.diffusion
  model, sched, optimizer, lr_fn = experiment.build(c, (8, 8, 1))
  init = functools.partial(training.init_train_state, model=model, optimizer=optimizer, image_shape=(8, 8, 1))
  state = jax.jit(init).lower(jax.random.PRNGKey(0)).compile(compiler_options=runner.FAST_COMPILE)(jax.random.PRNGKey(0))
  step_fn = functools.partial(training.train_step, model=model, optimizer=optimizer, schedule=sched,
                              mean_type=d.mean_type, var_type=d.var_type, loss_type=d.loss_type,
                              ema=c.optim.ema_decay, learning_rate=lr_fn)
  it = data.make_train_iterator("digits", data_dir=data_dir, global_batch_size=c.training.batch_size, seed=0,
                                num_threads=0, prefetch_batches=1)
  batch = {"image": next(it)["image"]}
  jaxpr = str(jax.make_jaxpr(step_fn)(state, batch))
  step = jax.jit(step_fn, donate_argnums=(0,)).lower(state, batch).compile(compiler_options=runner.FAST_COMPILE)
  losses, grad_norms = [], []
  for i in range(STEPS):
    if i:
      batch = {"image": next(it)["image"]}
    state, m = step(state, batch)
    losses.append(m["loss"])
    grad_norms.append(m["grad_norm"])
  return state, np.asarray(jax.device_get(losses)), np.asarray(jax.device_get(grad_norms)), jaxpr


def test_bfloat16_training_stays_finite_and_tracks_float32(data_dir):
  state16, loss16, gn16, jaxpr16 = _train("bfloat16", data_dir)
  state32, loss32, gn32, jaxpr32 = _train("float32", data_dir)
  # bfloat16 is really used for activations in one run and not in the other ...
  assert "bf16" in jaxpr16 and "bf16" not in jaxpr32
  # ... while parameters, EMA and optimizer state stay float32
  for part in (state16.params, state16.ema_params, state16.opt_state):
    float_leaves = [x for x in jax.tree.leaves(part) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert float_leaves and all(x.dtype == jnp.float32 for x in float_leaves)
  # finite all the way, nothing skipped
  assert np.isfinite(loss16).all() and np.isfinite(gn16).all()
  assert int(state16.nonfinite_total) == 0 and int(state32.nonfinite_total) == 0
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state16.params))
  # the loss falls in both runs (the model learns the digits) ...
  print("loss per 50 steps, bfloat16:", loss16.reshape(-1, 50).mean(1), "float32:", loss32.reshape(-1, 50).mean(1),
        "first 10:", loss16[:10].mean(), loss32[:10].mean())
  for loss in (loss16, loss32):
    assert loss[-50:].mean() < 0.5 * loss[:10].mean(), (loss[:10].mean(), loss[-50:].mean())
  # ... and bfloat16 tracks float32: window means within 5 %
  w16, w32 = loss16.reshape(-1, 50).mean(1), loss32.reshape(-1, 50).mean(1)
  np.testing.assert_allclose(w16, w32, rtol=0.05)
  # the comparison is sharp enough to see a real difference: consecutive windows differ by more
  assert np.abs(np.diff(w32[:3])).max() > 0.1 * w32[2]
