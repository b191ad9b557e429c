"""Compiled samplers: one `lax.scan` over a timestep array (floor 1: imports only jax and numpy).

Ancestral sampling (DDPM, Ho et al. 2020, Algorithm 2) for every variance type, DDIM (Song et al. 2021,
eq. 12 with sigma_t(eta) of eq. 16), and both on a respaced schedule (Nichol & Dhariwal 2021, section 4).

The reverse chain x_T -> x_{T-1} -> ... -> x_0 is a single `lax.scan` over the schedule's entries
K-1, ..., 0: it is traced once whatever T is, and the PRNG key is a traced argument, so a new seed never
recompiles. Within a schedule (respaced or not) step k goes from entry k to entry k - 1, whose alphabar
is ``schedule.alphas_cumprod_prev[k]``; the network is called as ``model_fn(x_t, t)`` with t int32 [B]
the ORIGINAL timestep ``schedule.timesteps[k]``.

Randomness is per sample: sample i of a run (global index i = sample_offset + position in the batch)
uses key_i = fold_in(key, i), x_T = N(0, I) drawn from fold_in(key_i, X_T_TAG), and the noise of the
step at original timestep t from fold_in(key_i, t). The same key therefore gives the same images
whatever the batch size, the split into batches, or the number of devices.

Public names:
  p_sample, ddim_step       one reverse step, for research code that writes its own loop;
  sample                    the whole chain for one batch, model_fn(x_t, t); traceable, jitted once per
                            (model_fn, shape, config);
  make_sampler              a jitted, batch-sharded sampler(params, key, sample_offset) for
                            apply_fn(params, x_t, t), compiled once and reused;
  sample_batched            any number of samples in fixed-size sharded batches (pad and drop).
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxddpm.diffusion import (MEAN_TYPES, VAR_TYPES, check_choice, extract, output_channels,
                               p_mean_variance)
from jaxddpm.schedule import Schedule, respace, space_timesteps

METHODS = ("ancestral", "ddim")
# fold_in tag for x_T; network timesteps are < 2^31 - 1, so it never collides with a step's tag.
X_T_TAG = 2 ** 31 - 1


# ----------------------------------------------------------------------------------- single steps
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
  _check_eta(eta, "ddim")
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


# ------------------------------------------------------------------------------------- validation
@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """The static (hashable) choices of a sampler; one compiled program per config and shape."""
  method: str = "ancestral"
  eta: float = 0.0
  mean_type: str = "eps"
  var_type: str = "fixed_large"
  clip_denoised: bool = True
  snapshot_every: int | None = None


def _check_eta(eta, method):
  if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not np.isfinite(eta):
    raise ValueError(f"eta must be a finite Python float >= 0, got {eta!r}")
  if eta < 0:
    raise ValueError(f"eta must be >= 0 (DDIM eq. 16), got {eta}")
  if method == "ancestral" and eta != 0:
    raise ValueError(f"eta={eta} applies only to method='ddim'; ancestral sampling has its variance "
                     "from var_type (use method='ddim', eta=1.0 for DDIM's stochastic sampler)")


def _make_config(method, eta, mean_type, var_type, clip_denoised, snapshot_every) -> SamplerConfig:
  check_choice("method", method, METHODS)
  check_choice("mean_type", mean_type, MEAN_TYPES)
  check_choice("var_type", var_type, VAR_TYPES)
  _check_eta(eta, method)
  if not isinstance(clip_denoised, (bool, np.bool_)):
    raise ValueError(f"clip_denoised must be True or False, got {clip_denoised!r}")
  if snapshot_every is not None and (isinstance(snapshot_every, bool)
                                     or not isinstance(snapshot_every, numbers.Integral)
                                     or snapshot_every < 1):
    raise ValueError(f"snapshot_every must be None or an int >= 1, got {snapshot_every!r}")
  return SamplerConfig(method, float(eta), mean_type, var_type, bool(clip_denoised),
                       None if snapshot_every is None else int(snapshot_every))


def _check_shape(shape, name="shape") -> tuple[int, ...]:
  try:
    shape = tuple(shape)
  except TypeError:
    raise ValueError(f"{name} must be a tuple of positive ints [N, ..., C], got {shape!r}") from None
  if len(shape) < 2 or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1
                               for d in shape):
    raise ValueError(f"{name} must be a tuple of >= 2 positive ints [N, ..., C], got {shape!r}")
  return tuple(int(d) for d in shape)


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


def snapshot_indices(num_steps: int, snapshot_every: int | None) -> np.ndarray:
  """Which scan steps record a snapshot: the last step (t = index 0) and every snapshot_every-th step
  before it, i.e. scan positions i with (num_steps - 1 - i) % snapshot_every == 0, in order. [S]."""
  if snapshot_every is None:
    return np.zeros((0,), np.int64)
  return np.arange(num_steps)[(num_steps - 1 - np.arange(num_steps)) % snapshot_every == 0]


# ------------------------------------------------------------------------------------------ chain
def _check_model_output(out, x, cfg: SamplerConfig):
  want = x.shape[:-1] + (output_channels(x.shape[-1], cfg.var_type),)
  if jnp.shape(out) != want:
    raise ValueError(f"model_fn returned shape {jnp.shape(out)} for x_t of shape {x.shape}, but "
                     f"mean_type={cfg.mean_type!r} with var_type={cfg.var_type!r} needs {want}"
                     + (" (2x the channels: mean and variance parts)" if want[-1] != x.shape[-1] else ""))


def _sample_keys(key, sample_offset, batch: int):
  """key_i = fold_in(key, sample_offset + i) for i < batch: a [batch] array of keys."""
  idx = jnp.asarray(sample_offset, jnp.int32) + jnp.arange(batch, dtype=jnp.int32)
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)


def _normal(keys, tag, image_shape):
  """Per-sample N(0, I) draws [B, *image_shape] from fold_in(key_i, tag)."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, tag), image_shape, jnp.float32))(keys)


def _chain_layout(K: int, cfg: SamplerConfig):
  """(snapshot positions [S], slot of each scan position [K] (-1: none)) of a chain of K steps."""
  positions = snapshot_indices(K, cfg.snapshot_every)
  slot_of_step = np.full((K,), -1, np.int32)
  slot_of_step[positions] = np.arange(len(positions), dtype=np.int32)
  return positions, slot_of_step


def _constrain_fn(sharding):
  return (lambda a, spec: a) if sharding is None else (
      lambda a, spec: jax.lax.with_sharding_constraint(a, NamedSharding(sharding, spec)))


def _chain_start(schedule: Schedule, key, x_T, sample_offset, shape, cfg: SamplerConfig, sharding=None):
  """The scan carry before the first step: (x_T, snapshot buffers). Traceable."""
  constrain = _constrain_fn(sharding)
  if x_T is None:
    x_T = _normal(constrain(_sample_keys(key, sample_offset, shape[0]), P("data")), X_T_TAG, shape[1:])
  x_T = constrain(jnp.asarray(x_T, jnp.float32), P("data"))
  S = len(_chain_layout(schedule.num_timesteps, cfg)[0])
  snaps0 = ()
  if S:
    buf = constrain(jnp.zeros((S,) + tuple(shape), jnp.float32), P(None, "data"))
    snaps0 = (buf, buf)
  return x_T, snaps0


def _chain_steps(model_fn, schedule: Schedule, key, carry, sample_offset, shape, cfg: SamplerConfig,
                 sharding=None, first=0, length=None):
  """Scan positions first .. first + length - 1 of the chain (position i runs schedule entry K-1-i)
  from `carry`; returns the carry after them. first may be traced, length is static. Traceable."""
  B, image_shape = shape[0], shape[1:]
  constrain = _constrain_fn(sharding)
  keys = constrain(_sample_keys(key, sample_offset, B), P("data"))
  K = schedule.num_timesteps
  length = K if length is None else length
  _, slot_of_step = _chain_layout(K, cfg)
  S = int((slot_of_step >= 0).sum())
  needs_noise = cfg.method == "ancestral" or cfg.eta != 0

  def step(carry, xs):
    x, snaps = carry
    k, slot = xs
    t_net = schedule.timesteps[k]
    out = model_fn(x, jnp.full((B,), t_net, jnp.int32))
    _check_model_output(out, x, cfg)
    t_idx = jnp.full((B,), k, jnp.int32)
    noise = constrain(_normal(keys, t_net, image_shape), P("data")) if needs_noise else None
    kw = dict(mean_type=cfg.mean_type, var_type=cfg.var_type, clip_denoised=cfg.clip_denoised)
    if cfg.method == "ancestral":
      x_prev, pred_x0 = p_sample(schedule, out, x, t_idx, noise, **kw)
    else:
      x_prev, pred_x0 = ddim_step(schedule, out, x, t_idx, noise, eta=cfg.eta, **kw)
    x_prev = constrain(x_prev, P("data"))
    if S:
      def put(buf, val):
        s = jnp.maximum(slot, 0)
        old = jax.lax.dynamic_index_in_dim(buf, s, 0, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(buf, jnp.where(slot >= 0, val.astype(buf.dtype), old), s, 0)
      snaps = (put(snaps[0], pred_x0), put(snaps[1], x))
    return (x_prev, snaps), None

  ks, slots = jnp.arange(K - 1, -1, -1, dtype=jnp.int32), jnp.asarray(slot_of_step)
  if length != K:
    ks, slots = (jax.lax.dynamic_slice_in_dim(a, first, length) for a in (ks, slots))
  carry, _ = jax.lax.scan(step, carry, (ks, slots))
  return carry


def _chain_result(schedule: Schedule, carry, cfg: SamplerConfig) -> dict:
  """The output dict of `sample` from the carry after the last step."""
  x0, snaps = carry
  result = {"samples": x0}
  if snaps:
    K = schedule.num_timesteps
    positions, _ = _chain_layout(K, cfg)
    result["pred_x0_snapshots"] = snaps[0]
    result["x_t_snapshots"] = snaps[1]
    result["snapshot_timesteps"] = schedule.timesteps[jnp.asarray(K - 1 - positions, jnp.int32)]
  return result


def _reverse_chain(model_fn, schedule: Schedule, key, x_T, sample_offset, shape, cfg: SamplerConfig,
                   sharding=None):
  """The scan over schedule entries K-1..0; returns the output dict (see `sample`). Traceable."""
  carry = _chain_start(schedule, key, x_T, sample_offset, shape, cfg, sharding)
  carry = _chain_steps(model_fn, schedule, key, carry, sample_offset, shape, cfg, sharding)
  return _chain_result(schedule, carry, cfg)


def segment_length(num_steps: int, max_segments: int) -> int:
  """The length of each of at most max_segments equal segments of a chain of num_steps steps: the
  smallest divisor L of num_steps with num_steps / L <= max_segments (equal lengths compile once)."""
  for n in range(max(1, min(int(max_segments), num_steps)), 0, -1):
    if num_steps % n == 0:
      return num_steps // n
  return num_steps


@functools.partial(jax.jit, static_argnames=("model_fn", "shape", "cfg"))
def _sample_jit(schedule, key, x_T, sample_offset, *, model_fn, shape, cfg):
  return _reverse_chain(model_fn, schedule, key, x_T, sample_offset, shape, cfg)


def sample(model_fn: Callable, schedule: Schedule, shape, key, *, method: str = "ancestral",
           timesteps=None, eta: float = 0.0, mean_type: str = "eps", var_type: str = "fixed_large",
           clip_denoised: bool = True, snapshot_every: int | None = None, x_T=None, sample_offset=0):
  """Draws x_0 ~ p_theta by running the reverse chain x_T -> x_0 as one `lax.scan`.

  method="ancestral": DDPM Algorithm 2 (`p_sample`) with the variance of var_type; method="ddim":
  DDIM eq. 12 (`ddim_step`) with sigma_t(eta). timesteps respaces the schedule first (see
  `resolve_timesteps`: None = all its entries, an int/str/list spec for `space_timesteps`, or an index
  array); respacing runs in numpy before tracing.

  Args:
    model_fn: (x_t [B, ...] float32, t int32 [B] original timesteps) -> [B, ..., C] (or 2C for learned
      variances). Hashed by identity: reuse the same function object to reuse the compiled sampler
      (arrays it closes over are baked into the program; for a network with changing parameters use
      `make_sampler` / `sample_batched`, which take the parameters as an argument).
    schedule: the `Schedule` (concrete when timesteps is not None).
    shape: (B, ..., C), the batch of samples.
    key: a jax PRNG key (traced: a new key does not recompile).
    x_T: optional [B, ...] starting noise (default: N(0, I) from fold_in(fold_in(key, i), X_T_TAG)).
    sample_offset: global index of the first sample of this batch (int, may be traced).
    snapshot_every: record (pred_x0, x_t) at the last step and every snapshot_every-th step before it.
  Returns:
    {"samples": [B, ...] float32} and, with snapshot_every, "pred_x0_snapshots" [S, B, ...] (the model's
    x_0 estimate at each recorded step), "x_t_snapshots" [S, B, ...] (the x_t it was computed from) and
    "snapshot_timesteps" int32 [S] (their original timesteps, decreasing, the last one schedule.timesteps[0]).
  Works under an outer `jit` too (then timesteps must be None unless the schedule is concrete).
  """
  cfg = _make_config(method, eta, mean_type, var_type, clip_denoised, snapshot_every)
  shape = _check_shape(shape)
  if not callable(model_fn):
    raise ValueError(f"model_fn must be callable (x_t, t) -> output, got {model_fn!r}")
  if isinstance(sample_offset, numbers.Integral) and sample_offset < 0:
    raise ValueError(f"sample_offset must be >= 0, got {sample_offset}")
  if x_T is not None and jnp.shape(x_T) != shape:
    raise ValueError(f"x_T has shape {jnp.shape(x_T)} but shape={shape}")
  schedule = resolve_timesteps(schedule, timesteps)
  return _sample_jit(schedule, key, x_T, sample_offset, model_fn=model_fn, shape=shape, cfg=cfg)


# ------------------------------------------------------------------------------- sharded batches
def data_mesh(devices=None) -> Mesh:
  """The 1-D ("data",) mesh over ``devices`` (default: all global devices)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), ("data",))


@functools.lru_cache(maxsize=64)
def _sharded_sampler(apply_fn, shape, cfg: SamplerConfig, mesh: Mesh):
  """The jitted (params, schedule, key, sample_offset) -> dict for a padded batch `shape` over mesh."""
  def fn(params, schedule, key, sample_offset):
    return _reverse_chain(lambda x, t: apply_fn(params, x, t), schedule, key, None, sample_offset, shape,
                          cfg, sharding=mesh)
  return jax.jit(fn)


@functools.lru_cache(maxsize=64)
def _sharded_segments(apply_fn, shape, cfg: SamplerConfig, mesh: Mesh, length: int):
  """The jitted chain in pieces: start(schedule, key, sample_offset) -> carry, and
  steps(params, schedule, key, sample_offset, carry, first) -> carry after `length` steps from `first`."""
  def start(schedule, key, sample_offset):
    return _chain_start(schedule, key, None, sample_offset, shape, cfg, sharding=mesh)

  def steps(params, schedule, key, sample_offset, carry, first):
    return _chain_steps(lambda x, t: apply_fn(params, x, t), schedule, key, carry, sample_offset, shape, cfg,
                        sharding=mesh, first=first, length=length)
  return jax.jit(start), jax.jit(steps, donate_argnums=(4,))


def make_sampler(apply_fn: Callable, schedule: Schedule, shape, *, method: str = "ancestral",
                 timesteps=None, eta: float = 0.0, mean_type: str = "eps", var_type: str = "fixed_large",
                 clip_denoised: bool = True, snapshot_every: int | None = None, mesh: Mesh | None = None):
  """A compiled sampler for one batch, sharded over a 1-D ("data",) mesh: sampler(params, key,
  sample_offset=0) -> the dict of `sample` for samples sample_offset .. sample_offset + B - 1.

  The batch is padded up to a multiple of the mesh size (extra samples are generated and dropped);
  params, schedule and key are replicated (NamedSharding(mesh, P())), the batch is sharded
  (P("data")). The jitted program is built once per (apply_fn, shape, config, mesh) and cached, and
  compiled once per parameter shapes; key and sample_offset are traced.

  Args:
    apply_fn: (params, x_t [B', ...], t int32 [B']) -> output, e.g.
      ``lambda p, x, t: unet.apply({"params": p}, x, t)``. Hashed by identity.
    schedule, shape, method, timesteps, eta, mean_type, var_type, clip_denoised, snapshot_every: as in
      `sample` (timesteps respaced here, once).
    mesh: a jax.sharding.Mesh with the single axis "data" (default: all devices).
  Returns:
    sampler, with attributes ``jitted`` (the jax.jit function of (params, schedule, key, sample_offset)
    on the padded batch), ``schedule`` (the respaced schedule), ``padded_shape`` and ``place`` (puts its
    arguments on the mesh, replicated), so ``sampler.jitted.lower(*sampler.place(params, key, 0))``
    gives the compiled program.
  """
  cfg = _make_config(method, eta, mean_type, var_type, clip_denoised, snapshot_every)
  shape = _check_shape(shape)
  if not callable(apply_fn):
    raise ValueError(f"apply_fn must be callable (params, x_t, t) -> output, got {apply_fn!r}")
  mesh = data_mesh() if mesh is None else mesh
  if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != ("data",):
    raise ValueError(f"mesh must be a jax.sharding.Mesh with axis_names ('data',), got {mesh!r}")
  schedule = resolve_timesteps(schedule, timesteps)
  n = mesh.size
  B = shape[0]
  padded = (-(-B // n) * n,) + shape[1:]
  jitted = _sharded_sampler(apply_fn, padded, cfg, mesh)
  replicated = NamedSharding(mesh, P())

  def place(params, key, sample_offset=0):
    if isinstance(sample_offset, numbers.Integral) and sample_offset < 0:
      raise ValueError(f"sample_offset must be >= 0, got {sample_offset}")
    args = (params, schedule, key, jnp.asarray(sample_offset, jnp.int32))
    return jax.device_put(args, replicated)

  def unpad(out):
    if padded[0] != B:
      out = {k: (v if k == "snapshot_timesteps" else v[:B] if k == "samples" else v[:, :B])
             for k, v in out.items()}
    return out

  def sampler(params, key, sample_offset=0) -> dict[str, Any]:
    return unpad(jitted(*place(params, key, sample_offset)))

  def in_segments(params, key, sample_offset=0, *, max_segments=10, on_segment=None) -> dict[str, Any]:
    """The same samples as sampler(...), the chain run as at most max_segments jitted pieces of equal
    length; on_segment(steps_done, num_steps) is called after each (it waits for the piece)."""
    K = schedule.num_timesteps
    length = segment_length(K, max_segments)
    start, steps = _sharded_segments(apply_fn, padded, cfg, mesh, length)
    params, sched, key, offset = place(params, key, sample_offset)
    carry = start(sched, key, offset)
    for first in range(0, K, length):
      carry = steps(params, sched, key, offset, carry, jnp.asarray(first, jnp.int32))
      if on_segment is not None:
        jax.block_until_ready(carry)
        on_segment(first + length, K)
    return unpad(_chain_result(sched, carry, cfg))

  sampler.in_segments = in_segments
  sampler.jitted = jitted
  sampler.schedule = schedule
  sampler.padded_shape = padded
  sampler.place = place
  return sampler


def sample_batched(apply_fn: Callable, params, schedule: Schedule, shape, key, *, batch_size: int | None = None,
                   mesh: Mesh | None = None, sample_offset: int = 0, on_steps: Callable | None = None,
                   max_segments: int = 10, **kwargs) -> dict[str, np.ndarray]:
  """shape[0] samples in batches of batch_size on a device mesh; returns host numpy arrays.

  Batch b holds global sample indices sample_offset + b * batch_size + [0, batch_size); every batch has
  the same shape (the last one is padded, and padding to the mesh size too), so the program compiles
  once, and the result is identical for any batch_size or mesh (each sample's noise comes from its global
  index). kwargs: method, timesteps, eta, mean_type, var_type, clip_denoised, snapshot_every (see
  `sample`). With on_steps, each batch's chain runs in at most max_segments jitted pieces (the same
  samples) and on_steps(steps_done, K) reports after each piece (a progress bar).
  Returns the dict of `sample` with N = shape[0] samples (snapshots [S, N, ...]).
  """
  shape = _check_shape(shape)
  N = shape[0]
  batch_size = N if batch_size is None else batch_size
  if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  if isinstance(sample_offset, bool) or not isinstance(sample_offset, numbers.Integral) or sample_offset < 0:
    raise ValueError(f"sample_offset must be an int >= 0, got {sample_offset!r}")
  batch_size = min(int(batch_size), N)
  sampler = make_sampler(apply_fn, schedule, (batch_size,) + shape[1:], mesh=mesh, **kwargs)
  pieces = []
  for start in range(0, N, batch_size):
    if on_steps is None:
      out = sampler(params, key, sample_offset + start)
    else:
      out = sampler.in_segments(params, key, sample_offset + start, max_segments=max_segments,
                                on_segment=lambda done, K: on_steps(done, K))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415
      out = multihost_utils.process_allgather(out, tiled=True)
    pieces.append(jax.device_get(out))
  keep = lambda a, axis: np.concatenate(a, axis=axis)
  result = {"samples": keep([p["samples"] for p in pieces], 0)[:N]}
  if "pred_x0_snapshots" in pieces[0]:
    result["pred_x0_snapshots"] = keep([p["pred_x0_snapshots"] for p in pieces], 1)[:, :N]
    result["x_t_snapshots"] = keep([p["x_t_snapshots"] for p in pieces], 1)[:, :N]
    result["snapshot_timesteps"] = np.asarray(pieces[0]["snapshot_timesteps"])
  return result
