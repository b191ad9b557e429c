"""Fast solvers and SDE samplers (Heun, DPM-Solver++ 2M/3M, Euler-Maruyama, predictor-corrector) against
closed forms, with exact denoisers (no training).

Gaussian data x ~ N(MU, diag(SD^2)) has a linear probability-flow ODE: z_t = alpha_t MU + c_t xi with
c_t = sqrt(alpha_t^2 SD^2 + sigma_t^2) and xi fixed along a trajectory, so the exact solution from any z
at t_0 is known in float64 (the convergence orders). A Gaussian mixture has the exact denoiser
E[x | z_t] = sum_j r_j(z_t) (mu_j + alpha s^2 (z_t - alpha mu_j) / (alpha^2 s^2 + sigma^2)), r_j the
posterior responsibilities, for any (alpha, sigma): every sampler must reproduce its weights and moments
within Monte Carlo tolerance. Data live in a tiny [N, 1, 1, 2] "image".
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxddpm import sampling
from jaxddpm.core.process import make_process
from jaxddpm.core.samplers import engine, grids
from jaxddpm.schedule import make_schedule, space_timesteps

KEY = jax.random.PRNGKey(0)
MU = np.array([0.5, -0.3])
SD = np.array([0.3, 0.6])
MIX_W = np.array([0.3, 0.7])
MIX_MU = np.array([[-0.6, 0.3], [0.5, -0.4]])
MIX_SD = 0.15
T = 1000
SCHED = make_schedule("linear", T)


def alpha_sigma_of(process):
  """(alpha, sigma) at the network's time input: 1000 t on a process, the timestep on DDPM's chain."""
  if process.is_discrete:
    return lambda t: process.alpha_sigma(t)
  return lambda t: process.alpha_sigma(t / 1000.0)


def gaussian_x0(process):
  a_s = alpha_sigma_of(process)

  def model(z, t):
    a, s = (v[:, None, None, None] for v in a_s(t))
    return MU + a * SD ** 2 * (z - a * MU) / (a * a * SD ** 2 + s * s)
  return model


def mixture_x0(process):
  a_s = alpha_sigma_of(process)

  def model(z, t):
    a, s = (v[:, None, None, None, None] for v in a_s(t))
    z = z[..., None, :]                                  # [B, 1, 1, 1, 2] against components [J, 2]
    var = a * a * MIX_SD ** 2 + s * s
    diff = z - a * MIX_MU
    logits = jnp.log(MIX_W)[:, None] - 0.5 * jnp.sum(diff ** 2, -1, keepdims=True) / var
    r = jax.nn.softmax(logits, axis=-2)
    return jnp.sum(r * (MIX_MU + a * MIX_SD ** 2 * diff / var), axis=-2)
  return model


def alpha_sigma64(name, t):
  """float64 closed forms of the vp and flow paths (independent of jaxddpm.core.process)."""
  t = np.asarray(t, np.float64)
  if name == "flow":
    return 1.0 - t, t
  B = 0.1 * t + 0.5 * (20.0 - 0.1) * t * t
  return np.exp(-0.5 * B), np.sqrt(-np.expm1(-B))


def run(process, model, grid, x_T, method, **kw):
  cfg = engine.make_config(method, 0.0, "x0", "fixed_small", False, None, process, kw.get("options"))
  f = jax.jit(lambda g, x: engine.run_chain(model, process, g, KEY, x, 0, x_T.shape, cfg)["samples"])
  return np.asarray(f(jnp.asarray(grid), jnp.asarray(x_T, jnp.float32)), np.float64)


# ------------------------------------------------------------------------------ convergence order
@pytest.mark.parametrize("name,method,n,lo,hi", [
    ("vp", "euler", 16, 1.6, 2.5), ("vp", "heun", 8, 3.0, 5.5), ("vp", "dpm_solver_pp", 16, 3.0, 5.5),
    ("flow", "dpm_solver_pp", 32, 3.0, 5.5)])
def test_convergence_order_on_gaussian_data(name, method, n, lo, hi):
  """Error at the grid's end (t_eps, before the final denoising jump) against the exact ODE solution, at
  N and 2N steps uniform in log-SNR: Euler halves; Heun and DPM-Solver++ 2M fall about 4x."""
  process = make_process(name)
  x_T = np.asarray(jax.random.normal(KEY, (128, 1, 1, 2)), np.float64)
  model = gaussian_x0(process)
  errs = []
  for steps in (n, 2 * n):
    grid = np.asarray(grids.logsnr_grid(process, steps + 1))[:-1]   # t_0 ... t_eps, no jump to 0
    a0, s0 = alpha_sigma64(name, grid[0])
    a1, s1 = alpha_sigma64(name, grid[-1])
    z0 = x_T * math.sqrt(a0 ** 2 + s0 ** 2)
    c0, c1 = np.sqrt(a0 ** 2 * SD ** 2 + s0 ** 2), np.sqrt(a1 ** 2 * SD ** 2 + s1 ** 2)
    exact = a1 * MU + c1 * (z0 - a0 * MU) / c0
    errs.append(np.sqrt(np.mean((run(process, model, grid, z0, method) - exact) ** 2)))
  assert errs[1] > 1e-4, errs  # well above float32 round-off, so the ratio is the method's
  assert lo < errs[0] / errs[1] < hi, errs


# ----------------------------------------------------------------------------- mixture moments
def assert_mixture(x):
  x = np.asarray(x).reshape(-1, 2)
  n = len(x)
  assert np.isfinite(x).all()
  comp = np.argmin(((x[:, None, :] - MIX_MU) ** 2).sum(-1), axis=1)
  frac = np.bincount(comp, minlength=2) / n
  np.testing.assert_array_less(np.abs(frac - MIX_W), 4 * np.sqrt(MIX_W * (1 - MIX_W) / n))
  for j in range(2):
    xj = x[comp == j]
    np.testing.assert_array_less(np.abs(xj.mean(0) - MIX_MU[j]), 4 * MIX_SD / np.sqrt(len(xj)) + 0.01)
    np.testing.assert_allclose(xj.std(0), MIX_SD, rtol=4 / np.sqrt(2 * len(xj)) + 0.03)


@pytest.mark.parametrize("name,method,steps,grid,options", [
    # Heun at <= 20 NFE misses this narrow mixture's spread (std 0.13 for 0.15 on flow, means off ~0.05 on
    # vp); it reproduces it at 20 steps (38 NFE on flow, whose first step from alpha = 0 is Euler)
    ("flow", "heun", 20, "uniform", None),
    ("vp", "dpm_solver_pp", 20, "logsnr", None),          # 20 NFE
    ("flow", "dpm_solver_pp", 20, "uniform", None),
    ("vp", "dpm_solver_pp_3m", 15, "logsnr", None),
    ("ve", "euler_maruyama", 500, "uniform", None),
    ("vp", "pc", 250, "uniform", None),                   # 500 NFE, snr 0.16
])
def test_mixture_weights_and_moments(name, method, steps, grid, options):
  process = make_process(name)
  # 200 "images" of 4 x 4 independent mixture draws: 3200 points, and per-sample norms (the Langevin step
  # size) over 32 dimensions as in an image, not over 2
  out = sampling.sample(mixture_x0(process), process, (200, 4, 4, 2), KEY, method=method, timesteps=steps,
                        grid=grid, mean_type="x0", var_type="fixed_small", clip_denoised=False, options=options)
  assert_mixture(out["samples"])


def test_dpm_solver_on_the_ddpm_chain_matches_the_continuous_grid():
  """DPM-Solver++ 2M on DDPM's discrete linear schedule, respaced to 20 entries spaced uniformly in log-SNR
  (as DPM-Solver recommends), and on the VP SDE (its continuous limit, beta(t) = T beta_t) at the
  corresponding times t_k = (k + 1) / T give the same samples from the same x_T, up to the schedules' own
  difference (alphabar vs exp(-B)); both reproduce the mixture."""
  vp = make_process("vp")
  t_logsnr = np.asarray(grids.logsnr_grid(vp, 20))[:-1]
  kept = np.unique(np.clip(np.round(t_logsnr * T - 1), 0, T - 1).astype(np.int64))
  x_T = jax.random.normal(KEY, (200, 4, 4, 2))
  kw = dict(mean_type="x0", var_type="fixed_small", clip_denoised=False, x_T=x_T)
  disc = sampling.sample(mixture_x0(SCHED), SCHED, x_T.shape, KEY, method="dpm_solver_pp", timesteps=kept,
                         **kw)["samples"]
  grid = np.append((kept[::-1] + 1.0) / T, 0.0).astype(np.float32)
  cont = run(vp, mixture_x0(vp), grid, np.asarray(x_T), "dpm_solver_pp")
  assert_mixture(disc)
  assert_mixture(cont)
  diff = np.abs(np.asarray(disc, np.float64) - cont)
  assert np.median(diff) < 2e-3 and np.quantile(diff, 0.99) < 2e-2, (np.median(diff), diff.max())
  # a negative control: first order (DDIM) on the same chain is much further from 2M
  ddim = sampling.sample(mixture_x0(SCHED), SCHED, x_T.shape, KEY, method="ddim", timesteps=kept, **kw)["samples"]
  assert np.median(np.abs(np.asarray(ddim) - np.asarray(disc))) > 5 * np.median(diff)


# ------------------------------------------------------------- batch split and device invariance
@pytest.mark.parametrize("name,method,options", [("vp", "dpm_solver_pp_3m", None), ("ve", "pc", None)])
def test_same_samples_for_any_batch_split_and_device_count(name, method, options):
  assert len(jax.devices()) == 8
  process = make_process(name)
  model = mixture_x0(process)
  apply_fn = lambda params, x, t: params * model(x, t)
  kw = dict(method=method, timesteps=6, grid="logsnr" if method != "pc" else "uniform", mean_type="x0",
            var_type="fixed_small", clip_denoised=False, snapshot_every=2, options=options)
  shape = (10, 1, 1, 2)
  params = jnp.float32(1.0)
  one = sampling.data_mesh(jax.devices()[:1])
  ref = sampling.sample_batched(apply_fn, params, process, shape, KEY, batch_size=10, mesh=one, **kw)
  for batch_size in (8, 3):   # 8 devices: 8 + 2 (padded), and 3-sample batches padded to 8
    r = sampling.sample_batched(apply_fn, params, process, shape, KEY, batch_size=batch_size, **kw)
    for k in ("samples", "pred_x0_snapshots", "x_t_snapshots"):
      # equal up to float32 rounding (programs for other shapes fuse the solver's arithmetic differently); a
      # key or history mix-up would differ by O(1)
      np.testing.assert_allclose(r[k], ref[k], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------- NFE and input
def test_nfe_per_method():
  vp = make_process("vp")
  assert sampling.make_sampler(lambda p, x, t: x, vp, (2, 1, 1, 2), method="heun", timesteps=10).nfe == 19
  assert sampling.make_sampler(lambda p, x, t: x, vp, (2, 1, 1, 2), method="pc", timesteps=10,
                               options={"corrector_steps": 2}).nfe == 30
  for m in ("dpm_solver_pp", "dpm_solver_pp_3m", "euler_maruyama"):
    assert engine.nfe(m, 10, vp) == 10
  from jaxddpm.metrics import nfe_sweep  # the sweep's steps for a budget: the most that fit
  assert nfe_sweep.steps_for_budget("heun", 10, vp) == 5          # 9 calls; 6 steps would make 11
  assert nfe_sweep.steps_for_budget("pc", 5, vp, (("corrector_steps", 1),)) == 2
  assert nfe_sweep.steps_for_budget("heun", 0, vp) is None


@pytest.mark.parametrize("process,kw,match", [
    (SCHED, dict(method="pc"), "continuous process"),
    (SCHED, dict(method="euler_maruyama"), "continuous process"),
    (SCHED, dict(method="heun", options={"s_churn": 1.0}), "s_churn"),
    (SCHED, dict(method="dpm_solver_pp", mean_type="x_prev"), "x_prev"),
    (make_process("vp"), dict(method="heun", options={"churn": 1.0}), "unknown sampler option"),
    (make_process("vp"), dict(method="pc", options={"snr": -1.0}), "snr"),
    (make_process("vp"), dict(method="pc", options={"corrector_steps": 1.5}), "corrector_steps"),
    (make_process("vp"), dict(method="ddim", options={"snr": 0.1}), "allowed: none"),
])
def test_bad_options_raise_before_tracing(process, kw, match):
  calls = []

  def model(x, t):
    calls.append(1)
    return x
  with pytest.raises(ValueError, match=match):
    sampling.sample(model, process, (2, 1, 1, 2), KEY, timesteps=4, **kw)
  assert not calls


def test_config_selects_method_steps_and_options():
  from jaxddpm import config as config_lib
  c = config_lib.base_config()
  c.data.name = "digits"
  c.data.image_size = 8
  c.sample.method, c.sample.steps = "dpm_solver_pp", 20
  config_lib.validate(c)
  assert config_lib.sample_timesteps(c) == "20" and config_lib.sampler_options(c) == {}
  c.sample.method, c.diffusion.process, c.diffusion.var_type = "pc", "vp", "fixed_small"
  c.sample.pc_corrector_steps = 2
  config_lib.validate(c)
  assert config_lib.sampler_options(c) == {"snr": 0.16, "corrector_steps": 2}
  for field, value, match in (("steps", 0, "sample.steps"), ("pc_snr", -1.0, "snr"),
                              ("s_churn", 1.0, "sample.s_churn"), ("timesteps", "10", "sample.steps")):
    bad = config_lib.base_config()
    bad.update_from_flattened_dict({"data.name": "digits", "data.image_size": 8, "sample.method": "pc",
                                    "diffusion.process": "vp", "diffusion.var_type": "fixed_small",
                                    "sample.steps": 20})
    bad.sample[field] = value
    with pytest.raises(ValueError, match=match):
      config_lib.validate(bad)
