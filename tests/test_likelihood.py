"""The probability-flow ODE likelihood (jaxddpm.core.likelihood) against closed forms.

Gaussian data x ~ N(MU, diag(SD^2)) with the exact denoiser has an affine PF-ODE flow map,
z_T = alpha_T MU + c_T (x - alpha_e MU) / c_e with c_t = sqrt(alpha_t^2 SD^2 + sigma_t^2), so the model's
log-density is log N(z_T; 0, prior_std^2 I) + sum_d log(c_T / c_e), in float64 numpy. On DDPM's chain the
PF-ODE bits/dim and the variational bound of `calc_bpd_loop` are both computed; the bound may not be
below the ODE value by more than the estimators' error.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxddpm import losses
from jaxddpm.core import likelihood
from jaxddpm.core.process import make_process
from jaxddpm.schedule import make_schedule

KEY = jax.random.PRNGKey(3)
MU = np.array([0.2, -0.3])
SD = np.array([0.3, 0.5])


def alpha_sigma64(name, t, b0=0.1, b1=20.0):
  if name == "flow":
    return 1.0 - t, t
  B = b0 * t + 0.5 * (b1 - b0) * t * t
  return math.exp(-0.5 * B), math.sqrt(-math.expm1(-B))


def gaussian_model(process, output, var=SD ** 2, time_of=lambda n: n / 1000.0):
  from jaxddpm.core import diffusion
  def model(z, net):
    t = time_of(net)
    p = diffusion.path_point(process, t, z, True)
    x0 = MU + p.alpha * var * (z - p.alpha * MU) / (p.alpha ** 2 * var + p.sigma ** 2)
    return diffusion.output_from_x0_eps(output, x0, (z - p.alpha * x0) / p.sigma, p)
  return model


def closed_form_logp(name, x, t_eps, t_max, var=SD ** 2, **params):
  a_e, s_e = alpha_sigma64(name, t_eps, **params)
  a_T, s_T = alpha_sigma64(name, t_max, **params)
  c_e, c_T = np.sqrt(a_e ** 2 * var + s_e ** 2), np.sqrt(a_T ** 2 * var + s_T ** 2)
  z_T = a_T * MU + c_T * (x - a_e * MU) / c_e
  std = math.sqrt(a_T ** 2 + s_T ** 2)
  D = x.shape[-1]
  prior = -0.5 * np.sum((z_T / std) ** 2, -1) - D * (math.log(std) + 0.5 * math.log(2 * math.pi))
  return prior + np.sum(np.log(c_T / c_e))


def data(n, seed=0):
  return (MU + SD * np.random.default_rng(seed).standard_normal((n, 2))).reshape(n, 1, 1, 2)


@pytest.mark.parametrize("name,output,solver,steps,grid", [("vp", "eps", "rk4", 40, "logsnr"),
                                                           ("flow", "u", "heun", 100, "uniform")])
def test_exact_divergence_matches_the_closed_form(name, output, solver, steps, grid):
  process = make_process(name)
  x = data(256)
  t_max = 1.0 if name == "vp" else 0.999
  out = jax.jit(lambda x: likelihood.ode_logp(gaussian_model(process, output), process, x, mean_type=output,
                                               num_steps=steps, solver=solver, divergence="exact",
                                               t_max=t_max, grid=grid))(x)
  assert float(out["t_T"]) == pytest.approx(t_max)
  ref = closed_form_logp(name, x.reshape(-1, 2), likelihood.T_EPS, t_max)
  np.testing.assert_allclose(np.asarray(out["logp"], np.float64), ref, atol=2e-3)


def test_hutchinson_is_unbiased_within_its_monte_carlo_error():
  process = make_process("vp")
  x = data(256)
  model = gaussian_model(process, "eps")
  run = lambda **kw: np.asarray(jax.jit(lambda x, ids: likelihood.ode_logp(
      model, process, x, KEY, num_steps=10, example_ids=ids, **kw)["logp"])(x, jnp.arange(256)), np.float64)
  exact = run(divergence="exact")
  # Gaussian probes: unbiased, with a real spread
  diff = run(divergence="hutchinson", probe="gaussian", num_probes=2) - exact
  assert diff.std() > 1e-3
  assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(len(diff)), (diff.mean(), diff.std())
  # Rademacher probes (n_i^2 = 1) are exact for this data's diagonal Jacobian
  np.testing.assert_allclose(run(divergence="hutchinson", probe="rademacher"), exact, rtol=1e-5, atol=1e-4)
  # keyed by example id: a batch split gives the same estimates
  gauss = lambda x, ids: likelihood.ode_logp(model, process, x, KEY, num_steps=10, example_ids=ids,
                                             probe="gaussian", num_probes=2)["logp"]
  half = np.asarray(jax.jit(gauss)(x[128:], jnp.arange(128, 256)))
  np.testing.assert_allclose(half, np.asarray(jax.jit(gauss)(x, jnp.arange(256)))[128:], rtol=1e-5, atol=1e-4)


def test_ddpm_chain_reports_ode_bpd_and_the_bound_is_not_below_it():
  T = 1000
  sched = make_schedule("linear", T)
  process, net_time = likelihood.ddpm_continuous_limit(sched)
  n = 256
  k = np.clip(np.round((data(n, 1) + 1.0) * 127.5), 0, 255)
  x = jnp.asarray(k / 127.5 - 1.0, jnp.float32)
  var = SD ** 2 + (2.0 / 256) ** 2 / 12  # the dequantised density, N(MU, SD^2) blurred by the bins
  ode_model = gaussian_model(process, "eps", var, time_of=lambda net: (net + 1.0) / T)
  ode = jax.jit(lambda x: likelihood.ode_bpd(ode_model, process, x, KEY, net_time=net_time, num_steps=40,
                                             divergence="exact"))(x)
  ab = jnp.asarray(sched.alphas_cumprod)

  def vlb_model(z, t):
    a = ab[t][:, None, None, None]
    return jnp.sqrt(1 - a) * (z - jnp.sqrt(a) * MU) / (a * var + 1 - a)
  vlb = jax.jit(lambda x: losses.calc_bpd_loop(sched, vlb_model, x, KEY, clip_denoised=False))(x)["total_bpd"]
  ode_bpd, vlb = np.asarray(ode["bpd"], np.float64), np.asarray(vlb, np.float64)
  # the ODE value is the dequantised density's, in closed form
  y = np.asarray(ode["y"], np.float64).reshape(-1, 2)
  ref = -closed_form_logp("vp", y, likelihood.T_EPS, 1.0, var, b0=T * float(sched.betas[0]),
                          b1=T * float(sched.betas[-1])) / (2 * math.log(2)) + 7
  np.testing.assert_allclose(ode_bpd, ref, atol=2e-3)
  diff = vlb - ode_bpd
  assert diff.mean() > -3 * diff.std() / math.sqrt(n), (vlb.mean(), ode_bpd.mean())
  assert 0 < diff.mean() < 0.5, (vlb.mean(), ode_bpd.mean())  # both report the same data's ~entropy


def test_bad_options_raise():
  process = make_process("vp")
  for kw, match in ((dict(solver="euler"), "solver"), (dict(divergence="exactly"), "divergence"),
                    (dict(num_steps=0), "num_steps"), (dict(t_eps=0.0), "t_eps"), (dict(probe="x"), "probe")):
    with pytest.raises(ValueError, match=match):
      likelihood.ode_logp(lambda z, t: z, process, jnp.zeros((2, 1, 1, 2)), KEY, **kw)
  with pytest.raises(ValueError, match="linear"):
    likelihood.ddpm_continuous_limit(make_schedule("cosine", 100))
