"""Likelihoods (floor 1): the discrete chain's variational bound in bits/dim (`calc_bpd_loop`, DDPM eq. 5).

The probability-flow ODE likelihood of continuous processes (Song et al. 2021, appendix D) belongs here too.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxddpm.core import diffusion
from jaxddpm.core.losses import mean_flat, prior_bpd, vb_terms_bpd
from jaxddpm.core.schedule import Schedule


def calc_bpd_loop(s: Schedule, model_fn: Callable, x0, key, *, mean_type: str = "eps",
                  var_type: str = "fixed_large", clip_denoised: bool = False, example_ids=None) -> dict:
  """The full variational bound in bits/dim, L_T + sum_t L_{t-1} (DDPM eq. 5), as one `lax.scan` over t.

  x0: [B, H, W, C] data in [-1, 1] (8-bit values); key: PRNG key. The noise of example i at step t is
  drawn from fold_in(fold_in(key, t), example_ids[i]) (default ids arange(B)), so results do not depend
  on how a dataset is split into batches or devices.
  Returns {"total_bpd" [B], "prior_bpd" [B], "vb" [B, T], "x0_mse" [B, T], "mse" [B, T] (eps MSE)}.
  """
  B = x0.shape[0]
  ids = jnp.arange(B, dtype=jnp.uint32) if example_ids is None else jnp.asarray(example_ids, jnp.uint32)
  if ids.shape != (B,):
    raise ValueError(f"example_ids must have shape ({B},), got {ids.shape}")

  def body(carry, i):
    t = jnp.full((B,), i, jnp.int32)
    k = jax.random.fold_in(key, i)
    noise = jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(k, j), x0.shape[1:], x0.dtype))(ids)
    x_t = diffusion.q_sample(s, x0, t, noise)
    vb, out = vb_terms_bpd(s, model_fn(x_t, s.timesteps[t]), x0, x_t, t, mean_type=mean_type,
                           var_type=var_type, clip_denoised=clip_denoised)
    return carry, (vb, mean_flat(jnp.square(out.pred_x0 - x0)), mean_flat(jnp.square(out.pred_eps - noise)))

  _, (vb, x0_mse, mse) = jax.lax.scan(body, None, jnp.arange(s.num_timesteps - 1, -1, -1))
  vb, x0_mse, mse = (jnp.flip(a, 0).T for a in (vb, x0_mse, mse))  # [B, T], t ascending
  prior = prior_bpd(s, x0)
  return {"total_bpd": vb.sum(axis=1) + prior, "prior_bpd": prior, "vb": vb, "x0_mse": x0_mse, "mse": mse}
