"""Time grids t_0 > t_1 > ... > t_N the sampler engine runs over (floor 1).

Discrete chain: the (possibly respaced) schedule's entries K-1, ..., 0, then -1 (the data); respacing
follows Nichol & Dhariwal 2021, section 4 (`resolve_timesteps`). Continuous processes (N steps, ending at
t_N = 0, the data):
  uniform  t_i = t_max (1 - i / N)                         (score_sde, flow matching);
  logsnr   lambda uniform between lambda(t_max) and lambda(t_eps), then t = 0   (DPM-Solver);
  edm      sigma_i = (s_max^(1/rho) + i / (N - 1) (s_min^(1/rho) - s_max^(1/rho)))^rho with
           sigma = e^{-lambda/2} (EDM's sigma of the scaled path), rho = 7, s_min = max(0.002,
           sigma(t_eps)), then t = 0   (Karras et al. 2022, eq. 5).
Log-SNR ranges are clipped to [-LOGSNR_CLIP, LOGSNR_CLIP] where a process reaches +-inf.
"""
from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jaxddpm.core.schedule import Schedule, respace, space_timesteps

GRIDS = ("uniform", "logsnr", "edm")
LOGSNR_CLIP = 20.0
T_EPS = 1e-3  # the smallest network time of the logsnr / edm grids (score_sde's sampling eps)
EDM_RHO = 7.0
EDM_SIGMA_MIN = 0.002
DEFAULT_STEPS = 100  # continuous processes, when timesteps is None


@functools.partial(jax.jit, static_argnames=("num_steps", "t_max"))
def uniform_grid(process, num_steps: int, t_max: float = 1.0) -> jnp.ndarray:
  """[N + 1] float32: t_i = t_max (1 - i / N), from t_max to 0."""
  del process
  return jnp.asarray(np.linspace(t_max, 0.0, num_steps + 1), jnp.float32)


def _logsnr_range(process, t_max):
  lo = jnp.maximum(process.logsnr(t_max), -LOGSNR_CLIP)
  hi = jnp.minimum(process.logsnr(T_EPS), LOGSNR_CLIP)
  return lo, hi


@functools.partial(jax.jit, static_argnames=("num_steps", "t_max"))
def logsnr_grid(process, num_steps: int, t_max: float = 1.0) -> jnp.ndarray:
  """[N + 1] float32: N times uniform in lambda from lambda(t_max) to lambda(t_eps), then 0."""
  lo, hi = _logsnr_range(process, t_max)
  lam = lo + (hi - lo) * jnp.arange(num_steps, dtype=jnp.float32) / max(num_steps - 1, 1)
  return jnp.append(process.t_from_logsnr(lam), 0.0).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("num_steps", "t_max", "rho"))
def edm_grid(process, num_steps: int, t_max: float = 1.0, rho: float = EDM_RHO) -> jnp.ndarray:
  """[N + 1] float32: EDM's rho-spaced sigmas (eq. 5) mapped to process time, then 0."""
  lo, hi = _logsnr_range(process, t_max)
  s_max, s_min = jnp.exp(-0.5 * lo), jnp.maximum(jnp.exp(-0.5 * hi), EDM_SIGMA_MIN)
  i = jnp.arange(num_steps, dtype=jnp.float32) / max(num_steps - 1, 1)
  sigma = (s_max ** (1 / rho) + i * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
  return jnp.append(process.t_from_logsnr(-2.0 * jnp.log(sigma)), 0.0).astype(jnp.float32)


GRID_FNS = {"uniform": uniform_grid, "logsnr": logsnr_grid, "edm": edm_grid}


def discrete_grid(schedule: Schedule) -> jnp.ndarray:
  """[K + 1] int32: the schedule's entries K-1, ..., 0 and -1 (the data)."""
  return jnp.arange(schedule.num_timesteps - 1, -2, -1, dtype=jnp.int32)


def continuous_steps(timesteps) -> int:
  """The number of steps N of a continuous sampler from `timesteps` (an int or a string "N")."""
  if isinstance(timesteps, str) and timesteps.strip().isdigit():
    timesteps = int(timesteps)
  if isinstance(timesteps, bool) or not isinstance(timesteps, numbers.Integral) or timesteps < 1:
    raise ValueError(f"timesteps for a continuous process is the number of sampling steps, an integer >= 1 "
                     f"(or a string of one), got {timesteps!r}")
  return int(timesteps)


def make_time_grid(process, timesteps=None, grid: str = "uniform"):
  """(process, grid) a sampler runs over. Discrete chain: the schedule respaced by `resolve_timesteps`
  and its `discrete_grid` (grid must be "uniform": the discrete chain's grid is chosen by timesteps).
  Continuous process: itself and GRID_FNS[grid](process, N), N = timesteps (default DEFAULT_STEPS).
  Call outside `jit` when respacing."""
  if grid not in GRIDS:
    raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
  if process.is_discrete:
    if grid != "uniform":
      raise ValueError(f"grid={grid!r} needs a continuous process; the discrete chain's grid is its "
                       "(respaced) entries, chosen by timesteps")
    process = resolve_timesteps(process, timesteps)
    return process, discrete_grid(process)
  steps = DEFAULT_STEPS if timesteps is None else continuous_steps(timesteps)
  return process, GRID_FNS[grid](process, steps)


def resolve_timesteps(schedule: Schedule, timesteps=None) -> Schedule:
  """The schedule the chain runs over: ``schedule`` itself (timesteps=None), or `respace` of it.

  timesteps: None (all T entries); an int K or a string ("K", "K1,K2,...", "ddimK") or a list/tuple of
  section counts for `space_timesteps`; or a numpy/jax array of kept indices (strictly increasing in
  [0, T)). Runs in numpy: call it (or `sample` with timesteps) outside `jit`.
  """
  if timesteps is None:
    return schedule
  try:
    T = schedule.num_timesteps
    if isinstance(timesteps, (np.ndarray, jax.Array)):
      kept = np.asarray(timesteps)
      if kept.ndim != 1:
        raise ValueError(f"timesteps as an index array must be 1-D, got shape {kept.shape}")
      if not np.issubdtype(kept.dtype, np.integer):
        raise ValueError(f"timesteps as an index array must hold integers, got dtype {kept.dtype}")
    else:
      if isinstance(timesteps, bool):
        raise ValueError(f"timesteps must be None, a spec for space_timesteps or an index array, got {timesteps!r}")
      count = None
      if isinstance(timesteps, numbers.Integral):
        count = int(timesteps)
      elif isinstance(timesteps, str) and timesteps.startswith("ddim") and timesteps[4:].isdigit():
        count = int(timesteps[4:])
      elif isinstance(timesteps, str) and timesteps.replace(",", "").strip().isdigit():
        count = sum(int(c) for c in timesteps.split(","))
      elif isinstance(timesteps, (list, tuple)) and all(isinstance(c, numbers.Integral) for c in timesteps):
        count = sum(int(c) for c in timesteps)
      if count is not None and count > T:
        raise ValueError(f"timesteps={timesteps!r} asks for {count} sampling steps but the schedule has only "
                         f"T = {T}")
      if count is not None and count < 1:
        raise ValueError(f"timesteps={timesteps!r}: the number of sampling steps must be >= 1")
      kept = space_timesteps(T, timesteps)
    if kept.size > T:
      raise ValueError(f"timesteps has {kept.size} entries, more than the schedule's T = {T}")
    if kept.size == T and np.array_equal(kept, np.arange(T)):
      return schedule
    return respace(schedule, kept)
  except jax.errors.ConcretizationTypeError as e:  # pragma: no cover - message only
    raise ValueError("timesteps: respacing needs a concrete schedule; respace it outside jit "
                     "(jaxddpm.respace) and pass timesteps=None") from e
  except jax.errors.TracerArrayConversionError as e:
    raise ValueError("timesteps: respacing needs a concrete schedule; respace it outside jit "
                     "(jaxddpm.respace) and pass timesteps=None") from e


