"""Ancestral sampling: z_s ~ q(z_s | z_t, x = x_hat) (DDPM, Ho et al. 2020, Algorithm 2; any process
through the general posterior of Kingma et al. 2021). 1 network call per step."""
from __future__ import annotations

import jax.numpy as jnp

from jaxddpm.core import diffusion
from jaxddpm.core.diffusion import p_mean_variance
from jaxddpm.core.samplers.base import SamplerConfig, Stepper, denoise, init_state, normal
from jaxddpm.core.schedule import Schedule


def _batch_view(a, x):
  """a (scalar or [B]) reshaped to broadcast against x [B, ...]."""
  a = jnp.asarray(a)
  return a.reshape(a.shape + (1,) * (jnp.ndim(x) - a.ndim))


def p_sample(schedule: Schedule, model_output, x_t, t, noise, *, mean_type: str = "eps",
             var_type: str = "fixed_large", clip_denoised: bool = True):
  """One ancestral step x_t -> x_{t-1} ~ p_theta(x_{t-1} | x_t)   (DDPM Algorithm 2, line 4).

    x_{t-1} = mu_theta(x_t, t) + sigma_t z,   z ~ N(0, I),  and no noise at t = 1 (index 0),

  with mu_theta and sigma_t^2 from `p_mean_variance` for the given mean_type / var_type.

  Args:
    schedule: the (possibly respaced) `Schedule`; t indexes its entries.
    model_output: the network output at (x_t, t): [B, ..., C], or [B, ..., 2C] for learned variances.
    x_t: [B, ..., C].
    t: int32 [B] (or a scalar) schedule indices.
    noise: z, like x_t.
  Returns:
    (x_{t-1} [B, ..., C] float32, pred_x0 [B, ..., C]).
  """
  out = p_mean_variance(schedule, model_output, x_t, t, mean_type=mean_type, var_type=var_type,
                        clip_denoised=clip_denoised)
  nonzero = _batch_view(jnp.asarray(t) != 0, x_t).astype(jnp.float32)
  x_prev = out.mean + nonzero * jnp.exp(0.5 * out.log_variance) * noise
  return x_prev, out.pred_x0


def make(process, cfg: SamplerConfig) -> Stepper:
  """The ancestral stepper. Discrete schedule: `p_sample` (every mean and variance type). Continuous
  process: z_s = mu + sqrt(var) n with (mu, var) = `diffusion.posterior`(x_hat, z_t; s, t), i.e. the
  DDPM reverse step with the posterior ("fixed_small") variance, exact at s = 0 (z_0 = alpha_0 x_hat)."""
  def step(model_fn, state, t, t_next, key):
    x = state["x"]
    out = model_fn(x, t)
    noise = normal(key, x)
    if process.is_discrete:
      t_idx = jnp.full((x.shape[0],), t, jnp.int32)
      x_prev, pred_x0 = p_sample(process, out, x, t_idx, noise, mean_type=cfg.mean_type,
                                 var_type=cfg.var_type, clip_denoised=cfg.clip_denoised)
    else:
      p_t, p_s = diffusion.path_point(process, t, x, True), diffusion.path_point(process, t_next, x)
      pred_x0, _ = denoise(cfg, out, x, p_t)
      mean, var = diffusion.posterior(pred_x0, x, p_s, p_t)
      x_prev = mean + jnp.sqrt(var) * noise
    return {"x": x_prev, "pred_x0": pred_x0}

  return Stepper(init_state, step, 1)
