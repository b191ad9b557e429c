"""Reference statistics (mu, sigma) of features, cached as .npz, and the protocol stored with each result.

The .npz holds `mu` [D] and `sigma` [D, D] (float64), the keys pytorch-fid and TTUR read and write, so
published statistics files (e.g. TTUR's `fid_stats_cifar10_train.npz`) load directly and ours load in
those tools. We add optional metadata keys (`image_shape`, `feature_extractor`, `num_samples`) that the
other tools ignore; when present they are checked on load, so statistics of another resolution or another
feature extractor give a clear error instead of a meaningless FID.
"""
import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Optional

import numpy as np

from jaxddpm.metrics import frechet

__all__ = [
  "compute_statistics",
  "save_statistics",
  "load_statistics",
  "load_or_compute_statistics",
  "Protocol",
  "save_result",
  "QUANTISATION",
]

QUANTISATION = "uint8 = clip(round_half_even((x + 1) * 127.5), 0, 255)  (jaxddpm.images.to_uint8)"


def compute_statistics(batches: Iterable[np.ndarray], feature_fn: Callable[[np.ndarray], np.ndarray],
                       max_samples: Optional[int] = None):
  """mu [D], sigma [D, D] (float64, unbiased covariance) of feature_fn over an iterator of uint8 batches.

  Args:
    batches: iterable of uint8 arrays [B, H, W, C] (all the same H, W, C).
    feature_fn: uint8 [B, H, W, C] -> features [B, D] (e.g. `make_inception_feature_fn(...)`).
    max_samples: stop after this many images (the last batch is cropped); None = the whole iterator.
  Returns:
    (mu, sigma, info) where info = {"num_samples": N, "image_shape": [H, W, C], "feature_dim": D}.
  """
  if max_samples is not None and (int(max_samples) != max_samples or max_samples < 2):
    raise ValueError(f"max_samples must be an integer >= 2 or None, got {max_samples!r}")
  moments, shape = None, None
  for batch in batches:
    batch = np.asarray(batch)
    if batch.dtype != np.uint8 or batch.ndim != 4:
      raise ValueError(f"batches must yield uint8 arrays [B, H, W, C], got {batch.dtype} {batch.shape}")
    if shape is None:
      shape = batch.shape[1:]
    elif batch.shape[1:] != shape:
      raise ValueError(f"all batches must have image shape {shape}, got {batch.shape[1:]}")
    if max_samples is not None:
      seen = 0 if moments is None else moments.count
      batch = batch[:max_samples - seen]
    feats = np.asarray(feature_fn(batch), np.float64)
    if feats.ndim != 2 or feats.shape[0] != batch.shape[0]:
      raise ValueError(f"feature_fn must return [B, D] features, got shape {feats.shape} for B={batch.shape[0]}")
    if moments is None:
      moments = frechet.moments_init(feats.shape[1])
    moments = frechet.moments_update(moments, feats)
    if max_samples is not None and moments.count >= max_samples:
      break
  if moments is None or moments.count < 2:
    raise ValueError("batches yielded fewer than 2 images; cannot estimate a covariance")
  mu, sigma = frechet.moments_statistics(moments)
  return mu, sigma, {"num_samples": int(moments.count), "image_shape": list(shape),
                     "feature_dim": int(mu.shape[0])}


def save_statistics(path, mu, sigma, *, image_shape=None, feature_extractor=None, num_samples=None):
  """Write statistics as .npz with keys `mu`, `sigma` (+ optional metadata keys). Returns the path."""
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
  extra = {}
  if image_shape is not None:
    extra["image_shape"] = np.asarray(image_shape, np.int64)
  if feature_extractor is not None:
    extra["feature_extractor"] = np.asarray(str(feature_extractor))
  if num_samples is not None:
    extra["num_samples"] = np.asarray(int(num_samples), np.int64)
  path = os.fspath(path)
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, mu=mu, sigma=sigma, **extra)
  os.replace(tmp, path)
  return path


def load_statistics(path, *, feature_dim=None, image_shape=None, feature_extractor=None):
  """Read (mu [D], sigma [D, D]) float64 from a .npz (ours, pytorch-fid's or TTUR's).

  Checks, when given: mu/sigma dimension == feature_dim; and, when the file records them, image_shape
  ([H, W, C]; H, W of the file must match) and feature_extractor. Raises FileNotFoundError or ValueError.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"statistics file not found: {path!r}")
  try:
    with np.load(path, allow_pickle=False) as f:
      data = {k: np.asarray(f[k]) for k in f.files}
  except Exception as e:
    raise ValueError(f"could not read statistics {path!r} as .npz: {e}") from e
  if "mu" not in data or "sigma" not in data:
    raise ValueError(f"statistics file {path!r} must contain keys 'mu' and 'sigma', has {sorted(data)}")
  mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"statistics file {path!r}: mu must be [D] and sigma [D, D], got {mu.shape}, {sigma.shape}")
  if feature_dim is not None and mu.shape[0] != feature_dim:
    raise ValueError(f"statistics file {path!r} has feature dimension {mu.shape[0]}, expected {feature_dim} "
                     "(statistics of another feature extractor?)")
  if image_shape is not None and "image_shape" in data:
    got = [int(v) for v in data["image_shape"]]
    if got[:2] != [int(v) for v in image_shape][:2]:
      raise ValueError(f"statistics file {path!r} was computed on images of shape {got}, but the images "
                       f"to compare have shape {list(image_shape)}: another resolution")
  if feature_extractor is not None and "feature_extractor" in data:
    got = str(data["feature_extractor"])
    if got != str(feature_extractor):
      raise ValueError(f"statistics file {path!r} was computed with feature extractor {got!r}, "
                       f"expected {feature_extractor!r}")
  return mu, sigma


def load_or_compute_statistics(path, batches_fn, feature_fn, *, feature_extractor, image_shape,
                               max_samples=None):
  """Load cached statistics from `path` or compute them from `batches_fn()` and cache them there.

  Returns (mu, sigma). `batches_fn` is only called on a cache miss.
  """
  if os.path.isfile(os.fspath(path)):
    return load_statistics(path, image_shape=image_shape, feature_extractor=feature_extractor)
  mu, sigma, info = compute_statistics(batches_fn(), feature_fn, max_samples=max_samples)
  if list(info["image_shape"][:2]) != list(image_shape)[:2]:
    raise ValueError(f"the reference images have shape {info['image_shape']}, expected {list(image_shape)}")
  save_statistics(path, mu, sigma, image_shape=info["image_shape"], feature_extractor=feature_extractor,
                  num_samples=info["num_samples"])
  return mu, sigma


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How a sample-quality number was measured; stored next to every result.

  Attributes:
    num_samples: number of generated images the statistics were computed on (50_000 in the papers).
    reference: where the reference statistics come from, e.g. "cifar10:train" or a .npz path.
    reference_split: "train" or "test" (the DDPM paper reports FID against the training set).
    ema: whether the EMA parameters generated the samples.
    seed: the sampling seed.
    feature_extractor: "inception-2015-12-05-pool3" or the in-domain classifier's name.
    quantisation: how samples became uint8 (default: `jaxddpm.images.to_uint8`).
    sampler: free-form description of the sampler (name, steps, eta, ...).
    extra: anything else worth recording.
  """
  num_samples: int
  reference: str
  reference_split: str
  ema: bool
  seed: int
  feature_extractor: str
  quantisation: str = QUANTISATION
  sampler: Any = None
  extra: Any = None

  def __post_init__(self):
    if not isinstance(self.num_samples, (int, np.integer)) or self.num_samples < 2:
      raise ValueError(f"num_samples must be an integer >= 2, got {self.num_samples!r}")
    if self.reference_split not in ("train", "test", "validation", "other"):
      raise ValueError(f"reference_split must be one of 'train', 'test', 'validation', 'other', "
                       f"got {self.reference_split!r}")
    if not isinstance(self.ema, (bool, np.bool_)):
      raise ValueError(f"ema must be a bool, got {self.ema!r}")
    if not isinstance(self.seed, (int, np.integer)):
      raise ValueError(f"seed must be an integer, got {self.seed!r}")

  def to_dict(self):
    d = dataclasses.asdict(self)
    d["num_samples"], d["seed"], d["ema"] = int(self.num_samples), int(self.seed), bool(self.ema)
    return d


def save_result(path, metrics, protocol):
  """Write {"metrics": {...}, "protocol": {...}} as JSON to `path` (a Protocol or a plain dict)."""
  if isinstance(protocol, Protocol):
    protocol = protocol.to_dict()
  if not isinstance(protocol, dict):
    raise ValueError(f"protocol must be a Protocol or a dict, got {type(protocol).__name__}")
  metrics = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in dict(metrics).items()}
  path = os.fspath(path)
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"metrics": metrics, "protocol": protocol}, f, indent=2, sort_keys=True, default=str)
  return path
