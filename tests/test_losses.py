"""Likelihood terms and training losses against float64 references from the papers.

DDPM (Ho et al. 2020) eqs. 5, 13, 14; Improved DDPM (Nichol & Dhariwal 2021) L_hybrid and eq. 15; Min-SNR-gamma
(Hang et al. 2023); P2 (Choi et al. 2022). The bits/dim bound is checked against an exact expectation for
Gaussian data with the analytic optimal denoiser.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import jaxddpm as jd

LN2 = math.log(2.0)
SHAPE = (6, 3, 3, 2)


def f32(x):
  return jnp.asarray(x, jnp.float32)


# ------------------------------------------------------------------------------ float64 references
def ref_kl(m1, lv1, m2, lv2):
  """KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2 / s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2."""
  s1, s2 = np.exp(0.5 * lv1), np.exp(0.5 * lv2)
  return np.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5


def ref_disc_loglik(x, mu, log_scale):
  """log P(bin of x) for N(mu, sigma^2) with bins of width 2/255 around the 256 levels, edges open (eq. 13)."""
  x, mu, sd = np.broadcast_arrays(x, mu, np.exp(log_scale))
  lo, hi = x - 1 / 255, x + 1 / 255
  n = stats.norm(mu, sd)
  # log(P(X > lo) - P(X > hi)) above the mean, log(P(X < hi) - P(X < lo)) below: scipy's log tails in float64.
  upper = x > mu
  big = np.where(upper, n.logsf(lo), n.logcdf(hi))
  small = np.where(upper, n.logsf(hi), n.logcdf(lo))
  interior = big + np.log1p(-np.exp(small - big))
  return np.where(x < -0.999, n.logcdf(hi), np.where(x > 0.999, n.logsf(lo), interior))


def coefs(betas):
  b = np.asarray(betas, np.float64)
  ab = np.cumprod(1 - b)
  abp = np.append(1.0, ab[:-1])
  bt = b * (1 - abp) / (1 - ab)
  return dict(b=b, ab=ab, abp=abp, bt=bt, lbt=np.log(np.append(bt[1], bt[1:])),
              large=np.append(bt[1], b[1:]), c1=np.sqrt(abp) * b / (1 - ab),
              c2=np.sqrt(1 - b) * (1 - abp) / (1 - ab))


def col(c, k, t, nd=4):
  return c[k][t].reshape((-1,) + (1,) * (nd - 1))


def ref_p(c, out, x_t, t, mean_type, var_type):
  """Reverse-step mean and log-variance (DDPM eq. 11 / eq. 7 of the predicted x0; Improved DDPM eq. 15)."""
  C = x_t.shape[-1]
  mo, vo = (out[..., :C], out[..., C:]) if var_type.startswith("learned") else (out, None)
  ab, b = col(c, "ab", t), col(c, "b", t)
  if mean_type == "eps":
    mean = (x_t - b / np.sqrt(1 - ab) * mo) / np.sqrt(1 - b)
  elif mean_type == "x_prev":
    mean = mo
  else:
    x0 = mo if mean_type == "x0" else np.sqrt(ab) * x_t - np.sqrt(1 - ab) * mo
    mean = col(c, "c1", t) * x0 + col(c, "c2", t) * x_t
  lv = {"fixed_small": lambda: col(c, "lbt", t), "fixed_large": lambda: np.log(col(c, "large", t)),
        "learned": lambda: vo,
        "learned_range": lambda: (vo + 1) / 2 * np.log(b) + (1 - vo) / 2 * col(c, "lbt", t)}[var_type]()
  return mean, np.broadcast_to(lv, x_t.shape)


def ref_vb(c, out, x0, x_t, t, mean_type, var_type):
  """L_{t-1} in bits/dim: KL(posterior || p) for t > 1, -log p(x0 | x1) (discretized) at t = 1."""
  mean, lv = ref_p(c, out, x_t, t, mean_type, var_type)
  pm = col(c, "c1", t) * x0 + col(c, "c2", t) * x_t
  kl = ref_kl(pm, col(c, "lbt", t), mean, lv).mean(axis=(1, 2, 3)) / LN2
  nll = -ref_disc_loglik(x0, mean, 0.5 * lv).mean(axis=(1, 2, 3)) / LN2
  return np.where(t == 0, nll, kl)


def data(seed, shape=SHAPE):
  """8-bit images in [-1, 1] and Gaussian noise."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, shape) / 127.5 - 1, rng.normal(size=shape)


# ---------------------------------------------------------------------------------- normal_kl
def test_normal_kl_against_formula_and_properties():
  rng = np.random.default_rng(0)
  m1, m2 = rng.normal(size=(2, 50))
  lv1, lv2 = rng.uniform(-6, 2, size=(2, 50))
  got = np.asarray(jd.normal_kl(f32(m1), f32(lv1), f32(m2), f32(lv2)), np.float64)
  want = ref_kl(m1, lv1, m2, lv2)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5 * (1 + np.exp(lv1 - lv2) + np.abs(lv2 - lv1)).max())
  assert np.all(got >= 0) and np.all(want > 1e-6)
  near = jd.normal_kl(0.0, f32(lv1), 0.0, f32(lv1 + 1e-4 * rng.normal(size=50)))  # close Gaussians: >= 0
  assert np.all(np.asarray(near) >= 0)
  np.testing.assert_array_equal(jd.normal_kl(f32(m1), f32(lv1), f32(m1), f32(lv1)), 0.0)  # equal Gaussians
  # Broadcasting: scalars and arrays mix.
  np.testing.assert_allclose(jd.normal_kl(f32(m1), f32(lv1), 0.0, 0.0), ref_kl(m1, lv1, 0.0, 0.0), rtol=2e-5,
                             atol=1e-5)


def test_normal_kl_monte_carlo():
  m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(2.0)
  x = np.random.default_rng(1).normal(m1, math.exp(lv1 / 2), 400_000)
  logp = stats.norm.logpdf(x, m1, math.exp(lv1 / 2)) - stats.norm.logpdf(x, m2, math.exp(lv2 / 2))
  got = float(jd.normal_kl(m1, lv1, m2, lv2))
  assert abs(logp.mean() - got) < 5 * logp.std() / math.sqrt(x.size), (logp.mean(), got)


# ------------------------------------------------------------------------------ discretized decoder
def test_discretized_loglik_against_scipy():
  rng = np.random.default_rng(2)
  x = rng.integers(0, 256, 4000) / 127.5 - 1
  x[:4] = [-1.0, 1.0, -1.0, 1.0]
  log_scale = rng.uniform(math.log(0.003), math.log(0.5), x.size)
  # means within 5 standard deviations either side (both tails exercised), plus a few outside [-1, 1].
  mu = x + rng.uniform(-5, 5, x.size) * np.exp(log_scale)
  mu[4:8] = [-1.3, 1.2, 1.05, -1.02]
  got = np.asarray(jd.discretized_gaussian_log_likelihood(f32(x), f32(mu), f32(log_scale)), np.float64)
  want = ref_disc_loglik(np.float32(x).astype(np.float64), np.float32(mu).astype(np.float64),
                         np.float32(log_scale).astype(np.float64))
  # float32 inputs: |d log p / d mu| <= |z| / sigma ~ 5/sigma, times mu's float32 rounding, plus ndtr error.
  tol = 1e-5 * (1 + np.abs(want)) + 6e-8 * (np.abs(mu) + 1) * 10 / np.exp(log_scale)
  assert np.all(np.abs(got - want) <= tol), np.max(np.abs(got - want) / tol)


@pytest.mark.parametrize("mu,sd", [(0.0, 0.01), (0.37, 0.2), (-0.98, 0.05), (1.3, 0.4), (0.5, 0.002),
                                   (-0.2, 3.0)])
def test_discretized_loglik_sums_to_one(mu, sd):
  levels = f32(np.arange(256) / 127.5 - 1)
  p = np.exp(np.asarray(jd.discretized_gaussian_log_likelihood(levels, f32(mu), f32(math.log(sd))), np.float64))
  assert abs(p.sum() - 1) < 2e-5, p.sum()


def test_discretized_loglik_bad_shapes():
  with pytest.raises(ValueError, match="x, means, log_scales do not broadcast"):
    jd.discretized_gaussian_log_likelihood(jnp.zeros((2, 3)), jnp.zeros((2, 4)), 0.0)
  with pytest.raises(ValueError, match="shapes do not broadcast"):
    jd.normal_kl(jnp.zeros((2, 3)), 0.0, jnp.zeros(5), 0.0)


# ------------------------------------------------------------------------------ VLB terms
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_vb_terms_and_prior_every_type(name):
  T = 1000
  s = jd.make_schedule(name, T)
  c = coefs(jd.beta_schedule(name, T))
  x0, eps = data(3)
  t = np.array([0, 0, 1, 10, 500, T - 1], np.int32)
  x_t = np.asarray(jd.q_sample(s, f32(x0), t, f32(eps)), np.float64)  # checked in test_diffusion.py
  rng = np.random.default_rng(4)
  for mean_type in jd.MEAN_TYPES:
    target = {"eps": eps, "x0": x0, "v": np.sqrt(col(c, "ab", t)) * eps - np.sqrt(1 - col(c, "ab", t)) * x0,
              "x_prev": col(c, "c1", t) * x0 + col(c, "c2", t) * x_t}[mean_type]
    for var_type in jd.VAR_TYPES:
      out = target + 0.05 * rng.normal(size=SHAPE)  # a fair model: the bound terms stay O(1)
      if var_type.startswith("learned"):
        vpart = rng.uniform(-1, 1, SHAPE) if var_type == "learned_range" else (
            np.broadcast_to(np.log(col(c, "bt", t) + 1e-4), SHAPE))
        out = np.concatenate([out, vpart], axis=-1)
      got, pmv = jd.vb_terms_bpd(s, f32(out), f32(x0), f32(x_t), t, mean_type=mean_type, var_type=var_type)
      want = ref_vb(c, out, x0, x_t, t, mean_type, var_type)
      np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4, err_msg=f"{mean_type}/{var_type}")
      assert isinstance(pmv, jd.PMeanVariance)
  want_prior = ref_kl(np.sqrt(c["ab"][-1]) * x0, np.log(1 - c["ab"][-1]), 0.0, 0.0).mean(axis=(1, 2, 3)) / LN2
  np.testing.assert_allclose(jd.prior_bpd(s, f32(x0)), want_prior, rtol=1e-4, atol=1e-9)


# ------------------------------------------------------------------------------ weights and losses
def ref_weight(snr, mean_type, weighting, gamma=5.0, p2_gamma=1.0, p2_k=1.0):
  """Min-SNR-gamma (Hang et al. 2023): eps min(snr, g)/snr, x0 min(snr, g), v min(snr, g)/(snr + 1).
  P2 (Choi et al. 2022): eps-MSE weighted by 1/(k + snr)^gamma, carried to x0 (x snr) and v (x snr/(1+snr))."""
  if weighting == "none":
    return np.ones_like(snr)
  if weighting == "min_snr":
    return {"eps": np.minimum(snr, gamma) / snr, "x0": np.minimum(snr, gamma),
            "v": np.minimum(snr, gamma) / (snr + 1)}[mean_type]
  base = (p2_k + snr) ** -p2_gamma
  return base * {"eps": 1.0, "x0": snr, "v": snr / (1 + snr)}[mean_type]


def test_snr_and_loss_weights():
  s = jd.make_schedule("linear", 1000)
  c = coefs(jd.beta_schedule("linear", 1000))
  t = np.array([0, 1, 20, 100, 300, 999], np.int32)
  snr = c["ab"][t] / (1 - c["ab"][t])
  np.testing.assert_allclose(jd.snr(s, t), snr, rtol=2e-6)
  for mean_type in ("eps", "x0", "v"):
    for weighting, kw in [("none", {}), ("min_snr", {"min_snr_gamma": 5.0}), ("min_snr", {"min_snr_gamma": 0.5}),
                          ("p2", {"p2_gamma": 1.0, "p2_k": 1.0}), ("p2", {"p2_gamma": 0.5, "p2_k": 2.0})]:
      got = jd.loss_weight(s, t, mean_type=mean_type, weighting=weighting, **kw)
      want = ref_weight(snr, mean_type, weighting, gamma=kw.get("min_snr_gamma", 5.0),
                        p2_gamma=kw.get("p2_gamma", 1.0), p2_k=kw.get("p2_k", 1.0))
      np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"{mean_type}/{weighting}/{kw}")
  # The weights are the eps-space weights in disguise: w_target |target - pred|^2 = w_eps |eps - eps_pred|^2.
  rng = np.random.default_rng(5)
  x0, eps = rng.normal(size=(2, 6, 8))
  ab = c["ab"][t][:, None]
  x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
  x0_hat = x0 + 0.1 * rng.normal(size=x0.shape)
  eps_hat = (x_t - np.sqrt(ab) * x0_hat) / np.sqrt(1 - ab)
  v, v_hat = np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0, np.sqrt(ab) * eps_hat - np.sqrt(1 - ab) * x0_hat
  for weighting in ("min_snr", "p2"):
    w_eps = np.asarray(jd.loss_weight(s, t, mean_type="eps", weighting=weighting), np.float64)
    lhs = w_eps * ((eps - eps_hat) ** 2).mean(1)
    for mt, (a, b) in {"x0": (x0, x0_hat), "v": (v, v_hat)}.items():
      w = np.asarray(jd.loss_weight(s, t, mean_type=mt, weighting=weighting), np.float64)
      np.testing.assert_allclose(w * ((a - b) ** 2).mean(1), lhs, rtol=2e-5, err_msg=f"{weighting}/{mt}")


def respaced():
  """A respaced schedule, so that the network timestep map s.timesteps[t] is exercised too."""
  base = jd.make_schedule("linear", 1000)
  kept = jd.space_timesteps(1000, "100")
  ab = coefs(jd.beta_schedule("linear", 1000))["ab"][kept]
  return jd.respace(base, kept), kept, coefs(1 - ab / np.append(1.0, ab[:-1]))


def linear_model(base, C_out):
  """f(x_t, t) = 0.3 x_t (tiled to C_out channels) + 1e-3 t + base: depends on both inputs."""
  def fn(x, tt):
    reps = C_out // x.shape[-1]
    return 0.3 * jnp.tile(x, (1, 1, 1, reps)) + 1e-3 * tt[:, None, None, None].astype(jnp.float32) + base
  return fn


def ref_linear_model(base, x_t, tt, C_out):
  return 0.3 * np.tile(x_t, (1, 1, 1, C_out // x_t.shape[-1])) + 1e-3 * tt[:, None, None, None] + base


@pytest.mark.parametrize("mean_type", jd.MEAN_TYPES)
def test_training_losses_mse_targets_and_weights(mean_type):
  s, kept, c = respaced()
  x0, eps = data(6)
  t = np.array([0, 1, 5, 50, 98, 99], np.int32)
  rng = np.random.default_rng(7)
  base = rng.normal(size=SHAPE)
  ab = col(c, "ab", t)
  x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
  out = ref_linear_model(base, x_t, kept[t], SHAPE[-1])
  target = {"eps": eps, "x0": x0, "v": np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0,
            "x_prev": col(c, "c1", t) * x0 + col(c, "c2", t) * x_t}[mean_type]
  mse = ((target - out) ** 2).mean(axis=(1, 2, 3))
  snr = c["ab"][t] / (1 - c["ab"][t])
  for weighting in (("none", "min_snr", "p2") if mean_type != "x_prev" else ("none",)):
    got = jd.training_losses(s, linear_model(f32(base), SHAPE[-1]), f32(x0), t, f32(eps), mean_type=mean_type,
                             var_type="fixed_large", loss_type="mse", weighting=weighting)
    want = ref_weight(snr, mean_type, weighting) * mse
    np.testing.assert_allclose(got["loss"], want, rtol=5e-5, err_msg=weighting)
    np.testing.assert_allclose(got["mse"], want, rtol=5e-5)
    np.testing.assert_array_equal(got["vb"], 0.0)


@pytest.mark.parametrize("mean_type,var_type", [("eps", "fixed_large"), ("x0", "fixed_small"),
                                                ("v", "learned_range"), ("eps", "learned"),
                                                ("x_prev", "fixed_small")])
def test_training_losses_kl_is_T_times_vb_term(mean_type, var_type):
  s, kept, c = respaced()
  x0, eps = data(8)
  t = np.array([0, 1, 5, 50, 98, 99], np.int32)
  C_out = 2 * SHAPE[-1] if var_type.startswith("learned") else SHAPE[-1]
  base = 0.1 * np.random.default_rng(9).normal(size=SHAPE[:-1] + (C_out,))
  ab = col(c, "ab", t)
  x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
  out = ref_linear_model(base, x_t, kept[t], C_out)
  got = jd.training_losses(s, linear_model(f32(base), C_out), f32(x0), t, f32(eps), mean_type=mean_type,
                           var_type=var_type, loss_type="kl")
  want = 100 * ref_vb(c, out, x0, x_t, t, mean_type, var_type)
  np.testing.assert_allclose(got["loss"], want, rtol=5e-4, atol=1e-3)
  np.testing.assert_allclose(got["vb"], want, rtol=5e-4, atol=1e-3)
  np.testing.assert_array_equal(got["mse"], 0.0)


@pytest.mark.parametrize("var_type", ["learned_range", "learned"])
def test_hybrid_loss_values_and_gradients(var_type):
  """L_hybrid = L_simple + T/1000 L_{t-1} with the mean stop-gradiented (Improved DDPM): the mean part's
  gradient is exactly the MSE's, the variance part's is the VB term's (derived by hand below)."""
  s, kept, c = respaced()
  T = 100
  x0, eps = data(10)
  t = np.array([1, 2, 5, 50, 98, 99], np.int32)  # t > 1: KL terms (the decoder term is checked elsewhere)
  rng = np.random.default_rng(11)
  pm = rng.normal(size=SHAPE)
  pv = rng.uniform(-0.9, 0.9, SHAPE) if var_type == "learned_range" else np.log(col(c, "bt", t)) + 0.3 * rng.normal(
      size=SHAPE)

  def loss(params):
    fn = lambda x, tt: jnp.concatenate([params[0], params[1]], axis=-1)
    out = jd.training_losses(s, fn, f32(x0), t, f32(eps), mean_type="eps", var_type=var_type, loss_type="hybrid",
                             weighting="min_snr")
    return out["loss"].sum(), out

  (_, out), (g_m, g_v) = jax.jit(jax.value_and_grad(loss, has_aux=True))((f32(pm), f32(pv)))
  ab = col(c, "ab", t)
  x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
  n = np.prod(SHAPE[1:])
  w = ref_weight(c["ab"][t] / (1 - c["ab"][t]), "eps", "min_snr")
  mse = w * ((eps - pm) ** 2).mean(axis=(1, 2, 3))
  vb = T / 1000 * ref_vb(c, np.concatenate([pm, pv], -1), x0, x_t, t, "eps", var_type)
  np.testing.assert_allclose(out["mse"], mse, rtol=5e-5)
  np.testing.assert_allclose(out["vb"], vb, rtol=5e-4, atol=1e-6)
  np.testing.assert_allclose(out["loss"], mse + vb, rtol=5e-4, atol=1e-6)
  # d/d(mean part): only the MSE term, 2 w (pm - eps) / n.
  np.testing.assert_allclose(g_m, 2 * w[:, None, None, None] * (pm - eps) / n, rtol=1e-4, atol=1e-7)
  # d/d(variance part): dKL/dlogvar2 = (1 - e^(lv1 - lv2) - (m1 - m2)^2 e^(-lv2)) / 2, times dlogvar2/dv.
  mean, lv2 = ref_p(c, np.concatenate([pm, pv], -1), x_t, t, "eps", var_type)
  m1, lv1 = col(c, "c1", t) * x0 + col(c, "c2", t) * x_t, col(c, "lbt", t)
  dkl = 0.5 * (1 - np.exp(lv1 - lv2) - (m1 - mean) ** 2 * np.exp(-lv2))
  dlv = 0.5 * (np.log(col(c, "b", t)) - col(c, "lbt", t)) if var_type == "learned_range" else 1.0
  want_gv = T / 1000 * dkl * dlv / n / LN2
  np.testing.assert_allclose(g_v, want_gv, rtol=2e-3, atol=1e-3 * np.abs(want_gv).max())
  assert np.abs(want_gv).max() > 1e-4
  # Without the stop-gradient the VB term would move the mean too, by T/1000 dKL/dm2 dm2/deps_hat with
  # dKL/dm2 = (m2 - m1) e^(-lv2) and dm2/deps_hat = -beta_t / (sqrt(1 - abar_t) sqrt(alpha_t)) (eq. 11): that
  # gradient is far above the tolerance of the check of g_m.
  dm = -col(c, "b", t) / np.sqrt(1 - col(c, "ab", t)) / np.sqrt(1 - col(c, "b", t))
  vb_grad_on_mean = T / 1000 * (mean - m1) * np.exp(-lv2) * dm / n / LN2
  assert np.abs(vb_grad_on_mean).max() > 10 * (1e-4 * np.abs(np.asarray(g_m)).max() + 1e-7)


# ------------------------------------------------------------------------------ timestep sampling
def test_sample_timesteps_uniform_and_antithetic():
  T, B = 10, 20000
  t = np.asarray(jd.sample_timesteps(jax.random.key(0), B, T, "uniform"))
  assert t.dtype == np.int32 and t.shape == (B,)
  counts = np.bincount(t, minlength=T)
  assert len(counts) == T and counts.min() > 0
  assert stats.chisquare(counts).pvalue > 1e-4
  B += 1  # odd: the last draw is unpaired
  t = np.asarray(jd.sample_timesteps(jax.random.key(1), B, T, "antithetic"))
  half = (B + 1) // 2
  assert t.shape == (B,) and t.dtype == np.int32 and t.min() >= 0 and t.max() <= T - 1
  np.testing.assert_array_equal(t[:B - half] + t[half:], T - 1)
  assert stats.chisquare(np.bincount(t[:half], minlength=T)).pvalue > 1e-4


# ------------------------------------------------------------------------------ the full bound
def noise_for(key, ids, t, shape):
  """The documented noise of calc_bpd_loop: example i at step t uses fold_in(fold_in(key, t), ids[i])."""
  k = jax.random.fold_in(key, t)
  return np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, int(i)), shape), np.float64) for i in ids])


def test_calc_bpd_loop_is_one_scan():
  model = lambda x, t: 0.5 * x
  sizes = []
  for T in (50, 1000):
    s = jd.make_schedule("cosine", T)
    jaxpr = jax.make_jaxpr(lambda x, k: jd.calc_bpd_loop(s, model, x, k))(jnp.zeros((2, 4, 4, 1)),
                                                                           jax.random.key(0))
    prims = [e.primitive.name for e in jaxpr.eqns]
    assert prims.count("scan") == 1, prims

    def subjaxprs(params):
      for v in params.values():
        for u in (v if isinstance(v, (tuple, list)) else (v,)):
          if hasattr(u, "eqns"):
            yield u
          elif hasattr(u, "jaxpr") and hasattr(u.jaxpr, "eqns"):
            yield u.jaxpr

    def count(j):  # equations, recursively through scan / pjit / cond bodies
      return sum(1 + sum(count(sub) for sub in subjaxprs(e.params)) for e in j.eqns)

    sizes.append(count(jaxpr.jaxpr))
  assert sizes[0] == sizes[1], sizes


def test_calc_bpd_loop_equals_prior_plus_terms():
  T, shape = 20, (2, 2, 1)
  betas = np.linspace(0.01, 0.3, T)
  s, c = jd.schedule_from_betas(betas), coefs(betas)
  x0, _ = data(12, (3,) + shape)
  configs = [("eps", "fixed_large", 1), ("v", "learned_range", 2)]
  rng = np.random.default_rng(13)
  bases = [np.clip(0.2 * rng.normal(size=(3,) + shape[:-1] + (C_out,)), -0.9, 0.9) for _, _, C_out in configs]
  key = jax.random.key(14)

  @jax.jit
  def run(x):
    return [jd.calc_bpd_loop(s, linear_model(f32(base), C_out), x, key, mean_type=mt, var_type=vt)
            for (mt, vt, C_out), base in zip(configs, bases)]

  ids = np.arange(3)
  noise = [noise_for(key, ids, k, shape) for k in range(T)]
  for (mean_type, var_type, C_out), base, out in zip(configs, bases, run(f32(x0))):
    vb, x0_mse, eps_mse = np.zeros((3, T)), np.zeros((3, T)), np.zeros((3, T))
    for k in range(T):
      t, eps, ab = np.full(3, k, np.int32), noise[k], c["ab"][k]
      x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
      mo = ref_linear_model(base, x_t, t, C_out)
      vb[:, k] = ref_vb(c, mo, x0, x_t, t, mean_type, var_type)
      pred_x0 = {"eps": lambda: (x_t - np.sqrt(1 - ab) * mo[..., :1]) / np.sqrt(ab),
                 "v": lambda: np.sqrt(ab) * x_t - np.sqrt(1 - ab) * mo[..., :1]}[mean_type]()
      x0_mse[:, k] = ((pred_x0 - x0) ** 2).mean(axis=(1, 2, 3))
      eps_mse[:, k] = (((x_t - np.sqrt(ab) * pred_x0) / np.sqrt(1 - ab) - eps) ** 2).mean(axis=(1, 2, 3))
    prior = ref_kl(np.sqrt(c["ab"][-1]) * x0, np.log(1 - c["ab"][-1]), 0.0, 0.0).mean(axis=(1, 2, 3)) / LN2
    np.testing.assert_allclose(out["vb"], vb, rtol=2e-4, atol=1e-5, err_msg=mean_type)
    np.testing.assert_allclose(out["prior_bpd"], prior, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(out["total_bpd"], prior + vb.sum(1), rtol=2e-4)
    np.testing.assert_allclose(out["x0_mse"], x0_mse, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(out["mse"], eps_mse, rtol=2e-4, atol=1e-6)


def gaussian_data_expected_bound(c, mu, sd, P, levels, log_var_fn):
  """E[bound] in bits/dim for 8-bit data with level probabilities P, under the linear-Gaussian denoiser that
  is optimal for x0 ~ N(mu, sd^2): pred_x0(x_t) = k x_t + h, k = a sd^2 / D, h = sigma^2 mu / D,
  D = a^2 sd^2 + sigma^2 (a^2 = abar_t, sigma^2 = 1 - abar_t). Exact for the discrete data: the KL terms
  need only E[(x0 - pred_x0)^2]; the decoder is integrated by Gauss-Hermite quadrature over x_1."""
  m1 = (P * levels).sum()
  m2 = (P * levels ** 2).sum()
  a, sg = np.sqrt(c["ab"]), np.sqrt(1 - c["ab"])
  D = a ** 2 * sd ** 2 + sg ** 2
  k, h = a * sd ** 2 / D, sg ** 2 * mu / D
  err2 = (1 - k * a) ** 2 * m2 - 2 * (1 - k * a) * h * m1 + h ** 2 + k ** 2 * sg ** 2
  lv = log_var_fn(c, sd)
  kl = 0.5 * (-1 + lv - c["lbt"] + np.exp(c["lbt"] - lv) + c["c1"] ** 2 * err2 * np.exp(-lv))
  prior = 0.5 * (-1 - np.log(sg[-1] ** 2) + sg[-1] ** 2 + a[-1] ** 2 * m2)
  z, wz = np.polynomial.hermite_e.hermegauss(80)
  wz = wz / wz.sum()
  dec = 0.0
  for x, p in zip(levels[P > 1e-15], P[P > 1e-15]):
    x1 = a[0] * x + sg[0] * z
    dec -= p * (wz * ref_disc_loglik(np.full_like(z, x), k[0] * x1 + h[0], 0.5 * lv[0])).sum()
  return (kl[1:].sum() + prior + dec) / LN2


def optimal_log_var(c, sd):
  """The exact Var(x_{t-1} | x_t) for Gaussian data: betatilde_t + coef1_t^2 Var(x0 | x_t)."""
  ab = c["ab"]
  V = sd ** 2 * (1 - ab) / (ab * sd ** 2 + 1 - ab)
  return np.log(np.concatenate([[0.0], c["bt"][1:]]) + c["c1"] ** 2 * V)


def test_calc_bpd_loop_gaussian_data_optimal_denoiser():
  """Data: x0 ~ N(mu, sd^2) per dim, quantized to 8 bits. With the analytic optimal eps-denoiser
  E[eps | x_t] = sigma (x_t - a mu) / D, the estimated bound must agree with its exact expectation and be
  >= the entropy H of the 8-bit data (cross-entropy >= entropy). With fixed_large the exact expected gap is
  0.12 bpd (the decoder's variance betatilde_2 = 5.5e-5 is below Var(x0 | x1) ~ 1e-4); with the exact reverse
  variances (var_type "learned") it is 0.001 bpd. One sample of the bound has a standard deviation of ~0.55
  bpd per 4x4 image, so B = 512 gives a standard error of ~0.025 (~0.009 for the paired difference)."""
  T, mu, sd, B = 1000, 0.1, 0.25, 512
  s = jd.make_schedule("linear", T)
  c = coefs(jd.beta_schedule("linear", T))
  levels = np.arange(256) / 127.5 - 1
  P = np.exp(ref_disc_loglik(levels, mu, math.log(sd)))
  H = -(P[P > 0] * np.log2(P[P > 0])).sum()
  x0 = np.clip(np.round((np.random.default_rng(17).normal(mu, sd, (B, 4, 4, 1)) + 1) * 127.5), 0, 255) / 127.5 - 1
  a = f32(np.sqrt(c["ab"]))
  sg = f32(np.sqrt(1 - c["ab"]))
  lv_opt = f32(optimal_log_var(c, sd))

  def eps_model(x, t):
    at, st = a[t][:, None, None, None], sg[t][:, None, None, None]
    return st * (x - at * mu) / (at ** 2 * sd ** 2 + st ** 2)

  def learned_model(x, t):
    return jnp.concatenate([eps_model(x, t), jnp.broadcast_to(lv_opt[t][:, None, None, None], x.shape)], -1)

  @jax.jit
  def run(x, key):  # the same key: both bounds see the same noise, so their difference is precise
    return (jd.calc_bpd_loop(s, eps_model, x, key, var_type="fixed_large")["total_bpd"],
            jd.calc_bpd_loop(s, learned_model, x, key, var_type="learned")["total_bpd"])

  large, opt = (np.asarray(r, np.float64) for r in run(f32(x0), jax.random.key(18)))
  want_large = gaussian_data_expected_bound(c, mu, sd, P, levels, lambda c, sd: np.log(c["large"]))
  want_opt = gaussian_data_expected_bound(c, mu, sd, P, levels, optimal_log_var)
  # The exact expectations: both >= H; the exact-variance bound is within a few hundredths of a bit of H.
  assert H <= want_opt < H + 0.02 and want_opt + 0.05 < want_large < H + 0.2, (H, want_opt, want_large)
  se = lambda a: a.std() / math.sqrt(B)
  for name, got, want in [("fixed_large", large, want_large), ("optimal", opt, want_opt),
                          ("difference", large - opt, want_large - want_opt)]:
    assert abs(got.mean() - want) < 4 * se(got), (name, got.mean(), want, se(got))
  for got in (large, opt):
    assert got.mean() > H - 4 * se(got), (got.mean(), H, se(got))


# -------------------------------------------------------------------------------------- bad input
S10 = jd.make_schedule("cosine", 10)
X = jnp.zeros((2, 3, 3, 1))
T2 = jnp.array([1, 2], jnp.int32)
M = lambda x, t: x

BAD = [
    (lambda x: jd.training_losses(S10, M, x, T2, x, loss_type="l2"),
     r"loss_type must be one of \('mse', 'kl', 'hybrid'\), got 'l2'"),
    (lambda x: jd.training_losses(S10, M, x, T2, x, weighting="snr"),
     r"weighting must be one of \('none', 'min_snr', 'p2'\), got 'snr'"),
    (lambda x: jd.training_losses(S10, M, x, T2, x, mean_type="noise"), r"mean_type must be one of"),
    (lambda x: jd.training_losses(S10, M, x, T2, x, var_type="big"), r"var_type must be one of"),
    (lambda x: jd.training_losses(S10, M, x, T2, x, var_type="learned"), r"loss_type='mse' gives a learned"),
    (lambda x: jd.training_losses(S10, M, x, T2, x, loss_type="hybrid"), r"loss_type='hybrid' needs var_type in"),
    (lambda x: jd.training_losses(S10, M, x, T2[:1], x), r"batch sizes must match"),
    (lambda x: jd.training_losses(S10, M, x, T2, x[:, :2]), r"shapes must match"),
    (lambda x: jd.training_losses(S10, lambda x, t: x[..., :0], x, T2, x), r"model output has shape"),
    (lambda x: jd.loss_weight(S10, T2, mean_type="x_prev", weighting="p2"), r"defined for mean_type in"),
    (lambda x: jd.loss_weight(S10, T2, mean_type="noise", weighting="p2"), r"mean_type must be one of"),
    (lambda x: jd.vb_terms_bpd(S10, x, x, x, T2, var_type="small"), r"var_type must be one of"),
    (lambda x: jd.vb_terms_bpd(S10, x, x, x[:, :1], T2), r"shapes must match"),
    (lambda x: jd.sample_timesteps(jax.random.key(0), 4, 10, "stratified"),
     r"method must be one of \('uniform', 'antithetic'\), got 'stratified'"),
    (lambda x: jd.sample_timesteps(jax.random.key(0), 4, 0), r"num_timesteps must be an integer >= 1"),
    (lambda x: jd.calc_bpd_loop(S10, M, x, jax.random.key(0), example_ids=jnp.arange(3)),
     r"example_ids must have shape \(2,\)"),
    (lambda x: jd.calc_bpd_loop(S10, M, x, jax.random.key(0), mean_type="e"), r"mean_type must be one of"),
    (lambda x: jd.normal_kl(x, 0.0, x[:, :2], 0.0), r"shapes do not broadcast"),
]


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input_raises_value_error_at_trace_time(i, jit):
  fn, match = BAD[i]
  with pytest.raises(ValueError, match=match):
    (jax.jit(fn) if jit else fn)(X)
