"""Tests for jaxddpm/sampling.py with analytic denoisers (no training).

For Gaussian data x_0 ~ N(mu, diag(s^2)) the optimal denoiser is linear in x_t:
  E[x_0 | x_t] = mu + sqrt(ab) s^2 (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab),
  E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab),
so each sampler is a linear-Gaussian chain whose output law N(m, v) is propagated exactly in float64
numpy (`chain_moments`), independently of the library: the samples must match it within Monte Carlo
error, and (with all T = 1000 steps, or with the exact reverse variance) match the data itself. A
mixture of Gaussians uses the posterior responsibilities. Data live in a tiny [N, 1, 1, 2] "image".
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxddpm import sampling
from jaxddpm.schedule import beta_schedule, make_schedule, space_timesteps

T = 1000
SCHED = make_schedule("linear", T)
AB64 = np.cumprod(1.0 - beta_schedule("linear", T))
AB32 = jnp.asarray(AB64, jnp.float32)
MU = np.array([0.5, -0.3])
SD = np.array([0.3, 0.6])
SHAPE = (4000, 1, 1, 2)
KEY = jax.random.PRNGKey(0)


def gaussian_eps(x, t):
  """The optimal eps-prediction E[eps | x_t] for x_0 ~ N(MU, diag(SD^2)); t = original timesteps."""
  ab = AB32[t][:, None, None, None]
  return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * MU) / (ab * SD ** 2 + 1 - ab)


def gaussian_x0(x, t):
  """E[x_0 | x_t] in float64 numpy (x [..., 2], t original timestep)."""
  ab = AB64[t]
  return MU + math.sqrt(ab) * SD ** 2 * (x - math.sqrt(ab) * MU) / (ab * SD ** 2 + 1 - ab)


def kept_indices(spec):
  return np.arange(T) if spec is None else np.asarray(space_timesteps(T, spec))


def respaced_tables(spec):
  """float64 alphabar, alphabar_prev, beta, betatilde of the respaced chain."""
  ab = AB64[kept_indices(spec)]
  abp = np.append(1.0, ab[:-1])
  beta = 1.0 - ab / abp
  return ab, abp, beta, beta * (1 - abp) / (1 - ab)


def exact_reverse_variance(a, abp, beta, bt):
  """Var[x_{k-1} | x_k] under the data law: betatilde + coef1^2 Var[x_0 | x_k] (per dimension)."""
  c1 = math.sqrt(abp) * beta / (1 - a)
  return bt + c1 ** 2 * SD ** 2 * (1 - a) / (a * SD ** 2 + 1 - a)


def chain_moments(spec, method, var_type="fixed_large", eta=0.0):
  """Exact float64 mean and variance of the sampler's output for the Gaussian data (per dimension)."""
  ab, abp, beta, bt = respaced_tables(spec)
  m, v = np.zeros(2), np.ones(2)
  for k in range(len(ab) - 1, -1, -1):
    a = ab[k]
    g = math.sqrt(a) * SD ** 2 / (a * SD ** 2 + 1 - a)   # pred_x0 = g x + h
    h = MU - g * math.sqrt(a) * MU
    if method == "ancestral":
      c1 = math.sqrt(abp[k]) * beta[k] / (1 - a)
      c2 = math.sqrt(1 - beta[k]) * (1 - abp[k]) / (1 - a)
      A, B = c1 * g + c2, c1 * h
      var = {"fixed_small": bt[k], "fixed_large": beta[k],
             "exact": exact_reverse_variance(a, abp[k], beta[k], bt[k])}[var_type] if k > 0 else 0.0
    else:  # DDIM eq. 12; eps = ((1 - sqrt(a) g) x - sqrt(a) h) / sqrt(1 - a)
      var = eta ** 2 * bt[k]
      d = math.sqrt(max(1 - abp[k] - var, 0.0) / (1 - a))
      A = math.sqrt(abp[k]) * g + d * (1 - math.sqrt(a) * g)
      B = math.sqrt(abp[k]) * h - d * math.sqrt(a) * h
    m, v = A * m + B, A * A * v + var
  return m, v


def assert_moments(x, mean, var, n_sigma=4.0):
  """Sample mean and variance within n_sigma Monte Carlo standard errors of (mean, var)."""
  x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
  n = x.shape[0]
  np.testing.assert_array_less(np.abs(x.mean(0) - mean), n_sigma * np.sqrt(var / n))
  np.testing.assert_array_less(np.abs(x.var(0) / var - 1.0), n_sigma * math.sqrt(2.0 / n))


# ------------------------------------------------------------------------------- Gaussian data
# (The T = 1000 configurations below are reused, from the jit cache, by the exact-identity tests.)
@pytest.mark.parametrize("timesteps,method,var_type,eta", [
    (None, "ancestral", "fixed_large", 0.0),
    (None, "ancestral", "fixed_small", 0.0),
    (100, "ancestral", "fixed_large", 0.0),
    (None, "ddim", "fixed_large", 0.0),
    (None, "ddim", "fixed_large", 1.0),
])
def test_gaussian_moments(timesteps, method, var_type, eta):
  out = sampling.sample(gaussian_eps, SCHED, SHAPE, KEY, method=method, timesteps=timesteps, eta=eta,
                        var_type=var_type, clip_denoised=False)
  x = np.asarray(out["samples"])
  assert x.shape == SHAPE and np.all(np.isfinite(x))
  m, v = chain_moments(timesteps, method, var_type, eta)
  assert_moments(x, m, v)                  # the exact law of this discrete sampler
  if timesteps is None:
    assert_moments(x, MU, SD ** 2)         # with all 1000 steps: the data distribution


@pytest.mark.parametrize("var_type", ["learned", "learned_range"])
def test_learned_variance_reproduces_data(var_type):
  """With the exact reverse variance as the network's variance output, ancestral sampling is exact in
  law for Gaussian data even with 10 respaced steps."""
  spec = 10
  kept = kept_indices(spec)
  ab, abp, beta, bt = respaced_tables(spec)
  log_var = np.stack([np.log(exact_reverse_variance(ab[k], abp[k], beta[k], bt[k])) for k in range(len(kept))])
  if var_type == "learned":
    var_out = log_var
  else:  # Improved DDPM eq. 15 inverted: v = 2 u - 1, log var = u log beta + (1 - u) log betatilde_clipped
    log_bt_clipped = np.log(np.append(bt[1], bt[1:]))[:, None]
    var_out = 2 * (log_var - log_bt_clipped) / (np.log(beta)[:, None] - log_bt_clipped) - 1
  index_of = np.zeros(T, np.int32)
  index_of[kept] = np.arange(len(kept))
  index_of, var_out = jnp.asarray(index_of), jnp.asarray(var_out, jnp.float32)

  def model_fn(x, t):
    v = jnp.broadcast_to(var_out[index_of[t]][:, None, None, :], x.shape)
    return jnp.concatenate([gaussian_eps(x, t), v], axis=-1)

  out = sampling.sample(model_fn, SCHED, SHAPE, KEY, timesteps=spec, var_type=var_type, clip_denoised=False)
  assert_moments(out["samples"], MU, SD ** 2)
  assert_moments(out["samples"], *chain_moments(spec, "ancestral", "exact"))


# ------------------------------------------------------------------------------- mixture data
MIX_W = np.array([0.3, 0.7])
MIX_MU = np.array([[-0.6, 0.3], [0.5, -0.4]])
MIX_SD = 0.15


def mixture_eps(x, t):
  """E[eps | x_t] for the mixture: sum_j r_j(x_t) E[eps | x_t, j], r_j the posterior responsibilities."""
  ab = AB32[t][:, None, None, None, None]
  x = x[..., None, :]                                     # [B, 1, 1, 1, 2] against components [J, 2]
  var = ab * MIX_SD ** 2 + 1 - ab
  diff = x - jnp.sqrt(ab) * MIX_MU
  logits = jnp.log(MIX_W)[:, None] - 0.5 * jnp.sum(diff ** 2, -1, keepdims=True) / var
  r = jax.nn.softmax(logits, axis=-2)
  return jnp.sum(r * jnp.sqrt(1 - ab) * diff / var, axis=-2)


@pytest.mark.parametrize("method,eta,timesteps", [("ancestral", 0.0, None), ("ddim", 0.0, None),
                                                  ("ancestral", 0.0, 100)])
def test_mixture_weights_and_moments(method, eta, timesteps):
  x = np.asarray(sampling.sample(mixture_eps, SCHED, (3000, 1, 1, 2), KEY, method=method, eta=eta,
                                 timesteps=timesteps, clip_denoised=False)["samples"]).reshape(-1, 2)
  n = len(x)
  comp = np.argmin(((x[:, None, :] - MIX_MU) ** 2).sum(-1), axis=1)
  frac = np.bincount(comp, minlength=2) / n
  np.testing.assert_array_less(np.abs(frac - MIX_W), 4 * np.sqrt(MIX_W * (1 - MIX_W) / n))
  for j in range(2):
    xj = x[comp == j]
    np.testing.assert_array_less(np.abs(xj.mean(0) - MIX_MU[j]), 4 * MIX_SD / np.sqrt(len(xj)))
    if timesteps is None:  # (100 respaced fixed_large steps inflate a narrow component's spread ~8%)
      np.testing.assert_allclose(xj.std(0), MIX_SD, rtol=4 / np.sqrt(2 * len(xj)) + 0.02)


# ------------------------------------------------------------------------------- exact identities
def test_ddim_eta0_is_deterministic_given_x_T():
  x_T = jax.random.normal(jax.random.PRNGKey(5), (64, 1, 1, 2))
  kw = dict(method="ddim", timesteps=50, x_T=x_T, clip_denoised=False)
  a = sampling.sample(gaussian_eps, SCHED, x_T.shape, jax.random.PRNGKey(1), eta=0.0, **kw)["samples"]
  b = sampling.sample(gaussian_eps, SCHED, x_T.shape, jax.random.PRNGKey(2), eta=0.0, **kw)["samples"]
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c = sampling.sample(gaussian_eps, SCHED, x_T.shape, jax.random.PRNGKey(1), eta=1.0, **kw)["samples"]
  d = sampling.sample(gaussian_eps, SCHED, x_T.shape, jax.random.PRNGKey(2), eta=1.0, **kw)["samples"]
  assert np.abs(np.asarray(c) - np.asarray(d)).max() > 1e-2      # eta = 1 does use the key
  # and eta = 0 is the deterministic linear map of the float64 chain: x_0 = A x_T + B
  ab, abp, _, _ = respaced_tables(50)
  x = np.asarray(x_T, np.float64).reshape(-1, 2)
  for k in range(len(ab) - 1, -1, -1):
    x0 = MU + math.sqrt(ab[k]) * SD ** 2 * (x - math.sqrt(ab[k]) * MU) / (ab[k] * SD ** 2 + 1 - ab[k])
    eps = (x - math.sqrt(ab[k]) * x0) / math.sqrt(1 - ab[k])
    x = math.sqrt(abp[k]) * x0 + math.sqrt(1 - abp[k]) * eps
  np.testing.assert_allclose(np.asarray(a).reshape(-1, 2), x, atol=2e-4)


def test_ddim_eta1_equals_ancestral_fixed_small():
  """DDIM with eta = 1 over all T steps is DDPM's ancestral sampler with sigma_t^2 = betatilde_t."""
  kw = dict(clip_denoised=False)
  a = sampling.sample(gaussian_eps, SCHED, SHAPE, KEY, method="ddim", eta=1.0, **kw)["samples"]
  b = sampling.sample(gaussian_eps, SCHED, SHAPE, KEY, var_type="fixed_small", **kw)["samples"]
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4)
  c = sampling.sample(gaussian_eps, SCHED, SHAPE, KEY, var_type="fixed_large", **kw)["samples"]
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2      # the comparison can fail


def test_single_steps_match_float64_formulas():
  rng = np.random.default_rng(0)
  spec = 25
  sched = sampling.resolve_timesteps(SCHED, spec)
  ab, abp, beta, bt = respaced_tables(spec)
  B = 6
  t = np.array([0, 1, 2, 10, 20, 24])
  x = rng.normal(size=(B, 2, 2, 3)) * 1.5
  e = rng.normal(size=x.shape)
  z = rng.normal(size=x.shape)
  a, ap = ab[t][:, None, None, None], abp[t][:, None, None, None]
  x0 = np.clip((x - np.sqrt(1 - a) * e) / np.sqrt(a), -1, 1)
  e_c = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)        # eps consistent with the clipped x0
  f32 = lambda u: jnp.asarray(u, jnp.float32)
  for eta in (0.0, 0.5, 1.0):
    sig = eta * np.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
    want = np.sqrt(ap) * x0 + np.sqrt(np.maximum(1 - ap - sig ** 2, 0)) * e_c + sig * z
    got, px0 = sampling.ddim_step(sched, f32(e), f32(x), jnp.asarray(t), f32(z), eta=eta)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(px0), x0, rtol=1e-4, atol=1e-4)
  # ancestral (DDPM Algorithm 2): posterior mean + sqrt(beta) z, no noise at index 0
  c1 = np.sqrt(ap) * beta[t][:, None, None, None] / (1 - a)
  c2 = np.sqrt(1 - beta[t])[:, None, None, None] * (1 - ap) / (1 - a)
  large = np.append(bt[1], beta[1:])[t][:, None, None, None]
  want = c1 * x0 + c2 * x + (t > 0)[:, None, None, None] * np.sqrt(large) * z
  got, _ = sampling.p_sample(sched, f32(e), f32(x), jnp.asarray(t), f32(z), var_type="fixed_large")
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------ snapshots and tracing
def test_snapshots():
  spec, every = 40, 7
  out = sampling.sample(gaussian_eps, SCHED, (16, 1, 1, 2), KEY, timesteps=spec, snapshot_every=every,
                        clip_denoised=False)
  kept = kept_indices(spec)
  S = -(-len(kept) // every)
  assert out["pred_x0_snapshots"].shape == (S, 16, 1, 1, 2) == out["x_t_snapshots"].shape
  # recorded at the last step (t = 0) and every 7th before it, as ORIGINAL timesteps
  recorded = np.arange(0, len(kept), every)[::-1]       # entries ..., 14, 7, 0 (counted from t = 0)
  np.testing.assert_array_equal(np.asarray(out["snapshot_timesteps"]), kept[recorded])
  # each pred_x0 snapshot is E[x_0 | x_t] of the x_t snapshot at that original timestep
  for s, t in enumerate(np.asarray(out["snapshot_timesteps"])):
    np.testing.assert_allclose(np.asarray(out["pred_x0_snapshots"][s]),
                               gaussian_x0(np.asarray(out["x_t_snapshots"][s], np.float64), t), atol=1e-4)
  # the last step (t = 0) has no noise and a posterior mean equal to pred_x0
  np.testing.assert_allclose(np.asarray(out["pred_x0_snapshots"][-1]), np.asarray(out["samples"]), atol=1e-5)
  assert out["snapshot_timesteps"][-1] == 0


def _count_eqns(jaxpr, counts):
  for eqn in jaxpr.eqns:
    counts["eqns"] += 1
    counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          _count_eqns(sub.jaxpr, counts)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          _count_eqns(sub, counts)
  return counts


@pytest.mark.parametrize("method", ["ancestral", "ddim"])
def test_one_scan_and_jaxpr_independent_of_T(method):
  counts = []
  for n in (10, 1000):
    jaxpr = jax.make_jaxpr(lambda s, k: sampling.sample(gaussian_eps, s, (8, 1, 1, 2), k, method=method,
                                                        eta=0.5 if method == "ddim" else 0.0))(
        make_schedule("cosine", n), KEY)
    counts.append(_count_eqns(jaxpr.jaxpr, {"eqns": 0}))
  assert counts[0]["scan"] == 1 and counts[0]["eqns"] > 10
  assert counts[0] == counts[1]


# ------------------------------------------------------------- batch split and device invariance
def test_same_images_for_any_batch_split_and_device_count():
  assert len(jax.devices()) == 8
  apply_fn = lambda params, x, t: params * gaussian_eps(x, t)
  params = jnp.float32(1.0)
  kw = dict(timesteps=20, snapshot_every=5, clip_denoised=False)
  shape = (10, 1, 1, 2)
  ref = jax.device_get(sampling.sample(gaussian_eps, SCHED, shape, KEY, **kw))
  one = sampling.data_mesh(jax.devices()[:1])
  runs = [
      sampling.sample_batched(apply_fn, params, SCHED, shape, KEY, batch_size=10, mesh=one, **kw),
      sampling.sample_batched(apply_fn, params, SCHED, shape, KEY, batch_size=8, **kw),   # 8 devices, 8 + 2
      sampling.sample_batched(apply_fn, params, SCHED, shape, KEY, batch_size=4, **kw),   # pad 4 -> 8, 3 batches
  ]
  for r in runs:
    for k in ("samples", "pred_x0_snapshots", "x_t_snapshots", "snapshot_timesteps"):
      np.testing.assert_array_equal(r[k], ref[k])
  # a batch of 2 with sample_offset 6 is rows 6, 7 of the whole run
  part = sampling.sample(gaussian_eps, SCHED, (2, 1, 1, 2), KEY, sample_offset=6, **kw)
  np.testing.assert_array_equal(np.asarray(part["samples"]), ref["samples"][6:8])
  # the sharded sampler really shards the batch over the 8 devices, and a new key does not recompile
  sampler = sampling.make_sampler(apply_fn, SCHED, (8, 1, 1, 2), **kw)
  out = sampler(params, KEY)
  assert len(out["samples"].sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(out["samples"]), ref["samples"][:8])
  size = sampler.jitted._cache_size()
  sampler(params, jax.random.PRNGKey(9), 16)
  assert sampler.jitted._cache_size() == size


# -------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_value_error_before_tracing():
  calls = []

  def model_fn(x, t):
    calls.append(1)
    return gaussian_eps(x, t)

  shape = (4, 1, 1, 2)
  bad = [
      (dict(method="euler"), "method"),
      (dict(timesteps=1001), "T = 1000"),
      (dict(timesteps="ddim2000"), "T = 1000"),
      (dict(timesteps=np.arange(1001)), "T = 1000"),
      (dict(timesteps=0), "timesteps"),
      (dict(method="ddim", eta=-0.1), "eta"),
      (dict(method="ancestral", eta=1.0), "eta"),
      (dict(mean_type="score"), "mean_type"),
      (dict(var_type="big"), "var_type"),
      (dict(snapshot_every=0), "snapshot_every"),
      (dict(x_T=jnp.zeros((3, 1, 1, 2))), "x_T"),
  ]
  for kwargs, match in bad:
    with pytest.raises(ValueError, match=match):
      sampling.sample(model_fn, SCHED, shape, KEY, **kwargs)
  with pytest.raises(ValueError, match="shape"):
    sampling.sample(model_fn, SCHED, (4,), KEY)
  with pytest.raises(ValueError, match="batch_size"):
    sampling.sample_batched(lambda p, x, t: model_fn(x, t), None, SCHED, shape, KEY, batch_size=0)
  assert not calls                     # nothing was traced, let alone compiled
  # a network output that does not fit var_type: caught when model_fn is first traced
  with pytest.raises(ValueError, match="learned.*2x the channels"):
    sampling.sample(model_fn, SCHED, shape, KEY, var_type="learned", timesteps=5)
  with pytest.raises(ValueError, match="fixed_large"):
    sampling.sample(lambda x, t: jnp.concatenate([x, x], -1), SCHED, shape, KEY, timesteps=5)


def test_sample_under_an_outer_jit():
  kw = dict(timesteps=20, clip_denoised=False)
  shape = (8, 1, 1, 2)
  eager = sampling.sample(gaussian_eps, SCHED, shape, KEY, **kw)["samples"]
  jitted = jax.jit(lambda k, off: sampling.sample(gaussian_eps, SCHED, shape, k, sample_offset=off, **kw))
  np.testing.assert_allclose(np.asarray(jitted(KEY, 0)["samples"]), np.asarray(eager), atol=1e-6)
  # respacing needs a concrete schedule: a traced one gets a clear error
  with pytest.raises(ValueError, match="respac"):
    jax.jit(lambda s: sampling.sample(gaussian_eps, s, shape, KEY, **kw))(SCHED)
