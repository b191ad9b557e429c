"""TrainState, optimizer, EMA and the jitted data-parallel train step."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxddpm import make_schedule, parallel, training


class TinyNet(nn.Module):
  """A cheap stand-in for the UNet (same interface: (x, t, train) -> output, dropout rng)."""
  out_channels: int = 1

  @nn.compact
  def __call__(self, x, t, *, train=False):
    h = nn.Conv(8, (3, 3))(x) + nn.Dense(8)(jnp.sin(t[:, None] / 10.0 * jnp.arange(1, 5)))[:, None, None]
    h = nn.Dropout(0.1, deterministic=not train)(nn.swish(nn.GroupNorm(4)(h)))
    return nn.Conv(self.out_channels, (3, 3))(h)


@functools.cache
def _setup(var_type="fixed_large", loss_type="mse", lr=1e-3):
  out = 2 if var_type.startswith("learned") else 1
  model = TinyNet(out)
  sched = make_schedule("linear", 50)
  opt = training.make_optimizer(lr=lr, warmup_steps=3, grad_clip=1.0)
  state = training.init_train_state(jax.random.PRNGKey(0), model, opt, (8, 8, 1))
  step = functools.partial(training.train_step, model=model, optimizer=opt, schedule=sched, mean_type="eps",
                           var_type=var_type, loss_type=loss_type, ema=0.99,
                           learning_rate=training.learning_rate_schedule(lr, 3))
  return model, sched, opt, state, step


def _batch(n=16, seed=1):
  x = np.random.default_rng(seed).uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32)
  return {"image": x}


def test_learning_rate_warmup_matches_formula():
  fn = training.learning_rate_schedule(2e-4, 5000)
  for s in [0, 1, 2499, 4999, 5000, 100000]:
    np.testing.assert_allclose(float(fn(s)), 2e-4 * min(1.0, (s + 1) / 5000), rtol=1e-6)


def test_optimizer_matches_numpy_clip_then_adam():
  """Two updates of clip_by_global_norm(1) + Adam with warm-up against a float64 numpy reference."""
  opt = training.make_optimizer(lr=0.1, warmup_steps=4, grad_clip=1.0)
  p = {"a": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([[0.5]])}
  st = opt.init(p)
  grads = [{"a": jnp.array([3.0, 4.0, 0.0]), "b": jnp.array([[0.0]])},
           {"a": jnp.array([0.1, -0.2, 0.05]), "b": jnp.array([[0.3]])}]
  ref = {k: np.asarray(v, np.float64) for k, v in p.items()}
  m = {k: np.zeros_like(v) for k, v in ref.items()}
  v = {k: np.zeros_like(x) for k, x in ref.items()}
  for i, g in enumerate(grads):
    upd, st = opt.update(g, st, p)
    p = optax.apply_updates(p, upd)
    g = {k: np.asarray(x, np.float64) for k, x in g.items()}
    norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
    g = {k: x * min(1.0, 1.0 / norm) for k, x in g.items()}
    lr = 0.1 * min(1.0, (i + 1) / 4)
    for k in ref:
      m[k] = 0.9 * m[k] + 0.1 * g[k]
      v[k] = 0.999 * v[k] + 0.001 * g[k] ** 2
      mh, vh = m[k] / (1 - 0.9 ** (i + 1)), v[k] / (1 - 0.999 ** (i + 1))
      ref[k] = ref[k] - lr * mh / (np.sqrt(vh) + 1e-8)
  for k in ref:
    np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("g,max_norm", [([3.0, 4.0], 1.0), ([0.3, 0.4], 1.0), ([3.0, 4.0], 5.0)])
def test_clip_by_global_norm_matches_formula(g, max_norm):
  """g if ||g|| < c else g * c / ||g||, with ||g|| over all leaves; a given grad_norm is the one used."""
  tree = {"a": jnp.array([g[0]]), "b": {"c": jnp.array([[g[1]]])}}
  clip = training.clip_by_global_norm(max_norm)
  norm = float(np.sqrt(np.sum(np.square(np.asarray(g, np.float64)))))
  out, _ = clip.update(tree, clip.init(tree))
  scale = 1.0 if norm < max_norm else max_norm / norm
  np.testing.assert_allclose([float(out["a"][0]), float(out["b"]["c"][0, 0])], np.asarray(g) * scale, rtol=1e-6)
  out, _ = clip.update(tree, clip.init(tree), grad_norm=jnp.float32(10.0))
  scale = 1.0 if 10.0 < max_norm else max_norm / 10.0
  np.testing.assert_allclose([float(out["a"][0]), float(out["b"]["c"][0, 0])], np.asarray(g) * scale, rtol=1e-6)


def test_train_step_accepts_a_plain_optax_optimizer():
  """Any optax optimizer works: one SGD step moves the params by -lr * grad of the same loss."""
  model, sched, _, state, _ = _setup()
  sgd = optax.sgd(0.5)
  state = state.replace(opt_state=sgd.init(state.params))
  step = functools.partial(training.train_step, model=model, optimizer=sgd, schedule=sched, mean_type="eps",
                           var_type="fixed_large", loss_type="mse", ema=0.99)
  new, metrics = jax.jit(step)(state, _batch())
  norm = np.sqrt(sum(np.sum(np.square(np.asarray(a, np.float64) - np.asarray(b)))
                     for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params))))
  np.testing.assert_allclose(norm, 0.5 * float(metrics["grad_norm"]), rtol=1e-4)


@functools.cache
def _jitted_step():
  return jax.jit(_setup()[-1])


def test_train_step_updates_params_and_ema_by_formula():
  model, sched, opt, state, step = _setup()
  new, metrics = _jitted_step()(state, _batch())
  assert int(new.step) == 1 and float(metrics["finite"]) == 1.0
  # EMA with warm-up: decay = min(0.99, (1 + 0) / (10 + 0)) = 0.1 at step 0.
  d = min(0.99, 1 / 10)
  for e0, p1, e1 in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(new.params),
                        jax.tree.leaves(new.ema_params)):
    np.testing.assert_allclose(np.asarray(e1), d * np.asarray(e0) + (1 - d) * np.asarray(p1), rtol=1e-5,
                               atol=1e-7)
  changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params))]
  assert any(changed)
  for k in ("loss", "mse", "grad_norm", "lr", "loss_q0", "loss_q3"):
    assert np.isfinite(float(metrics[k])), k
  np.testing.assert_allclose(float(metrics["lr"]), 1e-3 / 3, rtol=1e-6)


def test_nonfinite_batch_skips_update_and_counts():
  _, _, _, state, step = _setup()
  bad = _batch()
  bad["image"][0, 0, 0, 0] = np.nan
  new, metrics = _jitted_step()(state, bad)
  assert float(metrics["finite"]) == 0.0
  assert int(new.nonfinite_streak) == 1 and int(new.nonfinite_total) == 1 and int(new.step) == 1
  for a, b in zip(jax.tree.leaves((state.params, state.ema_params, state.opt_state)),
                  jax.tree.leaves((new.params, new.ema_params, new.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  new2, _ = _jitted_step()(new, _batch())
  assert int(new2.nonfinite_streak) == 0 and int(new2.nonfinite_total) == 1


@pytest.mark.parametrize("var_type,loss_type", [("fixed_large", "mse"), ("learned_range", "hybrid")])
def test_one_step_on_8_devices_equals_1_device(var_type, loss_type):
  """Same global batch on a mesh of 8 devices and of 1: same loss, gradients and new parameters.
  (The UNet itself under a sharded batch is checked in test_unet.py.)"""
  model, sched, opt, state, step = _setup(var_type, loss_type)
  batch = _batch(16)
  results = {}
  for n in (1, 8):
    mesh = parallel.data_mesh(jax.devices()[:n])
    st = jax.device_put(jax.tree.map(jnp.copy, state), parallel.replicated(mesh))  # donated below
    b = parallel.global_batch(batch, mesh)
    new, metrics = training.jit_train_step(step, mesh)(st, b)
    assert len(b["image"].sharding.device_set) == n
    results[n] = (jax.device_get(new), jax.device_get(metrics))
  (s1, m1), (s8, m8) = results[1], results[8]
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s8)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_gradients_on_8_devices_equal_1_device():
  model, sched, opt, state, _ = _setup()
  from jaxddpm import losses
  x = jnp.asarray(_batch(16)["image"])
  t = jnp.arange(16, dtype=jnp.int32) * 3
  noise = jax.random.normal(jax.random.PRNGKey(3), x.shape)

  def loss(params, x):
    f = lambda xt, tt: model.apply({"params": params}, xt, tt)
    return jnp.mean(losses.training_losses(sched, f, x, t, noise)["loss"])

  grads = {}
  for n in (1, 8):
    mesh = parallel.data_mesh(jax.devices()[:n])
    g = jax.jit(jax.grad(loss), in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)))(
        state.params, x)
    grads[n] = jax.device_get(g)
  for a, b in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[8])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_state_is_jittable_pytree_and_eval_shape_gives_abstract_state():
  model = TinyNet()
  opt = training.make_optimizer(lr=1e-3, warmup_steps=0, grad_clip=0.0)
  abstract = jax.eval_shape(functools.partial(training.init_train_state, model=model, optimizer=opt,
                                              image_shape=(8, 8, 1)), jax.random.PRNGKey(0))
  real = training.init_train_state(jax.random.PRNGKey(0), model, opt, (8, 8, 1))
  assert jax.tree.structure(abstract) == jax.tree.structure(real)
  for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real)):
    assert a.shape == r.shape and a.dtype == r.dtype


class ZeroOutNet(nn.Module):
  """TinyNet with DDPM's zero-initialised output convolution: at step 0 every gradient upstream of it is
  exactly 0, so Adam with eps = 0 (1e-50 in float32) computes 0 / 0 for those parameters."""

  @nn.compact
  def __call__(self, x, t, *, train=False):
    h = nn.Conv(8, (3, 3))(x) + nn.Dense(8)(jnp.sin(t[:, None] / 10.0 * jnp.arange(1, 5)))[:, None, None]
    return nn.Conv(1, (3, 3), kernel_init=nn.initializers.zeros)(nn.swish(h))


def _fast_jit(fn, *args):
  from runner import FAST_COMPILE  # noqa: PLC0415
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


@pytest.mark.parametrize("guard", ["select", "branch"])  # "auto" is "branch" on CPU
def test_guard_skips_an_update_whose_result_is_not_finite(guard):
  """optim.eps = 1e-50 (0 in float32): the loss and gradient norm are finite, but unguarded Adam makes
  some parameters 0/0 = NaN. The step is skipped and counted; params, optimizer state and EMA keep their
  values bit for bit, nothing non-finite reaches them, and every guard decides the same."""
  model, sched = ZeroOutNet(), make_schedule("linear", 50)
  opt = training.make_optimizer(lr=1e-3, warmup_steps=0, grad_clip=1.0, eps=1e-50)
  state = training.init_train_state(jax.random.PRNGKey(0), model, opt, (8, 8, 1))
  step = _fast_jit(functools.partial(training.train_step, model=model, optimizer=opt, schedule=sched,
                                     mean_type="eps", var_type="fixed_large", loss_type="mse", ema=0.9,
                                     guard=guard), state, _batch())
  # The reference, unguarded: the same Adam update gives NaN parameters (so the guard has work to do).
  out = lambda p: model.apply({"params": p}, _batch()["image"], jnp.zeros(16, jnp.int32))
  grads = jax.grad(lambda p: jnp.sum((out(p) - 1.0) ** 2))(state.params)
  updates, _ = opt.update(grads, state.opt_state, state.params)
  assert not all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
  new, metrics = step(state, _batch())
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert float(metrics["finite"]) == 0.0 and int(new.nonfinite_streak) == 1 and int(new.step) == 1
  before = jax.tree.leaves((state.params, state.ema_params, state.opt_state))
  after = jax.tree.leaves((new.params, new.ema_params, new.opt_state))
  for a, b in zip(before, after):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  new, _ = step(new, _batch(seed=2))
  assert int(new.nonfinite_streak) == 2
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((new.params, new.ema_params, new.opt_state)))


def test_select_and_branch_guards_compute_the_same_update():
  """A finite step: the select guard (GPU/TPU) and the branch guard (CPU) give the same new state."""
  model, sched, opt, state, _ = _setup()
  out = {"branch": _jitted_step()(state, _batch())[0]}  # the default guard on CPU
  step = functools.partial(training.train_step, model=model, optimizer=opt, schedule=sched, mean_type="eps",
                           var_type="fixed_large", loss_type="mse", ema=0.99,
                           learning_rate=training.learning_rate_schedule(1e-3, 3), guard="select")
  out["select"], metrics = _fast_jit(step, state, _batch())(state, _batch())
  assert float(metrics["finite"]) == 1.0
  for a, b in zip(jax.tree.leaves(out["select"]), jax.tree.leaves(out["branch"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
