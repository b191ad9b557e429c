"""Every public math function under jit, vmap, grad, jax.pmap and jax.shard_map (8 fake CPU devices).

One function, `forward`, calls each public function of diffusion/losses on a batch; every transform must
reproduce the unjitted full-batch results, and the gradient of a sum of its outputs (all but calc_bpd_loop's,
an evaluation) must match finite differences. Schedules are pytrees of arrays that pass through all of them. Compiling `forward` costs a few
seconds on CPU, so transforms are combined: pmap with grad, shard_map with vmap.
Per-example functions (all of them) split over devices along the batch; calc_bpd_loop gets global
example_ids so that its noise does not depend on the split.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxddpm as jd

B, SHAPE, T = 16, (4, 4, 2), 50
N_DEV = 8


def model(x, tt):
  """A tiny per-example network with a learned-variance output: [B, ..., C] -> [B, ..., 2C]."""
  h = jnp.tanh(0.5 * x + 1e-3 * tt[:, None, None, None].astype(jnp.float32))
  return jnp.concatenate([h, 0.8 * jnp.tanh(x)], axis=-1)


def forward(s, x0, noise, out, t, ids, key):
  """All public array functions of the math floor; every output has the batch first."""
  r = {}
  x_t = r["q_sample"] = jd.q_sample(s, x0, t, noise)
  r["q_mean"], r["q_var"], r["q_logvar"] = jd.q_mean_variance(s, x0, t)
  r["post_mean"], r["post_var"], r["post_logvar"] = jd.q_posterior_mean_variance(s, x0, x_t, t)
  r["x0_from_eps"] = jd.predict_x0_from_eps(s, x_t, t, noise)
  r["eps_from_x0"] = jd.predict_eps_from_x0(s, x_t, t, x0)
  r["x0_from_v"] = jd.predict_x0_from_v(s, x_t, t, noise)
  r["eps_from_v"] = jd.predict_eps_from_v(s, x_t, t, noise)
  r["v"] = jd.v_from_eps_x0(s, x0, t, noise)
  r["x0_from_xprev"] = jd.predict_x0_from_xprev(s, x_t, t, r["post_mean"])
  r["score"] = jd.score_from_eps(s, x_t, t, noise)
  r["eps_from_score"] = jd.eps_from_score(s, x_t, t, r["score"])
  r["split_mean"], r["split_var"] = jd.split_model_output(out, x_t, "learned_range")
  pmv = jd.p_mean_variance(s, out, x_t, t, mean_type="v", var_type="learned_range", clip_denoised=True)
  r.update({f"p_{k}": v for k, v in pmv._asdict().items()})
  r["kl"] = jd.normal_kl(r["post_mean"], r["post_logvar"], pmv.mean, pmv.log_variance)
  r["decoder"] = jd.discretized_gaussian_log_likelihood(x0, pmv.mean, 0.5 * pmv.log_variance)
  r["mean_flat"] = jd.mean_flat(x_t)
  r["prior"] = jd.prior_bpd(s, x0)
  r["vb"] = jd.vb_terms_bpd(s, out, x0, x_t, t, mean_type="eps", var_type="learned")[0]
  r["snr"] = jd.snr(s, t)
  r["weight"] = jd.loss_weight(s, t, mean_type="v", weighting="min_snr")
  for k, v in jd.training_losses(s, model, x0, t, noise, mean_type="eps", var_type="learned_range",
                                 loss_type="hybrid", weighting="p2").items():
    r[f"train_{k}"] = v
  for k, v in jd.calc_bpd_loop(s, model, x0, key, var_type="learned_range", example_ids=ids).items():
    r[f"bpd_{k}"] = v
  return r


def weighted_sum(outputs, weights):
  """sum_k w_k sum(o_k): a scalar of all float outputs, separable over examples (so per-device gradients are
  slices of the full one); w_k = 1 / (size_k (1 + mean |o_k|)) keeps every term O(1) for finite differences."""
  return sum(w * jnp.sum(outputs[k]) for k, w in weights.items())


def inputs(seed):
  rng = np.random.default_rng(seed)
  x0 = rng.integers(0, 256, (B,) + SHAPE) / 127.5 - 1
  noise = rng.normal(size=(B,) + SHAPE)
  out = np.concatenate([rng.normal(size=(B,) + SHAPE), rng.uniform(-1, 1, (B,) + SHAPE)], -1)
  t = rng.integers(0, T, B)
  t[:2] = [0, T - 1]
  return (jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32), jnp.asarray(out, jnp.float32),
          jnp.asarray(t, jnp.int32), jnp.arange(B, dtype=jnp.uint32), jax.random.key(seed))


SCHED = jd.make_schedule("cosine", T)
MESH = Mesh(np.array(jax.devices()[:N_DEV]), ("data",))
BATCH_SPECS = (P(), P("data"), P("data"), P("data"), P("data"), P("data"), P())  # schedule, ..., key


@pytest.fixture(scope="module")
def reference():
  """The unjitted results on the full batch."""
  args = inputs(0)
  return args, jax.tree.map(np.asarray, forward(SCHED, *args))


def assert_match(got, want, rtol=1e-4, atol=1e-4):
  """Same numbers up to float32 reassociation (XLA fuses differently per program); t = T - 1 with the cosine
  schedule makes x0 recovery cancel terms of size 1/sqrt(alphabar_T) ~ 1e3, hence the absolute slack."""
  assert set(got) == set(want)
  for k in want:
    w = np.asarray(want[k])
    g = np.asarray(got[k]).reshape(w.shape)
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol * (1 + np.abs(w).max()), err_msg=k)


def test_jit_with_named_sharding(reference):
  """jax.jit with the batch sharded over a 1-D ("data",) mesh of the 8 devices (the library's own mode)."""
  args, want = reference
  batch, repl = NamedSharding(MESH, P("data")), NamedSharding(MESH, P())
  sharded = [jax.device_put(a, batch) for a in args[:5]] + [jax.device_put(args[5], repl)]
  got = jax.jit(forward)(jax.device_put(SCHED, repl), *sharded)
  assert len(got["bpd_total_bpd"].sharding.device_set) == N_DEV
  assert_match(got, want)


def test_pmap_and_grad(reference):
  """jax.pmap over 8 devices, 2 examples each (this is also calc_bpd_loop's batch-split property: its global
  example_ids make its noise independent of the split), with jax.grad of a weighted sum of the outputs taken
  per device: the outputs equal the full-batch ones, and the gradient equals central differences of the
  same scalar along random directions."""
  args, want = reference
  weights = {k: 1.0 / (v.size * (1.0 + np.abs(v).mean())) for k, v in want.items()}
  # The hybrid loss stops the gradient of its VB term through the model's mean on purpose (checked in
  # test_losses.py), so its derivative is not the finite difference: leave it out of the scalar.
  weights["train_loss"] = weights["train_vb"] = 0.0
  # calc_bpd_loop is an evaluation: differentiating through its scan would double this test's compile time.
  weights = {k: w for k, w in weights.items() if w and not k.startswith("bpd_")}

  def local(s, x0, noise, out, t, ids, key):
    def f(noise, out):
      r = forward(s, x0, noise, out, t, ids, key)
      return weighted_sum(r, weights), r
    (value, r), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(noise, out)
    return value, r, grads

  split = lambda a: a.reshape((N_DEV, B // N_DEV) + a.shape[1:])
  pf = jax.pmap(local, in_axes=(None, 0, 0, 0, 0, 0, None))
  x0, noise, out, t, ids, key = args
  run = lambda n, o: pf(SCHED, split(x0), split(n), split(o), split(t), split(ids), key)
  value, got, (g_noise, g_out) = run(noise, out)
  assert_match(got, want)
  total = lambda n, o: float(np.sum(np.asarray(run(n, o)[0], np.float64)))
  g_noise, g_out = (np.asarray(g).reshape(a.shape) for g, a in ((g_noise, noise), (g_out, out)))
  rng = np.random.default_rng(3)
  h = 1e-2
  for _ in range(2):
    dn, do = (rng.normal(size=a.shape).astype(np.float32) for a in (noise, out))
    fd = (total(noise + h * dn, out + h * do) - total(noise - h * dn, out - h * do)) / (2 * h)
    ad = float(np.vdot(g_noise, dn) + np.vdot(g_out, do))
    # |f| ~ 30: float32 rounding of f costs ~1e-5 / h; curvature over +-h about 1e-2 relative.
    assert abs(fd - ad) < 2e-2 * abs(ad) + 1e-3, (fd, ad, float(np.sum(value)))
    assert abs(ad) > 0.1


def test_shard_map_of_vmap(reference):
  """jax.shard_map over the 8 devices, and inside it jax.vmap over the device's examples, each passed as a
  batch of one."""
  args, want = reference

  def per_device(s, x0, noise, out, t, ids, key):
    one = lambda *a: jax.tree.map(lambda y: y[0], forward(s, *(z[None] for z in a), key))
    return jax.vmap(one)(x0, noise, out, t, ids)

  f = jax.shard_map(per_device, mesh=MESH, in_specs=BATCH_SPECS, out_specs=P("data"))
  assert_match(jax.jit(f)(SCHED, *args), want)


def test_vmap_over_schedules():
  """A stack of schedules is a batch of pytrees: vmap over it equals one call per schedule."""
  scheds = [SCHED, jd.make_schedule("linear", T, beta_start=1e-3, beta_end=0.2)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *scheds)
  x0, noise, out, t, _, _ = inputs(1)

  def f(s):
    x_t = jd.q_sample(s, x0, t, noise)
    return x_t, jd.p_mean_variance(s, out, x_t, t, mean_type="eps", var_type="learned_range")

  got = jax.jit(jax.vmap(f))(stacked)
  for i, s in enumerate(scheds):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(f(s))):
      np.testing.assert_allclose(g[i], w, rtol=1e-5, atol=1e-5 * (1 + np.abs(np.asarray(w)).max()))


def test_sample_timesteps_under_transforms():
  keys = jax.random.split(jax.random.key(5), 2 * N_DEV)
  f = lambda k: jd.sample_timesteps(k, 6, T, "antithetic")
  want = np.stack([np.asarray(f(k)) for k in keys])
  np.testing.assert_array_equal(jax.pmap(f)(keys[:N_DEV]), want[:N_DEV])
  sm = jax.shard_map(jax.vmap(f), mesh=MESH, in_specs=P("data"), out_specs=P("data"))  # vmap inside
  np.testing.assert_array_equal(jax.jit(sm)(keys), want)


def test_schedule_pytree_through_transforms():
  s = jd.respace(jd.make_schedule("sigmoid", 200), jd.space_timesteps(200, "ddim20"))
  out = jax.jit(lambda s: jax.tree.map(lambda a: a + 0, s))(s)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(s)):
    np.testing.assert_array_equal(a, b)
  assert jax.jit(lambda s: s.num_timesteps)(s) == 20
  per_dev = jax.pmap(lambda s, i: s.betas[i], in_axes=(None, 0))(s, jnp.arange(N_DEV))
  np.testing.assert_array_equal(per_dev, np.asarray(s.betas)[:N_DEV])


def test_bad_input_inside_transforms_raises_at_trace_time():
  args = inputs(0)
  bad_t = jnp.zeros((B // 2,), jnp.int32)
  with pytest.raises(ValueError, match="batch sizes must match"):
    jax.jit(forward)(SCHED, args[0], args[1], args[2], bad_t, args[4], args[5])
  with pytest.raises(ValueError, match="var_type must be one of"):
    jax.vmap(lambda x: jd.p_mean_variance(SCHED, x, x, jnp.zeros(2, jnp.int32), var_type="big"))(
        jnp.zeros((3, 2, 4, 4, 1)))
  with pytest.raises(ValueError, match="mean_type must be one of"):
    jax.pmap(lambda x: jd.training_losses(SCHED, model, x, jnp.zeros(1, jnp.int32), x, mean_type="score"))(
        jnp.zeros((N_DEV, 1, 4, 4, 1)))
  with pytest.raises(ValueError, match="loss_type must be one of"):
    jax.shard_map(lambda x: jd.training_losses(SCHED, model, x, jnp.zeros(1, jnp.int32), x, loss_type="l1")["loss"],
                  mesh=MESH, in_specs=P("data"), out_specs=P("data"))(jnp.zeros((N_DEV, 4, 4, 1)))
  with pytest.raises(ValueError, match="shapes must match"):
    jax.grad(lambda n: jd.q_sample(SCHED, args[0], args[3], n).sum())(args[1][:, :2])
