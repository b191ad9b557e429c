"""What every stepper shares (floor 1): the `Stepper` interface, the sampler's static options, per-sample
noise, and the denoiser's (x_hat, eps_hat) from a network output.

A stepper is ``init(x_T) -> state`` and ``step(model_fn, state, t, t_next, key) -> state``. The state is
a dict pytree carried by the engine's `lax.scan`; it always holds "x" (the current z_t, [B, ...]) and
"pred_x0" (the last denoised estimate, for snapshots), and may hold anything else (a multistep solver's
history). ``model_fn(z, t)`` takes the grid's time t (a scalar: a schedule index for the discrete
chain, process time otherwise) and returns the raw network output; ``key`` is a [B] array of keys, one
per sample, already folded with (sample index, step), so a stepper draws its noise with `normal` (and
`jax.random.fold_in` for more than one draw per step). ``nfe`` is the network calls per step
(``final_nfe`` those of the last step, when it differs).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxddpm.core import diffusion


class Stepper(NamedTuple):
  init: Callable
  step: Callable
  nfe: int
  final_nfe: int | None = None  # network calls of the last step when it differs from nfe (Heun's Euler step)


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """The static (hashable) choices of a sampler; one compiled program per config and shape."""
  method: str = "ancestral"
  eta: float = 0.0
  mean_type: str = "eps"
  var_type: str = "fixed_large"
  clip_denoised: bool = True
  snapshot_every: int | None = None
  # a stepper's own static options as sorted (name, value) pairs (see `option`; engine.STEPPER_OPTIONS
  # lists each stepper's names and defaults), plus ("num_steps", N) set by the engine
  options: tuple = ()


def option(cfg: SamplerConfig, name: str, default):
  """The stepper option ``name`` of cfg (``default`` when it is not set)."""
  return dict(cfg.options).get(name, default)


def normal(key, x):
  """Per-sample N(0, I) like x [B, ...] from a [B] array of keys."""
  return jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], jnp.float32))(key)


def init_state(x_T):
  """The state every stepper starts from: {"x": x_T, "pred_x0": zeros}."""
  x = jnp.asarray(x_T, jnp.float32)
  return {"x": x, "pred_x0": jnp.zeros_like(x)}


def denoise(cfg: SamplerConfig, out, z, p: diffusion.PathPoint):
  """(x_hat, eps_hat) of a network output on a continuous path; with cfg.clip_denoised, x_hat is
  clipped to [-1, 1] and eps_hat recomputed from it, eps_hat = (z - alpha x_hat) / sigma."""
  x0, eps = diffusion.x0_eps_from_output(cfg.mean_type, out.astype(jnp.float32), z, p)
  if cfg.clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = (z - p.alpha * x0) / p.sigma
  return x0, eps
