"""Bits/dim of a dataset split (floor 3): the full variational bound L_T + sum_t L_{t-1} (DDPM eq. 5,
discretized decoder at t = 1) of every example, the per-batch bound jitted once and sharded over all
devices and hosts. The noise of example i at step t comes from its index in the split, so the result does
not depend on the batch size, the device count or the number of hosts. Reported: the mean total, its
standard error, the prior term, and the per-term curve L_t (CSV + PNG, `write_bpd_outputs`).
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxddpm import figures, losses, parallel
from jaxddpm.metrics import report

__all__ = ["make_bpd_step", "bpd_over_split", "write_bpd_outputs", "make_ode_bpd_step", "ode_bpd_over_split"]

_SUM_KEYS = ("count", "total", "total_sq", "prior", "vb", "x0_mse", "mse")


@functools.lru_cache(maxsize=32)
def make_bpd_step(apply_fn, mesh: Mesh, *, mean_type: str = "eps", var_type: str = "fixed_large",
                  clip_denoised: bool = False):
  """The per-batch bound, jitted once: step(params, schedule, batch, key) -> masked sums over the batch.

  batch = {"image": float32 [B, H, W, C] in [-1, 1], "index": int32 [B] (global example ids), "mask":
  bool [B]}, a global array sharded over mesh (parallel.global_batch). For each example the bound is
  `losses.calc_bpd_loop` with example_ids = index (noise from fold_in(fold_in(key, t), index)), and
  the step returns, summed over examples with mask True (replicated over the mesh):
    count, total (sum of L_total bits/dim), total_sq (sum of squares), prior (sum L_T),
    vb [T] (sum of L_{t-1} per t), x0_mse [T], mse [T] (eps MSE).
  Cached per (apply_fn, mesh, options): calling it again reuses the compiled program.
  """
  rep = parallel.replicated(mesh)

  def step(params, schedule, batch, key):
    out = losses.calc_bpd_loop(schedule, lambda x, t: apply_fn(params, x, t), batch["image"], key,
                               mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised,
                               example_ids=batch["index"])
    w = batch["mask"].astype(jnp.float32)
    total = out["total_bpd"]
    return {"count": w.sum(), "total": (w * total).sum(), "total_sq": (w * total * total).sum(),
            "prior": (w * out["prior_bpd"]).sum(), "vb": w @ out["vb"], "x0_mse": w @ out["x0_mse"],
            "mse": w @ out["mse"]}

  return jax.jit(step, out_shardings=rep)


def bpd_over_split(apply_fn, params, schedule, batches, *, mesh: Mesh, key, mean_type: str = "eps",
                   var_type: str = "fixed_large", clip_denoised: bool = False, num_examples: int | None = None,
                   num_batches: int | None = None, progress: bool = True) -> dict:
  """Bits/dim of a dataset split: the mean over examples of L_T + sum_{t=1}^{T} L_{t-1} (DDPM eq. 5).

  Args:
    apply_fn: (params, x_t [B, H, W, C], t int32 [B]) -> model output.
    params: replicated parameters (e.g. the EMA parameters).
    schedule: the training `Schedule`.
    batches: iterable of this process's local batches {"image": float32 [b, ...], "index": int32 [b],
      "mask": bool [b]} (as `data.make_eval_iterator` yields); every process must yield the same number.
    mesh: the ("data",) mesh; b * process_count must be a multiple of its size.
    key: PRNG key of the bound's noise.
    num_examples: use only examples with index < num_examples (None: all).
    num_batches: stop after this many batches (None: exhaust `batches`).
  Returns:
    {"bpd": mean total, "bpd_stderr": its standard error, "prior_bpd": mean L_T, "num_examples": N,
     "terms_bpd": [T] mean L_{t-1} for t = 1..T (index 0 is the decoder NLL L_0), "x0_mse": [T],
     "eps_mse": [T]} (numpy float64 / Python floats).
  """
  step = make_bpd_step(apply_fn, mesh, mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised)
  rep = parallel.replicated(mesh)
  params, schedule, key = jax.device_put((params, schedule, key), rep)
  acc = None
  bar = report.progress(num_batches, "bits/dim") if progress else None
  try:
    for i, local in enumerate(batches):
      if num_batches is not None and i >= num_batches:
        break
      mask = np.asarray(local["mask"], bool)
      index = np.asarray(local["index"], np.int32)
      if num_examples is not None:
        mask = mask & (index < num_examples)
      batch = parallel.global_batch({"image": np.asarray(local["image"], np.float32), "index": index,
                                     "mask": mask}, mesh)
      sums = parallel.replicated_to_host(step(params, schedule, batch, key))
      sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
      acc = sums if acc is None else {k: acc[k] + sums[k] for k in _SUM_KEYS}
      if bar is not None:
        bar.update(1)
        if acc["count"] > 0:
          bar.set_postfix(bpd=f"{acc['total'] / acc['count']:.4f}", n=int(acc["count"]))
  finally:
    if bar is not None:
      bar.close()
  if acc is None or acc["count"] < 1:
    raise ValueError("bits/dim: the split yielded no examples (check config.eval.num_examples and the split)")
  n = acc["count"]
  mean = acc["total"] / n
  var = max(acc["total_sq"] / n - mean * mean, 0.0) * n / max(n - 1, 1)
  return {"bpd": float(mean), "bpd_stderr": float(math.sqrt(var / n)), "prior_bpd": float(acc["prior"] / n),
          "num_examples": int(round(float(n))), "terms_bpd": acc["vb"] / n, "x0_mse": acc["x0_mse"] / n,
          "eps_mse": acc["mse"] / n}


def write_bpd_outputs(result: dict, outdir: str, step: int, title: str | None = None,
                      name: str | None = None) -> dict:
  """Write the per-term curve of a `bpd_over_split` result as CSV and PNG under outdir.

  CSV columns: term (L_T prior first, then L_{t-1} for t = T..1), t (the paper's t, 1-indexed), bpd,
  x0_mse, eps_mse, rate_bpd and distortion_rmse (DDPM Fig. 5: bits/dim received once x_t is known,
  RMSE of the predicted x_0 on the [0, 255] scale; see `figures.bpd_curves`).
  Files: outdir/<name>_terms.csv and .png (name default: bpd_step<step>).
  Returns {"csv": path, "png": path}.
  """
  name = f"bpd_step{step}" if name is None else name
  terms = np.asarray(result["terms_bpd"], np.float64)
  T = terms.shape[0]
  t, rate, dist = figures.bpd_curves(terms, result["prior_bpd"], result["x0_mse"])
  os.makedirs(outdir, exist_ok=True)
  csv_path = os.path.join(outdir, f"{name}_terms.csv")
  with open(csv_path, "w") as f:
    f.write("term,t,bpd,x0_mse,eps_mse,rate_bpd,distortion_rmse\n")
    f.write(f"L_T,{T},{result['prior_bpd']:.9g},,,{result['prior_bpd']:.9g},\n")
    for i in range(T - 1, -1, -1):
      f.write(f"L_{i},{t[i]},{terms[i]:.9g},{result['x0_mse'][i]:.9g},{result['eps_mse'][i]:.9g},"
              f"{rate[i]:.9g},{dist[i]:.9g}\n")
  png_path = figures.plot_bpd_terms(os.path.join(outdir, f"{name}_terms.png"), terms,
                                    result["prior_bpd"], result["x0_mse"], title=title)
  return {"csv": csv_path, "png": png_path}


# ---------------------------------------------------- the probability-flow ODE's bits/dim (core/likelihood)
@functools.lru_cache(maxsize=32)
def make_ode_bpd_step(apply_fn, mesh: Mesh, net_time, **options):
  """The per-batch PF-ODE bits/dim, jitted once: step(params, process, batch, key) -> masked sums
  {count, total, total_sq} over the batch (see `likelihood.ode_bpd`; dequantisation and probes keyed by
  the examples' global index). options: `likelihood.LikelihoodConfig` fields (hashable values)."""
  from jaxddpm.core import likelihood  # noqa: PLC0415
  rep = parallel.replicated(mesh)

  def step(params, process, batch, key):
    out = likelihood.ode_bpd(lambda z, t: apply_fn(params, z, t), process, batch["image"], key, net_time=net_time,
                             example_ids=batch["index"], **options)
    w = batch["mask"].astype(jnp.float32)
    return {"count": w.sum(), "total": (w * out["bpd"]).sum(), "total_sq": (w * out["bpd"] ** 2).sum()}

  return jax.jit(step, out_shardings=rep)


def ode_bpd_over_split(apply_fn, params, process, batches, *, mesh: Mesh, key, net_time=None,
                       num_examples: int | None = None, num_batches: int | None = None, progress: bool = True,
                       **options) -> dict:
  """Bits/dim of a split by the PF-ODE (Song et al. 2021, uniform dequantisation): the mean over examples,
  its standard error and the network calls per example. batches, mesh, num_examples, num_batches: as in
  `bpd_over_split`; process: a continuous process (DDPM: `likelihood.ddpm_continuous_limit`)."""
  from jaxddpm.core import likelihood  # noqa: PLC0415
  cfg = likelihood.check_config(**options)
  step = make_ode_bpd_step(apply_fn, mesh, net_time, **cfg._asdict())
  rep = parallel.replicated(mesh)
  params, process, key = jax.device_put((params, process, key), rep)
  acc = {"count": 0.0, "total": 0.0, "total_sq": 0.0}
  bar = report.progress(num_batches, "ODE bits/dim") if progress else None
  try:
    for i, local in enumerate(batches):
      if num_batches is not None and i >= num_batches:
        break
      mask = np.asarray(local["mask"], bool)
      index = np.asarray(local["index"], np.int32)
      if num_examples is not None:
        mask = mask & (index < num_examples)
      batch = parallel.global_batch({"image": np.asarray(local["image"], np.float32), "index": index,
                                     "mask": mask}, mesh)
      sums = parallel.replicated_to_host(step(params, process, batch, key))
      acc = {k: acc[k] + float(sums[k]) for k in acc}
      if bar is not None:
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  n = acc["count"]
  if n < 1:
    raise ValueError("ODE bits/dim: the split yielded no examples (check config.eval.num_examples and the split)")
  mean = acc["total"] / n
  var = max(acc["total_sq"] / n - mean * mean, 0.0) * n / max(n - 1, 1)
  return {"bpd": float(mean), "bpd_stderr": float(math.sqrt(var / n)), "num_examples": int(round(n)),
          "nfe": likelihood.nfe(cfg), "jvps_per_call": cfg.num_probes if cfg.divergence == "hutchinson" else None,
          **cfg._asdict()}
