"""The Gaussian identities of diffusion.py against float64 references written from the papers.

DDPM (Ho et al. 2020) eqs. 4, 6, 7, 11; Improved DDPM (Nichol & Dhariwal 2021) eq. 15 and its fixed variances;
v-prediction (Salimans & Ho 2022); Tweedie's formula for the score. References are float64 numpy and carry
an error scale (the sum of the absolute values of every term), so float32 results are compared with a
relative tolerance that is honest about cancellation.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxddpm as jd

RTOL = 2e-6        # about 16 float32 ulps of the error scale
SHAPE = (6, 3, 3, 2)


class V:
  """A float64 reference value with an error scale (sum of |terms|) for float32 comparisons."""
  __array_ufunc__ = None  # numpy arrays defer to V's reflected operators

  def __init__(self, v, s=None):
    self.v = np.asarray(v, np.float64)
    self.s = np.abs(self.v) if s is None else np.asarray(s, np.float64)

  @staticmethod
  def of(x):
    return x if isinstance(x, V) else V(x)

  def __add__(self, o):
    o = V.of(o)
    return V(self.v + o.v, self.s + o.s)

  __radd__ = __add__

  def __sub__(self, o):
    o = V.of(o)
    return V(self.v - o.v, self.s + o.s)

  def __rsub__(self, o):
    return V.of(o) - self

  def __neg__(self):
    return V(-self.v, self.s)

  def __mul__(self, o):
    o = V.of(o)
    return V(self.v * o.v, self.s * o.s)

  __rmul__ = __mul__

  def __truediv__(self, o):
    o = V.of(o)
    return V(self.v / o.v, self.s / np.abs(o.v) + np.abs(self.v) * o.s / o.v ** 2)

  def clip(self):
    return V(np.clip(self.v, -1, 1), self.s)

  def exp(self):
    return V(np.exp(self.v), np.exp(self.v) * (self.s + 1))  # plus one ulp of the result


def check(actual, ref, rtol=RTOL, what=""):
  ref = V.of(ref)
  a = np.asarray(actual, np.float64)
  a, v, s = np.broadcast_arrays(a, ref.v, ref.s)
  bad = ~(np.abs(a - v) <= rtol * s + 1e-12)
  assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} off; worst actual {a[bad][:3]} ref {v[bad][:3]} "
                         f"scale {s[bad][:3]}")


def coefs(name, T):
  """Float64 per-step quantities from DDPM's definitions; entry i is the paper's t = i + 1."""
  b = jd.beta_schedule(name, T)  # float64 betas (checked against the papers in test_schedule.py)
  ab = np.cumprod(1 - b)
  abp = np.append(1.0, ab[:-1])
  with np.errstate(divide="ignore"):
    bt = b * (1 - abp) / (1 - ab)
  bt_clip = np.append(bt[1], bt[1:])
  return dict(b=b, a=1 - b, ab=ab, abp=abp, bt=bt, log_bt_clip=np.log(bt_clip),
              large=np.append(bt[1], b[1:]))


def at(c, key, t):
  """c[key][t] shaped [B, 1, 1, 1]."""
  return c[key][t].reshape(-1, 1, 1, 1)


def draw(seed, name, T):
  rng = np.random.default_rng(seed)
  hi = T - 1 if name != "jsd" else T - 2  # jsd's beta_T = 1 makes alphabar_T = 0 (x_0 not recoverable)
  t = np.concatenate([[0, 1, hi], rng.integers(0, hi + 1, SHAPE[0] - 3)]).astype(np.int32)
  x0 = rng.uniform(-1, 1, SHAPE)
  x_t = 1.5 * rng.normal(size=SHAPE)
  eps = rng.normal(size=SHAPE)
  return t, x0, x_t, eps


def f32(x):
  return jnp.asarray(x, jnp.float32)


SCHEDULES = [(name, 1000) for name in jd.SCHEDULES]  # one T: eager ops compile once per shape


# ------------------------------------------------------------------------------- paper formulas
@pytest.mark.parametrize("name,T", SCHEDULES)
def test_forward_and_posterior(name, T):
  s, c = jd.make_schedule(name, T), coefs(name, T)
  t, x0, x_t, eps = draw(0, name, T)
  mean, var, log_var = jd.q_mean_variance(s, f32(x0), t)
  check(mean, V(np.sqrt(at(c, "ab", t))) * x0, what="q mean (eq. 4)")
  check(var, 1 - at(c, "ab", t), what="q variance")
  check(log_var, V(np.log(1 - at(c, "ab", t)), np.abs(np.log(1 - at(c, "ab", t))) + 1), what="q log-variance")
  assert var.shape == log_var.shape == (SHAPE[0], 1, 1, 1)
  x_t_got = jd.q_sample(s, f32(x0), t, f32(eps))
  check(x_t_got, V(np.sqrt(at(c, "ab", t))) * x0 + V(np.sqrt(1 - at(c, "ab", t))) * eps, what="q_sample")
  # Eq. 7: mutilde = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t.
  pm, pv, plv = jd.q_posterior_mean_variance(s, f32(x0), f32(x_t), t)
  ab, abp, b = at(c, "ab", t), at(c, "abp", t), at(c, "b", t)
  check(pm, V(np.sqrt(abp) * b / (1 - ab)) * x0 + V(np.sqrt(1 - b) * (1 - abp) / (1 - ab)) * x_t,
        what="posterior mean")
  check(pv, at(c, "bt", t), what="posterior variance")
  check(plv, V(at(c, "log_bt_clip", t), np.abs(at(c, "log_bt_clip", t)) + 1), what="posterior log-variance")


@pytest.mark.parametrize("name,T", SCHEDULES)
def test_conversions_against_formulas(name, T):
  s, c = jd.make_schedule(name, T), coefs(name, T)
  t, x0, x_t, eps = draw(1, name, T)
  sa, sm = V(np.sqrt(at(c, "ab", t))), V(np.sqrt(1 - at(c, "ab", t)))
  v = eps  # any array: the formulas are linear maps
  check(jd.predict_x0_from_eps(s, f32(x_t), t, f32(eps)), (x_t - sm * eps) / sa, what="x0 from eps")
  check(jd.predict_eps_from_x0(s, f32(x_t), t, f32(x0)), (x_t - sa * x0) / sm, what="eps from x0")
  # Salimans & Ho 2022: z = alpha x + sigma eps, v = alpha eps - sigma x  =>  x = alpha z - sigma v,
  # eps = sigma z + alpha v (alpha^2 = abar, sigma^2 = 1 - abar).
  check(jd.predict_x0_from_v(s, f32(x_t), t, f32(v)), sa * x_t - sm * v, what="x0 from v")
  check(jd.predict_eps_from_v(s, f32(x_t), t, f32(v)), sm * x_t + sa * v, what="eps from v")
  check(jd.v_from_eps_x0(s, f32(x0), t, f32(eps)), sa * eps - sm * x0, what="v")
  ab, abp, b = at(c, "ab", t), at(c, "abp", t), at(c, "b", t)
  c1, c2 = V(np.sqrt(abp) * b / (1 - ab)), V(np.sqrt(1 - b) * (1 - abp) / (1 - ab))
  check(jd.predict_x0_from_xprev(s, f32(x_t), t, f32(x0)), (x0 - c2 * x_t) / c1, what="x0 from x_prev")
  check(jd.score_from_eps(s, f32(x_t), t, f32(eps)), -V(eps) / sm, what="score")
  check(jd.eps_from_score(s, f32(x_t), t, f32(eps)), -sm * eps, what="eps from score")


def ref_p_mean_variance(c, out, x_t, t, mean_type, var_type, clip):
  """Reverse step p(x_{t-1} | x_t) from the papers: returns V's for mean, variance, log-variance, pred_x0,
  pred_eps. eps (unclipped) uses DDPM eq. 11 directly; the others the posterior mean eq. 7 of pred_x0."""
  ab, abp, b = at(c, "ab", t), at(c, "abp", t), at(c, "b", t)
  sa, sm = V(np.sqrt(ab)), V(np.sqrt(1 - ab))
  c1, c2 = V(np.sqrt(abp) * b / (1 - ab)), V(np.sqrt(1 - b) * (1 - abp) / (1 - ab))
  C = x_t.shape[-1]
  mo, vo = (out[..., :C], out[..., C:]) if var_type.startswith("learned") else (out, None)
  clipf = (lambda z: z.clip()) if clip else (lambda z: z)
  if mean_type == "x_prev":
    mean = V(mo)
    pred_x0 = clipf((mean - c2 * x_t) / c1)
  else:
    raw = {"eps": lambda: (x_t - sm * mo) / sa, "x0": lambda: V(mo), "v": lambda: sa * x_t - sm * mo}[mean_type]()
    pred_x0 = clipf(raw)
    mean = c1 * pred_x0 + c2 * x_t
    if mean_type == "eps" and not clip:  # DDPM eq. 11: mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)
      eq11 = (x_t - b / np.sqrt(1 - ab) * mo) / np.sqrt(1 - b)
      np.testing.assert_allclose(mean.v, eq11, rtol=1e-9, atol=1e-12)
      mean = V(eq11, mean.s)
  pred_eps = (x_t - sa * pred_x0) / sm
  lb, lbt = np.log(at(c, "b", t)), at(c, "log_bt_clip", t)
  if var_type == "fixed_small":
    log_var = V(lbt, np.abs(lbt) + 1)
    var = V(at(c, "bt", t))
  elif var_type == "fixed_large":
    log_var = V(np.log(at(c, "large", t)), np.abs(np.log(at(c, "large", t))) + 1)
    var = V(at(c, "large", t))
  elif var_type == "learned":
    log_var = V(vo)
    var = log_var.exp()
  else:  # Improved DDPM eq. 15: Sigma = exp(u log beta_t + (1 - u) log betatilde_t), u = (v + 1) / 2
    u = (vo + 1) / 2
    log_var = V(u * lb + (1 - u) * lbt, np.abs(u * lb) + np.abs((1 - u) * lbt) + 1)
    var = log_var.exp()
  return dict(mean=mean, variance=var, log_variance=log_var, pred_x0=pred_x0, pred_eps=pred_eps)


@pytest.mark.parametrize("name,T", SCHEDULES)
def test_p_mean_variance_every_type(name, T):
  s, c = jd.make_schedule(name, T), coefs(name, T)
  t, x0, x_t, eps = draw(2, name, T)
  rng = np.random.default_rng(3)
  for mean_type, var_type, clip in itertools.product(jd.MEAN_TYPES, jd.VAR_TYPES, (False, True)):
    C = 2 * SHAPE[-1] if var_type.startswith("learned") else SHAPE[-1]
    out = rng.normal(size=SHAPE[:-1] + (C,))
    if var_type == "learned_range":
      out[..., SHAPE[-1]:] = rng.uniform(-1.2, 1.2, size=SHAPE)
    got = jd.p_mean_variance(s, f32(out), f32(x_t), t, mean_type=mean_type, var_type=var_type,
                             clip_denoised=clip)
    ref = ref_p_mean_variance(c, out, x_t, t, mean_type, var_type, clip)
    for k, r in ref.items():
      check(getattr(got, k), r, what=f"{mean_type}/{var_type}/clip={clip}: {k}")
    assert got.mean.shape == SHAPE and got.pred_x0.shape == SHAPE
    assert np.broadcast_shapes(got.variance.shape, SHAPE) == SHAPE


# ------------------------------------------------------------------------------------- properties
def test_q_sample_moments_monte_carlo():
  """x_t from q_sample has the moments of T' steps of the forward chain x_s = sqrt(1 - beta_s) x_{s-1} +
  sqrt(beta_s) n_s, propagated by the recursion m_s = sqrt(alpha_s) m_{s-1}, v_s = alpha_s v_{s-1} + beta_s."""
  s = jd.make_schedule("cosine", 200)
  b = jd.beta_schedule("cosine", 200)
  steps = np.array([0, 10, 99, 180, 199])
  m, v, mom = 1.0, 0.0, {}
  for k in range(200):
    m, v = np.sqrt(1 - b[k]) * m, (1 - b[k]) * v + b[k]
    mom[k] = (m, v)
  N = 40000
  x0 = np.array([-0.9, 0.3, 0.8], np.float32)
  noise = jax.random.normal(jax.random.key(0), (len(steps), N, 3))
  for i, k in enumerate(steps):
    xt = np.asarray(jd.q_sample(s, jnp.broadcast_to(x0, (N, 3)), jnp.full((N,), k, jnp.int32), noise[i]),
                    np.float64)
    mk, vk = mom[k]
    se_mean, se_var = np.sqrt(vk / N), vk * np.sqrt(2 / (N - 1))
    assert np.all(np.abs(xt.mean(0) - mk * x0) < 5 * se_mean), (k, xt.mean(0), mk * x0)
    assert np.all(np.abs(xt.var(0) - vk) < 5 * se_var), (k, xt.var(0), vk)


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid", "jsd", "const"])
def test_posterior_is_gaussian_conditional_of_forward_chain(name):
  """q(x_{t-1} | x_t, x_0) by Gaussian conditioning of the joint of (x_1..x_T | x_0), built numerically from
  the chain x_s = sqrt(alpha_s) x_{s-1} + sqrt(beta_s) n_s (no closed form used)."""
  T = 50
  b = jd.beta_schedule(name, T) if name != "linear" else np.linspace(1e-3, 0.2, T)
  s = jd.schedule_from_betas(b)
  L = np.zeros((T, T))  # x_k - m_k x_0 = L[k-1] . n, k = 1..T
  m = np.ones(T + 1)
  prev = np.zeros(T)
  for k in range(1, T + 1):
    row = np.sqrt(1 - b[k - 1]) * prev
    row[k - 1] = np.sqrt(b[k - 1])
    L[k - 1], prev = row, row
    m[k] = np.sqrt(1 - b[k - 1]) * m[k - 1]
  cov = L @ L.T
  rng = np.random.default_rng(4)
  x0, x_t = rng.uniform(-1, 1, (T, 5)), rng.normal(size=(T, 5))
  want_mean, want_var = np.zeros((T, 5)), np.zeros(T)
  for i in range(T):  # library index i: x_{i} (paper t-1) given x_{i+1} (paper t)
    if i == 0:  # x_{t-1} = x_0 is known
      want_mean[i], want_var[i] = x0[i], 0.0
      continue
    a_, b_ = i - 1, i  # rows of cov for x_i and x_{i+1}
    S = cov[np.ix_([a_, b_], [a_, b_])]
    gain = np.linalg.solve(S[1:, 1:], S[1:, :1])[0, 0]
    want_mean[i] = m[i] * x0[i] + gain * (x_t[i] - m[i + 1] * x0[i])
    want_var[i] = S[0, 0] - S[0, 1] * gain
  pm, pv, _ = jd.q_posterior_mean_variance(s, f32(x0), f32(x_t), np.arange(T, dtype=np.int32))
  np.testing.assert_allclose(pm, want_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(pv)[:, 0], want_var, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("name,T", SCHEDULES)
def test_conversions_invert_each_other(name, T):
  s, c = jd.make_schedule(name, T), coefs(name, T)
  t, x0, _, eps = draw(5, name, T)
  sa, sm = np.sqrt(at(c, "ab", t)), np.sqrt(1 - at(c, "ab", t))
  x_t = jd.q_sample(s, f32(x0), t, f32(eps))
  # error scale of x0 recovered from x_t: (|x_t| + sm |eps|) / sa
  sc = (np.abs(np.asarray(x_t)) + sm * np.abs(eps)) / sa + np.abs(x0)
  check(jd.predict_x0_from_eps(s, x_t, t, f32(eps)), V(x0, sc), rtol=1e-6, what="eps -> x0")
  check(jd.predict_eps_from_x0(s, x_t, t, f32(x0)), V(eps, sc * sa / sm), rtol=1e-6, what="x0 -> eps")
  v = jd.v_from_eps_x0(s, f32(x0), t, f32(eps))
  check(jd.predict_x0_from_v(s, x_t, t, v), V(x0, sc), rtol=1e-6, what="v -> x0")
  check(jd.predict_eps_from_v(s, x_t, t, v), V(eps, sc / sm), rtol=1e-6, what="v -> eps")
  e2 = jd.predict_eps_from_x0(s, x_t, t, jd.predict_x0_from_eps(s, x_t, t, f32(eps)))
  check(e2, V(eps, sc * sa / sm), rtol=1e-6, what="eps -> x0 -> eps")
  x_prev, _, _ = jd.q_posterior_mean_variance(s, f32(x0), x_t, t)
  c1 = np.sqrt(at(c, "abp", t)) * at(c, "b", t) / (1 - at(c, "ab", t))
  check(jd.predict_x0_from_xprev(s, x_t, t, x_prev), V(x0, sc + 2 * np.abs(np.asarray(x_t)) / c1), rtol=1e-6,
        what="x0 -> x_prev -> x0")
  check(jd.eps_from_score(s, x_t, t, jd.score_from_eps(s, x_t, t, f32(eps))), V(eps), what="score <-> eps")


def test_score_is_tweedie_for_gaussian_data():
  """Data x0 ~ N(mu, s^2) per dim: q(x_t) = N(sqrt(abar) mu, abar s^2 + 1 - abar), whose score is
  -(x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar); E[eps | x_t] = sqrt(1 - abar)(x_t - sqrt(abar) mu) / D."""
  s, c = jd.make_schedule("linear", 1000), coefs("linear", 1000)
  mu, sd = 0.3, 0.4
  t = np.array([0, 5, 100, 500, 999, 250], np.int32)
  x_t = np.random.default_rng(6).normal(size=SHAPE)
  ab = at(c, "ab", t)
  D = ab * sd ** 2 + 1 - ab
  e_eps = np.sqrt(1 - ab) * (x_t - np.sqrt(ab) * mu) / D
  true_score = -(x_t - np.sqrt(ab) * mu) / D
  check(jd.score_from_eps(s, f32(x_t), t, f32(e_eps)), V(true_score, np.abs(true_score) + 1e-6), rtol=1e-5,
        what="Tweedie score")


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("name,T", [("linear", 1000), ("cosine", 1000), ("sigmoid", 1000)])
def test_true_targets_give_posterior_mean(name, T, clip):
  s, c = jd.make_schedule(name, T), coefs(name, T)
  t, x0, _, eps = draw(7, name, T)
  x_t = jd.q_sample(s, f32(x0), t, f32(eps))
  ab, abp, b = at(c, "ab", t), at(c, "abp", t), at(c, "b", t)
  xt64 = np.asarray(x_t, np.float64)
  post = V(np.sqrt(abp) * b / (1 - ab)) * x0 + V(np.sqrt(1 - b) * (1 - abp) / (1 - ab)) * xt64
  sa, sm = np.sqrt(ab), np.sqrt(1 - ab)
  targets = {"eps": eps, "x0": x0, "v": sa * eps - sm * x0, "x_prev": post.v}
  sc = (np.abs(xt64) + sm * np.abs(eps)) / sa + np.abs(x0)  # conditioning of recovering x0 from x_t
  for mean_type, target in targets.items():
    out = jd.p_mean_variance(s, f32(target), x_t, t, mean_type=mean_type, var_type="fixed_small",
                             clip_denoised=clip)
    c1 = np.sqrt(abp) * b / (1 - ab)
    x0_scale = sc if mean_type != "x_prev" else sc + 2 * np.abs(xt64) / c1
    check(out.mean, V(post.v, post.s + c1 * x0_scale), rtol=1e-6, what=f"{mean_type} mean")
    check(out.pred_x0, V(x0, x0_scale), rtol=1e-6, what=f"{mean_type} pred_x0")
    check(out.pred_eps, V(eps, x0_scale * sa / sm), rtol=1e-6, what=f"{mean_type} pred_eps")


def test_variance_types():
  s, c = jd.make_schedule("linear", 1000), coefs("linear", 1000)
  x_t = jnp.zeros((4, 2, 2, 1))
  t = np.array([0, 1, 500, 999], np.int32)
  big = jd.p_mean_variance(s, jnp.zeros_like(x_t), x_t, t, var_type="fixed_large")
  small = jd.p_mean_variance(s, jnp.zeros_like(x_t), x_t, t, var_type="fixed_small")
  # fixed_large: sigma_t^2 = beta_t, except betatilde_2 at t = 1 (index 0), as the original code does.
  np.testing.assert_allclose(np.ravel(big.variance), [c["bt"][1], c["b"][1], c["b"][500], c["b"][999]],
                             rtol=1e-6)
  np.testing.assert_allclose(np.ravel(big.log_variance), np.log([c["bt"][1], c["b"][1], c["b"][500],
                                                                 c["b"][999]]), rtol=1e-6)
  # fixed_small: betatilde_t (0 at t = 1), log-variance clipped to log betatilde_2 there.
  np.testing.assert_allclose(np.ravel(small.variance), [0.0, c["bt"][1], c["bt"][500], c["bt"][999]],
                             rtol=1e-6, atol=1e-30)
  np.testing.assert_allclose(np.ravel(small.log_variance), np.log([c["bt"][1], c["bt"][1], c["bt"][500],
                                                                   c["bt"][999]]), rtol=1e-6)
  # learned_range interpolates in log space: v = 1 -> beta_t, v = -1 -> betatilde_t (clipped), v = 0 ->
  # the geometric mean.
  for v, want in [(1.0, np.log(c["b"][t])), (-1.0, c["log_bt_clip"][t]),
                  (0.0, 0.5 * (np.log(c["b"][t]) + c["log_bt_clip"][t]))]:
    out = jnp.concatenate([x_t, jnp.full_like(x_t, v)], axis=-1)
    got = jd.p_mean_variance(s, out, x_t, t, var_type="learned_range")
    np.testing.assert_allclose(got.log_variance[:, 0, 0, 0], want, rtol=2e-6)
    np.testing.assert_allclose(got.variance[:, 0, 0, 0], np.exp(want), rtol=2e-5)
  out = jnp.concatenate([x_t, jnp.full_like(x_t, -3.0)], axis=-1)
  got = jd.p_mean_variance(s, out, x_t, t, var_type="learned")
  np.testing.assert_allclose(got.log_variance, -3.0)
  np.testing.assert_allclose(got.variance, np.exp(-3.0), rtol=1e-6)


def test_output_channels_and_split():
  assert [jd.output_channels(3, v) for v in jd.VAR_TYPES] == [3, 3, 6, 6]
  x = jnp.zeros((2, 4, 4, 3))
  out = jnp.arange(2 * 4 * 4 * 6, dtype=jnp.float32).reshape(2, 4, 4, 6)
  m, v = jd.split_model_output(out, x, "learned_range")
  np.testing.assert_array_equal(m, out[..., :3])
  np.testing.assert_array_equal(v, out[..., 3:])
  m, v = jd.split_model_output(out[..., :3], x, "fixed_small")
  assert v is None
  np.testing.assert_array_equal(m, out[..., :3])


def test_pytree_inputs_apply_leafwise():
  s = jd.make_schedule("cosine", 1000)
  rng = np.random.default_rng(8)
  t = np.array([3, 70], np.int32)
  x0 = {"a": f32(rng.normal(size=(2, 4))), "b": f32(rng.normal(size=(2, 2, 3)))}
  eps = {"a": f32(rng.normal(size=(2, 4))), "b": f32(rng.normal(size=(2, 2, 3)))}
  got = jd.q_sample(s, x0, t, eps)
  for k in x0:
    np.testing.assert_allclose(got[k], jd.q_sample(s, x0[k], t, eps[k]), rtol=1e-6)
  back = jd.predict_x0_from_eps(s, got, t, eps)
  for k in x0:
    np.testing.assert_allclose(back[k], x0[k], rtol=1e-4, atol=1e-5)
  mean, var, _ = jd.q_posterior_mean_variance(s, x0, got, t)
  assert mean["b"].shape == (2, 2, 3) and var["b"].shape == (2, 1, 1)


# -------------------------------------------------------------------------------------- bad input
S10 = jd.make_schedule("cosine", 10)
X = jnp.zeros((2, 3, 3, 1))
T2 = jnp.array([1, 2], jnp.int32)

BAD = [
    (lambda x: jd.p_mean_variance(S10, x, x, T2, mean_type="epsilon"),
     r"mean_type must be one of \('eps', 'x0', 'v', 'x_prev'\), got 'epsilon'"),
    (lambda x: jd.p_mean_variance(S10, x, x, T2, var_type="small"),
     r"var_type must be one of \('fixed_small', 'fixed_large', 'learned', 'learned_range'\), got 'small'"),
    (lambda x: jd.p_mean_variance(S10, x, x, T2, var_type="learned"), r"needs \(2, 3, 3, 2\)"),
    (lambda x: jd.output_channels(3, "fixed"), r"var_type must be one of"),
    (lambda x: jd.q_sample(S10, x, jnp.array([1, 2, 3]), x), r"t has shape \(3,\) but x has shape"),
    (lambda x: jd.q_sample(S10, x, jnp.zeros((2, 1), jnp.int32), x), r"t must be a scalar or a 1-D int"),
    (lambda x: jd.q_sample(S10, x, T2, x[..., :1, :]), r"shapes must match.*x0.*noise"),
    (lambda x: jd.q_mean_variance(S10, x[:1], T2), r"batch sizes must match"),
    (lambda x: jd.q_posterior_mean_variance(S10, x, x[:, :2], T2), r"shapes must match.*x0.*x_t"),
    (lambda x: jd.p_mean_variance(S10, x, x, T2[:1]), r"batch sizes must match"),
    (lambda x: jd.predict_x0_from_eps(S10, x, T2, x[..., :2, :]), r"shapes must match.*x_t.*eps"),
    (lambda x: jd.predict_eps_from_x0(S10, x, T2, x[:, :1]), r"shapes must match.*x_t.*x0"),
    (lambda x: jd.predict_x0_from_v(S10, x, T2, x[:, :1]), r"shapes must match.*x_t.*v"),
    (lambda x: jd.predict_eps_from_v(S10, x, T2, x[:, :1]), r"shapes must match.*x_t.*v"),
    (lambda x: jd.v_from_eps_x0(S10, x, T2, x[:, :1]), r"shapes must match.*x0.*eps"),
    (lambda x: jd.predict_x0_from_xprev(S10, x, T2, x[:, :1]), r"shapes must match.*x_t.*x_prev"),
    (lambda x: jd.score_from_eps(S10, x, T2, x[:, :1]), r"shapes must match.*x_t.*eps"),
    (lambda x: jd.eps_from_score(S10, x, T2, x[:, :1]), r"shapes must match.*x_t.*score"),
    (lambda x: jd.q_sample(S10, {"a": x}, T2, {"b": x}), r"pytree structures must match"),
]


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input_raises_value_error_at_trace_time(i, jit):
  fn, match = BAD[i]
  with pytest.raises(ValueError, match=match):
    (jax.jit(fn) if jit else fn)(X)
