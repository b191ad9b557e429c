"""Evaluation of a run: `python -m jaxddpm --mode evaluate` and the reusable pieces (floor 3/4).

* Bits/dim (`bpd_over_split`): the full variational bound L_T + sum_t L_{t-1} (DDPM eq. 5, discretized
  decoder at t = 1) of every example of a split, the per-batch bound jitted once and sharded over all
  devices and hosts. The noise of example i at step t comes from its index in the split, so the result
  does not depend on the batch size, the device count or the number of hosts. Reported: the mean total,
  its standard error, the prior term, and the per-term curve L_t (CSV + PNG, `write_bpd_outputs`).
* FID (`fid_report`): config.eval.fid_num_samples samples of the configured sampler, quantised to uint8
  exactly as saved images (`images.to_uint8`), Inception pool3 features, reference statistics from
  config.eval.fid_stats (any pytorch-fid / TTUR .npz) or computed once from a split of the dataset and
  cached as .npz, the Frechet distance; the protocol is written next to the number.
* In-domain score (`in_domain_report`) for the built-in datasets, where Inception weights are not
  available: a small classifier trained on the train split (cached), the Frechet distance of its
  features on samples vs. the held-out test split, and its confidence on samples. Real train images are
  scored the same way as a reference point.
* Pictures (`write_figures`): a sample grid, progressive generation (predicted x_0 along the chain) and
  interpolation in x_t between real test images (DDPM Fig. 8).

`run(config, workdir)` does all of it for the newest checkpoint and writes WORKDIR/eval/results_stepN.json.
Bad input (missing weights or statistics file, statistics of another resolution, no checkpoint) raises
FileNotFoundError / ValueError before anything is compiled.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxddpm import config as config_lib, data, figures, generate, images, losses, parallel, sampling
from jaxddpm.metrics import classifier as classifier_lib, fid_stats, frechet, inception

__all__ = [
  "METRICS",
  "IN_DOMAIN_DATASETS",
  "INCEPTION_FEATURES",
  "validate_eval_config",
  "make_bpd_step",
  "bpd_over_split",
  "write_bpd_outputs",
  "sample_feature_moments",
  "dataset_feature_moments",
  "reference_statistics",
  "fid_report",
  "in_domain_report",
  "read_images",
  "write_figures",
  "run",
]

METRICS = ("bpd", "fid", "in_domain", "figures")
IN_DOMAIN_DATASETS = ("digits", "mnist5k")
INCEPTION_FEATURES = "inception-2015-12-05-pool3"
EVAL_DIR = "eval"


# ------------------------------------------------------------------------------------------ config
def _metrics(config) -> tuple[str, ...]:
  """config.eval.metrics ("bpd,fid,in_domain,figures", "auto" or "") as a tuple; "auto" = bits/dim,
  figures, and FID when Inception weights are set, else the in-domain score for built-in datasets."""
  spec = config.eval.metrics
  if not isinstance(spec, str):
    raise ValueError(f"config.eval.metrics = {spec!r} is invalid; allowed: 'auto' or a comma-separated "
                     f"subset of {METRICS}")
  if spec.strip() == "auto":
    out = ["bpd"]
    if config.eval.inception_weights:
      out.append("fid")
    elif config.data.name in IN_DOMAIN_DATASETS:
      out.append("in_domain")
    return tuple(out + ["figures"])
  names = tuple(s.strip() for s in spec.split(",") if s.strip())
  bad = [n for n in names if n not in METRICS]
  if bad:
    raise ValueError(f"config.eval.metrics = {spec!r} names unknown metric(s) {bad}; allowed: 'auto' or a "
                     f"comma-separated subset of {METRICS}")
  return names


def validate_eval_config(config) -> tuple[str, ...]:
  """Checks the eval section (no file is read). Returns the metrics to run (see `_metrics`)."""
  e = config.eval

  def positive(field, v, zero_ok=False, none_ok=False):
    if v is None and none_ok:
      return
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero_ok else 1):
      raise ValueError(f"config.eval.{field} = {v!r} is invalid; allowed: an integer >= {0 if zero_ok else 1}"
                       + (" or None" if none_ok else ""))

  positive("num_examples", e.num_examples, none_ok=True)
  positive("batch_size", e.batch_size)
  positive("seed", e.seed, zero_ok=True)
  positive("fid_num_samples", e.fid_num_samples)
  if e.fid_num_samples < 2:
    raise ValueError(f"config.eval.fid_num_samples = {e.fid_num_samples} is invalid; allowed: an integer >= 2")
  positive("in_domain_num_samples", e.in_domain_num_samples)
  if e.in_domain_num_samples < 2:
    raise ValueError(f"config.eval.in_domain_num_samples = {e.in_domain_num_samples} is invalid; allowed: an "
                     "integer >= 2")
  positive("classifier_steps", e.classifier_steps)
  positive("figure_num_samples", e.figure_num_samples)
  positive("figure_num_snapshots", e.figure_num_snapshots)
  positive("interp_num_pairs", e.interp_num_pairs)
  positive("interp_num_lambdas", e.interp_num_lambdas)
  if e.interp_num_lambdas < 2:
    raise ValueError(f"config.eval.interp_num_lambdas = {e.interp_num_lambdas} is invalid; allowed: an "
                     "integer >= 2 (lambda = 0 and 1 at least)")
  positive("interp_timestep", e.interp_timestep, none_ok=True)
  T = config.diffusion.num_timesteps
  if e.interp_timestep is not None and not 1 <= e.interp_timestep <= T:
    raise ValueError(f"config.eval.interp_timestep = {e.interp_timestep} is invalid; allowed: an integer in "
                     f"[1, {T}] (the paper's t; None = T // 2)")
  splits = data.DATASETS[config.data.name].splits if config.data.name in data.DATASETS else ()
  if e.fid_stats is None and splits and e.fid_stats_split not in splits:
    raise ValueError(f"config.eval.fid_stats_split = {e.fid_stats_split!r} is invalid; allowed: a split of "
                     f"{config.data.name!r}: {splits}")
  if e.fid_stats is not None and e.fid_stats_split not in ("train", "test", "validation", "other"):
    raise ValueError(f"config.eval.fid_stats_split = {e.fid_stats_split!r} is invalid; allowed (the split the "
                     "published statistics were computed on): 'train', 'test', 'validation', 'other'")
  for field in ("use_ema", "bpd_clip_denoised"):
    if not isinstance(e[field], bool):
      raise ValueError(f"config.eval.{field} = {e[field]!r} is invalid; allowed: True or False")
  metrics = _metrics(config)
  if "fid" in metrics and not e.inception_weights:
    raise ValueError("config.eval.metrics asks for 'fid' but config.eval.inception_weights is not set; "
                     f"{inception.WEIGHTS_HELP}")
  if "in_domain" in metrics and config.data.name not in IN_DOMAIN_DATASETS:
    raise ValueError(f"config.eval.metrics asks for 'in_domain', which exists only for the built-in datasets "
                     f"{IN_DOMAIN_DATASETS}, not {config.data.name!r}; use 'fid'")
  return metrics


def _sampler_kwargs(config) -> dict:
  s, d = config.sample, config.diffusion
  return dict(method=s.method, timesteps=s.timesteps, eta=s.eta, mean_type=d.mean_type, var_type=d.var_type,
              clip_denoised=s.clip_denoised)


def _sampler_description(config) -> dict:
  kw = _sampler_kwargs(config)
  kw["num_timesteps"] = config.diffusion.num_timesteps
  kw["schedule"] = config.diffusion.schedule
  return kw


@functools.lru_cache(maxsize=None)
def _apply_fn(model):
  """One apply function per model (cache hits for the compiled samplers and bound)."""
  return lambda params, x, t: model.apply({"params": params}, x, t, train=False)


def _eval_dir(workdir: str) -> str:
  return os.path.join(workdir, EVAL_DIR)


def _is_main() -> bool:
  return jax.process_index() == 0


def _progress(total, desc):
  from tqdm import tqdm  # noqa: PLC0415
  return tqdm(total=total, desc=desc, unit="batch", disable=not _is_main(), dynamic_ncols=True, leave=True)


# ---------------------------------------------------------------------------------------- bits/dim
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
  bar = _progress(num_batches, "bits/dim") if progress else None
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
          "num_examples": int(round(n)), "terms_bpd": acc["vb"] / n, "x0_mse": acc["x0_mse"] / n,
          "eps_mse": acc["mse"] / n}


def write_bpd_outputs(result: dict, outdir: str, step: int, title: str | None = None) -> dict:
  """Write the per-term curve of a `bpd_over_split` result as CSV and PNG under outdir.

  CSV columns: term (L_T prior first, then L_{t-1} for t = T..1), t (the paper's t, 1-indexed), bpd,
  x0_mse, eps_mse, rate_bpd and distortion_rmse (DDPM Fig. 5: bits/dim received once x_t is known,
  RMSE of the predicted x_0 on the [0, 255] scale; see `figures.bpd_curves`).
  Returns {"csv": path, "png": path}.
  """
  terms = np.asarray(result["terms_bpd"], np.float64)
  T = terms.shape[0]
  t, rate, dist = figures.bpd_curves(terms, result["prior_bpd"], result["x0_mse"])
  os.makedirs(outdir, exist_ok=True)
  csv_path = os.path.join(outdir, f"bpd_terms_step{step}.csv")
  with open(csv_path, "w") as f:
    f.write("term,t,bpd,x0_mse,eps_mse,rate_bpd,distortion_rmse\n")
    f.write(f"L_T,{T},{result['prior_bpd']:.9g},,,{result['prior_bpd']:.9g},\n")
    for i in range(T - 1, -1, -1):
      f.write(f"L_{i},{t[i]},{terms[i]:.9g},{result['x0_mse'][i]:.9g},{result['eps_mse'][i]:.9g},"
              f"{rate[i]:.9g},{dist[i]:.9g}\n")
  png_path = figures.plot_bpd_terms(os.path.join(outdir, f"bpd_terms_step{step}.png"), terms,
                                    result["prior_bpd"], result["x0_mse"], title=title)
  return {"csv": csv_path, "png": png_path}


def _eval_num_batches(num_split: int, global_batch: int, num_examples: int | None) -> int:
  """Batches every process runs: enough for each process to reach its last example with index < N."""
  P = jax.process_count()
  local = global_batch // P
  n = num_split if num_examples is None else min(num_examples, num_split)
  most = 0
  for p in range(P):
    start, stop = data.shard_bounds(num_split, p, P)
    most = max(most, max(0, min(stop, n) - start))
  return max(1, math.ceil(most / local))


def _run_bpd(config, model, sched, params, mesh, image_shape, workdir, step) -> dict:
  e, d = config.eval, config.data
  parallel.check_batch_size(e.batch_size, mesh, "eval.batch_size")
  info = data.dataset_info(d.name, d.data_dir, image_size=d.image_size)
  num_split = info.num_examples[d.eval_split]
  it = data.make_eval_iterator(d.name, split=d.eval_split, data_dir=d.data_dir, global_batch_size=e.batch_size,
                               process_index=jax.process_index(), process_count=jax.process_count(),
                               image_size=d.image_size, num_threads=d.num_threads,
                               prefetch_batches=max(d.prefetch_batches, 1))
  result = bpd_over_split(_apply_fn(model), params, sched, it, mesh=mesh, key=jax.random.PRNGKey(e.seed),
                          mean_type=config.diffusion.mean_type, var_type=config.diffusion.var_type,
                          clip_denoised=e.bpd_clip_denoised, num_examples=e.num_examples,
                          num_batches=_eval_num_batches(num_split, e.batch_size, e.num_examples))
  out = {k: result[k] for k in ("bpd", "bpd_stderr", "prior_bpd", "num_examples")}
  out.update(split=d.eval_split, num_timesteps=int(sched.num_timesteps), seed=e.seed, ema=e.use_ema,
             clip_denoised=e.bpd_clip_denoised)
  if _is_main():
    paths = write_bpd_outputs(result, _eval_dir(workdir), step,
                              title=f"{d.name}:{d.eval_split}, step {step}, {out['num_examples']} examples")
    out.update(paths)
    print(f"bits/dim ({d.name}:{d.eval_split}, {out['num_examples']} examples, step {step}): "
          f"{out['bpd']:.4f} +- {out['bpd_stderr']:.4f} (prior {out['prior_bpd']:.2e}); per-term curve "
          f"{paths['csv']}", flush=True)
  return out


# ------------------------------------------------------------------------------------- feature moments
def _allgather_moments(m: frechet.FeatureMoments) -> frechet.FeatureMoments:
  """Merge every process's moments (all processes call this; returns the global moments on each)."""
  if jax.process_count() == 1:
    return m
  from jax.experimental import multihost_utils  # noqa: PLC0415

  def split(x):  # float64 -> two float32 parts (JAX arrays are float32 without x64): x = hi + lo to ~1e-14
    hi = x.astype(np.float32)
    return np.stack([hi, (x - hi.astype(np.float64)).astype(np.float32)])

  g = multihost_utils.process_allgather({"count": np.asarray(m.count, np.int32), "mean": split(m.mean),
                                         "m2": split(m.m2)})
  join = lambda a: np.asarray(a[0], np.float64) + np.asarray(a[1], np.float64)
  out = frechet.FeatureMoments(0, np.zeros_like(m.mean), np.zeros_like(m.m2))
  for p in range(jax.process_count()):
    out = frechet.moments_merge(out, frechet.FeatureMoments(int(g["count"][p]), join(g["mean"][p]),
                                                            join(g["m2"][p])))
  return out


def _local_rows(x: jax.Array):
  """This process's rows of a batch-sharded global array: (global row indices [n], numpy rows [n, ...])."""
  idx, rows = [], []
  seen = set()
  for shard in x.addressable_shards:
    sl = shard.index[0]
    start = sl.start or 0
    if start in seen:  # replicated copies of the same rows
      continue
    seen.add(start)
    block = np.asarray(shard.data)
    idx.append(np.arange(start, start + block.shape[0]))
    rows.append(block)
  order = np.argsort([i[0] if len(i) else 0 for i in idx])
  return np.concatenate([idx[o] for o in order]), np.concatenate([rows[o] for o in order])


def sample_feature_moments(apply_fn, params, schedule, image_shape, num_samples: int, feature_fn, *,
                           mesh: Mesh, key, batch_size: int, progress: bool = True, **sampler_kwargs):
  """Feature moments of num_samples generated images, streamed batch by batch.

  Sample i (i < num_samples) is the same image `sampling.sample_batched` / `--mode sample` would give
  with this key (its noise comes from its global index), quantised with `images.to_uint8` as a saved
  PNG; each process computes `feature_fn` (uint8 [n, H, W, C] -> [n, D]) on the rows its devices hold,
  and the moments are merged over processes. batch_size is rounded up to a multiple of the mesh size.
  Returns the global `frechet.FeatureMoments`.
  """
  n_dev = mesh.size
  bs = -(-min(int(batch_size), int(num_samples)) // n_dev) * n_dev
  sampler = sampling.make_sampler(apply_fn, schedule, (bs,) + tuple(image_shape), mesh=mesh, **sampler_kwargs)
  moments = None
  num_batches = -(-int(num_samples) // bs)
  bar = _progress(num_batches, "samples") if progress else None
  try:
    for b in range(num_batches):
      offset = b * bs
      out = sampler.jitted(*sampler.place(params, key, offset))
      idx, rows = _local_rows(images.to_uint8(out["samples"]))
      keep = offset + idx < num_samples
      if keep.any():
        feats = np.asarray(feature_fn(rows[keep]), np.float64)
        moments = frechet.moments_init(feats.shape[1]) if moments is None else moments
        moments = frechet.moments_update(moments, feats)
      if bar is not None:
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  if moments is None:  # this process held no kept rows; learn D from an empty call
    moments = frechet.moments_init(np.asarray(feature_fn(np.zeros((1,) + tuple(image_shape), np.uint8))).shape[1])
  return _allgather_moments(moments)


def dataset_feature_moments(config, split: str, feature_fn, *, num_examples: int | None = None,
                            progress: bool = True):
  """Feature moments of the uint8 images of a split (every process reads its shard; merged)."""
  d = config.data
  P = jax.process_count()
  bs = max(config.eval.batch_size // P, 1) * P
  info = data.dataset_info(d.name, d.data_dir, image_size=d.image_size)
  num_split = info.num_examples[split]
  it = data.make_eval_iterator(d.name, split=split, data_dir=d.data_dir, global_batch_size=bs,
                               process_index=jax.process_index(), process_count=P, image_size=d.image_size,
                               num_threads=d.num_threads, prefetch_batches=max(d.prefetch_batches, 1))
  nb = _eval_num_batches(num_split, bs, num_examples)
  moments = None
  bar = _progress(nb, f"{split} features") if progress else None
  try:
    for i, batch in enumerate(it):
      if i >= nb:
        break
      keep = np.asarray(batch["mask"], bool)
      if num_examples is not None:
        keep &= np.asarray(batch["index"]) < num_examples
      if keep.any():
        feats = np.asarray(feature_fn(images.to_uint8(np.asarray(batch["image"])[keep])), np.float64)
        moments = frechet.moments_init(feats.shape[1]) if moments is None else moments
        moments = frechet.moments_update(moments, feats)
      if bar is not None:
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  if moments is None:
    shape = info.image_shape
    moments = frechet.moments_init(np.asarray(feature_fn(np.zeros((1,) + tuple(shape), np.uint8))).shape[1])
  return _allgather_moments(moments)


def _stats_path(config, workdir, image_shape) -> str:
  """Where computed reference statistics are cached: config.eval.stats_dir or WORKDIR/eval."""
  d = config.data
  root = config.eval.stats_dir or _eval_dir(workdir)
  name = d.name.replace("/", "_")
  return os.path.join(root, f"fid_stats_{name}_{config.eval.fid_stats_split}_{image_shape[0]}x{image_shape[1]}.npz")


def reference_statistics(config, workdir, image_shape, feature_fn, feature_extractor=INCEPTION_FEATURES):
  """(mu, sigma, description) of the reference: config.eval.fid_stats if set (checked against the image
  shape and feature dimension when the file records them), else statistics of config.eval.fid_stats_split
  computed once and cached as .npz (keys mu, sigma: the pytorch-fid / TTUR format)."""
  e = config.eval
  if e.fid_stats:
    mu, sigma = fid_stats.load_statistics(e.fid_stats, feature_dim=inception.FEATURE_DIM, image_shape=image_shape,
                                          feature_extractor=feature_extractor)
    return mu, sigma, os.fspath(e.fid_stats)
  path = _stats_path(config, workdir, image_shape)
  cached = os.path.isfile(path)
  if jax.process_count() > 1:  # every process must take the same branch (computing them is collective)
    from jax.experimental import multihost_utils  # noqa: PLC0415
    cached = bool(multihost_utils.broadcast_one_to_all(np.int32(cached)))
  if cached:
    mu, sigma = fid_stats.load_statistics(path, image_shape=image_shape, feature_extractor=feature_extractor)
    return mu, sigma, path
  m = dataset_feature_moments(config, e.fid_stats_split, feature_fn)
  mu, sigma = frechet.moments_statistics(m)
  if _is_main():
    fid_stats.save_statistics(path, mu, sigma, image_shape=list(image_shape), feature_extractor=feature_extractor,
                              num_samples=m.count)
    print(f"cached reference statistics of {config.data.name}:{e.fid_stats_split} ({m.count} images) in {path}",
          flush=True)
  return mu, sigma, path


def _check_fid_inputs(config, image_shape):
  """Fail early (before loading a checkpoint or compiling) on a bad weights or statistics file."""
  e = config.eval
  if e.fid_stats:
    fid_stats.load_statistics(e.fid_stats, feature_dim=inception.FEATURE_DIM, image_shape=image_shape,
                              feature_extractor=INCEPTION_FEATURES)
  return inception.load_inception_variables(e.inception_weights)


def fid_report(config, model, sched, params, mesh, image_shape, workdir, *, step: int, feature_fn=None,
               feature_extractor: str = INCEPTION_FEATURES) -> dict:
  """FID of config.eval.fid_num_samples samples against the reference statistics, with its protocol.

  d^2 = |mu_s - mu_r|^2 + Tr(S_s + S_r - 2 (S_s S_r)^{1/2}) on pool3 features (Heusel et al. 2017).
  feature_fn defaults to the FID Inception network of config.eval.inception_weights. Writes
  WORKDIR/eval/fid_stepN.json ({"metrics", "protocol"}) and returns {"fid", "path", "protocol"}.
  """
  e = config.eval
  if feature_fn is None:
    feature_fn = inception.make_inception_feature_fn(_check_fid_inputs(config, image_shape))
  mu_r, sigma_r, reference = reference_statistics(config, workdir, image_shape, feature_fn, feature_extractor)
  m = sample_feature_moments(_apply_fn(model), params, sched, image_shape, e.fid_num_samples, feature_fn, mesh=mesh,
                             key=jax.random.PRNGKey(e.seed), batch_size=config.sample.batch_size,
                             **_sampler_kwargs(config))
  mu_s, sigma_s = frechet.moments_statistics(m)
  fid = frechet.frechet_distance(mu_s, sigma_s, mu_r, sigma_r)
  protocol = fid_stats.Protocol(num_samples=int(m.count), reference=reference, reference_split=e.fid_stats_split,
                                ema=bool(e.use_ema), seed=int(e.seed), feature_extractor=feature_extractor,
                                sampler=_sampler_description(config),
                                extra={"dataset": config.data.name, "image_shape": list(image_shape), "step": step})
  path = os.path.join(_eval_dir(workdir), f"fid_step{step}.json")
  if _is_main():
    fid_stats.save_result(path, {"fid": fid}, protocol)
    print(f"FID ({m.count} samples vs {reference}, step {step}): {fid:.3f}", flush=True)
  return {"fid": fid, "path": path, "protocol": protocol.to_dict()}


# ---------------------------------------------------------------------------------------- in-domain
def read_images(config, split: str, indices=None, image_shape=None):
  """uint8 images [N, H, W, C] and int labels [N] of a split (all, or the given indices), resized to the
  run's image size the way the training pipeline does (`data.resize_image`)."""
  d = config.data
  src = data.data_source(d.name, split, d.data_dir)
  spec = data.DATASETS[d.name]
  indices = range(len(src)) if indices is None else indices
  ims, labels = [], []
  for i in indices:
    rec = src[int(i)]
    im = np.asarray(rec["image"], np.uint8)
    im = im[..., None] if im.ndim == 2 else im
    if image_shape is not None and im.shape != tuple(image_shape):
      im = data.resize_image(im, image_shape[0], spec.upscale)
    ims.append(im)
    labels.append(int(rec[spec.label_key]) if spec.label_key else 0)
  return np.stack(ims), np.asarray(labels, np.int64)


def _classifier_path(config, image_shape) -> str:
  root = config.data.data_dir or data.default_data_dir()
  return os.path.join(root, "classifiers", f"{config.data.name}_{image_shape[0]}x{image_shape[1]}.npz")


def _load_classifier(config, image_shape, train_images, train_labels):
  """Train (or load the cached) classifier; with several processes, process 0 trains and writes first."""
  path = _classifier_path(config, image_shape)
  kw = dict(steps=config.eval.classifier_steps, name=f"{config.data.name}-classifier")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    if _is_main():
      classifier_lib.load_or_train_classifier(path, train_images, train_labels, **kw)
    multihost_utils.sync_global_devices("jaxddpm.evaluate.classifier")
  return classifier_lib.load_or_train_classifier(path, train_images, train_labels, **kw), path


def in_domain_report(config, model, sched, params, mesh, image_shape, workdir, *, step: int | None = None,
                     num_samples: int | None = None, use_ema: bool | None = None) -> dict:
  """The offline in-domain score of a built-in dataset (digits, mnist5k) for the given parameters.

  A small classifier trained on the train split (cached in DATA_DIR/classifiers/, see
  `metrics.classifier`) scores n = config.eval.in_domain_num_samples samples of config.sample's sampler
  (uint8 as saved, seed config.eval.seed):
    frechet_distance   d^2 between Gaussians of its penultimate features on the samples and on the
                       held-out test split (same formula as FID; lower is better);
    mean_max_confidence  (1/n) sum_i max_y p(y | x_i);  classifier_score  exp(E KL(p(y|x) || p(y)));
    class_entropy      H(p_hat(y)) (log 10 = 2.30 when all classes are equally frequent).
  The same numbers for min(n, |train|) real train images ("real_*") give the value a perfect model
  would reach at this sample size; test_accuracy checks the classifier itself.

  Writes WORKDIR/eval/in_domain_stepN.json ({"metrics", "protocol"}) on process 0 and prints one line.
  Every process must call it (sampling is sharded). Returns the metrics dict (plus "path").
  """
  d, e = config.data, config.eval
  if d.name not in IN_DOMAIN_DATASETS:
    raise ValueError(f"config.data.name = {d.name!r}: the in-domain score exists only for {IN_DOMAIN_DATASETS}")
  n = e.in_domain_num_samples if num_samples is None else int(num_samples)
  if n < 2:
    raise ValueError(f"num_samples must be >= 2, got {n}")
  use_ema = e.use_ema if use_ema is None else bool(use_ema)
  train_x, train_y = read_images(config, d.split, image_shape=image_shape)
  test_split = d.eval_split if d.eval_split != d.split else "test"
  test_x, test_y = read_images(config, test_split, image_shape=image_shape)
  clf, clf_path = _load_classifier(config, image_shape, train_x, train_y)
  mu, sigma = classifier_lib.classifier_statistics(clf, test_x)
  samples = generate.sample_uint8(config, model, sched, params, mesh, image_shape, n, seed=e.seed)["samples"]
  score = classifier_lib.in_domain_score(clf, samples, mu, sigma)
  real = classifier_lib.in_domain_score(clf, train_x[:min(n, len(train_x))], mu, sigma)
  metrics = dict(score)
  metrics.update({f"real_{k}": v for k, v in real.items()})
  metrics["test_accuracy"] = classifier_lib.classifier_accuracy(clf, test_x, test_y)
  metrics["num_samples"] = int(n)
  metrics["num_real"] = int(min(n, len(train_x)))
  protocol = fid_stats.Protocol(
      num_samples=int(n), reference=f"{d.name}:{test_split}", reference_split="test", ema=bool(use_ema),
      seed=int(e.seed), feature_extractor=f"{clf.name} ({(clf.meta or {}).get('fingerprint', '?')})",
      sampler=_sampler_description(config),
      extra={"classifier": clf_path, "classifier_steps": int(e.classifier_steps), "step": step,
             "image_shape": list(image_shape), "num_reference": int(len(test_x))})
  name = "in_domain.json" if step is None else f"in_domain_step{step}.json"
  path = os.path.join(_eval_dir(workdir), name)
  if _is_main():
    fid_stats.save_result(path, metrics, protocol)
    print(f"in-domain score ({d.name}, {n} samples{'' if step is None else f', step {step}'}): "
          f"frechet {score['frechet_distance']:.2f} (real train images: {real['frechet_distance']:.2f}), "
          f"confidence {score['mean_max_confidence']:.3f} (real: {real['mean_max_confidence']:.3f}), "
          f"classifier score {score['classifier_score']:.2f} (real: {real['classifier_score']:.2f}), "
          f"classifier test accuracy {metrics['test_accuracy']:.3f} -> {path}", flush=True)
  metrics["path"] = path
  return metrics


# ------------------------------------------------------------------------------------------- figures
def write_figures(config, model, sched, params, mesh, image_shape, workdir, *, step: int) -> dict:
  """Sample grid, progressive generation and interpolation PNGs under WORKDIR/eval/. Returns the paths.

  One sampler run of config.eval.figure_num_samples samples (config.sample's sampler, seed
  config.eval.seed) with about config.eval.figure_num_snapshots snapshots of the predicted x_0 gives
  the grid and the progressive figure (first min(8, N) samples as rows). The interpolation encodes
  config.eval.interp_num_pairs pairs of test images (0, 1), (2, 3), ... to the paper's
  t = config.eval.interp_timestep (default T // 2) with config.eval.interp_num_lambdas values of lambda.
  """
  e, d = config.eval, config.data
  n = e.figure_num_samples
  K = sampling.resolve_timesteps(sched, config.sample.timesteps).num_timesteps
  every = max(1, math.ceil(K / e.figure_num_snapshots))
  out = generate.sample_uint8(config, model, sched, params, mesh, image_shape, n, seed=e.seed,
                              snapshot_every=every)
  paths = {}
  outdir = _eval_dir(workdir)
  if _is_main():
    cols = math.ceil(math.sqrt(n))
    paths["samples"] = images.save_png(os.path.join(outdir, f"samples_step{step}.png"),
                                       generate.grid_png(out["samples"], cols))
    grid = figures.progressive_grid(out["pred_x0_snapshots"][:, :min(8, n)])
    paths["progressive"] = images.save_png(os.path.join(outdir, f"progressive_step{step}.png"),
                                           _visible(grid))
  T = config.diffusion.num_timesteps
  t_paper = e.interp_timestep or max(T // 2, 1)
  pairs = e.interp_num_pairs
  test_x, _ = read_images(config, d.eval_split, indices=range(min(2 * pairs, _split_size(config, d.eval_split))),
                          image_shape=image_shape)
  pairs = len(test_x) // 2
  if pairs >= 1:
    x = images.from_uint8(test_x[:2 * pairs])
    lambdas = np.linspace(0.0, 1.0, e.interp_num_lambdas)
    s = config.sample
    if jax.process_count() > 1:  # a small computation: every process runs it on one local device
      params = jax.device_put(parallel.replicated_to_host(params), jax.local_devices()[0])
    res = figures.interpolate(_apply_fn(model), params, sched, x[0::2], x[1::2], t_paper - 1, lambdas,
                              jax.random.PRNGKey(e.seed), method=s.method, eta=s.eta,
                              mean_type=config.diffusion.mean_type, var_type=config.diffusion.var_type,
                              clip_denoised=s.clip_denoised)
    if _is_main():
      grid = figures.interpolation_grid(test_x[0::2], test_x[1::2], res["decoded"])
      paths["interpolation"] = images.save_png(os.path.join(outdir, f"interpolation_step{step}_t{t_paper}.png"),
                                               _visible(grid))
  if _is_main():
    print(f"wrote figures {sorted(paths.values())}", flush=True)
  return paths


def _visible(grid):
  """Nearest-neighbour upscaling so that grids of tiny (8x8) images are visible (long side > 256)."""
  factor = max(1, 512 // max(grid.shape[:2]))
  return images.upscale(grid[None], factor)[0] if factor > 1 else grid


def _split_size(config, split):
  d = config.data
  return data.dataset_info(d.name, d.data_dir, image_size=d.image_size).num_examples[split]


# ----------------------------------------------------------------------------------------------- run
def run(config, workdir: str) -> dict:
  """--mode evaluate: bits/dim, FID or the in-domain score, and figures for the newest checkpoint.

  Checks first (ValueError / FileNotFoundError, nothing compiled): the config, the Inception weights
  and statistics files when FID runs, that the workdir has a checkpoint. Then loads the EMA (or, with
  config.eval.use_ema=False, the raw) parameters and writes WORKDIR/eval/results_stepN.json with every
  number and its protocol. Returns that dict.
  """
  config_lib.validate(config)
  metrics = validate_eval_config(config)
  d = config.data
  image_shape = data.dataset_info(d.name, d.data_dir, image_size=d.image_size).image_shape
  variables = _check_fid_inputs(config, image_shape) if "fid" in metrics else None
  model, sched, mesh, image_shape, params, step = generate.load_params(config, workdir, use_ema=config.eval.use_ema)
  results = {"step": step, "workdir": os.fspath(workdir), "dataset": d.name, "ema": bool(config.eval.use_ema),
             "metrics_run": list(metrics)}
  if "bpd" in metrics:
    results["bpd"] = _run_bpd(config, model, sched, params, mesh, image_shape, workdir, step)
  if "fid" in metrics:
    feature_fn = inception.make_inception_feature_fn(variables)
    results["fid"] = fid_report(config, model, sched, params, mesh, image_shape, workdir, step=step,
                                feature_fn=feature_fn)
  if "in_domain" in metrics:
    results["in_domain"] = in_domain_report(config, model, sched, params, mesh, image_shape, workdir, step=step)
  if "figures" in metrics:
    results["figures"] = write_figures(config, model, sched, params, mesh, image_shape, workdir, step=step)
  if "fid" not in metrics and "in_domain" not in metrics and _is_main():
    print("no sample-quality metric: set --config.eval.inception_weights=PATH (and optionally "
          "--config.eval.fid_stats=PATH) for FID", flush=True)
  results["config"] = json.loads(config.to_json_best_effort())
  path = os.path.join(_eval_dir(workdir), f"results_step{step}.json")
  if _is_main():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump(results, f, indent=2, sort_keys=True, default=_json_default)
    print(f"wrote {path}", flush=True)
  results["path"] = path
  return results


def _json_default(o):
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  if dataclasses.is_dataclass(o):
    return dataclasses.asdict(o)
  return str(o)
