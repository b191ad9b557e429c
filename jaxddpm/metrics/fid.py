"""The FID pipeline of a run (floor 3): config.eval.fid_num_samples samples of the configured sampler,
quantised to uint8 exactly as saved images (`images.to_uint8`), Inception pool3 features, reference
statistics from config.eval.fid_stats (any pytorch-fid / TTUR .npz) or computed once from a split of the
dataset and cached as .npz, the Frechet distance; the protocol is written next to the number (`fid_report`).
Feature moments are streamed batch by batch and merged over processes.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh

from jaxddpm import data, images, sampling
from jaxddpm.metrics import fid_stats, frechet, inception, report

__all__ = [
  "INCEPTION_FEATURES",
  "sample_feature_moments",
  "dataset_feature_moments",
  "reference_statistics",
  "check_fid_inputs",
  "fid_report",
]

INCEPTION_FEATURES = "inception-2015-12-05-pool3"


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


def _stream_moments(row_blocks, feature_fn, image_shape, *, total: int, desc: str, progress: bool):
  """Moments of feature_fn over the uint8 row blocks [n, H, W, C] (one per batch, n may be 0) this
  process yields, merged over processes. A process that held no rows learns D from one call on a zero
  image, so that every process takes part in the merge."""
  moments = None
  bar = report.progress(total, desc) if progress else None
  try:
    for rows in row_blocks:
      if len(rows):
        feats = np.asarray(feature_fn(rows), np.float64)
        moments = frechet.moments_init(feats.shape[1]) if moments is None else moments
        moments = frechet.moments_update(moments, feats)
      if bar is not None:
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  if moments is None:
    moments = frechet.moments_init(np.asarray(feature_fn(np.zeros((1,) + tuple(image_shape), np.uint8))).shape[1])
  return _allgather_moments(moments)


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
  num_batches = -(-int(num_samples) // bs)

  def kept_rows():
    for b in range(num_batches):
      offset = b * bs
      out = sampler.jitted(*sampler.place(params, key, offset))
      idx, rows = _local_rows(images.to_uint8(out["samples"]))
      yield rows[offset + idx < num_samples]

  return _stream_moments(kept_rows(), feature_fn, image_shape, total=num_batches, desc="samples",
                         progress=progress)


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
  nb = report.eval_num_batches(num_split, bs, num_examples)

  def kept_rows():
    for i, batch in enumerate(it):
      if i >= nb:
        break
      keep = np.asarray(batch["mask"], bool)
      if num_examples is not None:
        keep &= np.asarray(batch["index"]) < num_examples
      yield images.to_uint8(np.asarray(batch["image"])[keep])

  return _stream_moments(kept_rows(), feature_fn, info.image_shape, total=nb, desc=f"{split} features",
                         progress=progress)


def _stats_path(config, workdir, image_shape) -> str:
  """Where computed reference statistics are cached: config.eval.stats_dir or WORKDIR/eval."""
  d = config.data
  root = config.eval.stats_dir or report.eval_dir(workdir)
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
  if report.is_main():
    fid_stats.save_statistics(path, mu, sigma, image_shape=list(image_shape), feature_extractor=feature_extractor,
                              num_samples=m.count)
    print(f"cached reference statistics of {config.data.name}:{e.fid_stats_split} ({m.count} images) in {path}",
          flush=True)
  return mu, sigma, path


def check_fid_inputs(config, image_shape):
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
  WORKDIR/eval/<report.sample_tag>_fid.json ({"metrics", "protocol"}) and returns {"fid", "path", "protocol"}.
  """
  e = config.eval
  if feature_fn is None:
    feature_fn = inception.make_inception_feature_fn(check_fid_inputs(config, image_shape))
  mu_r, sigma_r, reference = reference_statistics(config, workdir, image_shape, feature_fn, feature_extractor)
  m = sample_feature_moments(report.apply_fn(model), params, sched, image_shape, e.fid_num_samples, feature_fn,
                             mesh=mesh, key=jax.random.PRNGKey(e.seed), batch_size=config.sample.batch_size,
                             **report.sampler_kwargs(config))
  mu_s, sigma_s = frechet.moments_statistics(m)
  fid = frechet.frechet_distance(mu_s, sigma_s, mu_r, sigma_r)
  protocol = fid_stats.Protocol(num_samples=int(m.count), reference=reference, reference_split=e.fid_stats_split,
                                ema=bool(e.use_ema), seed=int(e.seed), feature_extractor=feature_extractor,
                                sampler=report.sampler_description(config),
                                extra={"dataset": config.data.name, "image_shape": list(image_shape), "step": step})
  tag = report.sample_tag(config, step, seed=e.seed, num_samples=e.fid_num_samples, use_ema=e.use_ema)
  path = os.path.join(report.eval_dir(workdir), f"{tag}_fid.json")
  if report.is_main():
    fid_stats.save_result(path, {"fid": fid}, protocol)
    print(f"FID ({m.count} samples vs {reference}, step {step}): {fid:.3f}", flush=True)
  return {"fid": fid, "path": path, "protocol": protocol.to_dict()}
