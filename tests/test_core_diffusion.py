"""Tests for the continuous-time identities of jaxddpm/core/diffusion.py and core/losses.py against float64
numpy references: output conversions, the posterior q(z_s | z_t, x) by Gaussian conditioning, DDPM's
posterior at s = t - 1, the loss identities of Kingma & Gao 2023 / Gao et al. 2024, and the continuous
objectives."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxddpm
from jaxddpm.core import diffusion, losses
from jaxddpm.core.samplers import base, ddim, euler
from jaxddpm.schedule import make_schedule

RNG = np.random.default_rng(0)
X = RNG.uniform(-1, 1, (5, 3, 3, 2))
EPS = RNG.standard_normal((5, 3, 3, 2))
TS = np.array([0.05, 0.2, 0.5, 0.8, 0.95])


def point64(name, t):
  """float64 (alpha, sigma, alpha', sigma') [B, 1, 1, 1] by central differences of the process (h = 1e-4)."""
  p = jaxddpm.make_process(name)
  f = lambda tt: [np.asarray(v, np.float64) for v in p.alpha_sigma(jnp.asarray(tt, jnp.float32))]
  if name == "flow":
    a, s, da, ds = 1 - t, t, -np.ones_like(t), np.ones_like(t)
  elif name == "ve":
    s = 0.01 * 5000.0 ** t
    a, da, ds = np.ones_like(t), np.zeros_like(t), s * np.log(5000.0)
  else:
    (a, s), (ap, sp), (am, sm) = f(t), f(t + 1e-3), f(t - 1e-3)
    da, ds = (ap - am) / 2e-3, (sp - sm) / 2e-3
  return [v.reshape(-1, 1, 1, 1) for v in (a, s, da, ds)]


def numpy_output(kind, x, eps, a, s, da, ds):
  return {"eps": eps, "x0": x, "v": a * eps - s * x, "u": da * x + ds * eps, "score": -eps / s}[kind]


@pytest.mark.parametrize("name", ["vp", "ve", "flow", "subvp"])
def test_conversions_round_trip_for_every_pair(name):
  p = diffusion.path_point(jaxddpm.make_process(name), jnp.asarray(TS, jnp.float32), X, derivatives=True)
  a, s, da, ds = (np.asarray(v, np.float64) for v in p)
  z = a * X + s * EPS
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  for src, dst in itertools.product(diffusion.OUTPUTS, repeat=2):
    out = numpy_output(src, X, EPS, a, s, da, ds)
    got = diffusion.convert_output(f32(out), f32(z), p, source=src, target=dst)
    want = numpy_output(dst, X, EPS, a, s, da, ds)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max(), err_msg=f"{src}->{dst}")
  with pytest.raises(ValueError, match="output must be one of"):
    diffusion.x0_eps_from_output("x_prev", f32(z), f32(z), p)


def test_posterior_is_gaussian_conditioning_and_ddpm_at_t_minus_1():
  # reference: (z_s, z_t) jointly Gaussian given x, z_t = alpha_{t|s} z_s + sigma_{t|s} n, conditioned on z_t
  for name in ("vp", "ve", "flow"):
    process = jaxddpm.make_process(name)
    for s_, t_ in [(0.1, 0.3), (0.4, 0.45), (0.5, 0.9), (0.0, 0.2)]:
      (a_s, s_s), (a_t, s_t) = [tuple(np.float64(v) for v in process.alpha_sigma(jnp.float32(u))) for u in (s_, t_)]
      a_ts = a_t / a_s
      cov = a_ts * s_s ** 2                      # Cov(z_s, z_t | x)
      z_t = a_t * X + s_t * EPS
      mean = a_s * X + cov / s_t ** 2 * (z_t - a_t * X)
      var = s_s ** 2 - cov ** 2 / s_t ** 2
      ps, pt = diffusion.path_point(process, jnp.float32(s_), X), diffusion.path_point(process, jnp.float32(t_), X)
      got_mean, got_var = diffusion.posterior(jnp.asarray(X, jnp.float32), jnp.asarray(z_t, jnp.float32), ps, pt)
      np.testing.assert_allclose(got_mean, mean, rtol=1e-4, atol=1e-4, err_msg=f"{name} {s_} {t_}")
      np.testing.assert_allclose(np.broadcast_to(got_var, X.shape), np.broadcast_to(var, X.shape), rtol=1e-3,
                                 atol=1e-7)
  # DDPM: q(x_{t-1} | x_t, x_0) on the integer grid is the s = t - 1 case
  sched = make_schedule("linear", 1000)
  t = jnp.asarray([1, 2, 10, 500, 999])
  xt = jnp.asarray(X, jnp.float32)
  x0 = jnp.asarray(np.clip(EPS, -1, 1), jnp.float32)
  want_mean, want_var, _ = diffusion.q_posterior_mean_variance(sched, x0, xt, t)
  got_mean, got_var = diffusion.posterior(x0, xt, diffusion.path_point(sched, t - 1, xt),
                                          diffusion.path_point(sched, t, xt))
  np.testing.assert_allclose(got_mean, want_mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got_var, want_var, rtol=2e-3, atol=1e-9)


def test_loss_identities_pointwise():
  """For a denoiser error d = eps_hat - eps: |x - x_hat|^2 = e^{-lambda} |d|^2, |v - v_hat|^2 =
  alpha^2 (e^{-lambda} + 1)^2 |d|^2, and on the flow path |u - u_hat|^2 = (e^{-lambda/2} + 1)^2 |d|^2."""
  d = RNG.standard_normal(X.shape)
  for name in ("vp", "flow", "ve"):
    a, s, da, ds = point64(name, TS)
    lam = np.log(a ** 2 / s ** 2)
    z = a * X + s * EPS
    eps_hat = EPS + d
    x_hat = (z - s * eps_hat) / a
    err = lambda kind: (numpy_output(kind, X, EPS, a, s, da, ds) - numpy_output(kind, x_hat, eps_hat, a, s, da, ds)) ** 2
    np.testing.assert_allclose(err("x0"), np.exp(-lam) * d ** 2, rtol=1e-9)
    np.testing.assert_allclose(err("v"), a ** 2 * (np.exp(-lam) + 1) ** 2 * d ** 2, rtol=1e-9)
    if name == "flow":
      np.testing.assert_allclose(err("u"), (np.exp(-lam / 2) + 1) ** 2 * d ** 2, rtol=1e-9)
    # the library's factors c(lambda) are these
    p = diffusion.path_point(jaxddpm.make_process(name), jnp.asarray(TS, jnp.float32), X, True)
    flat = diffusion.PathPoint(*(v.reshape(-1) for v in p))
    lam32 = jaxddpm.make_process(name).logsnr(jnp.asarray(TS, jnp.float32))
    for kind in diffusion.OUTPUTS:
      got = losses.output_mse_factor(kind, lam32, flat)
      np.testing.assert_allclose(got, (err(kind) / d ** 2)[:, 0, 0, 0], rtol=2e-3, err_msg=kind)


@pytest.mark.parametrize("output", diffusion.OUTPUTS)
def test_ddim_step_is_the_euler_step_on_the_flow_path(output):
  """Gao et al. 2024: on alpha = 1 - t, sigma = t one DDIM step equals z_t + u_hat (s - t)."""
  flow = jaxddpm.make_process("flow")
  cfg = base.SamplerConfig(method="ddim", mean_type=output, clip_denoised=False)
  x_hat = jnp.asarray(np.tanh(X), jnp.float32)
  for t, s in [(0.9, 0.6), (0.5, 0.45), (0.3, 0.0)]:
    z = jnp.asarray((1 - t) * X + t * EPS, jnp.float32)
    p = diffusion.path_point(flow, jnp.float32(t), z, True)
    model = lambda zz, tt: diffusion.output_from_x0_eps(output, x_hat, (zz - p.alpha * x_hat) / p.sigma, p)
    state = {"x": z, "pred_x0": z}
    a = ddim.make(flow, cfg).step(model, state, jnp.float32(t), jnp.float32(s), None)["x"]
    b = euler.make(flow, cfg).step(model, state, jnp.float32(t), jnp.float32(s), None)["x"]
    eps_hat = (np.asarray(z, np.float64) - (1 - t) * np.asarray(x_hat, np.float64)) / t
    want = np.asarray(z, np.float64) + (eps_hat - np.asarray(x_hat, np.float64)) * (s - t)
    np.testing.assert_allclose(a, want, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(b, want, rtol=1e-4, atol=2e-5)


def test_continuous_losses_weightings_and_time_sampling():
  """The loss of each weighting equals w(lambda) |eps - eps_hat|^2 computed in float64 from the model's
  output converted to eps; "none" is the plain MSE of the output (flow matching for u)."""
  flow = jaxddpm.make_process("flow")
  x0, noise = jnp.asarray(X, jnp.float32), jnp.asarray(EPS, jnp.float32)
  t = jnp.asarray(TS, jnp.float32)
  wrong = jnp.asarray(RNG.standard_normal(X.shape), jnp.float32)
  model = lambda z, tn: wrong  # any fixed output
  a, s, da, ds = point64("flow", TS)
  lam = np.log(a ** 2 / s ** 2)[:, 0, 0, 0]
  z = a * X + s * EPS
  w_ref = {"eps": 1.0, "x0": np.exp(-lam), "v": a[:, 0, 0, 0] ** 2 * (np.exp(-lam) + 1) ** 2,
           "flow": (np.exp(-lam / 2) + 1) ** 2, "min_snr": np.minimum(np.exp(lam), 5.0) / np.exp(lam),
           "p2": 1.0 / (1.0 + np.exp(lam)), "edm": (np.exp(-lam) + 0.25) / 0.25}
  for output in ("u", "eps", "x0", "v"):
    out64 = np.asarray(wrong, np.float64)
    if output == "eps":
      eps_hat = out64
    elif output == "x0":
      eps_hat = (z - a * out64) / s
    elif output == "v":
      eps_hat = (s * z + a * out64) / (a ** 2 + s ** 2)
    else:
      eps_hat = (a * out64 - da * z) / (a * ds - s * da)
    eps_mse = np.mean((EPS - eps_hat) ** 2, axis=(1, 2, 3))
    for weighting, w in w_ref.items():
      got = losses.continuous_losses(flow, model, x0, t, noise, output=output, weighting=weighting)["loss"]
      np.testing.assert_allclose(got, w * eps_mse, rtol=3e-3, err_msg=f"{output} {weighting}")
  fm = losses.continuous_losses(flow, model, x0, t, noise, output="u")["loss"]
  np.testing.assert_allclose(fm, np.mean((EPS - X - np.asarray(wrong)) ** 2, axis=(1, 2, 3)), rtol=1e-5)
  # time samplers: the range, and lognormal's lambda = -2 ln sigma with ln sigma ~ N(-1.2, 1.2^2)
  key = jax.random.PRNGKey(0)
  for method in losses.CONTINUOUS_T_SAMPLINGS:
    tt = np.asarray(losses.sample_t(flow, key, 20000, method))
    assert tt.min() >= losses.T_EPS and tt.max() < 1.0, method
  u = np.asarray(losses.sample_t(flow, key, 20000, "uniform"))
  assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.003
  log_sigma = -0.5 * np.asarray(flow.logsnr(losses.sample_t(flow, key, 20000, "lognormal")))
  assert abs(log_sigma.mean() + 1.2) < 0.05 and abs(log_sigma.std() - 1.2) < 0.05
