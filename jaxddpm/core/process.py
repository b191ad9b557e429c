"""Continuous-time Gaussian processes z_t = alpha_t x + sigma_t eps, t in [0, 1] (floor 1).

t = 0 is data, t = 1 noise; lambda_t = log(alpha_t^2 / sigma_t^2) is the log signal-to-noise ratio
(Kingma et al. 2021, "Variational diffusion models"). Every process is one pytree, `Process`, whose
static `name` selects a row of `PATHS` and whose float parameters are leaves, so it passes through
`jit`, `vmap`, `grad`, `pmap` and `shard_map` like any argument. The discrete DDPM `Schedule` offers the
same protocol on its integer grid (`alpha_sigma`, `logsnr`, `net_time`, `is_discrete`); samplers and
losses only use that protocol.

  vp         score_sde's VP SDE (Song et al. 2021, eq. 11): beta(t) = b0 + t (b1 - b0), b0 = 0.1, b1 = 20,
             B(t) = int_0^t beta = b0 t + (b1 - b0) t^2 / 2, alpha = exp(-B/2), sigma = sqrt(1 - e^{-B}).
  vp_cosine  the cosine schedule in continuous time (Nichol & Dhariwal 2021, eq. 17, as written by
             Hoogeboom et al. 2023 with log-SNR bounds): alpha = cos(a t + b), sigma = sin(a t + b),
             lambda = -2 log tan(a t + b), b = atan(e^{-lmax/2}), a = atan(e^{-lmin/2}) - b.
  subvp      score_sde's sub-VP SDE (eq. 29): alpha as vp, sigma = 1 - e^{-B}.
  ve         score_sde's VE SDE (eq. 30): alpha = 1, sigma = smin (smax / smin)^t, smin 0.01, smax 50.
  flow       flow matching / rectified flow (Lipman et al. 2023, Liu et al. 2023): alpha = 1 - t, sigma = t.

The SDE dz = f(t) z dt + g(t) dw with these marginals has f = alpha' / alpha and
g^2 = d sigma^2/dt - 2 f sigma^2 (Kingma et al. 2021, appendix A).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

NET_TIME_SCALE = 1000.0  # the network sees 1000 t, the range of DDPM's integer timesteps


def _vp_B(p, t):
  return p["b0"] * t + 0.5 * (p["b1"] - p["b0"]) * t * t


def _vp(p, t):
  B = _vp_B(p, t)
  return jnp.exp(-0.5 * B), jnp.sqrt(-jnp.expm1(-B))


def _vp_logsnr(p, t):
  return -jnp.log(jnp.expm1(_vp_B(p, t)))


def _vp_t_from_B(p, B):
  d = p["b1"] - p["b0"]
  return 2.0 * B / (p["b0"] + jnp.sqrt(p["b0"] ** 2 + 2.0 * d * B))  # the positive root, no cancellation


def _vp_inverse(p, lam):
  return _vp_t_from_B(p, jax.nn.softplus(-lam))  # e^{-B} = sigmoid(lambda) -> B = log(1 + e^{-lambda})


def _subvp(p, t):
  B = _vp_B(p, t)
  return jnp.exp(-0.5 * B), -jnp.expm1(-B)


def _subvp_logsnr(p, t):
  B = _vp_B(p, t)
  return -B - 2.0 * jnp.log(-jnp.expm1(-B))


def _subvp_inverse(p, lam):
  # a = e^{-B} solves e^lambda (1 - a)^2 = a: a = (2 e^l + 1 - sqrt(4 e^l + 1)) / (2 e^l), written
  # without cancellation as a = 2 e^l / (2 e^l + 1 + sqrt(4 e^l + 1)).
  el = jnp.exp(lam)
  a = 2.0 * el / (2.0 * el + 1.0 + jnp.sqrt(4.0 * el + 1.0))
  return _vp_t_from_B(p, -jnp.log(a))


def _cos_ab(p):
  b = jnp.arctan(jnp.exp(-0.5 * p["logsnr_max"]))
  return jnp.arctan(jnp.exp(-0.5 * p["logsnr_min"])) - b, b


def _cosine(p, t):
  a, b = _cos_ab(p)
  return jnp.cos(a * t + b), jnp.sin(a * t + b)


def _cosine_logsnr(p, t):
  a, b = _cos_ab(p)
  return -2.0 * jnp.log(jnp.tan(a * t + b))


def _cosine_inverse(p, lam):
  a, b = _cos_ab(p)
  return (jnp.arctan(jnp.exp(-0.5 * lam)) - b) / a


def _ve(p, t):
  sigma = p["sigma_min"] * (p["sigma_max"] / p["sigma_min"]) ** t
  return jnp.ones_like(sigma), sigma


def _ve_logsnr(p, t):
  return -2.0 * (jnp.log(p["sigma_min"]) + t * jnp.log(p["sigma_max"] / p["sigma_min"]))


def _ve_inverse(p, lam):
  return (-0.5 * lam - jnp.log(p["sigma_min"])) / jnp.log(p["sigma_max"] / p["sigma_min"])


def _flow(p, t):
  del p
  return 1.0 - t, t


def _flow_logsnr(p, t):
  del p
  return 2.0 * (jnp.log1p(-t) - jnp.log(t))


def _flow_inverse(p, lam):
  del p
  return jax.nn.sigmoid(-0.5 * lam)


class Path(NamedTuple):
  """One process: its default parameters and closed forms (params dict, t) -> value."""
  defaults: dict
  alpha_sigma: Callable
  logsnr: Callable
  t_from_logsnr: Callable


PATHS = {
    "vp": Path({"b0": 0.1, "b1": 20.0}, _vp, _vp_logsnr, _vp_inverse),
    "vp_cosine": Path({"logsnr_min": -15.0, "logsnr_max": 15.0}, _cosine, _cosine_logsnr, _cosine_inverse),
    "subvp": Path({"b0": 0.1, "b1": 20.0}, _subvp, _subvp_logsnr, _subvp_inverse),
    "ve": Path({"sigma_min": 0.01, "sigma_max": 50.0}, _ve, _ve_logsnr, _ve_inverse),
    "flow": Path({}, _flow, _flow_logsnr, _flow_inverse),
}
PROCESSES = tuple(PATHS)


@flax.struct.dataclass
class Process:
  """A continuous process: `name` (static, a key of PATHS) and its float parameters (pytree leaves).

  Every method takes t as a float array of any shape (process time, 0 = data, 1 = noise) and returns
  arrays of that shape in float32.
  """
  name: str = flax.struct.field(pytree_node=False)
  params: dict = flax.struct.field(default_factory=dict)
  is_discrete = False

  def _path(self) -> Path:
    return PATHS[self.name]

  def alpha_sigma(self, t):
    """(alpha_t, sigma_t)."""
    return self._path().alpha_sigma(self.params, jnp.asarray(t, jnp.float32))

  def logsnr(self, t):
    """lambda_t = log(alpha_t^2 / sigma_t^2), from its closed form (accurate where alpha or sigma -> 0)."""
    return self._path().logsnr(self.params, jnp.asarray(t, jnp.float32))

  def t_from_logsnr(self, lam):
    """The inverse of `logsnr`: t with lambda_t = lam (every process here is monotone in t)."""
    return self._path().t_from_logsnr(self.params, jnp.asarray(lam, jnp.float32))

  def d_alpha_sigma(self, t):
    """(d alpha_t / dt, d sigma_t / dt), exact (forward-mode differentiation of the closed forms)."""
    t = jnp.asarray(t, jnp.float32)
    _, tangents = jax.jvp(self.alpha_sigma, (t,), (jnp.ones_like(t),))
    return tangents

  def sde(self, t):
    """(f(t), g(t)) of dz = f(t) z dt + g(t) dw: f = alpha'/alpha, g^2 = 2 sigma sigma' - 2 f sigma^2."""
    alpha, sigma = self.alpha_sigma(t)
    da, ds = self.d_alpha_sigma(t)
    f = da / alpha
    return f, jnp.sqrt(jnp.maximum(2.0 * sigma * ds - 2.0 * f * sigma * sigma, 0.0))

  def net_time(self, t):
    """The network's time input for process time t: 1000 t in float32 (DDPM's timestep range)."""
    return jnp.asarray(t, jnp.float32) * NET_TIME_SCALE

  def prior_std(self, t=1.0):
    """Standard deviation of z_t for data of unit variance, sqrt(alpha_t^2 + sigma_t^2): the scale of
    the sampler's starting noise (1 for vp, subvp, flow; about sigma_max for ve)."""
    alpha, sigma = self.alpha_sigma(t)
    return jnp.sqrt(alpha * alpha + sigma * sigma)


def make_process(name: str, **params) -> Process:
  """The named process as a pytree: ``make_process("vp")``, ``make_process("ve", sigma_max=80.0)``.

  name: one of PROCESSES; params: overrides of that process's defaults (see the module docstring).
  """
  if name not in PATHS:
    raise ValueError(f"process name must be one of {PROCESSES}, got {name!r}")
  defaults = PATHS[name].defaults
  unknown = set(params) - set(defaults)
  if unknown:
    raise ValueError(f"unknown parameter(s) {sorted(unknown)} for process {name!r}; allowed: {sorted(defaults)}")
  merged = {k: float(params.get(k, v)) for k, v in defaults.items()}
  for k, v in merged.items():
    if not math.isfinite(v):
      raise ValueError(f"process {name!r}: parameter {k} must be finite, got {v}")
  if name in ("vp", "subvp") and not 0 < merged["b0"] <= merged["b1"]:
    raise ValueError(f"process {name!r}: need 0 < b0 <= b1, got b0={merged['b0']}, b1={merged['b1']}")
  if name == "ve" and not 0 < merged["sigma_min"] < merged["sigma_max"]:
    raise ValueError(f"process 've': need 0 < sigma_min < sigma_max, got {merged}")
  if name == "vp_cosine" and not merged["logsnr_min"] < merged["logsnr_max"]:
    raise ValueError(f"process 'vp_cosine': need logsnr_min < logsnr_max, got {merged}")
  return Process(name=name, params=merged)
