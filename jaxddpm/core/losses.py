"""Likelihood terms and training losses (floor 1: imports only jax and numpy).

DDPM (Ho et al. 2020) eq. 5 bound L = L_T + sum_{t>1} L_{t-1} + L_0 and eq. 14 L_simple; Improved DDPM
(Nichol & Dhariwal 2021) L_hybrid; Min-SNR-gamma (Hang et al. 2023) and P2 (Choi et al. 2022) weightings.
Bits/dim terms are per-example means over all non-batch dimensions divided by log 2.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from jaxddpm.core import diffusion
from jaxddpm.core.diffusion import MEAN_TYPES, VAR_TYPES, check_choice
from jaxddpm.core.schedule import Schedule

LOSS_TYPES = ("mse", "kl", "hybrid")
WEIGHTINGS = ("none", "min_snr", "p2")
T_SAMPLINGS = ("uniform", "antithetic")


def mean_flat(x: jnp.ndarray) -> jnp.ndarray:
  """Mean over all non-batch dimensions: [B, ...] -> [B]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise in nats (broadcasting):

  0.5 (-1 + logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^(-logvar2)).
  """
  try:
    jnp.broadcast_shapes(*(jnp.shape(a) for a in (mean1, logvar1, mean2, logvar2)))
  except ValueError:
    raise ValueError("normal_kl: shapes do not broadcast: "
                     f"{[jnp.shape(a) for a in (mean1, logvar1, mean2, logvar2)]}") from None
  # -1 + e^d written as expm1(d): exactly 0 for equal Gaussians, no cancellation when they are close.
  return 0.5 * (logvar2 - logvar1 + jnp.expm1(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """log p(x) for 8-bit data scaled to [-1, 1] under N(means, e^(2 log_scales)) discretized into 256
  bins of width 2/255 (DDPM eq. 13), the two edge bins open to -inf / +inf. Elementwise, in nats.

  log p = log[Phi((x + 1/255 - mu)/sigma) - Phi((x - 1/255 - mu)/sigma)] for interior bins,
  log Phi((x + 1/255 - mu)/sigma) at x = -1, log(1 - Phi((x - 1/255 - mu)/sigma)) at x = 1.
  """
  try:
    shape = jnp.broadcast_shapes(jnp.shape(x), jnp.shape(means), jnp.shape(log_scales))
  except ValueError:
    raise ValueError("discretized_gaussian_log_likelihood: shapes of x, means, log_scales do not broadcast: "
                     f"{jnp.shape(x)}, {jnp.shape(means)}, {jnp.shape(log_scales)}") from None
  del shape
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  plus_in = inv_stdv * (centered + 1.0 / 255.0)
  min_in = inv_stdv * (centered - 1.0 / 255.0)
  log_cdf_plus = jax.scipy.special.log_ndtr(plus_in)
  log_one_minus_cdf_min = jax.scipy.special.log_ndtr(-min_in)
  # log(Phi(b) - Phi(a)) in log space, on the tail side where both CDFs are small (above the mean,
  # Phi(b) - Phi(a) = Phi(-a) - Phi(-b)): exact in both tails, no float32 cancellation near 1 and no floor.
  upper = centered > 0
  log_hi = jax.scipy.special.log_ndtr(jnp.where(upper, -min_in, plus_in))
  log_lo = jax.scipy.special.log_ndtr(jnp.where(upper, -plus_in, min_in))
  d = log_lo - log_hi  # < 0
  log_delta = log_hi + jnp.where(d > -0.693, jnp.log(-jnp.expm1(d)), jnp.log1p(-jnp.exp(d)))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def prior_bpd(s: Schedule, x0: jnp.ndarray) -> jnp.ndarray:
  """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim: x0 [B, ...] -> [B]."""
  t = jnp.full((x0.shape[0],), s.num_timesteps - 1, dtype=jnp.int32)
  mean, _, log_var = diffusion.q_mean_variance(s, x0, t)
  return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / math.log(2.0)


def vb_terms_bpd(s: Schedule, model_output, x0, x_t, t, *, mean_type: str = "eps",
                 var_type: str = "fixed_large", clip_denoised: bool = False):
  """The bound's term at t in bits/dim: L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 1,
  and the decoder L_0 = -log p(x_0 | x_1) (discretized Gaussian) at t = 1 (index 0).

  model_output: [B, ..., C or 2C]; x0, x_t: [B, ..., C]; t int32 [B]. Returns (bpd [B], PMeanVariance).
  """
  true_mean, _, true_log_var = diffusion.q_posterior_mean_variance(s, x0, x_t, t)
  out = diffusion.p_mean_variance(s, model_output, x_t, t, mean_type=mean_type, var_type=var_type,
                                  clip_denoised=clip_denoised)
  kl = mean_flat(normal_kl(true_mean, true_log_var, out.mean, out.log_variance)) / math.log(2.0)
  decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
      x0, out.mean, 0.5 * jnp.broadcast_to(out.log_variance, x0.shape))) / math.log(2.0)
  return jnp.where(jnp.asarray(t) == 0, decoder_nll, kl), out


def snr(s: Schedule, t) -> jnp.ndarray:
  """Signal-to-noise ratio SNR(t) = alphabar_t / (1 - alphabar_t): t [B] -> [B]."""
  # From the float64-derived square roots: 1 - alphabar_t in float32 would cancel at small t.
  return jnp.square(s.sqrt_alphas_cumprod[t] / s.sqrt_one_minus_alphas_cumprod[t])


def loss_weight(s: Schedule, t, *, mean_type: str, weighting: str = "none", min_snr_gamma: float = 5.0,
                p2_gamma: float = 1.0, p2_k: float = 1.0) -> jnp.ndarray:
  """Per-example weight w(t) [B] that multiplies the MSE of the network's own target.

  "none": 1 (L_simple, DDPM eq. 14, for any target). The others are defined on the eps-MSE and carried
  over to the target's MSE with |eps - eps_hat|^2 = c(t) |target - target_hat|^2, c = 1 (eps),
  SNR (x0), SNR / (1 + SNR) (v):
  "min_snr": w_eps = min(SNR, gamma) / SNR (Hang et al. 2023);
  "p2": w_eps = 1 / (k + SNR)^gamma (Choi et al. 2022).
  """
  check_choice("mean_type", mean_type, MEAN_TYPES)
  check_choice("weighting", weighting, WEIGHTINGS)
  if weighting == "none":
    return jnp.ones(jnp.shape(t), jnp.float32)
  if mean_type == "x_prev":
    raise ValueError(f"weighting={weighting!r} is defined for mean_type in ('eps', 'x0', 'v'), not 'x_prev'")
  r = snr(s, t)
  w_eps = jnp.minimum(r, min_snr_gamma) / r if weighting == "min_snr" else (p2_k + r) ** (-p2_gamma)
  c = {"eps": jnp.ones_like(r), "x0": r, "v": r / (1.0 + r)}[mean_type]
  return w_eps * c


def sample_timesteps(key, batch_size: int, num_timesteps: int, method: str = "uniform") -> jnp.ndarray:
  """t ~ Uniform{0, ..., T-1}, int32 [batch_size]. "antithetic" pairs t with T-1-t (halves the variance of
  the loss estimate for losses monotone in t); for odd batch sizes the last draw is unpaired."""
  check_choice("method", method, T_SAMPLINGS)
  for name, value, low in (("num_timesteps", num_timesteps, 1), ("batch_size", batch_size, 0)):
    if not hasattr(value, "__index__") or isinstance(value, bool) or value < low:
      raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
  if method == "uniform":
    return jax.random.randint(key, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
  half = jax.random.randint(key, ((batch_size + 1) // 2,), 0, num_timesteps, dtype=jnp.int32)
  return jnp.concatenate([half, num_timesteps - 1 - half])[:batch_size]


def training_losses(s: Schedule, model_fn: Callable, x0, t, noise, *, mean_type: str = "eps",
                    var_type: str = "fixed_large", loss_type: str = "mse", weighting: str = "none",
                    min_snr_gamma: float = 5.0, p2_gamma: float = 1.0, p2_k: float = 1.0) -> dict:
  """Per-example training losses at timesteps t (x0, noise: [B, H, W, C]; t int32 [B]).

  x_t = q_sample(x0, t, noise); the network sees (x_t, schedule.timesteps[t]).
  "mse": w(t) |target - f(x_t, t)|^2 averaged over dims (L_simple, DDPM eq. 14; target eps, x0, v, or
    the posterior mean for x_prev). Needs a fixed variance.
  "kl": T * L_{t-1}(theta) in bits/dim, an unbiased estimate (over uniform t) of the bound minus L_T.
  "hybrid" (Improved DDPM): the mse term plus T/1000 * L_{t-1} with the mean stop-gradiented, so only the
    learned variance gets the bound's gradient (lambda = 0.001 with the bound summed over T steps).
  Returns {"loss", "mse", "vb"} each [B] (mse / vb are zeros when unused).
  """
  check_choice("mean_type", mean_type, MEAN_TYPES)
  check_choice("var_type", var_type, VAR_TYPES)
  check_choice("loss_type", loss_type, LOSS_TYPES)
  check_choice("weighting", weighting, WEIGHTINGS)
  learned = var_type in ("learned", "learned_range")
  if loss_type == "mse" and learned:
    raise ValueError(f"loss_type='mse' gives a learned variance (var_type={var_type!r}) no gradient; use "
                     "loss_type='hybrid' or 'kl', or a fixed var_type")
  if loss_type == "hybrid" and not learned:
    raise ValueError(f"loss_type='hybrid' needs var_type in ('learned', 'learned_range'), got {var_type!r}")
  x_t = diffusion.q_sample(s, x0, t, noise)
  model_output = model_fn(x_t, s.timesteps[t])
  mean_out, var_out = diffusion.split_model_output(model_output, x_t, var_type)
  T = s.num_timesteps
  zeros = jnp.zeros((x0.shape[0],), jnp.float32)
  if loss_type == "kl":
    vb, _ = vb_terms_bpd(s, model_output, x0, x_t, t, mean_type=mean_type, var_type=var_type)
    vb = vb * T
    return {"loss": vb, "mse": zeros, "vb": vb}
  target = {"eps": lambda: noise, "x0": lambda: x0,
            "v": lambda: diffusion.v_from_eps_x0(s, x0, t, noise),
            "x_prev": lambda: diffusion.q_posterior_mean_variance(s, x0, x_t, t)[0]}[mean_type]()
  w = loss_weight(s, t, mean_type=mean_type, weighting=weighting, min_snr_gamma=min_snr_gamma,
                  p2_gamma=p2_gamma, p2_k=p2_k)
  mse = w * mean_flat(jnp.square(target - mean_out.astype(jnp.float32)))
  if loss_type == "mse":
    return {"loss": mse, "mse": mse, "vb": zeros}
  frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_out], axis=-1)
  vb, _ = vb_terms_bpd(s, frozen, x0, x_t, t, mean_type=mean_type, var_type=var_type)
  vb = vb * (T / 1000.0)
  return {"loss": mse + vb, "mse": mse, "vb": vb}


# ------------------------------------------------------------ continuous time (any Process)
CONTINUOUS_T_SAMPLINGS = ("uniform", "antithetic", "lognormal", "logit_normal")
T_EPS = 1e-5  # t ~ U(T_EPS, 1): score_sde's training eps (keeps sigma_t > 0 and lambda_t finite)
EDM_P_MEAN, EDM_P_STD, EDM_SIGMA_DATA = -1.2, 1.2, 0.5


def sample_t(process, key, batch_size: int, method: str = "uniform", t_eps: float = T_EPS) -> jnp.ndarray:
  """Training times t in [t_eps, 1), float32 [batch_size]:
  uniform: U(t_eps, 1) (score_sde, flow matching); antithetic: t paired with 1 + t_eps - t;
  lognormal: EDM's ln sigma ~ N(-1.2, 1.2^2) with sigma = e^{-lambda/2}, mapped to t by the inverse
    log-SNR (Karras et al. 2022, Table 1);
  logit_normal: t = sigmoid(n), n ~ N(0, 1) (Esser et al. 2024, rectified-flow transformers)."""
  check_choice("t_sampling", method, CONTINUOUS_T_SAMPLINGS)
  if method == "uniform":
    t = jax.random.uniform(key, (batch_size,), jnp.float32, t_eps, 1.0)
  elif method == "antithetic":
    half = jax.random.uniform(key, ((batch_size + 1) // 2,), jnp.float32, t_eps, 1.0)
    t = jnp.concatenate([half, 1.0 + t_eps - half])[:batch_size]
  elif method == "lognormal":
    log_sigma = EDM_P_MEAN + EDM_P_STD * jax.random.normal(key, (batch_size,), jnp.float32)
    t = process.t_from_logsnr(-2.0 * log_sigma)
  else:
    t = jax.nn.sigmoid(jax.random.normal(key, (batch_size,), jnp.float32))
  # below 1: the flow path's alpha_1 = 0 would make the weightings divide by zero
  return jnp.clip(t, t_eps, jnp.nextafter(jnp.float32(1.0), jnp.float32(0.0)))


def output_mse_factor(output: str, lam, p: diffusion.PathPoint):
  """c with |out - out_hat|^2 = c |eps - eps_hat|^2 for the same denoiser error (pointwise):
  eps 1, x0 e^{-lambda}, v alpha^2 (e^{-lambda} + 1)^2, u (sigma' - alpha' sigma / alpha)^2
  (= (e^{-lambda/2} + 1)^2 on the flow path), score 1 / sigma^2."""
  check_choice("output", output, diffusion.OUTPUTS)
  if output == "eps":
    return jnp.ones_like(lam)
  if output == "x0":
    return jnp.exp(-lam)
  if output == "v":
    return jnp.square(p.alpha * (jnp.exp(-lam) + 1.0))
  if output == "u":
    return jnp.square(p.d_sigma - p.d_alpha * p.sigma / p.alpha)
  return 1.0 / jnp.square(p.sigma)


def _w_min_snr(lam, p, kw):
  return jnp.minimum(jnp.exp(lam), kw["min_snr_gamma"]) * jnp.exp(-lam)


def _w_p2(lam, p, kw):
  return (kw["p2_k"] + jnp.exp(lam)) ** (-kw["p2_gamma"])


def _w_edm(lam, p, kw):
  return (jnp.exp(-lam) + EDM_SIGMA_DATA ** 2) / EDM_SIGMA_DATA ** 2


# w(lambda) of the eps-MSE (Kingma & Gao 2023, Table 1). "none" is the MSE of the network's own output
# (w = output_mse_factor): L_simple for eps, flow matching for u, v-MSE for v; "eps", "x0", "v", "flow" give
# the MSE of that quantity whatever the output (flow: the velocity u = alpha' x + sigma' eps).
CONTINUOUS_WEIGHTINGS = {
    "none": None,
    "eps": lambda lam, p, kw: output_mse_factor("eps", lam, p),
    "x0": lambda lam, p, kw: output_mse_factor("x0", lam, p),
    "v": lambda lam, p, kw: output_mse_factor("v", lam, p),
    "flow": lambda lam, p, kw: output_mse_factor("u", lam, p),
    "min_snr": _w_min_snr,       # Hang et al. 2023: min(SNR, gamma) / SNR
    "p2": _w_p2,                 # Choi et al. 2022: 1 / (k + SNR)^gamma
    "edm": _w_edm,               # Karras et al. 2022: (sigma^2 + sigma_d^2) / sigma_d^2, sigma = e^{-lambda/2}
}


def continuous_losses(process, model_fn: Callable, x0, t, noise, *, output: str = "eps",
                      weighting: str = "none", min_snr_gamma: float = 5.0, p2_gamma: float = 1.0,
                      p2_k: float = 1.0) -> dict:
  """Per-example denoising loss on a continuous process at float times t [B] (x0, noise [B, ...]):

    z_t = alpha_t x + sigma_t eps,  out = f(z_t, net_time(t)),
    loss = w(lambda_t) |eps - eps_hat|^2 = w(lambda_t) / c(lambda_t) |target - out|^2,

  with target the output type's value for (x, eps), c = `output_mse_factor` and w from
  CONTINUOUS_WEIGHTINGS (means over the non-batch dims). Returns {"loss", "mse", "vb"} each [B]
  ("mse": the output's own MSE, "vb": zeros).
  """
  check_choice("output", output, diffusion.OUTPUTS)
  check_choice("weighting", weighting, tuple(CONTINUOUS_WEIGHTINGS))
  p = diffusion.path_point(process, t, x0, derivatives=True)
  z = diffusion.q_sample_at(p, x0, noise)
  out = model_fn(z, process.net_time(t)).astype(jnp.float32)
  if out.shape != x0.shape:
    raise ValueError(f"model output has shape {out.shape}; a continuous process needs one like x0 {x0.shape}")
  target = diffusion.output_from_x0_eps(output, x0, noise, p)
  mse = mean_flat(jnp.square(target - out))
  if weighting == "none":
    loss = mse
  else:
    lam = process.logsnr(t)
    flat = diffusion.PathPoint(*(None if a is None else a.reshape(lam.shape) for a in p))
    kw = dict(min_snr_gamma=min_snr_gamma, p2_gamma=p2_gamma, p2_k=p2_k)
    loss = CONTINUOUS_WEIGHTINGS[weighting](lam, flat, kw) / output_mse_factor(output, lam, flat) * mse
  return {"loss": loss, "mse": mse, "vb": jnp.zeros_like(mse)}


# ------------------------------------------------------------ the train step's seam: either kind of process
def sample_time(process, key, batch_size: int, method: str = "uniform") -> jnp.ndarray:
  """Training times: int32 `sample_timesteps` on the discrete chain, float32 `sample_t` on a process."""
  if process.is_discrete:
    return sample_timesteps(key, batch_size, process.num_timesteps, method)
  return sample_t(process, key, batch_size, method)


def process_losses(process, model_fn: Callable, x0, t, noise, *, mean_type: str = "eps",
                   var_type: str = "fixed_large", loss_type: str = "mse", weighting: str = "none",
                   min_snr_gamma: float = 5.0, p2_gamma: float = 1.0, p2_k: float = 1.0) -> dict:
  """`training_losses` on the discrete chain, `continuous_losses` (output = mean_type) on a process."""
  kw = dict(weighting=weighting, min_snr_gamma=min_snr_gamma, p2_gamma=p2_gamma, p2_k=p2_k)
  if process.is_discrete:
    return training_losses(process, model_fn, x0, t, noise, mean_type=mean_type, var_type=var_type,
                           loss_type=loss_type, **kw)
  return continuous_losses(process, model_fn, x0, t, noise, output=mean_type, **kw)


def time_quartile(process, t) -> jnp.ndarray:
  """Which quarter of the time range each t [B] falls in (0..3), for per-quartile loss metrics."""
  if process.is_discrete:
    return jnp.minimum(4 * t // process.num_timesteps, 3)
  return jnp.minimum(jnp.floor(4.0 * t), 3.0).astype(jnp.int32)


# The discrete chain's full bound lives in core/likelihood.py (with the likelihoods to come); kept here under
# its old name. Imported last: likelihood.py uses this module's terms.
from jaxddpm.core.likelihood import calc_bpd_loop  # noqa: E402
