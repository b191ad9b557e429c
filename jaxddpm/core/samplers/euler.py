"""Euler's method on the probability-flow ODE in the process's own time (Song et al. 2021, eq. 13):

  dz/dt = f(t) z - g(t)^2 / 2 * score = alpha'_t x_hat + sigma'_t eps_hat   (Gao et al. 2024),
  z_s = z_t + (s - t) (alpha'_t x_hat + sigma'_t eps_hat).

On the flow path (alpha = 1 - t, sigma = t) this is exactly the DDIM step. 1 network call per step.
Continuous processes only (the discrete schedule has no time derivatives).
"""
from __future__ import annotations

from jaxddpm.core import diffusion
from jaxddpm.core.samplers.base import SamplerConfig, Stepper, denoise, init_state


def make(process, cfg: SamplerConfig) -> Stepper:
  """The Euler PF-ODE stepper (deterministic: the key is unused)."""
  def step(model_fn, state, t, t_next, key):
    del key
    x = state["x"]
    p_t = diffusion.path_point(process, t, x, True)
    pred_x0, eps = denoise(cfg, model_fn(x, t), x, p_t)
    velocity = p_t.d_alpha * pred_x0 + p_t.d_sigma * eps
    return {"x": x + (t_next - t) * velocity, "pred_x0": pred_x0}

  return Stepper(init_state, step, 1)
