"""The Frechet distance between Gaussians fitted to features, in float64 numpy.

FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a local Nash
equilibrium") is the squared Frechet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2):

  d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}).

The trace of the matrix square root is computed without `sqrtm`: the eigenvalues of S1 S2 equal those of
the symmetric positive semi-definite matrix M = S1^{1/2} S2 S1^{1/2}, so Tr((S1 S2)^{1/2}) = sum_i
sqrt(lambda_i(M)). Two symmetric eigendecompositions give a real answer that stays exact for singular
(rank-deficient) covariances, where `scipy.linalg.sqrtm` needs an eps * I offset.

Feature moments can be accumulated over batches (and merged across hosts) with `moments_*`: they keep
(count, mean, M2 = sum of centred outer products) and merge with the pairwise update of Chan et al.
(1979), which does not lose precision when the mean is large compared to the spread.
"""
from typing import NamedTuple

import numpy as np

__all__ = [
  "frechet_distance",
  "trace_sqrt_product",
  "feature_statistics",
  "FeatureMoments",
  "moments_init",
  "moments_update",
  "moments_merge",
  "moments_statistics",
]


def _as_f64(name, x, ndim):
  x = np.asarray(x)
  if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
    raise ValueError(f"{name} must be a real numeric array, got dtype {x.dtype}")
  if x.ndim != ndim:
    raise ValueError(f"{name} must have {ndim} dimension(s), got shape {x.shape}")
  x = x.astype(np.float64)
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} contains NaN or infinite values")
  return x


def _check_gaussian(mu_name, mu, sigma_name, sigma):
  mu = _as_f64(mu_name, mu, 1)
  sigma = _as_f64(sigma_name, sigma, 2)
  d = mu.shape[0]
  if sigma.shape != (d, d):
    raise ValueError(f"{sigma_name} must have shape ({d}, {d}) to match {mu_name} of shape {mu.shape}, "
                     f"got {sigma.shape}")
  return mu, sigma


def _clip_roundoff(w):
  """Eigenvalues below the round-off level d * eps * max|w| (incl. negative ones) -> 0.

  Without this, a singular covariance's zero eigenvalues come out as +-1e-16 and their square roots add
  errors of order 1e-8 instead of 1e-16.
  """
  tol = w.shape[0] * np.finfo(np.float64).eps * max(float(np.max(np.abs(w), initial=0.0)), np.finfo(float).tiny)
  return np.where(w > tol, w, 0.0)


def _psd_sqrt(s):
  """Symmetric square root of a symmetric PSD matrix via eigh; round-off eigenvalues -> 0."""
  w, v = np.linalg.eigh(0.5 * (s + s.T))
  return (v * np.sqrt(_clip_roundoff(w))) @ v.T


def trace_sqrt_product(sigma1, sigma2):
  """Tr((S1 S2)^{1/2}) for symmetric PSD S1, S2 [D, D], as sum_i sqrt(lambda_i(S1^{1/2} S2 S1^{1/2})).

  Returns a Python float (float64 arithmetic).
  """
  a = _psd_sqrt(np.asarray(sigma1, np.float64))
  m = a @ np.asarray(sigma2, np.float64) @ a
  w = np.linalg.eigvalsh(0.5 * (m + m.T))
  return float(np.sum(np.sqrt(_clip_roundoff(w))))


def frechet_distance(mu1, sigma1, mu2, sigma2):
  """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID when fed Inception features).

  d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2}), computed in float64.

  Args:
    mu1, mu2: means, shape [D].
    sigma1, sigma2: covariances, shape [D, D], symmetric positive semi-definite (singular is fine).
  Returns:
    d^2 as a Python float, clipped at 0 (round-off can make identical Gaussians give -1e-13).
  Raises:
    ValueError: on mismatched shapes/dimensions or non-finite values.
  """
  mu1, sigma1 = _check_gaussian("mu1", mu1, "sigma1", sigma1)
  mu2, sigma2 = _check_gaussian("mu2", mu2, "sigma2", sigma2)
  if mu1.shape != mu2.shape:
    raise ValueError(f"mu1 and mu2 must have the same feature dimension, got {mu1.shape} and {mu2.shape} "
                     "(were the statistics computed with different feature extractors?)")
  diff = mu1 - mu2
  d2 = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
  return max(float(d2), 0.0)


def feature_statistics(features):
  """Mean and unbiased covariance of features [N, D] in float64: mu [D], sigma [D, D] (np.cov, ddof=1)."""
  f = _as_f64("features", features, 2)
  if f.shape[0] < 2:
    raise ValueError(f"features needs at least 2 rows to estimate a covariance, got shape {f.shape}")
  mu = f.mean(axis=0)
  c = f - mu
  return mu, (c.T @ c) / (f.shape[0] - 1)


class FeatureMoments(NamedTuple):
  """Streaming first and second moments of features: count N, mean [D], M2 = sum (f - mean)(f - mean)^T."""
  count: int
  mean: np.ndarray
  m2: np.ndarray


def moments_init(dim):
  """Empty moments for features of dimension `dim`."""
  if int(dim) != dim or dim < 1:
    raise ValueError(f"dim must be a positive integer, got {dim!r}")
  return FeatureMoments(0, np.zeros([dim], np.float64), np.zeros([dim, dim], np.float64))


def moments_merge(a, b):
  """Merge two FeatureMoments (Chan et al. 1979).

  n = n_a + n_b, delta = mean_b - mean_a, mean = mean_a + delta n_b / n,
  M2 = M2_a + M2_b + delta delta^T n_a n_b / n.
  """
  if a.mean.shape != b.mean.shape:
    raise ValueError(f"cannot merge moments of dimension {a.mean.shape[0]} and {b.mean.shape[0]}")
  n = a.count + b.count
  if n == 0:
    return a
  delta = b.mean - a.mean
  mean = a.mean + delta * (b.count / n)
  m2 = a.m2 + b.m2 + np.outer(delta, delta) * (a.count * b.count / n)
  return FeatureMoments(n, mean, m2)


def moments_update(moments, features):
  """Add a batch of features [B, D] to `moments` (float64)."""
  f = _as_f64("features", features, 2)
  if f.shape[1] != moments.mean.shape[0]:
    raise ValueError(f"features must have {moments.mean.shape[0]} columns, got shape {f.shape}")
  if f.shape[0] == 0:
    return moments
  mean = f.mean(axis=0)
  c = f - mean
  return moments_merge(moments, FeatureMoments(f.shape[0], mean, c.T @ c))


def moments_statistics(moments):
  """(mu [D], sigma [D, D]) from moments, with the unbiased covariance M2 / (N - 1) like np.cov."""
  if moments.count < 2:
    raise ValueError(f"need at least 2 samples to estimate a covariance, got {moments.count}")
  return moments.mean.copy(), moments.m2 / (moments.count - 1)
