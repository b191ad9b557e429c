"""Samplers of the reverse-time SDE (Song et al. 2021, "Score-based generative modeling through SDEs"),
for continuous processes dz = f(t) z dt + g(t) dw (`Process.sde`), whose reverse is

  dz = [f(t) z - g(t)^2 score(z, t)] dt + g(t) dw_bar,   score = -eps_hat / sigma_t   (eq. 6).

euler_maruyama: from t to s < t (dt = t - s),
  z_s = z_t - dt [f(t) z_t - g(t)^2 score] + g(t) sqrt(dt) n                   (1 network call per step).
pc (predictor-corrector, Algorithms 4-5 / score_sde's pc_sampler): at each grid time t, M Langevin
  corrector steps at target signal-to-noise ratio r,
    z <- z + e score(z, t) + sqrt(2 e) n,   e = 2 a (r ||n|| / ||score||)^2,
  with a = alpha_{t|s}^2 = (alpha_s / alpha_t)^-2 (1 - beta_i of the VP chain, 1 for VE), then the
  reverse-diffusion predictor (eq. 46 with the transition kernel of the step, alpha_{t|s} = alpha_t /
  alpha_s and sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2):
    z_s = (2 - alpha_{t|s}) z_t + sigma_{t|s}^2 score + sigma_{t|s} n           (1 + M calls per step).
Norms are per sample (score_sde averages them over the batch; per sample keeps results independent of
the batch split). The last step of a grid (to t = 0) adds no noise (score_sde's noise removal). The
SDE coefficients are evaluated at min(t, 1 - T_CAP): f and g are infinite at t = 1 on paths with
alpha_1 = 0 (flow), and the cap changes the VP/VE coefficients by under 0.2% on the first step only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxddpm.core import diffusion
from jaxddpm.core.samplers.base import SamplerConfig, Stepper, denoise, init_state, normal, option

T_CAP = 1e-3
PC_OPTIONS = {"snr": 0.16, "corrector_steps": 1}  # score_sde's CIFAR-10 settings


def _fold(key, i):
  return jax.vmap(lambda k: jax.random.fold_in(k, i))(key)


def _score(process, cfg, model_fn, z, t):
  p = diffusion.path_point(process, t, z, True)
  x0, eps = denoise(cfg, model_fn(z, t), z, p)
  return x0, -eps / p.sigma


def _last(t_next):
  return jnp.where(t_next <= 0, 0.0, 1.0)


def make_euler_maruyama(process, cfg: SamplerConfig) -> Stepper:
  """Euler-Maruyama on the reverse SDE."""
  def step(model_fn, state, t, t_next, key):
    z = state["x"]
    x0, score = _score(process, cfg, model_fn, z, t)
    f, g = process.sde(jnp.minimum(t, 1.0 - T_CAP))
    dt = t - t_next
    z_s = z - dt * (f * z - g * g * score) + _last(t_next) * g * jnp.sqrt(dt) * normal(key, z)
    return {"x": z_s, "pred_x0": x0}

  return Stepper(init_state, step, 1)


def langevin(process, cfg, model_fn, z, t, a, key, snr: float, steps: int):
  """`steps` Langevin corrector steps at time t (Song et al. 2021, Algorithm 5): returns z."""
  def one(j, z):
    _, score = _score(process, cfg, model_fn, z, t)
    n = normal(_fold(key, j), z)
    axes = tuple(range(1, z.ndim))
    norm = lambda a: jnp.sqrt(jnp.sum(jnp.square(a), axis=axes, keepdims=True))
    g = norm(score)
    e = jnp.where(g > 0, 2.0 * a * jnp.square(snr * norm(n) / jnp.where(g > 0, g, 1.0)), 0.0)
    return z + e * score + jnp.sqrt(2.0 * e) * n
  return jax.lax.fori_loop(0, steps, one, z)


def make_pc(process, cfg: SamplerConfig) -> Stepper:
  """Predictor-corrector: Langevin corrector, then the reverse-diffusion predictor; cfg.options may set
  PC_OPTIONS."""
  snr, steps = (option(cfg, k, v) for k, v in PC_OPTIONS.items())

  def step(model_fn, state, t, t_next, key):
    z = state["x"]
    tc, sc = jnp.minimum(t, 1.0 - T_CAP), jnp.minimum(t_next, 1.0 - T_CAP)
    (alpha_t, sigma_t), (alpha_s, sigma_s) = process.alpha_sigma(tc), process.alpha_sigma(sc)
    a_ts = alpha_t / alpha_s
    var_ts = jnp.maximum(sigma_t ** 2 - a_ts ** 2 * sigma_s ** 2, 0.0)
    z = langevin(process, cfg, model_fn, z, t, a_ts ** 2, _fold(key, 1), snr, steps)
    x0, score = _score(process, cfg, model_fn, z, t)
    z_s = (2.0 - a_ts) * z + var_ts * score + _last(t_next) * jnp.sqrt(var_ts) * normal(_fold(key, 0), z)
    return {"x": z_s, "pred_x0": x0}

  return Stepper(init_state, step, 1 + steps)
