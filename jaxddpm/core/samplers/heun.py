"""EDM's second-order sampler (Karras et al. 2022, Algorithms 1-2) on the probability-flow ODE of any
process, in EDM's scaled variables x~ = z / alpha and sigma~ = sigma / alpha = e^{-lambda/2}, where the
ODE reads d x~ / d sigma~ = eps_hat (EDM eq. 4 with s(t) = alpha_t, sigma(t) = sigma~_t):

  churn (Alg. 2, lines 4-6, continuous processes only): gamma = min(S_churn / N, sqrt(2) - 1) when
    S_tmin <= sigma~_t <= S_tmax (else 0), sigma^ = (1 + gamma) sigma~_t, t^ its process time,
    x~^ = x~_t + sqrt(sigma^^2 - sigma~_t^2) S_noise n;
  Euler (line 7-8): d = eps_hat(x~^, t^), x~' = x~^ + (sigma~_s - sigma^) d     (= DDIM from t^ to s);
  correction (lines 9-11) when sigma_s != 0: d' = eps_hat(x~', s), x~_s = x~^ + (sigma~_s - sigma^)(d + d')/2.

The last step to the data (sigma_s = 0) is the Euler step (EDM: "if sigma_{i+1} != 0"); so is a step
from alpha_t = 0 (sigma~ = infinity, the flow path at t = 1), where the Euler step z_s = alpha_s x_hat +
sigma_s eps_hat is still defined. The correction's network call is skipped there (lax.cond), so N steps
ending at the data cost 2N - 1 calls. Without churn it is deterministic and also runs on the discrete
DDPM chain (it evaluates the network only at grid times).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxddpm.core import diffusion
from jaxddpm.core.samplers.base import SamplerConfig, Stepper, init_state, normal, option
from jaxddpm.core.samplers.dpm_solver import denoise_output

# EDM's stochasticity parameters (Alg. 2) and their defaults: no churn
OPTIONS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}


def make(process, cfg: SamplerConfig) -> Stepper:
  """The Heun stepper; cfg.options may set OPTIONS (and carries ("num_steps", N) from the engine)."""
  s_churn, s_tmin, s_tmax, s_noise = (option(cfg, k, v) for k, v in OPTIONS.items())
  num_steps = option(cfg, "num_steps", 1)
  churn = s_churn > 0
  if churn and process.is_discrete:
    raise ValueError("heun: s_churn > 0 needs a continuous process (the churned time is off the discrete grid)")
  gamma_max = min(s_churn / num_steps, math.sqrt(2.0) - 1.0)
  with_d = not process.is_discrete

  def eps_at(model_fn, z, t):
    p = diffusion.path_point(process, t, z, with_d)
    return denoise_output(process, cfg, model_fn(z, t), z, p)

  def step(model_fn, state, t, t_next, key):
    z = state["x"]
    p_t = diffusion.path_point(process, t, z)
    p_s = diffusion.path_point(process, t_next, z)
    if churn:
      safe_alpha = jnp.where(p_t.alpha > 0, p_t.alpha, 1.0)
      sig = p_t.sigma / safe_alpha
      gamma = jnp.where((sig >= s_tmin) & (sig <= s_tmax) & (p_t.alpha > 0), gamma_max, 0.0)
      sig_hat = sig * (1.0 + gamma)
      t = jnp.where(jnp.reshape(gamma, ()) > 0, process.t_from_logsnr(-2.0 * jnp.log(jnp.reshape(sig_hat, ()))), t)
      p_hat = diffusion.path_point(process, t, z)
      x_tilde = z / safe_alpha + jnp.sqrt(jnp.maximum(sig_hat ** 2 - sig ** 2, 0.0)) * s_noise * normal(key, z)
      z = jnp.where(gamma > 0, p_hat.alpha * x_tilde, z)
      p_t = p_hat
    x0, eps = eps_at(model_fn, z, t)
    z_euler = p_s.alpha * x0 + p_s.sigma * eps
    correct = jnp.all(p_s.sigma > 0) & jnp.all(p_t.alpha > 0)

    def heun(_):
      _, eps_next = eps_at(model_fn, z_euler, t_next)
      safe_alpha = jnp.where(p_t.alpha > 0, p_t.alpha, 1.0)
      sig_t, sig_s = p_t.sigma / safe_alpha, p_s.sigma / p_s.alpha
      return p_s.alpha * (z / safe_alpha + (sig_s - sig_t) * 0.5 * (eps + eps_next))

    z_s = jax.lax.cond(correct, heun, lambda _: z_euler, None)
    return {"x": z_s, "pred_x0": x0}

  return Stepper(init_state, step, 2, final_nfe=1)
