"""Noise schedules and timestep respacing (floor 1: imports only jax and numpy).

Every quantity is computed in float64 numpy from the betas and stored as a float32 array of shape [T] in a
`Schedule` pytree, so a schedule passes through `jit`, `vmap`, `pmap` and `shard_map` like any other
argument. Notation follows Ho et al. 2020 (DDPM): beta_t, alpha_t = 1 - beta_t,
alphabar_t = prod_{s<=t} alpha_s, and the posterior q(x_{t-1} | x_t, x_0) = N(mutilde_t, betatilde_t).
Indices are 0-based: entry i holds the paper's t = i + 1.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.struct
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "cosine", "sigmoid", "quadratic", "const", "jsd", "warmup10", "warmup50")


@flax.struct.dataclass
class Schedule:
  """A diffusion schedule: float32 arrays of shape [T] (``timesteps`` is int32 [T]).

  Fields (paper notation, entry i <-> t = i + 1):
    betas: beta_t.
    alphas_cumprod: alphabar_t = prod_{s<=t} (1 - beta_s).
    alphas_cumprod_prev: alphabar_{t-1} (1 at t = 1).
    alphas_cumprod_next: alphabar_{t+1} (0 at t = T).
    sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, log_one_minus_alphas_cumprod,
    sqrt_recip_alphas_cumprod (1/sqrt(alphabar_t)), sqrt_recipm1_alphas_cumprod (sqrt(1/alphabar_t - 1)).
    posterior_variance: betatilde_t = beta_t (1 - alphabar_{t-1}) / (1 - alphabar_t)   (DDPM eq. 7).
    posterior_log_variance_clipped: log betatilde_t with betatilde_1 (= 0) replaced by betatilde_2.
    posterior_mean_coef1: sqrt(alphabar_{t-1}) beta_t / (1 - alphabar_t)   (coefficient of x_0).
    posterior_mean_coef2: sqrt(alpha_t) (1 - alphabar_{t-1}) / (1 - alphabar_t)   (coefficient of x_t).
    large_variance, large_log_variance: sigma_t^2 = beta_t with sigma_1^2 = betatilde_2 (the original
      "fixedlarge" choice, which gives the decoder a sensible variance at t = 1).
    timesteps: the original timestep each entry stands for (identity unless respaced); this is the t
      the network sees.
  """
  betas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  alphas_cumprod_prev: jnp.ndarray
  alphas_cumprod_next: jnp.ndarray
  sqrt_alphas_cumprod: jnp.ndarray
  sqrt_one_minus_alphas_cumprod: jnp.ndarray
  log_one_minus_alphas_cumprod: jnp.ndarray
  sqrt_recip_alphas_cumprod: jnp.ndarray
  sqrt_recipm1_alphas_cumprod: jnp.ndarray
  posterior_variance: jnp.ndarray
  posterior_log_variance_clipped: jnp.ndarray
  posterior_mean_coef1: jnp.ndarray
  posterior_mean_coef2: jnp.ndarray
  large_variance: jnp.ndarray
  large_log_variance: jnp.ndarray
  timesteps: jnp.ndarray

  is_discrete = True  # the process protocol (core/process.py): this one lives on an integer grid

  @property
  def num_timesteps(self) -> int:
    """T, the number of diffusion steps (static: read from the array shape)."""
    return self.betas.shape[-1]

  # ----------------------------------------------------- the process protocol on the integer grid
  def alpha_sigma(self, t):
    """(alpha_t, sigma_t) = (sqrt(alphabar_t), sqrt(1 - alphabar_t)) at entry t (int array, any shape);
    entry -1 stands for the data, (1, 0), the end of every reverse chain."""
    t = jnp.asarray(t)
    i = jnp.maximum(t, 0)
    data = t < 0
    return (jnp.where(data, 1.0, self.sqrt_alphas_cumprod[i]),
            jnp.where(data, 0.0, self.sqrt_one_minus_alphas_cumprod[i]))

  def logsnr(self, t):
    """lambda_t = log(alphabar_t / (1 - alphabar_t)) at entry t (+inf at the data entry -1)."""
    alpha, sigma = self.alpha_sigma(t)
    return 2.0 * (jnp.log(alpha) - jnp.log(sigma))

  def net_time(self, t):
    """The network's time input at entry t: the original timestep ``timesteps[t]`` (int32)."""
    return self.timesteps[jnp.maximum(jnp.asarray(t), 0)]

  def d_alpha_sigma(self, t):
    raise ValueError("the discrete DDPM schedule has no time derivatives (it lives on an integer grid); "
                     "use a continuous process (jaxddpm.make_process, config.diffusion.process) for the "
                     "probability-flow ODE")

  sde = d_alpha_sigma


def _alpha_bar_betas(alpha_bar, num_timesteps: int, max_beta: float) -> np.ndarray:
  """beta_t = min(1 - alphabar(t/T) / alphabar((t-1)/T), max_beta), from a continuous alphabar."""
  t = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  ab = alpha_bar(t)
  return np.minimum(1.0 - ab[1:] / ab[:-1], max_beta)


def beta_schedule(name: str, num_timesteps: int, **params) -> np.ndarray:
  """The float64 betas [T] of a named schedule.

  linear (DDPM): beta_t linear from beta_start to beta_end; defaults 1e-4 -> 0.02 scaled by 1000/T
    (Nichol & Dhariwal 2021), i.e. exactly DDPM's at T = 1000.
  quadratic: sqrt(beta_t) linear from sqrt(beta_start) to sqrt(beta_end) (DDPM code's "quad").
  const: beta_t = beta (default beta_end of linear).
  jsd: beta_t = 1 / (T - t + 1) (DDPM code).
  warmup10 / warmup50: beta_end everywhere but a linear warm-up over the first 10% / 50% (DDPM code).
  cosine (Improved DDPM eq. 17): alphabar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2),
    s = 0.008, beta_t = min(1 - alphabar_t/alphabar_{t-1}, max_beta = 0.999).
  sigmoid (Chen 2023, "On the importance of noise scheduling"): alphabar(t) =
    (sigmoid(end/tau) - sigmoid((t (end - start) + start)/tau)) / (sigmoid(end/tau) - sigmoid(start/tau)),
    start = -3, end = 3, tau = 1, betas clipped at max_beta = 0.999.
  """
  if name not in SCHEDULES:
    raise ValueError(f"schedule name must be one of {SCHEDULES}, got {name!r}")
  if not isinstance(num_timesteps, (int, np.integer)) or isinstance(num_timesteps, bool) or num_timesteps < 1:
    raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
  T = int(num_timesteps)
  allowed = {
      "linear": {"beta_start", "beta_end"}, "quadratic": {"beta_start", "beta_end"},
      "warmup10": {"beta_start", "beta_end"}, "warmup50": {"beta_start", "beta_end"},
      "const": {"beta"}, "jsd": set(), "cosine": {"s", "max_beta"},
      "sigmoid": {"start", "end", "tau", "max_beta"},
  }[name]
  unknown = set(params) - allowed
  if unknown:
    raise ValueError(f"unknown parameter(s) {sorted(unknown)} for schedule {name!r}; allowed: {sorted(allowed)}")
  scale = 1000.0 / T
  beta_start = float(params.get("beta_start", 1e-4 * scale))
  beta_end = float(params.get("beta_end", 0.02 * scale))
  if name == "linear":
    betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
  elif name == "quadratic":
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
  elif name in ("warmup10", "warmup50"):
    frac = 0.1 if name == "warmup10" else 0.5
    betas = beta_end * np.ones(T, dtype=np.float64)
    warm = int(T * frac)
    betas[:warm] = np.linspace(beta_start, beta_end, warm, dtype=np.float64)
  elif name == "const":
    betas = float(params.get("beta", beta_end)) * np.ones(T, dtype=np.float64)
  elif name == "jsd":
    betas = 1.0 / np.linspace(T, 1, T, dtype=np.float64)
  elif name == "cosine":
    s = float(params.get("s", 0.008))
    betas = _alpha_bar_betas(lambda u: np.cos((u + s) / (1 + s) * math.pi / 2) ** 2, T,
                             float(params.get("max_beta", 0.999)))
  else:  # sigmoid
    start, end = float(params.get("start", -3.0)), float(params.get("end", 3.0))
    tau = float(params.get("tau", 1.0))
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))
    v_start, v_end = sig(start / tau), sig(end / tau)
    betas = _alpha_bar_betas(lambda u: (v_end - sig((u * (end - start) + start) / tau)) / (v_end - v_start),
                             T, float(params.get("max_beta", 0.999)))
  return betas


def schedule_from_betas(betas, timesteps=None) -> Schedule:
  """Builds a `Schedule` from betas [T] (any float dtype; all arithmetic in float64 numpy).

  Args:
    betas: [T] array with 0 < beta_t < 1 (beta_T = 1 is allowed: it makes x_T pure noise).
    timesteps: optional int [T], the original timestep of each entry (default arange(T)).
  """
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.shape[0] < 1:
    raise ValueError(f"betas must be a 1-D array of length T >= 1, got shape {betas.shape}")
  if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas[:-1] >= 1) or betas[-1] > 1:
    raise ValueError("betas must lie in (0, 1) (beta_T may be 1), got min "
                     f"{betas.min():.6g}, max {betas.max():.6g}")
  T = betas.shape[0]
  if timesteps is None:
    timesteps = np.arange(T)
  timesteps = np.asarray(timesteps)
  if timesteps.shape != (T,):
    raise ValueError(f"timesteps must have shape ({T},) like betas, got {timesteps.shape}")
  alphas = 1.0 - betas
  ac = np.cumprod(alphas)
  ac_prev = np.append(1.0, ac[:-1])
  ac_next = np.append(ac[1:], 0.0)
  with np.errstate(divide="ignore"):
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    # betatilde_1 = 0: the original clips its log at t = 1 by using betatilde_2 (or beta_1 if T = 1).
    first = post_var[1] if T > 1 else betas[0]
    post_log_var = np.log(np.append(first, post_var[1:]))
    large_var = np.append(first, betas[1:])
    arrays = dict(
        betas=betas, alphas_cumprod=ac, alphas_cumprod_prev=ac_prev, alphas_cumprod_next=ac_next,
        sqrt_alphas_cumprod=np.sqrt(ac), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        log_one_minus_alphas_cumprod=np.log(1.0 - ac), sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0), posterior_variance=post_var,
        posterior_log_variance_clipped=post_log_var,
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        large_variance=large_var, large_log_variance=np.log(large_var))
  out = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in arrays.items()}
  return Schedule(timesteps=jnp.asarray(timesteps, dtype=jnp.int32), **out)


def make_schedule(name: str, num_timesteps: int, **params) -> Schedule:
  """A named beta schedule (see `beta_schedule`) as a `Schedule` pytree of float32 [T] arrays.

  Example: ``make_schedule("linear", 1000)`` is DDPM's schedule, ``make_schedule("cosine", 4000)`` Improved
  DDPM's.
  """
  return schedule_from_betas(beta_schedule(name, num_timesteps, **params))


def space_timesteps(num_timesteps: int, spec) -> np.ndarray:
  """Which of T timesteps to keep (Nichol & Dhariwal 2021, section 4): a sorted int array [K].

  spec: an int or "K" (K evenly spaced steps including the first and last), a comma-separated string or
  sequence of section counts ("10,10,10": split [0, T) into equal sections and take that many evenly
  spaced steps from each), or "ddimK" (the DDIM stride: range(0, T, stride) with exactly K elements).
  """
  T = num_timesteps
  if not isinstance(T, (int, np.integer)) or T < 1:
    raise ValueError(f"num_timesteps must be an integer >= 1, got {T!r}")
  if isinstance(spec, str) and spec.startswith("ddim"):
    try:
      k = int(spec[len("ddim"):])
    except ValueError:
      raise ValueError(f"timestep spec {spec!r}: 'ddimK' needs an integer K") from None
    for stride in range(1, T + 1):
      if len(range(0, T, stride)) == k:
        return np.arange(0, T, stride)
    raise ValueError(f"timestep spec {spec!r}: no integer stride gives exactly {k} of {T} steps; "
                     "use a plain count instead")
  if isinstance(spec, (int, np.integer)):
    counts = [int(spec)]
  elif isinstance(spec, str):
    try:
      counts = [int(c) for c in spec.split(",")]
    except ValueError:
      raise ValueError(f"timestep spec {spec!r} must be 'K', 'K1,K2,...' or 'ddimK'") from None
  elif isinstance(spec, Sequence):
    counts = [int(c) for c in spec]
  else:
    raise ValueError(f"timestep spec must be an int, a string or a sequence of ints, got {type(spec)}")
  if not counts or any(c < 1 for c in counts):
    raise ValueError(f"timestep spec {spec!r}: every section count must be >= 1")
  if len(counts) > T:
    raise ValueError(f"timestep spec {spec!r}: {len(counts)} sections but only {T} timesteps")
  size, extra = divmod(T, len(counts))
  kept, start = [], 0
  for i, count in enumerate(counts):
    section = size + (1 if i < extra else 0)
    if count > section:
      raise ValueError(f"timestep spec {spec!r}: cannot take {count} steps from a section of {section} "
                       f"(T = {T})")
    # improved-diffusion's float accumulation (cur_idx += frac_stride, then round): on ties it can differ
    # from round(j * frac_stride), and the kept steps must be the ones its checkpoints were sampled with.
    frac_stride = 1.0 if count <= 1 else (section - 1) / (count - 1)
    cur_idx = 0.0
    for _ in range(count):
      kept.append(start + round(cur_idx))
      cur_idx += frac_stride
    start += section
  return np.asarray(sorted(set(kept)), dtype=np.int64)


def respace(schedule: Schedule, timesteps) -> Schedule:
  """The schedule that jumps between the kept timesteps (Improved DDPM, section 4).

  With kept indices tau_1 < ... < tau_K, alphabar stays the same at the kept steps and
  beta_k = 1 - alphabar_{tau_k} / alphabar_{tau_{k-1}}, recomputed in float64 (the product of the
  skipped alphas, so no float32 cancellation). ``timesteps`` of the result maps back to the original
  network timesteps. Not traceable: call it outside `jit`.
  """
  T = schedule.num_timesteps
  kept = np.asarray(timesteps)
  if kept.ndim != 1 or kept.size < 1:
    raise ValueError(f"timesteps must be a non-empty 1-D array of indices, got shape {kept.shape}")
  if np.any(np.diff(kept) <= 0) or kept[0] < 0 or kept[-1] >= T:
    raise ValueError(f"timesteps must be strictly increasing integers in [0, {T}), got {kept}")
  betas = np.asarray(schedule.betas, dtype=np.float64)
  ac = np.asarray(schedule.alphas_cumprod, dtype=np.float64)
  ac_prev = np.asarray(schedule.alphas_cumprod_prev, dtype=np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    # log alpha_t from the stored float32 field that keeps it accurate: log1p(-beta_t) for small betas, the
    # ratio alphabar_t / alphabar_{t-1} for betas near 1 (a float32 beta_t = 0.999 or 1 - 1e-8 has lost 1 - beta_t).
    log_alphas = np.where(betas < 0.5, np.log1p(-np.minimum(betas, 0.5)), np.log(ac) - np.log(ac_prev))
  log_ac = np.cumsum(log_alphas)
  log_ac_prev = np.append(0.0, log_ac[kept[:-1]])
  new_betas = -np.expm1(log_ac[kept] - log_ac_prev)
  return schedule_from_betas(new_betas, np.asarray(schedule.timesteps)[kept])
