"""Tests for the sampler seam (jaxddpm/core/samplers) on continuous processes, with the exact denoiser of a
2-D Gaussian mixture (closed form for any alpha, sigma): moments and weights by Monte Carlo, the
equivalences of Gao et al. 2024, batch-split / device-count invariance, and improved-diffusion's respacing.
"""
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxddpm
from jaxddpm import parallel
from jaxddpm.core import diffusion
from jaxddpm.core.samplers import engine
from jaxddpm.schedule import space_timesteps

MU = np.array([[-0.6, 0.3], [0.5, -0.4]], np.float32)   # component means
STD = np.array([0.15, 0.25], np.float32)                 # isotropic component standard deviations
W = np.array([0.3, 0.7], np.float32)                     # weights
KEY = jax.random.PRNGKey(0)


def mixture_x0(z, alpha, sigma):
  """E[x | z] for x ~ sum_k w_k N(mu_k, s_k^2 I), z = alpha x + sigma eps: z [B, 1, 1, 2], alpha/sigma
  broadcastable [B, 1, 1, 1]. Component k: z ~ N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I), and
  E[x | z, k] = mu_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) (z - alpha mu_k)."""
  a, s = alpha[..., None], sigma[..., None]
  zk = z[..., None, :]                                            # [B, 1, 1, 1, 2]
  var = a ** 2 * STD[:, None] ** 2 + s ** 2                       # [B, 1, 1, K, 1]
  logp = jnp.log(W)[:, None] - 0.5 * jnp.sum((zk - a * MU) ** 2, -1, keepdims=True) / var - jnp.log(var)
  r = jax.nn.softmax(logp, axis=-2)
  return jnp.sum(r * (MU + a * STD[:, None] ** 2 / var * (zk - a * MU)), -2)


def mixture_model(process, output):
  """The exact denoiser as a network of the given output type (network time 1000 t)."""
  def fn(z, net_t):
    p = diffusion.path_point(process, net_t / 1000.0, z, derivatives=True)
    x0 = mixture_x0(z, p.alpha, p.sigma)
    return diffusion.output_from_x0_eps(output, x0, (z - p.alpha * x0) / p.sigma, p)
  return fn


def stats(x):
  """(weights [2], means [2, 2], stds [2, 2]) with points assigned to the nearest component mean."""
  x = np.asarray(x, np.float64).reshape(-1, 2)
  k = np.linalg.norm(x[:, None] - MU, axis=-1).argmin(1)
  return (np.array([(k == j).mean() for j in range(2)]), np.array([x[k == j].mean(0) for j in range(2)]),
          np.array([x[k == j].std(0) for j in range(2)]))


@pytest.fixture(scope="module")
def reference():
  """The same statistics of 200000 exact draws of the mixture (float64 numpy)."""
  rng = np.random.default_rng(1)
  n = 200_000
  k = rng.random(n) < W[1]
  x = np.where(k[:, None], MU[1] + STD[1] * rng.standard_normal((n, 2)), MU[0] + STD[0] * rng.standard_normal((n, 2)))
  return stats(x)


# (process, method, grid, steps): each stepper on vp, ve and flow at a step count where its discretisation
# error is below the Monte Carlo error of 4000 samples
CASES = [
    ("vp", "ancestral", "logsnr", 400), ("ve", "ancestral", "uniform", 200), ("flow", "ancestral", "uniform", 200),
    ("vp", "ddim", "logsnr", 100), ("ve", "ddim", "logsnr", 100), ("flow", "ddim", "uniform", 100),
    ("vp", "euler", "edm", 200), ("ve", "euler", "edm", 400), ("flow", "euler", "uniform", 100),
]


@pytest.mark.parametrize("name,method,grid,steps", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_mixture_weights_and_moments(name, method, grid, steps, reference):
  process = jaxddpm.make_process(name)
  n = 4000
  out = jaxddpm.sample(mixture_model(process, "x0"), process, (n, 1, 1, 2), KEY, method=method, timesteps=steps,
                       grid=grid, mean_type="x0", clip_denoised=False)["samples"]
  w, m, s = stats(out)
  w_ref, m_ref, s_ref = reference
  se_w = np.sqrt(W * (1 - W) / n)
  np.testing.assert_array_less(np.abs(w - w_ref), 4 * se_w + 0.01)
  se_m = s_ref / np.sqrt(n * W)[:, None]
  np.testing.assert_array_less(np.abs(m - m_ref), 4 * se_m + 0.01)
  np.testing.assert_array_less(np.abs(s / s_ref - 1), 0.08)


def test_ddim_trajectory_does_not_depend_on_the_output_type():
  """Gao et al. 2024: the same denoiser in any parameterisation gives the same DDIM trajectory."""
  process = jaxddpm.make_process("vp")
  process, grid = jaxddpm.make_time_grid(process, 12, "logsnr")
  shape = (64, 1, 1, 2)

  @jax.jit
  def runs(process, grid, key):  # one program for the five outputs (one compile: test time)
    cfg = lambda o: jaxddpm.SamplerConfig("ddim", 0.0, o, "fixed_large", False, 1)
    return {o: engine.run_chain(mixture_model(process, o), process, grid, key, None, 0, shape, cfg(o))
            for o in diffusion.OUTPUTS}

  out = runs(process, grid, KEY)
  ref = out["x0"]
  scale = float(np.abs(ref["x_t_snapshots"]).max())
  for o, r in out.items():
    np.testing.assert_allclose(r["x_t_snapshots"], ref["x_t_snapshots"], atol=2e-4 * scale, err_msg=o)
    np.testing.assert_allclose(r["samples"], ref["samples"], atol=2e-4 * scale, err_msg=o)


@flax.struct.dataclass
class ScaledFlow:
  """The flow path with (alpha, sigma) multiplied by c(t) = 1 + t: the same log-SNR, another scale."""
  is_discrete = False

  def alpha_sigma(self, t):
    t = jnp.asarray(t, jnp.float32)
    return (1 + t) * (1 - t), (1 + t) * t

  def d_alpha_sigma(self, t):
    t = jnp.asarray(t, jnp.float32)
    return -2 * t, 1 + 2 * t

  def logsnr(self, t):
    return jaxddpm.make_process("flow").logsnr(t)

  def net_time(self, t):
    return jnp.asarray(t, jnp.float32) * 1000.0

  def prior_std(self, t=1.0):
    a, s = self.alpha_sigma(t)
    return jnp.sqrt(a * a + s * s)


def test_ddim_is_invariant_to_scaling_the_path_and_euler_is_not():
  flow, scaled = jaxddpm.make_process("flow"), ScaledFlow()
  shape = (256, 1, 1, 2)
  grid = jaxddpm.make_time_grid(flow, 8)[1]

  @jax.jit
  def run(key):  # the four runs in one program (one compile: test time)
    cfg = lambda m: jaxddpm.SamplerConfig(m, 0.0, "x0", "fixed_large", False, None)
    return {(p, m): engine.run_chain(mixture_model(q, "x0"), q, grid, key, None, 0, shape, cfg(m))["samples"]
            for p, q in (("flow", flow), ("scaled", scaled)) for m in ("ddim", "euler")}

  out = jax.device_get(run(KEY))
  np.testing.assert_allclose(out["scaled", "ddim"], out["flow", "ddim"], atol=1e-5)
  # Euler on the PF-ODE of the scaled path is another discretisation: visibly different (a negative control)
  assert np.abs(out["scaled", "euler"] - out["flow", "euler"]).max() > 1e-2


def test_same_samples_for_any_batch_split_and_device_count():
  assert len(jax.devices()) == 8
  process = jaxddpm.make_process("vp")
  model = mixture_model(process, "eps")
  apply_fn = lambda params, x, t: params * model(x, t)
  params = jnp.float32(1.0)
  kw = dict(method="ancestral", timesteps=10, grid="logsnr", clip_denoised=False, snapshot_every=5)
  shape = (10, 1, 1, 2)
  ref = jax.device_get(jaxddpm.sample(model, process, shape, KEY, **kw))
  one = parallel.data_mesh(jax.devices()[:1])
  for r in (jaxddpm.sample_batched(apply_fn, params, process, shape, KEY, batch_size=10, mesh=one, **kw),
            jaxddpm.sample_batched(apply_fn, params, process, shape, KEY, batch_size=4, **kw)):  # pad 4 -> 8
    for k in ("samples", "pred_x0_snapshots", "x_t_snapshots", "snapshot_timesteps"):
      np.testing.assert_allclose(r[k], ref[k], rtol=1e-6, atol=1e-6, err_msg=k)
  np.testing.assert_allclose(ref["snapshot_timesteps"], np.asarray(jaxddpm.make_time_grid(process, 10, "logsnr")[1])[[4, 9]])
  sampler = jaxddpm.make_sampler(apply_fn, process, (8, 1, 1, 2), **kw)
  assert sampler.nfe == 10 and jaxddpm.nfe("euler", 25) == 25


def _improved_diffusion_steps(T, counts):
  """improved-diffusion's respace.space_timesteps (Nichol & Dhariwal 2021), restated: float accumulation."""
  size, extra = divmod(T, len(counts))
  steps, start = set(), 0
  for i, count in enumerate(counts):
    section = size + (1 if i < extra else 0)
    stride = 1 if count <= 1 else (section - 1) / (count - 1)
    cur = 0.0
    for _ in range(count):
      steps.add(start + round(cur))
      cur += stride
    start += section
  return sorted(steps)


def test_space_timesteps_reproduces_improved_diffusion():
  rng = np.random.default_rng(0)
  for T in range(1, 160):
    for count in range(1, T + 1):
      assert list(space_timesteps(T, count)) == _improved_diffusion_steps(T, [count]), (T, count)
    for _ in range(5):
      sections = int(rng.integers(1, min(T, 5) + 1))
      size = T // sections
      counts = [int(rng.integers(1, size + 1)) for _ in range(sections)]
      spec = ",".join(map(str, counts))
      assert list(space_timesteps(T, spec)) == _improved_diffusion_steps(T, counts), (T, spec)
  # a tie where the accumulation and round(j * stride) disagree: T = 399, 397 steps
  stride = 398 / 396
  assert [round(j * stride) for j in range(397)] != _improved_diffusion_steps(399, [397])
  assert list(space_timesteps(399, 397)) == _improved_diffusion_steps(399, [397])
