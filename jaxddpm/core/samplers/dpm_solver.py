"""DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++", Algorithm 2 and its third-order update): the
probability-flow ODE solved in the half log-SNR lambda = log(alpha / sigma) with the data prediction x_hat.

From t to s with h = lambda_s - lambda_t and the last denoised estimates m_0 (at t), m_1, m_2 (at the two
previous grid times, with steps h_0 = lambda_t - lambda_{t_1}, h_1 = lambda_{t_1} - lambda_{t_2}):

  order 1 (DDIM):  z_s = (sigma_s / sigma_t) z_t - alpha_s phi_1 m_0,           phi_1 = expm1(-h);
  order 2 (2M):    D = m_0 + (m_0 - m_1) / (2 r_0),  r_0 = h_0 / h,
                   z_s = (sigma_s / sigma_t) z_t - alpha_s phi_1 D;
  order 3 (3M):    D1_0 = (m_0 - m_1) / r_0, D1_1 = (m_1 - m_2) / r_1 (r_1 = h_1 / h),
                   D1 = D1_0 + r_0 (D1_0 - D1_1) / (r_0 + r_1),  D2 = (D1_0 - D1_1) / (r_0 + r_1),
                   z_s = (sigma_s / sigma_t) z_t - alpha_s phi_1 m_0 + alpha_s phi_2 D1 - alpha_s phi_3 D2,
                   phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2.

The order rises with the history (the first step is first order, the second at most second order) and
falls at the end as DPM-Solver's lower_order_final does: step n of N (from 0) uses order
min(order, n + 1, N - n), so the last step (to the data, sigma = 0, where h = +inf and z_s = alpha_s m_0)
is first order and 3M's second-to-last second order. The history (m_1, m_2, h_0, h_1 and the number of steps taken) rides in the
scan-carried state. Only (alpha, sigma) at the grid times are used, so it runs on any process and on the
discrete DDPM chain (whose last entry -1 is the data). 1 network call per step; deterministic.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp

from jaxddpm.core import diffusion
from jaxddpm.core.samplers.base import SamplerConfig, Stepper, denoise, init_state, option


def half_logsnr(p: diffusion.PathPoint):
  """lambda = log(alpha / sigma) (+inf at sigma = 0)."""
  return jnp.log(p.alpha) - jnp.log(p.sigma)


def denoise_output(process, cfg: SamplerConfig, out, z, p: diffusion.PathPoint):
  """(x_hat, eps_hat) of a network output on any process: on the discrete chain the variance channels of
  a learned-variance output are dropped first (the ODE solvers use only the denoiser)."""
  if process.is_discrete:
    out, _ = diffusion.split_model_output(out, z, cfg.var_type)
  return denoise(cfg, out, z, p)


def is_final(process, t_next):
  """True at the grid's last step, to the data: t_next = 0 (continuous) or entry -1 (discrete chain)."""
  return t_next < 0 if process.is_discrete else t_next <= 0


def _init(x_T):
  state = init_state(x_T)
  zero = jnp.zeros((), jnp.float32)
  return dict(state, m1=jnp.zeros_like(state["x"]), m2=jnp.zeros_like(state["x"]), h0=zero, h1=zero,
              n=jnp.zeros((), jnp.int32))


def make(process, cfg: SamplerConfig, order: int = 2) -> Stepper:
  """The DPM-Solver++ stepper of the given order (2: "dpm_solver_pp", 3: "dpm_solver_pp_3m")."""
  num_steps = option(cfg, "num_steps", 10 ** 9)  # set by the engine: the grid's N
  def step(model_fn, state, t, t_next, key):
    del key
    z = state["x"]
    p_t, p_s = diffusion.path_point(process, t, z, not process.is_discrete), diffusion.path_point(process, t_next, z)
    m0, _ = denoise_output(process, cfg, model_fn(z, t), z, p_t)
    final = is_final(process, t_next)
    h = jnp.reshape(half_logsnr(p_s) - half_logsnr(p_t), ())  # grid times are scalars
    safe_h = jnp.where(final, 1.0, h)
    phi_1 = jnp.where(final, -1.0, jnp.expm1(-safe_h))
    ratio = jnp.where(final, 0.0, p_s.sigma / p_t.sigma)
    z_1 = ratio * z - p_s.alpha * phi_1 * m0
    n = state["n"]
    r0 = state["h0"] / safe_h
    safe_r0 = jnp.where(n >= 1, r0, 1.0)
    z_2 = ratio * z - p_s.alpha * phi_1 * (m0 + (m0 - state["m1"]) / (2.0 * safe_r0))
    use = jnp.where(final, 1, jnp.minimum(jnp.minimum(n + 1, order), num_steps - n))
    z_s = jnp.where(use >= 2, z_2, z_1)
    if order >= 3:
      r1 = state["h1"] / safe_h
      ok = n >= 2
      safe_r0, safe_r1 = jnp.where(ok, r0, 1.0), jnp.where(ok, r1, 1.0)
      d10, d11 = (m0 - state["m1"]) / safe_r0, (state["m1"] - state["m2"]) / safe_r1
      d1 = d10 + safe_r0 * (d10 - d11) / (safe_r0 + safe_r1)
      d2 = (d10 - d11) / (safe_r0 + safe_r1)
      phi_2 = phi_1 / safe_h + 1.0
      phi_3 = phi_2 / safe_h - 0.5
      z_3 = ratio * z - p_s.alpha * (phi_1 * m0 - phi_2 * d1 + phi_3 * d2)
      z_s = jnp.where(use >= 3, z_3, z_s)
    return dict(state, x=z_s, pred_x0=m0, m1=m0, m2=state["m1"], h0=h, h1=state["h0"], n=n + 1)

  return Stepper(_init, step, 1)


make_3m = functools.partial(make, order=3)
