"""Likelihoods (floor 1): the discrete chain's variational bound in bits/dim (`calc_bpd_loop`, DDPM eq. 5)
and the exact likelihood through the probability-flow ODE (`ode_logp`, `ode_bpd`).

The PF-ODE dz/dt = v(z, t) = alpha'_t x_hat + sigma'_t eps_hat (any process, any output type) maps the
data z_{t_eps} = x to z_{t_max}; by the instantaneous change of variables (Chen et al. 2018),

  log p_0(x) = log p_prior(z_{t_max}) + int_{t_eps}^{t_max} div_z v(z_t, t) dt,

integrated data -> noise on a fixed grid (uniform in log-SNR by default, uniform in t on request) with
Heun's method or classical RK4 (one `lax.scan`). The divergence is exact (D Jacobian-vector products against the basis vectors, for small
D) or Hutchinson's estimator E_n[n^T (dv/dz) n] with Rademacher or Gaussian probes n, fixed along the
trajectory and keyed by (example id, probe index), so results do not depend on the batch split.

The prior is the distribution the samplers start from, N(0, prior_std(t_max)^2 I) with prior_std =
sqrt(alpha^2 + sigma^2) (1 on vp / subvp / flow; sqrt(1 + sigma_max^2) on ve): log p is then exactly the
log-density of the generative model "z ~ prior, integrate the PF-ODE back to t_eps". (It is not the
marginal of the forward process at t_max, N(alpha x, sigma^2), which depends on the data.)

Bits/dim of 8-bit data as Song et al. report it: uniform dequantisation y = (k + u) / 128 - 1 of the pixel
values k in {0..255}, u ~ U[0, 1)^D, and bpd = -log p(y) / (D ln 2) + 7, the 7 = -log2(2 / 256) being the
Jacobian of [0, 256) -> [-1, 1). It bounds the discrete model's -log2 P(k) / D (Jensen).

DDPM's discrete chain has no time derivatives; its continuous limit (`ddpm_continuous_limit`) is the VP SDE
with beta(t) = T beta_{tT} (linear schedules), whose network time for process time t is T t - 1 (entry i
stands for t = (i + 1) / T), as score_sde evaluates DDPM checkpoints.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxddpm.core import diffusion
from jaxddpm.core.diffusion import OUTPUTS, check_choice
from jaxddpm.core.losses import mean_flat, prior_bpd, vb_terms_bpd
from jaxddpm.core.schedule import Schedule


def calc_bpd_loop(s: Schedule, model_fn: Callable, x0, key, *, mean_type: str = "eps",
                  var_type: str = "fixed_large", clip_denoised: bool = False, example_ids=None) -> dict:
  """The full variational bound in bits/dim, L_T + sum_t L_{t-1} (DDPM eq. 5), as one `lax.scan` over t.

  x0: [B, H, W, C] data in [-1, 1] (8-bit values); key: PRNG key. The noise of example i at step t is
  drawn from fold_in(fold_in(key, t), example_ids[i]) (default ids arange(B)), so results do not depend
  on how a dataset is split into batches or devices.
  Returns {"total_bpd" [B], "prior_bpd" [B], "vb" [B, T], "x0_mse" [B, T], "mse" [B, T] (eps MSE)}.
  """
  B = x0.shape[0]
  ids = jnp.arange(B, dtype=jnp.uint32) if example_ids is None else jnp.asarray(example_ids, jnp.uint32)
  if ids.shape != (B,):
    raise ValueError(f"example_ids must have shape ({B},), got {ids.shape}")

  def body(carry, i):
    t = jnp.full((B,), i, jnp.int32)
    k = jax.random.fold_in(key, i)
    noise = jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(k, j), x0.shape[1:], x0.dtype))(ids)
    x_t = diffusion.q_sample(s, x0, t, noise)
    vb, out = vb_terms_bpd(s, model_fn(x_t, s.timesteps[t]), x0, x_t, t, mean_type=mean_type,
                           var_type=var_type, clip_denoised=clip_denoised)
    return carry, (vb, mean_flat(jnp.square(out.pred_x0 - x0)), mean_flat(jnp.square(out.pred_eps - noise)))

  _, (vb, x0_mse, mse) = jax.lax.scan(body, None, jnp.arange(s.num_timesteps - 1, -1, -1))
  vb, x0_mse, mse = (jnp.flip(a, 0).T for a in (vb, x0_mse, mse))  # [B, T], t ascending
  prior = prior_bpd(s, x0)
  return {"total_bpd": vb.sum(axis=1) + prior, "prior_bpd": prior, "vb": vb, "x0_mse": x0_mse, "mse": mse}


# ---------------------------------------------------------------- the probability-flow ODE likelihood
SOLVERS = {"heun": 2, "rk4": 4}  # network calls (right-hand-side evaluations) per step
GRIDS = ("logsnr", "uniform")  # step times uniform in lambda (dense near the data, where v is stiff) or in t
LOGSNR_CLIP = 20.0
DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
T_EPS = 1e-5  # score_sde's likelihood eps: the data are z at t = T_EPS


class LikelihoodConfig(NamedTuple):
  mean_type: str = "eps"
  num_steps: int = 100
  solver: str = "rk4"
  divergence: str = "hutchinson"
  probe: str = "rademacher"
  num_probes: int = 1
  t_eps: float = T_EPS
  t_max: float = 1.0
  grid: str = "logsnr"


def check_config(**kw) -> LikelihoodConfig:
  """The validated options (ValueError naming the option and the allowed values)."""
  cfg = LikelihoodConfig(**kw)
  check_choice("mean_type", cfg.mean_type, OUTPUTS)
  check_choice("solver", cfg.solver, tuple(SOLVERS))
  check_choice("divergence", cfg.divergence, DIVERGENCES)
  check_choice("probe", cfg.probe, PROBES)
  check_choice("grid", cfg.grid, GRIDS)
  for name in ("num_steps", "num_probes"):
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
  if not 0.0 < cfg.t_eps < cfg.t_max <= 1.0:
    raise ValueError(f"need 0 < t_eps < t_max <= 1, got t_eps={cfg.t_eps}, t_max={cfg.t_max}")
  return cfg


def nfe(cfg: LikelihoodConfig) -> int:
  """Network evaluations (each with its Jacobian-vector products) per example batch."""
  return cfg.num_steps * SOLVERS[cfg.solver]


def ddpm_continuous_limit(schedule):
  """(process, net_time) of a discrete linear DDPM schedule: the VP SDE with b0 = T beta_1, b1 = T beta_T
  and the network time T t - 1. Raises ValueError for other schedules (no closed-form limit here)."""
  from jaxddpm.core.process import make_process  # noqa: PLC0415
  betas = np.asarray(schedule.betas, np.float64)
  T = betas.shape[0]
  if np.asarray(schedule.timesteps).tolist() != list(range(T)) or T < 2 or not np.allclose(
      np.diff(betas), (betas[-1] - betas[0]) / (T - 1), rtol=1e-3, atol=1e-9):
    raise ValueError("the PF-ODE likelihood of the discrete chain needs an un-respaced 'linear' schedule (its "
                     "continuous limit is the VP SDE); use diffusion.schedule='linear' or a continuous process")
  process = make_process("vp", b0=float(T * betas[0]), b1=float(T * betas[-1]))
  return process, lambda t: jnp.asarray(t, jnp.float32) * T - 1.0


def _probes(cfg, key, ids, shape):
  """[K, B, ...] probes, probe k of example i from fold_in(fold_in(key, i), k)."""
  def one(i):
    ki = jax.random.fold_in(key, i)
    def draw(k):
      kk = jax.random.fold_in(ki, k)
      if cfg.probe == "gaussian":
        return jax.random.normal(kk, shape, jnp.float32)
      return jax.random.rademacher(kk, shape, jnp.float32)
    return jax.vmap(draw)(jnp.arange(cfg.num_probes))
  return jnp.swapaxes(jax.vmap(one)(ids), 0, 1)


def ode_logp(model_fn: Callable, process, x, key=None, *, net_time: Callable | None = None, example_ids=None,
             **options) -> dict:
  """log p(x) [B] (nats) by the PF-ODE, see the module docstring. Traceable.

  Args:
    model_fn: (z [B, ...], net_time [B] float32) -> network output of type options["mean_type"].
    process: a continuous `Process` (for DDPM's chain: `ddpm_continuous_limit`).
    x: [B, ...] data (continuous values; dequantise 8-bit data first, see `ode_bpd`).
    key: PRNG key of Hutchinson's probes (unused with divergence="exact").
    net_time: process time -> network time (default process.net_time).
    example_ids: [B] global example indices keying the probes (default arange(B)).
    options: `LikelihoodConfig` fields (mean_type, num_steps, solver, divergence, probe, num_probes,
      t_eps, t_max, grid).
  Returns:
    {"logp" [B], "prior_logp" [B], "delta_logp" [B] (the divergence integral), "z_T" [B, ...], "t_T" (the
    grid's last time, where the prior is evaluated)}.
  """
  cfg = check_config(**options)
  net_time = process.net_time if net_time is None else net_time
  x = jnp.asarray(x, jnp.float32)
  B, shape = x.shape[0], x.shape[1:]
  D = int(np.prod(shape))
  ids = jnp.arange(B, dtype=jnp.uint32) if example_ids is None else jnp.asarray(example_ids, jnp.uint32)
  if cfg.divergence == "exact":
    basis = jnp.broadcast_to(jnp.eye(D, dtype=jnp.float32).reshape((D, 1) + shape), (D, B) + shape)
  else:
    if key is None:
      raise ValueError("ode_logp: divergence='hutchinson' needs a PRNG key for its probes")
    probes = _probes(cfg, key, ids, shape)

  def velocity(z, t):
    p = diffusion.path_point(process, t, z, True)
    out = model_fn(z, jnp.full((B,), net_time(t), jnp.float32)).astype(jnp.float32)
    x0, eps = diffusion.x0_eps_from_output(cfg.mean_type, out, z, p)
    return p.d_alpha * x0 + p.d_sigma * eps

  def rhs(z, t):
    f = lambda zz: velocity(zz, t)
    if cfg.divergence == "exact":
      v, jv = jax.vmap(lambda e: jax.jvp(f, (z,), (e,)), out_axes=(None, 0))(basis)
      div = jnp.einsum("kbk->b", jv.reshape(D, B, D))
    else:
      v, jv = jax.vmap(lambda n: jax.jvp(f, (z,), (n,)), out_axes=(None, 0))(probes)
      div = jnp.mean(jnp.sum((probes * jv).reshape(cfg.num_probes, B, D), axis=-1), axis=0)
    return v, div

  def step(carry, ts):
    z, delta = carry
    t, s = ts
    h = s - t
    if cfg.solver == "heun":
      v1, d1 = rhs(z, t)
      v2, d2 = rhs(z + h * v1, s)
      return (z + 0.5 * h * (v1 + v2), delta + 0.5 * h * (d1 + d2)), None
    v1, d1 = rhs(z, t)
    v2, d2 = rhs(z + 0.5 * h * v1, t + 0.5 * h)
    v3, d3 = rhs(z + 0.5 * h * v2, t + 0.5 * h)
    v4, d4 = rhs(z + h * v3, s)
    return (z + h / 6.0 * (v1 + 2 * v2 + 2 * v3 + v4), delta + h / 6.0 * (d1 + 2 * d2 + 2 * d3 + d4)), None

  grid = time_grid(process, cfg)
  (z_T, delta), _ = jax.lax.scan(step, (x, jnp.zeros((B,), jnp.float32)), (grid[:-1], grid[1:]))
  std = process.prior_std(grid[-1])
  flat = z_T.reshape(B, D)
  prior = -0.5 * jnp.sum(jnp.square(flat / std), axis=-1) - D * (jnp.log(std) + 0.5 * math.log(2 * math.pi))
  return {"logp": prior + delta, "prior_logp": prior, "delta_logp": delta, "z_T": z_T, "t_T": grid[-1]}


def time_grid(process, cfg: LikelihoodConfig) -> jnp.ndarray:
  """[N + 1] float32 times from t_eps up to t_max: uniform in t, or uniform in lambda between lambda(t_eps)
  and lambda(t_max) (clipped to +-LOGSNR_CLIP; where lambda(t_max) is clipped the grid ends before
  t_max, and the prior is taken there)."""
  if cfg.grid == "uniform":
    return jnp.asarray(np.linspace(cfg.t_eps, cfg.t_max, cfg.num_steps + 1), jnp.float32)
  lo = jnp.minimum(process.logsnr(cfg.t_eps), LOGSNR_CLIP)
  hi = jnp.maximum(process.logsnr(cfg.t_max), -LOGSNR_CLIP)
  lam = lo + (hi - lo) * jnp.arange(cfg.num_steps + 1, dtype=jnp.float32) / cfg.num_steps
  t = process.t_from_logsnr(lam)
  t = t.at[0].set(cfg.t_eps)
  return jnp.where(jnp.arange(cfg.num_steps + 1) == cfg.num_steps,
                   jnp.where(process.logsnr(cfg.t_max) >= -LOGSNR_CLIP, cfg.t_max, t), t).astype(jnp.float32)


def dequantize(x, key, example_ids=None):
  """y = (k + u) / 128 - 1 for the 8-bit values k = round((x + 1) 127.5) of x in [-1, 1], u ~ U[0, 1)^D
  drawn per example from fold_in(key, id)."""
  x = jnp.asarray(x, jnp.float32)
  B = x.shape[0]
  ids = jnp.arange(B, dtype=jnp.uint32) if example_ids is None else jnp.asarray(example_ids, jnp.uint32)
  k = jnp.round((x + 1.0) * 127.5)
  u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), x.shape[1:], jnp.float32))(ids)
  return (k + u) / 128.0 - 1.0


def ode_bpd(model_fn: Callable, process, x, key, *, net_time: Callable | None = None, example_ids=None,
            **options) -> dict:
  """Bits/dim of 8-bit data x [B, ...] in [-1, 1] by the PF-ODE with uniform dequantisation:
  bpd = -log p(y) / (D ln 2) + 7 (Song et al. 2021). Returns {"bpd" [B], "logp" [B] (of y, nats), "y"}.
  The dequantisation noise uses fold_in(key, 0), the probes fold_in(key, 1)."""
  y = dequantize(x, jax.random.fold_in(key, 0), example_ids)
  out = ode_logp(model_fn, process, y, jax.random.fold_in(key, 1), net_time=net_time, example_ids=example_ids,
                 **options)
  D = int(np.prod(y.shape[1:]))
  return {"bpd": -out["logp"] / (D * math.log(2.0)) + 7.0, "logp": out["logp"], "y": y}
