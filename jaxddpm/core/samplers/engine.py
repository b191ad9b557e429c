"""The sampler engine: one `lax.scan` over a time grid, any stepper, any process (floor 1).

The reverse chain z_{t_0} -> z_{t_1} -> ... -> z_{t_N} (t_N the data) is a single `lax.scan`: it is
traced once whatever N is, and the PRNG key is a traced argument, so a new seed never recompiles. The
stepper (one file per method, table `STEPPERS`) is ``init(x_T) -> state`` and
``step(model_fn, state, t, t_next, key) -> state`` (see `base`); its state rides in the scan carry.

Randomness is per sample: sample i of a run (global index i = sample_offset + position in the batch)
uses key_i = fold_in(key, i), x_T = prior_std N(0, I) drawn from fold_in(key_i, X_T_TAG), and the step
at grid position n gets fold_in(key_i, tag_n), tag_n = the original timestep on the discrete chain (as
jaxddpm always did) and n for a continuous process. The same key therefore gives the same images
whatever the batch size, the split into batches, or the number of devices.

The network is called as ``model_fn(z [B, ...], net_time [B])``: the original int32 timestep on the
discrete chain, ``process.net_time(t)`` (float32, 1000 t) for a continuous process.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxddpm.core.diffusion import MEAN_TYPES, OUTPUTS, VAR_TYPES, check_choice, output_channels
from jaxddpm.core.samplers import ancestral, ddim, dpm_solver, euler, heun, sde
from jaxddpm.core.samplers.options import check_options
from jaxddpm.core.samplers.base import SamplerConfig
from jaxddpm.core.samplers.grids import make_time_grid

STEPPERS = {"ancestral": ancestral.make, "ddim": ddim.make, "euler": euler.make, "heun": heun.make,
            "dpm_solver_pp": dpm_solver.make, "dpm_solver_pp_3m": dpm_solver.make_3m,
            "euler_maruyama": sde.make_euler_maruyama, "pc": sde.make_pc}
METHODS = tuple(STEPPERS)
# steppers that need the path's time derivatives or the SDE's f, g
CONTINUOUS_ONLY = ("euler", "euler_maruyama", "pc")
# fold_in tag for x_T; network timesteps and step indices are < 2^31 - 1, so it never collides.
X_T_TAG = 2 ** 31 - 1


def make_config(method, eta, mean_type, var_type, clip_denoised, snapshot_every, process=None,
                options=None) -> SamplerConfig:
  """The validated static options (ValueError naming the argument). With a process, also checks that
  the method and output type fit it: continuous processes take OUTPUTS and fixed variances. options: the
  stepper's own (a dict, see `options.STEPPER_OPTIONS`)."""
  check_choice("method", method, METHODS)
  discrete = process is None or process.is_discrete
  if discrete and method in CONTINUOUS_ONLY:
    raise ValueError(f"method must be one of {tuple(m for m in METHODS if m not in CONTINUOUS_ONLY)} on the "
                     f"discrete chain, got {method!r}, which integrates the probability-flow ODE and needs a "
                     "continuous process (jaxddpm.make_process, config.diffusion.process)")
  check_choice("mean_type", mean_type, MEAN_TYPES if discrete else OUTPUTS)
  check_choice("var_type", var_type, VAR_TYPES)
  if not discrete and var_type not in ("fixed_small", "fixed_large"):
    raise ValueError(f"var_type={var_type!r} is the discrete chain's; a continuous process samples with the "
                     "posterior variance (var_type 'fixed_small' or 'fixed_large')")
  ddim.check_eta(eta, method)
  if not isinstance(clip_denoised, (bool, np.bool_)):
    raise ValueError(f"clip_denoised must be True or False, got {clip_denoised!r}")
  if snapshot_every is not None and (isinstance(snapshot_every, bool)
                                     or not isinstance(snapshot_every, numbers.Integral)
                                     or snapshot_every < 1):
    raise ValueError(f"snapshot_every must be None or an int >= 1, got {snapshot_every!r}")
  options = check_options(method, options, discrete, mean_type)
  return SamplerConfig(method, float(eta), mean_type, var_type, bool(clip_denoised),
                       None if snapshot_every is None else int(snapshot_every), options)


def check_shape(shape, name="shape") -> tuple[int, ...]:
  try:
    shape = tuple(shape)
  except TypeError:
    raise ValueError(f"{name} must be a tuple of positive ints [N, ..., C], got {shape!r}") from None
  if len(shape) < 2 or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1
                               for d in shape):
    raise ValueError(f"{name} must be a tuple of >= 2 positive ints [N, ..., C], got {shape!r}")
  return tuple(int(d) for d in shape)


def nfe(method: str, num_steps: int, process=None, options: tuple = ()) -> int:
  """Network calls (function evaluations) of num_steps steps of `method`: steps x the stepper's nfe
  (the last step counted with its final_nfe where it has one)."""
  from jaxddpm.core.process import make_process  # noqa: PLC0415
  s = STEPPERS[method](make_process("flow") if process is None else process, SamplerConfig(method, options=tuple(options)))
  return num_steps * s.nfe - (0 if s.final_nfe is None or num_steps < 1 else s.nfe - s.final_nfe)


def snapshot_indices(num_steps: int, snapshot_every: int | None) -> np.ndarray:
  """Which scan steps record a snapshot: the last step (t = index 0) and every snapshot_every-th step
  before it, i.e. scan positions i with (num_steps - 1 - i) % snapshot_every == 0, in order. [S]."""
  if snapshot_every is None:
    return np.zeros((0,), np.int64)
  return np.arange(num_steps)[(num_steps - 1 - np.arange(num_steps)) % snapshot_every == 0]


def _check_model_output(out, x, cfg: SamplerConfig):
  want = x.shape[:-1] + (output_channels(x.shape[-1], cfg.var_type),)
  if jnp.shape(out) != want:
    raise ValueError(f"model_fn returned shape {jnp.shape(out)} for x_t of shape {x.shape}, but "
                     f"mean_type={cfg.mean_type!r} with var_type={cfg.var_type!r} needs {want}"
                     + (" (2x the channels: mean and variance parts)" if want[-1] != x.shape[-1] else ""))


def sample_keys(key, sample_offset, batch: int):
  """key_i = fold_in(key, sample_offset + i) for i < batch: a [batch] array of keys."""
  idx = jnp.asarray(sample_offset, jnp.int32) + jnp.arange(batch, dtype=jnp.int32)
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)


def _fold(keys, tag):
  return jax.vmap(lambda k: jax.random.fold_in(k, tag))(keys)


def _constrain_fn(sharding):
  return (lambda a, spec: a) if sharding is None else (
      lambda a, spec: jax.lax.with_sharding_constraint(a, NamedSharding(sharding, spec)))


def _slots(N: int, cfg: SamplerConfig):
  """(snapshot positions [S], snapshot slot of each scan position [N], -1 for none)."""
  positions = snapshot_indices(N, cfg.snapshot_every)
  slot_of_step = np.full((N,), -1, np.int32)
  slot_of_step[positions] = np.arange(len(positions), dtype=np.int32)
  return positions, slot_of_step


def _stepper(process, N: int, cfg: SamplerConfig):
  return STEPPERS[cfg.method](process, dataclasses.replace(cfg, options=cfg.options + (("num_steps", N),)))


def chain_start(process, grid, key, x_T, sample_offset, shape, cfg: SamplerConfig, sharding=None):
  """The scan carry before the first step: (stepper.init(x_T), snapshot buffers). Traceable.

  x_T: [B, ...] or None for prior_std N(0, I) drawn from fold_in(fold_in(key, i), X_T_TAG).
  """
  B, image_shape = shape[0], shape[1:]
  constrain = _constrain_fn(sharding)
  if x_T is None:
    keys = constrain(sample_keys(key, sample_offset, B), P("data"))
    scale = 1.0 if process.is_discrete else process.prior_std(grid[0])
    x_T = scale * jax.vmap(lambda k: jax.random.normal(k, image_shape, jnp.float32))(_fold(keys, X_T_TAG))
  x_T = constrain(jnp.asarray(x_T, jnp.float32), P("data"))
  N = grid.shape[0] - 1
  S = len(_slots(N, cfg)[0])
  snaps0 = ()
  if S:
    buf = constrain(jnp.zeros((S,) + tuple(shape), jnp.float32), P(None, "data"))
    snaps0 = (buf, buf)
  return _stepper(process, N, cfg).init(x_T), snaps0


def chain_steps(model_fn: Callable, process, grid, key, carry, sample_offset, shape, cfg: SamplerConfig,
                sharding=None, first=0, length: int | None = None):
  """Scan positions first .. first + length - 1 (position n goes from grid[n] to grid[n + 1]) from
  `carry`; returns the carry after them. first may be traced, length is static (default: all N).
  Running the chain in consecutive pieces gives bitwise the samples of one scan. Traceable."""
  B = shape[0]
  constrain = _constrain_fn(sharding)
  keys = constrain(sample_keys(key, sample_offset, B), P("data"))
  N = grid.shape[0] - 1
  length = N if length is None else length
  _, slot_of_step = _slots(N, cfg)
  S = int((slot_of_step >= 0).sum())
  stepper = _stepper(process, N, cfg)
  if process.is_discrete:
    tags = process.net_time(grid[:-1]).astype(jnp.int32)
    net_time = lambda t: jnp.full((B,), process.net_time(t), jnp.int32)
  else:
    tags = jnp.arange(N, dtype=jnp.int32)
    net_time = lambda t: jnp.full((B,), process.net_time(t), jnp.float32)

  def call_model(z, t):
    out = model_fn(z, net_time(t))
    _check_model_output(out, z, cfg)
    return out

  def body(carry, xs):
    state, snaps = carry
    t, t_next, tag, slot = xs
    x = state["x"]
    new = stepper.step(call_model, state, t, t_next, constrain(_fold(keys, tag), P("data")))
    new = dict(new, x=constrain(new["x"], P("data")))
    if S:
      def put(buf, val):
        s = jnp.maximum(slot, 0)
        old = jax.lax.dynamic_index_in_dim(buf, s, 0, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(buf, jnp.where(slot >= 0, val.astype(buf.dtype), old), s, 0)
      snaps = (put(snaps[0], new["pred_x0"]), put(snaps[1], x))
    return (new, snaps), None

  xs = (grid[:-1], grid[1:], tags, jnp.asarray(slot_of_step))
  if length != N:
    xs = tuple(jax.lax.dynamic_slice_in_dim(a, first, length) for a in xs)
  carry, _ = jax.lax.scan(body, carry, xs)
  return carry


def chain_result(process, grid, carry, cfg: SamplerConfig) -> dict:
  """The output dict of `sample` from the carry after the last step."""
  state, snaps = carry
  result = {"samples": state["x"]}
  if snaps:
    positions, _ = _slots(grid.shape[0] - 1, cfg)
    result["pred_x0_snapshots"] = snaps[0]
    result["x_t_snapshots"] = snaps[1]
    at = grid[jnp.asarray(positions, jnp.int32)]
    result["snapshot_timesteps"] = process.net_time(at) if process.is_discrete else at
  return result


def run_chain(model_fn: Callable, process, grid, key, x_T, sample_offset, shape, cfg: SamplerConfig,
              sharding=None) -> dict:
  """The scan over grid[0] > ... > grid[-1]; returns the output dict (see `sample`). Traceable.

  grid: [N + 1] (int32 schedule entries ending in -1 for the discrete chain, float32 process times
  ending in 0 otherwise); sharding: an optional mesh whose "data" axis the batch is constrained to.
  """
  carry = chain_start(process, grid, key, x_T, sample_offset, shape, cfg, sharding)
  carry = chain_steps(model_fn, process, grid, key, carry, sample_offset, shape, cfg, sharding)
  return chain_result(process, grid, carry, cfg)


def segment_length(num_steps: int, max_segments: int) -> int:
  """The length of each of at most max_segments equal segments of a chain of num_steps steps: the
  smallest divisor L of num_steps with num_steps / L <= max_segments (equal lengths compile once)."""
  for n in range(max(1, min(int(max_segments), num_steps)), 0, -1):
    if num_steps % n == 0:
      return num_steps // n
  return num_steps


@functools.partial(jax.jit, static_argnames=("model_fn", "shape", "cfg"))
def _sample_jit(process, grid, key, x_T, sample_offset, *, model_fn, shape, cfg):
  return run_chain(model_fn, process, grid, key, x_T, sample_offset, shape, cfg)


def sample(model_fn: Callable, schedule, shape, key, *, method: str = "ancestral", timesteps=None,
           grid: str = "uniform", eta: float = 0.0, mean_type: str = "eps", var_type: str = "fixed_large",
           clip_denoised: bool = True, snapshot_every: int | None = None, x_T=None, sample_offset=0,
           options=None):
  """Draws x_0 ~ p_theta by running the reverse chain as one `lax.scan` (see the module docstring).

  schedule: the discrete `Schedule` or a continuous `Process` (`jaxddpm.make_process`).
  method: a key of STEPPERS: "ancestral" (DDPM Algorithm 2 with the variance of var_type; on a process
    the posterior q(z_s | z_t, x_hat)), "ddim" (DDIM eq. 12 with sigma_t(eta)), "euler" (the
    probability-flow ODE, continuous processes only), "heun" (EDM's second-order step, optional churn),
    "dpm_solver_pp" / "dpm_solver_pp_3m" (DPM-Solver++ 2M / 3M), "euler_maruyama" and "pc" (the reverse
    SDE; predictor-corrector with Langevin steps; continuous processes only).
  options: the stepper's own options, a dict: heun {"s_churn", "s_tmin", "s_tmax", "s_noise"} (EDM
    Alg. 2), pc {"snr", "corrector_steps"} (see `options.STEPPER_OPTIONS`).
  timesteps: discrete chain: respaces the schedule first (see `resolve_timesteps`: None = all its
    entries, an int/str/list spec for `space_timesteps`, or an index array; numpy, before tracing).
    Continuous process: the number of steps N (default 100) of the time grid `grid` ("uniform",
    "logsnr", "edm"; see `grids`).
  mean_type: the network's output type: MEAN_TYPES on the discrete chain, OUTPUTS ("eps", "x0", "v",
    "u", "score") on a continuous process.

  Args:
    model_fn: (x_t [B, ...] float32, t [B] network time: int32 original timesteps on the discrete chain,
      float32 1000 t on a process) -> [B, ..., C] (or 2C for learned variances). Hashed by identity:
      reuse the same function object to reuse the compiled sampler (arrays it closes over are baked into
      the program; for a network with changing parameters use `make_sampler` / `sample_batched`).
    shape: (B, ..., C), the batch of samples.
    key: a jax PRNG key (traced: a new key does not recompile).
    x_T: optional [B, ...] starting noise (default: prior_std N(0, I) from fold_in(fold_in(key, i), X_T_TAG)).
    sample_offset: global index of the first sample of this batch (int, may be traced).
    snapshot_every: record (pred_x0, x_t) at the last step and every snapshot_every-th step before it.
  Returns:
    {"samples": [B, ...] float32} and, with snapshot_every, "pred_x0_snapshots" [S, B, ...] (the model's
    x_0 estimate at each recorded step), "x_t_snapshots" [S, B, ...] (the x_t it was computed from) and
    "snapshot_timesteps" [S] (their original timesteps, decreasing, the last one schedule.timesteps[0];
    process times for a continuous process).
  Works under an outer `jit` too (then timesteps must be None unless the schedule is concrete).
  """
  cfg = make_config(method, eta, mean_type, var_type, clip_denoised, snapshot_every, schedule, options)
  shape = check_shape(shape)
  if not callable(model_fn):
    raise ValueError(f"model_fn must be callable (x_t, t) -> output, got {model_fn!r}")
  if isinstance(sample_offset, numbers.Integral) and sample_offset < 0:
    raise ValueError(f"sample_offset must be >= 0, got {sample_offset}")
  if x_T is not None and jnp.shape(x_T) != shape:
    raise ValueError(f"x_T has shape {jnp.shape(x_T)} but shape={shape}")
  process, time_grid = make_time_grid(schedule, timesteps, grid)
  return _sample_jit(process, time_grid, key, x_T, sample_offset, model_fn=model_fn, shape=shape, cfg=cfg)
