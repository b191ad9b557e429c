"""The pictures people look at: progressive generation, interpolation in x_t, and the per-term bound.

* `progressive_grid`: the model's prediction of x_0 along the reverse chain (DDPM Fig. 6): rows are
  samples, columns are snapshots from t = T (left) to t = 1 (right).
* `interpolate` / `interpolation_grid`: DDPM Fig. 8. Two real images x_0, x_0' are encoded with the same
  noise, x_t = q_sample(x_0, t, eps), x_t' = q_sample(x_0', t, eps); the latents are mixed linearly,
  xbar_t = (1 - lambda) x_t + lambda x_t', and decoded with the reverse process from t to 0.
* `plot_bpd_terms`: the terms L_{t-1} of the bound per t (as in Improved DDPM Fig. 2) and the rate /
  distortion curves of DDPM Fig. 5, drawn with matplotlib (no pyplot, no display needed).

Everything here takes arrays and returns arrays (or writes one file); the wiring to runs, configs and
workdirs is in `jaxddpm.evaluate`.
"""
from __future__ import annotations

import functools
import numbers
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxddpm import diffusion, images, sampling
from jaxddpm.schedule import Schedule

__all__ = ["progressive_grid", "interpolate", "interpolation_grid", "plot_bpd_terms", "bpd_curves"]


def _as_uint8(x, name):
  """uint8 stays as is; floats in [-1, 1] are quantised with `images.to_uint8` (as saved images)."""
  x = np.asarray(x)
  if x.dtype == np.uint8:
    return x
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"{name} must be uint8 or floats in [-1, 1], got dtype {x.dtype}")
  return images.to_uint8(x)


# --------------------------------------------------------------------------- progressive generation
def progressive_grid(snapshots, *, padding: int = 1, pad_value: int = 255):
  """Progressive generation figure: snapshots [S, N, H, W, C] (S snapshots of N samples, e.g.
  "pred_x0_snapshots" of `sampling.sample` with snapshot_every) -> uint8 image [H', W', C] with
  N rows (samples) and S columns (snapshots in chain order, t decreasing to the right).

  H' = N (H + p) + p, W' = S (W + p) + p for p = padding; cell (r, c) is snapshots[c, r] quantised
  with `images.to_uint8` (floats in [-1, 1]) or taken as is (uint8).
  """
  snapshots = _as_uint8(snapshots, "snapshots")
  if snapshots.ndim != 5:
    raise ValueError(f"snapshots must have shape [S, N, H, W, C], got {snapshots.shape}")
  s, n = snapshots.shape[:2]
  if s == 0 or n == 0:
    raise ValueError(f"snapshots must hold at least one snapshot of one sample, got shape {snapshots.shape}")
  rows = np.swapaxes(snapshots, 0, 1).reshape((n * s,) + snapshots.shape[2:])  # row-major: sample, snapshot
  return images.make_grid(rows, ncols=s, padding=padding, pad_value=pad_value)


# -------------------------------------------------------------------------------------- interpolation
def _check_lambdas(lambdas):
  lam = np.asarray(lambdas, np.float64)
  if lam.ndim != 1 or lam.size == 0 or not np.all(np.isfinite(lam)):
    raise ValueError(f"lambdas must be a non-empty 1-D array of finite numbers, got {lambdas!r}")
  if lam.min() < 0 or lam.max() > 1:
    raise ValueError(f"lambdas must lie in [0, 1], got range [{lam.min()}, {lam.max()}]")
  return lam.astype(np.float32)


@functools.partial(jax.jit, static_argnames=("apply_fn", "cfg"))
def _interpolate_jit(params, full, chain, x_a, x_b, t, lambdas, key, *, apply_fn, cfg):
  """Encode with shared noise, mix, decode every lambda with the same per-sample noise (vmap over lambda)."""
  shape = x_a.shape
  eps = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)
  tt = jnp.full((shape[0],), t, jnp.int32)
  xt_a = diffusion.q_sample(full, x_a, tt, eps)
  xt_b = diffusion.q_sample(full, x_b, tt, eps)
  lam = lambdas.reshape((-1,) + (1,) * x_a.ndim)
  latents = (1.0 - lam) * xt_a[None] + lam * xt_b[None]  # [L, P, H, W, C]
  model_fn = lambda x, tn: apply_fn(params, x, tn)
  decode_key = jax.random.fold_in(key, 1)

  def decode(x_t):
    return sampling.sample(model_fn, chain, shape, decode_key, method=cfg.method, eta=cfg.eta,
                           mean_type=cfg.mean_type, var_type=cfg.var_type, clip_denoised=cfg.clip_denoised,
                           x_T=x_t)["samples"]

  return latents, jax.vmap(decode)(latents)


def interpolate(apply_fn, params, schedule: Schedule, x_a, x_b, t: int, lambdas, key, *,
                method: str = "ancestral", eta: float = 0.0, mean_type: str = "eps",
                var_type: str = "fixed_large", clip_denoised: bool = True) -> dict:
  """Interpolation in x_t (DDPM Fig. 8) between pairs of images.

    x_t = sqrt(alphabar_t) x_a + sqrt(1 - alphabar_t) eps,   x_t' = sqrt(alphabar_t) x_b + sqrt(1 - alphabar_t) eps
    xbar_t(lambda) = (1 - lambda) x_t + lambda x_t'       (the same eps for both: DDPM eq. 4 with shared noise)
    decoded(lambda) ~ p_theta(x_0 | xbar_t(lambda))       (the reverse chain over schedule entries t, ..., 0)

  Every lambda of a pair is decoded with the same reverse-process noise, so a row changes only through
  lambda. The chain runs the sampler `method` (ancestral or DDIM with `eta`) over the original schedule
  entries 0..t (no respacing).

  Args:
    apply_fn: (params, x_t [B, H, W, C], t int32 [B]) -> model output (hashed by identity: reuse it).
    params: the network parameters (a pytree, passed to apply_fn).
    schedule: the (not respaced) training `Schedule`.
    x_a, x_b: [P, H, W, C] float images in [-1, 1] (P pairs).
    t: schedule index in [0, T) to encode to (DDPM Fig. 8 uses t = 500 of T = 1000, i.e. index 499).
    lambdas: [L] mixing weights in [0, 1].
    key: PRNG key (encoding noise from fold_in(key, 0), decoding noise from fold_in(key, 1)).
  Returns:
    {"latents": [L, P, H, W, C] xbar_t, "decoded": [L, P, H, W, C] float32 decoded images} (numpy).
  """
  x_a = np.asarray(x_a, np.float32)
  x_b = np.asarray(x_b, np.float32)
  if x_a.ndim != 4 or x_a.shape != x_b.shape or x_a.shape[0] == 0:
    raise ValueError(f"x_a and x_b must both have shape [P, H, W, C] with P >= 1, got {x_a.shape} and {x_b.shape}")
  T = schedule.num_timesteps
  if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < T:
    raise ValueError(f"t must be an integer schedule index in [0, {T}), got {t!r}")
  lam = _check_lambdas(lambdas)
  cfg = sampling._make_config(method, eta, mean_type, var_type, clip_denoised, None)  # validates
  chain = sampling.resolve_timesteps(schedule, np.arange(int(t) + 1))
  latents, decoded = _interpolate_jit(params, schedule, chain, x_a, x_b, np.int32(t), lam, key,
                                      apply_fn=apply_fn, cfg=cfg)
  return {"latents": np.asarray(latents), "decoded": np.asarray(decoded)}


def interpolation_grid(x_a, x_b, decoded, *, padding: int = 1, pad_value: int = 255):
  """Interpolation figure: row p = [x_a[p], decoded[0, p], ..., decoded[L-1, p], x_b[p]].

  x_a, x_b: [P, H, W, C]; decoded: [L, P, H, W, C] (uint8, or floats in [-1, 1] quantised with
  `images.to_uint8`). Returns uint8 [P (H + p) + p, (L + 2)(W + p) + p, C].
  """
  x_a, x_b = _as_uint8(x_a, "x_a"), _as_uint8(x_b, "x_b")
  decoded = _as_uint8(decoded, "decoded")
  if decoded.ndim != 5 or x_a.shape != x_b.shape or decoded.shape[1:] != x_a.shape:
    raise ValueError(f"decoded must be [L, P, H, W, C] and x_a, x_b [P, H, W, C] of the same P, H, W, C; got "
                     f"{decoded.shape}, {x_a.shape}, {x_b.shape}")
  return progressive_grid(np.concatenate([x_a[None], decoded, x_b[None]]), padding=padding, pad_value=pad_value)


# ------------------------------------------------------------------------------------- bits/dim plot
def bpd_curves(terms_bpd, prior_bpd, x0_mse):
  """Rate and distortion along the chain (DDPM Fig. 5 / progressive coding, Algorithm 3).

  With L_{s-1} = terms_bpd[s - 1] (s = 1..T; L_0 the decoder NLL) and L_T = prior_bpd:
    rate(t) = L_T + sum_{s = t+1}^{T} L_{s-1}  bits/dim received once x_t is known,
    distortion(t) = 127.5 sqrt(E |x0_hat(x_t) - x_0|^2 / D)  RMSE on the [0, 255] scale.
  Returns (t [T] = 1..T, rate [T], distortion [T]) as float64 numpy.
  """
  terms = np.asarray(terms_bpd, np.float64)
  if terms.ndim != 1:
    raise ValueError(f"terms_bpd must be 1-D [T], got shape {terms.shape}")
  T = terms.shape[0]
  tail = np.cumsum(terms[::-1])[::-1]  # tail[i] = sum_{j >= i} terms[j]
  rate = float(prior_bpd) + np.append(tail[1:], 0.0)
  distortion = 127.5 * np.sqrt(np.maximum(np.asarray(x0_mse, np.float64), 0.0))
  return np.arange(1, T + 1), rate, distortion


def plot_bpd_terms(path, terms_bpd, prior_bpd, x0_mse=None, *, title: str | None = None) -> str:
  """Write a PNG of the bound's terms per t (log scale, the prior L_T marked) and, with x0_mse, the
  rate / distortion curves of DDPM Fig. 5 (see `bpd_curves`). Returns the path.

  Drawn with matplotlib's object API (a Figure saved to PNG, no pyplot, no display needed); matplotlib is a
  dependency of mlxtend, which the built-in datasets need.
  """
  from matplotlib.figure import Figure  # noqa: PLC0415  (no pyplot: no backend or global state touched)

  terms = np.asarray(terms_bpd, np.float64)
  if terms.ndim != 1 or terms.size == 0:
    raise ValueError(f"terms_bpd must be a non-empty 1-D array [T], got shape {terms.shape}")
  T = terms.size
  t = np.arange(1, T + 1)
  ncols = 1 if x0_mse is None else 2
  fig = Figure(figsize=(5.5 * ncols, 4.0), dpi=100)
  ax = fig.add_subplot(1, ncols, 1)
  positive = np.where(terms > 0, terms, np.nan)
  ax.plot(t, positive, lw=1.2, label=r"$L_{t-1}$")
  ax.axhline(max(float(prior_bpd), 1e-12), color="C3", ls="--", lw=1, label=f"$L_T$ (prior) = {prior_bpd:.2e}")
  ax.set_yscale("log")
  ax.set_xlabel("t")
  ax.set_ylabel("bits/dim")
  ax.set_title(f"terms of the bound (total {terms.sum() + prior_bpd:.4f} bits/dim)")
  ax.legend(loc="upper right", fontsize=8)
  ax.grid(alpha=0.3)
  if x0_mse is not None:
    _, rate, distortion = bpd_curves(terms, prior_bpd, x0_mse)
    ax2 = fig.add_subplot(1, 2, 2)
    ax2.plot(t, np.where(distortion > 0, distortion, np.nan), color="C0", lw=1.2)
    ax2.set_yscale("log")
    ax2.set_xlabel("t")
    ax2.set_ylabel("distortion (RMSE, [0, 255])", color="C0")
    ax3 = ax2.twinx()
    ax3.plot(t, rate, color="C1", lw=1.2)
    ax3.set_ylabel("rate (bits/dim)", color="C1")
    ax2.set_title("rate and distortion vs. t (DDPM Fig. 5)")
    ax2.grid(alpha=0.3)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  path = os.fspath(path)
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, format="png")
  return path
