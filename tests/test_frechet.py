"""Frechet distance against closed forms, scipy's sqrtm, invariances; streaming moments against np.cov."""
import numpy as np
import pytest
import scipy.linalg

from jaxddpm.metrics import frechet
from jaxddpm.metrics.fid_stats import compute_statistics, load_statistics, save_statistics, save_result, Protocol


def random_spd(rng, d, rank=None):
  a = rng.normal(size=(d, rank or d))
  return a @ a.T / d


def sqrtm_reference(mu1, s1, mu2, s2):
  """The TTUR/pytorch-fid formula with scipy.linalg.sqrtm (full-rank inputs)."""
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_one_dimensional_closed_form():
  # d^2 = (m1 - m2)^2 + (s1 - s2)^2 for N(m1, s1^2), N(m2, s2^2).
  d2 = frechet.frechet_distance([1.5], [[4.0]], [-0.5], [[0.25]])
  assert d2 == pytest.approx(2.0 ** 2 + (2.0 - 0.5) ** 2, rel=1e-12)


def test_diagonal_closed_form_including_zero_variances():
  rng = np.random.default_rng(0)
  a = rng.uniform(0, 2, 16)
  b = rng.uniform(0, 2, 16)
  a[:5] = 0.0  # singular S1
  b[3:8] = 0.0  # singular S2, overlapping and not
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_scaled_singular_covariance_closed_form():
  # S2 = c S1 (S1 of rank 3 in 10-d, not diagonal): Tr((S1 S2)^1/2) = sqrt(c) Tr(S1),
  # so d^2 = |dmu|^2 + (1 - sqrt(c))^2 Tr(S1).
  rng = np.random.default_rng(1)
  s1 = random_spd(rng, 10, rank=3)
  c = 2.7
  mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
  expected = np.sum((mu1 - mu2) ** 2) + (1 - np.sqrt(c)) ** 2 * np.trace(s1)
  assert frechet.frechet_distance(mu1, s1, mu2, c * s1) == pytest.approx(expected, rel=1e-9)


def test_identical_singular_gaussians_give_zero():
  rng = np.random.default_rng(2)
  s = random_spd(rng, 32, rank=5)
  mu = rng.normal(size=32)
  assert frechet.frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-10)


def test_matches_scipy_sqrtm_formula_on_full_rank():
  rng = np.random.default_rng(3)
  for d in (2, 7, 64):
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    ref = sqrtm_reference(mu1, s1, mu2, s2)
    assert frechet.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)


def test_invariances_and_symmetry():
  rng = np.random.default_rng(4)
  d = 12
  s1, s2 = random_spd(rng, d, rank=8), random_spd(rng, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  base = frechet.frechet_distance(mu1, s1, mu2, s2)
  assert base > 0.1
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # rotation: x -> Q x
  t = rng.normal(size=d)  # translation of both
  rotated = frechet.frechet_distance(q @ mu1 + t, q @ s1 @ q.T, q @ mu2 + t, q @ s2 @ q.T)
  assert rotated == pytest.approx(base, rel=1e-9)
  assert frechet.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(base, rel=1e-9)
  # scaling x -> c x scales d^2 by c^2
  assert frechet.frechet_distance(3 * mu1, 9 * s1, 3 * mu2, 9 * s2) == pytest.approx(9 * base, rel=1e-9)


def test_streaming_moments_match_np_cov_for_any_batching():
  rng = np.random.default_rng(5)
  f = rng.normal(loc=1e4, scale=0.5, size=(203, 6))  # large mean: a naive sum of squares would cancel
  mu_ref, sig_ref = f.mean(0), np.cov(f, rowvar=False)
  m = frechet.moments_init(6)
  for chunk in np.array_split(f, [1, 50, 51, 140]):
    m = frechet.moments_update(m, chunk)
  mu, sig = frechet.moments_statistics(m)
  np.testing.assert_allclose(mu, mu_ref, rtol=1e-13)
  np.testing.assert_allclose(sig, sig_ref, rtol=1e-9)
  # merging two hosts' moments gives the same
  a = frechet.moments_update(frechet.moments_init(6), f[:77])
  b = frechet.moments_update(frechet.moments_init(6), f[77:])
  mu2, sig2 = frechet.moments_statistics(frechet.moments_merge(a, b))
  np.testing.assert_allclose(sig2, sig_ref, rtol=1e-9)
  mu3, sig3 = frechet.feature_statistics(f)
  np.testing.assert_allclose(sig3, sig_ref, rtol=1e-9)


def test_bad_input_is_value_error():
  with pytest.raises(ValueError, match="sigma1"):
    frechet.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match="feature dimension"):
    frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="mu1"):
    frechet.frechet_distance(np.zeros((3, 1)), np.eye(3), np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match="NaN"):
    frechet.frechet_distance(np.array([np.nan]), np.eye(1), np.zeros(1), np.eye(1))
  with pytest.raises(ValueError, match="columns"):
    frechet.moments_update(frechet.moments_init(3), np.zeros((2, 4)))
  with pytest.raises(ValueError, match="at least 2"):
    frechet.feature_statistics(np.zeros((1, 3)))


def test_statistics_cache_roundtrip_and_errors(tmp_path):
  rng = np.random.default_rng(6)
  images = rng.integers(0, 256, size=(37, 4, 4, 1), dtype=np.uint8)
  feature_fn = lambda b: b.reshape(b.shape[0], -1)[:, :5].astype(np.float64) ** 1.5  # noqa: E731
  batches = (images[i:i + 8] for i in range(0, 37, 8))
  mu, sigma, info = compute_statistics(batches, feature_fn, max_samples=30)
  ref = feature_fn(images[:30])
  np.testing.assert_allclose(mu, ref.mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(ref, rowvar=False), rtol=1e-10)
  assert info == {"num_samples": 30, "image_shape": [4, 4, 1], "feature_dim": 5}

  path = save_statistics(tmp_path / "ref.npz", mu, sigma, image_shape=[4, 4, 1], feature_extractor="toy")
  with np.load(path) as f:  # the format pytorch-fid / TTUR read: keys mu, sigma
    np.testing.assert_array_equal(f["mu"], mu)
    np.testing.assert_array_equal(f["sigma"], sigma)
  mu2, sigma2 = load_statistics(path, feature_dim=5, image_shape=(4, 4, 1), feature_extractor="toy")
  np.testing.assert_array_equal(mu2, mu)
  # a published-style file with only mu and sigma loads too
  np.savez(tmp_path / "published.npz", mu=mu.astype(np.float32), sigma=sigma)
  mu3, _ = load_statistics(tmp_path / "published.npz", image_shape=(32, 32, 3))
  np.testing.assert_allclose(mu3, mu, rtol=1e-6)

  with pytest.raises(ValueError, match="another resolution"):
    load_statistics(path, image_shape=(8, 8, 1))
  with pytest.raises(ValueError, match="feature dimension 5"):
    load_statistics(path, feature_dim=2048)
  with pytest.raises(ValueError, match="feature extractor"):
    load_statistics(path, feature_extractor="inception")
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    load_statistics(tmp_path / "nope.npz")
  np.savez(tmp_path / "bad.npz", mean=mu)
  with pytest.raises(ValueError, match="'mu' and 'sigma'"):
    load_statistics(tmp_path / "bad.npz")


def test_protocol_json(tmp_path):
  import json
  p = Protocol(num_samples=50_000, reference="cifar10:train", reference_split="train", ema=True, seed=0,
               feature_extractor="inception-2015-12-05-pool3", sampler={"name": "ddpm", "steps": 1000})
  path = save_result(tmp_path / "fid.json", {"fid": np.float64(3.17)}, p)
  with open(path) as f:
    d = json.load(f)
  assert d["metrics"]["fid"] == 3.17
  assert d["protocol"]["num_samples"] == 50_000 and d["protocol"]["ema"] is True
  assert "127.5" in d["protocol"]["quantisation"]
  with pytest.raises(ValueError, match="reference_split"):
    Protocol(num_samples=10, reference="x", reference_split="dev", ema=True, seed=0, feature_extractor="f")
  with pytest.raises(ValueError, match="num_samples"):
    Protocol(num_samples=1, reference="x", reference_split="test", ema=True, seed=0, feature_extractor="f")
