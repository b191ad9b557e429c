"""Tests for jaxddpm/core/process.py: closed forms in float64 numpy (score_sde, Lipman et al. 2023,
Nichol & Dhariwal 2021), the SDE's marginals by Monte Carlo of Euler-Maruyama, and the discrete schedule
seen through the same protocol."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxddpm
from jaxddpm.core.samplers import grids
from jaxddpm.schedule import make_schedule

T = np.linspace(0.02, 0.98, 49)  # float64 reference times
B0, B1, SMIN, SMAX, LMIN, LMAX = 0.1, 20.0, 0.01, 50.0, -15.0, 15.0


def ref(name, t):
  """(alpha, sigma, d alpha, d sigma, f, g^2) in float64, each from its paper's formula."""
  beta = B0 + t * (B1 - B0)
  Bt = B0 * t + 0.5 * (B1 - B0) * t ** 2
  if name in ("vp", "subvp"):
    a = np.exp(-0.5 * Bt)
    da = -0.5 * beta * a
    f = -0.5 * beta
    if name == "vp":          # score_sde eq. 11 / 33
      s = np.sqrt(1 - np.exp(-Bt))
      ds = 0.5 * beta * np.exp(-Bt) / s
      g2 = beta
    else:                     # sub-VP, eq. 29: g^2 = beta (1 - e^{-2B})
      s = 1 - np.exp(-Bt)
      ds = beta * np.exp(-Bt)
      g2 = beta * (1 - np.exp(-2 * Bt))
  elif name == "ve":          # eq. 30: sigma(t) = smin (smax/smin)^t, g = sigma sqrt(2 log(smax/smin))
    a, da, f = np.ones_like(t), np.zeros_like(t), np.zeros_like(t)
    s = SMIN * (SMAX / SMIN) ** t
    ds = s * math.log(SMAX / SMIN)
    g2 = s ** 2 * 2 * math.log(SMAX / SMIN)
  elif name == "flow":        # alpha = 1 - t, sigma = t; f = -1/(1-t), g^2 = 2 t / (1 - t)
    a, s, da, ds = 1 - t, t, -np.ones_like(t), np.ones_like(t)
    f, g2 = -1 / (1 - t), 2 * t / (1 - t)
  else:                       # truncated cosine: lambda = -2 log tan(c t + b)
    b = math.atan(math.exp(-LMAX / 2))
    c = math.atan(math.exp(-LMIN / 2)) - b
    a, s = np.cos(c * t + b), np.sin(c * t + b)
    da, ds = -c * s, c * a
    f = da / a
    g2 = 2 * s * ds - 2 * f * s ** 2
  return a, s, da, ds, f, g2


@pytest.mark.parametrize("name", jaxddpm.PROCESSES)
def test_closed_forms(name):
  p = jaxddpm.make_process(name)
  a, s, da, ds, f, g2 = ref(name, T)
  t32 = jnp.asarray(T, jnp.float32)
  got_a, got_s = p.alpha_sigma(t32)
  np.testing.assert_allclose(got_a, a, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(got_s, s, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(p.logsnr(t32), np.log(a ** 2 / s ** 2), rtol=1e-4, atol=1e-4)
  got_da, got_ds = p.d_alpha_sigma(t32)
  np.testing.assert_allclose(got_da, da, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got_ds, ds, rtol=1e-4, atol=1e-6)
  got_f, got_g = p.sde(t32)
  np.testing.assert_allclose(got_f, f, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.square(got_g), g2, rtol=2e-4, atol=1e-6)
  # the inverse of the log-SNR, from lambda computed in float64
  np.testing.assert_allclose(p.t_from_logsnr(jnp.asarray(np.log(a ** 2 / s ** 2), jnp.float32)), T,
                             rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(p.net_time(t32), 1000 * T, rtol=1e-6)
  if name == "vp":  # a pytree: jit, vmap and grad go through it (one process: compiles cost test time)
    lam = jax.jit(lambda q, t: q.logsnr(t))(p, t32)
    np.testing.assert_allclose(lam, p.logsnr(t32), rtol=1e-5, atol=1e-5)
    dlam = jax.vmap(jax.grad(lambda t: p.logsnr(t)))(t32)
    np.testing.assert_allclose(dlam, 2 * (da / a - ds / s), rtol=2e-3, atol=1e-3)
    # pmap and shard_map over the 8 test devices: the process replicated, t split
    n = jax.device_count()
    tt = jnp.asarray(np.linspace(0.05, 0.95, 2 * n), jnp.float32)
    a_ref = ref(name, np.linspace(0.05, 0.95, 2 * n))[0]
    got = jax.pmap(lambda q, t: q.alpha_sigma(t)[0], in_axes=(None, 0))(p, tt.reshape(n, 2))
    np.testing.assert_allclose(np.asarray(got).ravel(), a_ref, rtol=2e-5, atol=1e-7)
    from jax.sharding import Mesh, PartitionSpec as P  # noqa: PLC0415
    mesh = Mesh(np.array(jax.devices()), ("data",))
    fn = jax.shard_map(lambda q, t: q.alpha_sigma(t)[0], mesh=mesh, in_specs=(P(), P("data")),
                       out_specs=P("data"))
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(p, tt)), a_ref, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "vp_cosine"])
def test_sde_marginals_match_euler_maruyama(name):
  """z_0 ~ q(z_0 | x) then dz = f z dt + g dw with 1000 Euler-Maruyama steps (float64 numpy, 10000
  paths): mean and std at t = 0.5 and 0.9 are alpha_t x and sigma_t within Monte Carlo error."""
  p = jaxddpm.make_process(name)
  x, n_paths, n_steps = 0.8, 10000, 1000
  rng = np.random.default_rng(0)
  ts = np.linspace(0.0, 1.0, n_steps + 1)
  f, g = (np.asarray(v, np.float64) for v in p.sde(jnp.asarray(ts[:-1] + 0.5 / n_steps, jnp.float32)))
  a0, s0 = (float(v) for v in p.alpha_sigma(0.0))
  z = a0 * x + s0 * rng.standard_normal(n_paths)
  dt = 1.0 / n_steps
  for i in range(n_steps):
    z = z + f[i] * z * dt + g[i] * math.sqrt(dt) * rng.standard_normal(n_paths)
    if i + 1 in (n_steps // 2, 9 * n_steps // 10):  # (near t = 1 the cosine drift is stiff)
      a, s = ref(name, np.asarray(ts[i + 1]))[:2]
      se = s / math.sqrt(n_paths)
      assert abs(z.mean() - a * x) < 4 * se + 2e-3 * (a * x), (name, ts[i + 1], z.mean(), a * x)
      assert abs(z.std() / s - 1) < 0.03, (name, ts[i + 1], z.std(), s)


def test_discrete_schedule_speaks_the_protocol():
  sched = make_schedule("linear", 1000)
  ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
  t = jnp.asarray([0, 1, 500, 999, -1])
  a, s = sched.alpha_sigma(t)
  np.testing.assert_allclose(a[:4], np.sqrt(ab[[0, 1, 500, 999]]), rtol=1e-6)
  np.testing.assert_allclose(s[:4], np.sqrt(1 - ab[[0, 1, 500, 999]]), rtol=1e-5)
  assert (float(a[4]), float(s[4])) == (1.0, 0.0)          # entry -1 is the data
  np.testing.assert_allclose(sched.logsnr(t[:4]), np.log(ab / (1 - ab))[[0, 1, 500, 999]], rtol=1e-4)
  np.testing.assert_array_equal(sched.net_time(t[:4]), [0, 1, 500, 999])
  assert sched.is_discrete and not jaxddpm.make_process("flow").is_discrete
  with pytest.raises(ValueError, match="no time derivatives"):
    sched.d_alpha_sigma(t)


def test_time_grids():
  vp = jaxddpm.make_process("vp")
  np.testing.assert_allclose(grids.uniform_grid(vp, 4), [1, 0.75, 0.5, 0.25, 0])
  g = np.asarray(grids.logsnr_grid(vp, 5), np.float64)
  assert g[-1] == 0 and np.all(np.diff(g) < 0)
  lam = np.asarray(vp.logsnr(jnp.asarray(g[:-1], jnp.float32)), np.float64)
  np.testing.assert_allclose(np.diff(lam), np.full(4, (lam[-1] - lam[0]) / 4), rtol=2e-3)  # uniform in lambda
  assert lam[0] == pytest.approx(-math.log(math.expm1(0.1 + 9.95)), rel=1e-4)  # starts at t = 1
  assert lam[-1] == pytest.approx(-math.log(math.expm1(0.1e-3 + 9.95e-6)), rel=1e-4)  # ends at t_eps
  ve = jaxddpm.make_process("ve")
  g = np.asarray(grids.edm_grid(ve, 6), np.float64)
  sigma = SMIN * (SMAX / SMIN) ** g[:-1]  # VE: EDM's sigma is the process's sigma
  rho = 7.0
  i = np.arange(6) / 5
  want = (SMAX ** (1 / rho) + i * (max(0.002, SMIN * (SMAX / SMIN) ** 1e-3) ** (1 / rho) - SMAX ** (1 / rho))) ** rho
  np.testing.assert_allclose(sigma, want, rtol=2e-3)
  assert g[-1] == 0


def test_bad_process_names_and_parameters():
  with pytest.raises(ValueError, match="process name must be one of"):
    jaxddpm.make_process("vpp")
  with pytest.raises(ValueError, match="unknown parameter"):
    jaxddpm.make_process("flow", b0=1.0)
  with pytest.raises(ValueError, match="sigma_min < sigma_max"):
    jaxddpm.make_process("ve", sigma_min=2.0, sigma_max=1.0)
