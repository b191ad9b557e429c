"""The closed-form Gaussian identities of DDPM (floor 1: imports only jax and numpy).

Ho et al. 2020 (DDPM), Nichol & Dhariwal 2021 (Improved DDPM), Salimans & Ho 2022 (v-prediction).
Every function takes the `Schedule` as its first argument; `t` is int32 [B] (0-based indices into the
schedule) and x is [B, ...]. Functions marked "pytree" accept any pytree of such arrays (x_0, noise and
model outputs with matching structure), applying the identity leaf by leaf.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxddpm.core.schedule import Schedule

MEAN_TYPES = ("eps", "x0", "v", "x_prev")
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")


def check_choice(name: str, value, allowed) -> None:
  """Raises ValueError naming the argument when ``value`` is not one of ``allowed``."""
  if value not in allowed:
    raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def extract(coef: jnp.ndarray, t: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  """coef[t] reshaped to [B, 1, ..., 1] so that it broadcasts against x [B, ...] (float32).

  t may also be a scalar (the same timestep for the whole batch).
  """
  t = jnp.asarray(t)
  x_shape = jnp.shape(x)
  if t.ndim == 0:
    return coef[t].astype(jnp.float32)
  if t.ndim != 1:
    raise ValueError(f"t must be a scalar or a 1-D int array [B], got shape {t.shape}")
  if len(x_shape) < 1 or x_shape[0] != t.shape[0]:
    raise ValueError(f"t has shape {t.shape} but x has shape {x_shape}: their batch sizes must match")
  return coef[t].astype(jnp.float32).reshape((t.shape[0],) + (1,) * (len(x_shape) - 1))


def _check_same_shape(**arrays) -> None:
  shapes = {k: jnp.shape(v) for k, v in arrays.items()}
  if len(set(shapes.values())) > 1:
    raise ValueError(f"shapes must match, got {shapes}")


def _tree(fn, *trees, names=None):
  """Applies fn leaf-wise over matching pytrees; fn may return a tuple, giving a tuple of pytrees.

  With ``names`` (one per tree), leaves at the same position must have the same shape.
  """
  leaves = [jax.tree.leaves(tr) for tr in trees]
  treedef = jax.tree.structure(trees[0])
  for other in trees[1:]:
    if jax.tree.structure(other) != treedef:
      raise ValueError(f"pytree structures must match, got {treedef} and {jax.tree.structure(other)}")
  if names is not None:
    for ls in zip(*leaves):
      _check_same_shape(**dict(zip(names, ls)))
  outs = [fn(*ls) for ls in zip(*leaves)]
  if outs and isinstance(outs[0], tuple):
    return tuple(jax.tree.unflatten(treedef, [o[i] for o in outs]) for i in range(len(outs[0])))
  return jax.tree.unflatten(treedef, outs)


# ----------------------------------------------------------------------------------------- forward
def q_mean_variance(s: Schedule, x0, t):
  """q(x_t | x_0) = N(sqrt(alphabar_t) x_0, (1 - alphabar_t) I)   (DDPM eq. 4). pytree.

  Returns (mean [B, ...], variance [B, 1, ...], log_variance [B, 1, ...]) (leaf-wise for pytrees).
  """
  def f(x):
    return (extract(s.sqrt_alphas_cumprod, t, x) * x, extract(jnp.square(s.sqrt_one_minus_alphas_cumprod), t, x),
            extract(s.log_one_minus_alphas_cumprod, t, x))
  return _tree(f, x0)


def q_sample(s: Schedule, x0, t, noise):
  """x_t = sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) eps, a sample of q(x_t | x_0)   (DDPM eq. 4).

  x0, noise: [B, ...] (or matching pytrees); t: int32 [B]. Returns x_t like x0, in float32.
  """
  def f(x, n):
    _check_same_shape(x0=x, noise=n)
    return extract(s.sqrt_alphas_cumprod, t, x) * x + extract(s.sqrt_one_minus_alphas_cumprod, t, x) * n
  return _tree(f, x0, noise)


def q_posterior_mean_variance(s: Schedule, x0, x_t, t):
  """q(x_{t-1} | x_t, x_0) = N(mutilde_t, betatilde_t I)   (DDPM eqs. 6-7). pytree.

  mutilde_t = sqrt(alphabar_{t-1}) beta_t / (1 - alphabar_t) x_0
              + sqrt(alpha_t) (1 - alphabar_{t-1}) / (1 - alphabar_t) x_t,
  betatilde_t = (1 - alphabar_{t-1}) / (1 - alphabar_t) beta_t.
  Returns (mean [B, ...], variance [B, 1, ...], log_variance_clipped [B, 1, ...]).
  """
  def f(a, b):
    _check_same_shape(x0=a, x_t=b)
    mean = extract(s.posterior_mean_coef1, t, b) * a + extract(s.posterior_mean_coef2, t, b) * b
    return mean, extract(s.posterior_variance, t, b), extract(s.posterior_log_variance_clipped, t, b)
  return _tree(f, x0, x_t)


# ---------------------------------------------------------------------- parameterization conversions
def predict_x0_from_eps(s: Schedule, x_t, t, eps):
  """x_0 = (x_t - sqrt(1 - alphabar_t) eps) / sqrt(alphabar_t)   (DDPM eq. 4 solved for x_0). pytree."""
  return _tree(lambda x, e: extract(s.sqrt_recip_alphas_cumprod, t, x) * x
               - extract(s.sqrt_recipm1_alphas_cumprod, t, x) * e, x_t, eps,
               names=("x_t", "eps"))


def predict_eps_from_x0(s: Schedule, x_t, t, x0):
  """eps = (x_t / sqrt(alphabar_t) - x_0) / sqrt(1/alphabar_t - 1). pytree."""
  return _tree(lambda x, a: (extract(s.sqrt_recip_alphas_cumprod, t, x) * x - a)
               / extract(s.sqrt_recipm1_alphas_cumprod, t, x), x_t, x0,
               names=("x_t", "x0"))


def predict_x0_from_v(s: Schedule, x_t, t, v):
  """x_0 = sqrt(alphabar_t) x_t - sqrt(1 - alphabar_t) v   (Salimans & Ho 2022). pytree."""
  return _tree(lambda x, u: extract(s.sqrt_alphas_cumprod, t, x) * x
               - extract(s.sqrt_one_minus_alphas_cumprod, t, x) * u, x_t, v,
               names=("x_t", "v"))


def predict_eps_from_v(s: Schedule, x_t, t, v):
  """eps = sqrt(1 - alphabar_t) x_t + sqrt(alphabar_t) v   (Salimans & Ho 2022). pytree."""
  return _tree(lambda x, u: extract(s.sqrt_one_minus_alphas_cumprod, t, x) * x
               + extract(s.sqrt_alphas_cumprod, t, x) * u, x_t, v,
               names=("x_t", "v"))


def v_from_eps_x0(s: Schedule, x0, t, eps):
  """v = sqrt(alphabar_t) eps - sqrt(1 - alphabar_t) x_0, the v-prediction target. pytree."""
  return _tree(lambda a, e: extract(s.sqrt_alphas_cumprod, t, a) * e
               - extract(s.sqrt_one_minus_alphas_cumprod, t, a) * a, x0, eps,
               names=("x0", "eps"))


def predict_x0_from_xprev(s: Schedule, x_t, t, x_prev):
  """x_0 = (mutilde_t - coef2_t x_t) / coef1_t, inverting the posterior mean (DDPM's "xprev"). pytree."""
  return _tree(lambda x, p: (p - extract(s.posterior_mean_coef2, t, x) * x)
               / extract(s.posterior_mean_coef1, t, x), x_t, x_prev,
               names=("x_t", "x_prev"))


def score_from_eps(s: Schedule, x_t, t, eps):
  """Tweedie: grad_x log q(x_t) = -E[eps | x_t] / sqrt(1 - alphabar_t). pytree (x_t gives the shape)."""
  return _tree(lambda x, e: -e / extract(s.sqrt_one_minus_alphas_cumprod, t, x), x_t, eps,
               names=("x_t", "eps"))


def eps_from_score(s: Schedule, x_t, t, score):
  """eps = -sqrt(1 - alphabar_t) grad_x log q(x_t), the inverse of `score_from_eps`. pytree."""
  return _tree(lambda x, sc: -extract(s.sqrt_one_minus_alphas_cumprod, t, x) * sc, x_t, score,
               names=("x_t", "score"))


# ---------------------------------------------------------------------------------------- reverse
class PMeanVariance(NamedTuple):
  """p_theta(x_{t-1} | x_t) = N(mean, variance): mean [B, ...], variance and log_variance broadcastable
  to it, pred_x0 [B, ...] the model's estimate of x_0 (clipped if asked), pred_eps [B, ...] the noise
  estimate consistent with pred_x0."""
  mean: jnp.ndarray
  variance: jnp.ndarray
  log_variance: jnp.ndarray
  pred_x0: jnp.ndarray
  pred_eps: jnp.ndarray


def output_channels(in_channels: int, var_type: str) -> int:
  """Channels the network must output: C, or 2C when the variance is learned (Improved DDPM)."""
  check_choice("var_type", var_type, VAR_TYPES)
  return 2 * in_channels if var_type in ("learned", "learned_range") else in_channels


def split_model_output(model_output, x_t, var_type: str):
  """Splits a network output [B, ..., C or 2C] into (mean part [B, ..., C], variance part or None).

  Raises ValueError when the channel count does not match var_type.
  """
  check_choice("var_type", var_type, VAR_TYPES)
  want = output_channels(x_t.shape[-1], var_type)
  if model_output.shape[:-1] != x_t.shape[:-1] or model_output.shape[-1] != want:
    raise ValueError(f"model output has shape {model_output.shape} but var_type={var_type!r} with x_t of "
                     f"shape {x_t.shape} needs {x_t.shape[:-1] + (want,)}")
  if want == x_t.shape[-1]:
    return model_output, None
  c = x_t.shape[-1]
  return model_output[..., :c], model_output[..., c:]


def model_log_variance(s: Schedule, var_out, x_t, t, var_type: str):
  """The reverse-process (variance, log-variance) for each var_type.

  fixed_small: betatilde_t (log clipped at t = 1); fixed_large: beta_t (betatilde_2 at t = 1);
  learned: exp of the raw network output v; learned_range (Improved DDPM eq. 15):
  log Sigma = u log beta_t + (1 - u) log betatilde_t with u = (v + 1) / 2.
  """
  check_choice("var_type", var_type, VAR_TYPES)
  if var_type == "fixed_small":
    return extract(s.posterior_variance, t, x_t), extract(s.posterior_log_variance_clipped, t, x_t)
  if var_type == "fixed_large":
    return extract(s.large_variance, t, x_t), extract(s.large_log_variance, t, x_t)
  var_out = var_out.astype(jnp.float32)
  if var_type == "learned":
    log_var = var_out
  else:
    u = (var_out + 1.0) / 2.0
    log_var = u * extract(jnp.log(s.betas), t, x_t) + (1.0 - u) * extract(s.posterior_log_variance_clipped,
                                                                          t, x_t)
  return jnp.exp(log_var), log_var


def p_mean_variance(s: Schedule, model_output, x_t, t, *, mean_type: str = "eps",
                    var_type: str = "fixed_large", clip_denoised: bool = True) -> PMeanVariance:
  """p_theta(x_{t-1} | x_t) from a network output (DDPM section 3.2, Improved DDPM section 3.1).

  The mean is the posterior mean mutilde_t(pred_x0, x_t) with pred_x0 from the parameterization
  (eps: DDPM eq. 11, x0, v), clipped to [-1, 1] when clip_denoised; for mean_type "x_prev" the network
  output is the mean itself. model_output: [B, ..., C] or [B, ..., 2C] for learned variances; x_t [B, ..., C];
  t int32 [B].
  """
  check_choice("mean_type", mean_type, MEAN_TYPES)
  mean_out, var_out = split_model_output(model_output, x_t, var_type)
  mean_out = mean_out.astype(jnp.float32)
  x_t = x_t.astype(jnp.float32)
  variance, log_variance = model_log_variance(s, var_out, x_t, t, var_type)
  clip = (lambda x: jnp.clip(x, -1.0, 1.0)) if clip_denoised else (lambda x: x)
  if mean_type == "x_prev":
    pred_x0 = clip(predict_x0_from_xprev(s, x_t, t, mean_out))
    mean = mean_out
  else:
    if mean_type == "eps":
      pred_x0 = predict_x0_from_eps(s, x_t, t, mean_out)
    elif mean_type == "x0":
      pred_x0 = mean_out
    else:
      pred_x0 = predict_x0_from_v(s, x_t, t, mean_out)
    pred_x0 = clip(pred_x0)
    mean, _, _ = q_posterior_mean_variance(s, pred_x0, x_t, t)
  pred_eps = predict_eps_from_x0(s, x_t, t, pred_x0)
  return PMeanVariance(mean, variance, log_variance, pred_x0, pred_eps)


# ------------------------------------------------------- continuous time: any (alpha, sigma) path
OUTPUTS = ("eps", "x0", "v", "u", "score")


class PathPoint(NamedTuple):
  """(alpha_t, sigma_t) and their t-derivatives at one time, each broadcastable to z [B, ...].
  d_alpha / d_sigma are only needed by the flow velocity "u" (None otherwise)."""
  alpha: jnp.ndarray
  sigma: jnp.ndarray
  d_alpha: jnp.ndarray | None = None
  d_sigma: jnp.ndarray | None = None


def path_point(process, t, x, derivatives: bool = False) -> PathPoint:
  """The `PathPoint` of a process (or discrete `Schedule`) at t (scalar or [B]), shaped to broadcast
  against x [B, ...]."""
  view = lambda a: jnp.reshape(a, jnp.shape(a) + (1,) * (jnp.ndim(x) - jnp.ndim(a))).astype(jnp.float32)
  alpha, sigma = process.alpha_sigma(t)
  if not derivatives:
    return PathPoint(view(alpha), view(sigma))
  d_alpha, d_sigma = process.d_alpha_sigma(t)
  return PathPoint(view(alpha), view(sigma), view(d_alpha), view(d_sigma))


def q_sample_at(p: PathPoint, x0, eps):
  """z_t = alpha_t x + sigma_t eps (the marginal q(z_t | x) of every Gaussian diffusion or flow)."""
  return p.alpha * x0 + p.sigma * eps


def x0_eps_from_output(output: str, out, z, p: PathPoint):
  """The (x_hat, eps_hat) pair that a network output of type ``output`` stands for, exactly, given
  z = alpha x + sigma eps (Kingma & Gao 2023; Gao et al. 2024):

    eps:   eps = out, x = (z - sigma out) / alpha
    x0:    x = out, eps = (z - alpha out) / sigma
    v:     v = alpha eps - sigma x -> x = (alpha z - sigma v) / (alpha^2 + sigma^2),
                                      eps = (sigma z + alpha v) / (alpha^2 + sigma^2)
    u:     u = alpha' x + sigma' eps -> x = (sigma' z - sigma u) / D, eps = (alpha u - alpha' z) / D,
           D = alpha sigma' - sigma alpha'
    score: score = -eps / sigma -> eps = -sigma out, x = (z + sigma^2 out) / alpha
  out, z: [B, ...]; p: a `PathPoint` broadcastable to them.
  """
  check_choice("output", output, OUTPUTS)
  a, s = p.alpha, p.sigma
  if output == "eps":
    return (z - s * out) / a, out
  if output == "x0":
    return out, (z - a * out) / s
  if output == "v":
    n = a * a + s * s
    return (a * z - s * out) / n, (s * z + a * out) / n
  if output == "u":
    if p.d_alpha is None:
      raise ValueError("output 'u' needs the path's time derivatives (path_point(..., derivatives=True))")
    det = a * p.d_sigma - s * p.d_alpha
    return (p.d_sigma * z - s * out) / det, (a * out - p.d_alpha * z) / det
  eps = -s * out
  return (z - s * eps) / a, eps


def output_from_x0_eps(output: str, x0, eps, p: PathPoint):
  """The network target of type ``output`` for (x, eps): eps, x0, v = alpha eps - sigma x,
  u = alpha' x + sigma' eps (= dz_t/dt; eps - x on the flow path), score = -eps / sigma."""
  check_choice("output", output, OUTPUTS)
  if output == "eps":
    return eps
  if output == "x0":
    return x0
  if output == "v":
    return p.alpha * eps - p.sigma * x0
  if output == "u":
    if p.d_alpha is None:
      raise ValueError("output 'u' needs the path's time derivatives (path_point(..., derivatives=True))")
    return p.d_alpha * x0 + p.d_sigma * eps
  return -eps / p.sigma


def convert_output(out, z, p: PathPoint, *, source: str, target: str):
  """A network output of type ``source`` rewritten exactly as type ``target`` (both in OUTPUTS)."""
  return output_from_x0_eps(target, *x0_eps_from_output(source, out, z, p), p)


def posterior(x0, z_t, p_s: PathPoint, p_t: PathPoint):
  """q(z_s | z_t, x) = N(mu, var I) for any 0 <= s < t (Kingma et al. 2021, eqs. 29-33):

    alpha_{t|s} = alpha_t / alpha_s,  sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2,
    mu = alpha_{t|s} sigma_s^2 / sigma_t^2 z_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x,
    var = sigma_{t|s}^2 sigma_s^2 / sigma_t^2,

  written with r = e^{lambda_t - lambda_s} (so sigma_{t|s}^2 / sigma_t^2 = 1 - r = -expm1(log r), no
  cancellation for small steps). At s = 0 of a path with sigma_0 = 0 it is the point mass at alpha_0 x;
  on DDPM's grid with s = t - 1 it is `q_posterior_mean_variance`. Returns (mean [B, ...], var).
  """
  log_r = 2.0 * (jnp.log(p_t.alpha) + jnp.log(p_s.sigma) - jnp.log(p_s.alpha) - jnp.log(p_t.sigma))
  one_minus_r = -jnp.expm1(log_r)
  coef_z = jnp.square(p_s.sigma / p_t.sigma) * (p_t.alpha / p_s.alpha)
  return coef_z * z_t + p_s.alpha * one_minus_r * x0, jnp.square(p_s.sigma) * one_minus_r
