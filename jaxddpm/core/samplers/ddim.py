"""DDIM (Song et al. 2021, eq. 12): z_s = alpha_s x_hat + sqrt(sigma_s^2 - c^2) eps_hat + c n, with
c = eta sqrt(var of q(z_s | z_t, x)) (eq. 16). eta = 0 is deterministic. 1 network call per step."""
from __future__ import annotations

import jax.numpy as jnp

from jaxddpm.core import diffusion
from jaxddpm.core.diffusion import extract, p_mean_variance
from jaxddpm.core.samplers.ancestral import _batch_view
from jaxddpm.core.samplers.base import SamplerConfig, Stepper, denoise, init_state, normal
from jaxddpm.core.schedule import Schedule


def check_eta(eta, method):
  import numbers  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not np.isfinite(eta):
    raise ValueError(f"eta must be a finite Python float >= 0, got {eta!r}")
  if eta < 0:
    raise ValueError(f"eta must be >= 0 (DDIM eq. 16), got {eta}")
  if method != "ddim" and eta != 0:
    raise ValueError(f"eta={eta} applies only to method='ddim'; {method} sampling has no eta "
                     "(use method='ddim', eta=1.0 for DDIM's stochastic sampler)")


def ddim_sigma(schedule: Schedule, t, eta: float, x=None):
  """sigma_t(eta) = eta sqrt((1 - alphabar_prev) / (1 - alphabar_t)) sqrt(1 - alphabar_t / alphabar_prev)
  (DDIM eq. 16), i.e. eta sqrt(betatilde_t) of the schedule (alphabar_t / alphabar_prev = 1 - beta_t).

  Shape [B, 1, ..., 1] when x [B, ...] is given, else like t.
  """
  var = schedule.posterior_variance[t] if x is None else extract(schedule.posterior_variance, t, x)
  return eta * jnp.sqrt(var)


def ddim_step(schedule: Schedule, model_output, x_t, t, noise=None, *, eta: float = 0.0,
              mean_type: str = "eps", var_type: str = "fixed_large", clip_denoised: bool = True):
  """One DDIM step from schedule entry t to entry t - 1   (Song et al. 2021, eq. 12):

    x_prev = sqrt(alphabar_prev) x0_hat + sqrt(1 - alphabar_prev - sigma_t^2) eps_hat + sigma_t z,

  with alphabar_prev = ``schedule.alphas_cumprod_prev[t]`` (1 at t = 0, where x_prev = x0_hat),
  sigma_t = `ddim_sigma` (eta = 0: deterministic DDIM; eta = 1: the DDPM posterior variance), x0_hat
  from the network output (clipped to [-1, 1] when clip_denoised) and eps_hat the noise consistent with
  the clipped x0_hat. To jump over timesteps, `respace` the schedule: its entries are the kept steps.

  Args:
    schedule: the (possibly respaced) `Schedule`.
    model_output: [B, ..., C] (or [B, ..., 2C] when var_type is learned; the variance half is ignored).
    x_t: [B, ..., C]; t: int32 [B] (or scalar) schedule indices.
    noise: z like x_t; may be None only when eta == 0.
    eta: >= 0, a Python float.
  Returns:
    (x_prev [B, ..., C] float32, pred_x0 [B, ..., C]).
  """
  check_eta(eta, "ddim")
  if noise is None and eta != 0:
    raise ValueError(f"ddim_step: noise is required when eta != 0 (eta={eta})")
  out = p_mean_variance(schedule, model_output, x_t, t, mean_type=mean_type, var_type=var_type,
                        clip_denoised=clip_denoised)
  x_t = jnp.asarray(x_t, jnp.float32)
  t = jnp.asarray(t)
  # alphabar_prev and 1 - alphabar_prev at entry t - 1, read from the float64-built tables for
  # precision (1 - alphabar_prev computed in float32 loses digits when alphabar_prev is close to 1).
  t_prev = jnp.maximum(t - 1, 0)
  first = _batch_view(t == 0, x_t)
  sqrt_ab_prev = jnp.where(first, 1.0, extract(schedule.sqrt_alphas_cumprod, t_prev, x_t))
  one_minus_ab_prev = jnp.where(first, 0.0, jnp.square(extract(schedule.sqrt_one_minus_alphas_cumprod,
                                                               t_prev, x_t)))
  sigma = ddim_sigma(schedule, t, eta, x_t)
  dir_coef = jnp.sqrt(jnp.maximum(one_minus_ab_prev - jnp.square(sigma), 0.0))
  x_prev = sqrt_ab_prev * out.pred_x0 + dir_coef * out.pred_eps
  if eta != 0:
    x_prev = x_prev + sigma * noise
  return x_prev, out.pred_x0


def make(process, cfg: SamplerConfig) -> Stepper:
  """The DDIM stepper: `ddim_step` on the discrete schedule; on a continuous process
  z_s = alpha_s x_hat + sqrt(sigma_s^2 - c^2) eps_hat + c n, c^2 = eta^2 var(q(z_s | z_t, x))."""
  def step(model_fn, state, t, t_next, key):
    x = state["x"]
    out = model_fn(x, t)
    noise = normal(key, x) if cfg.eta != 0 else None
    if process.is_discrete:
      t_idx = jnp.full((x.shape[0],), t, jnp.int32)
      x_prev, pred_x0 = ddim_step(process, out, x, t_idx, noise, eta=cfg.eta, mean_type=cfg.mean_type,
                                  var_type=cfg.var_type, clip_denoised=cfg.clip_denoised)
    else:
      p_t, p_s = diffusion.path_point(process, t, x, True), diffusion.path_point(process, t_next, x)
      pred_x0, eps = denoise(cfg, out, x, p_t)
      x_prev = p_s.alpha * pred_x0
      if cfg.eta == 0:
        x_prev = x_prev + p_s.sigma * eps
      else:
        c2 = cfg.eta ** 2 * diffusion.posterior(pred_x0, x, p_s, p_t)[1]
        x_prev = x_prev + jnp.sqrt(jnp.maximum(jnp.square(p_s.sigma) - c2, 0.0)) * eps + jnp.sqrt(c2) * noise
    return {"x": x_prev, "pred_x0": pred_x0}

  return Stepper(init_state, step, 1)
