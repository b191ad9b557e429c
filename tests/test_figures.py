"""Figures: progressive-generation grid layout, interpolation in x_t with an exact denoiser, the bound's plot.

The interpolation is checked on data made of two images (a two-point distribution), whose exact denoiser
E[x_0 | x_t] is a softmax over the two points: decoding must return the encoded image for lambda = 0 and 1
at small t, and a real image (one of the two, never a pixel blend) for every lambda at large t.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxddpm as jd
from jaxddpm import figures


def u8(x):
  return np.clip(np.rint((np.asarray(x, np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def test_progressive_grid_layout():
  S, N, H, W, C = 3, 2, 4, 5, 3
  x = np.random.default_rng(0).uniform(-1.2, 1.2, (S, N, H, W, C)).astype(np.float32)
  g = figures.progressive_grid(x, padding=2, pad_value=7)
  assert g.shape == (N * (H + 2) + 2, S * (W + 2) + 2, C) and g.dtype == np.uint8
  for r in range(N):
    for c in range(S):
      y0, x0 = 2 + r * (H + 2), 2 + c * (W + 2)
      np.testing.assert_array_equal(g[y0:y0 + H, x0:x0 + W], u8(x[c, r]))  # row = sample, column = snapshot
  mask = np.ones(g.shape[:2], bool)
  for r in range(N):
    for c in range(S):
      mask[2 + r * (H + 2):2 + r * (H + 2) + H, 2 + c * (W + 2):2 + c * (W + 2) + W] = False
  assert np.all(g[mask] == 7)
  # uint8 input is used as is
  np.testing.assert_array_equal(figures.progressive_grid(u8(x), padding=2, pad_value=7), g)


def test_interpolation_grid_columns():
  P, L = 2, 3
  rng = np.random.default_rng(1)
  a, b = rng.integers(0, 256, (2, P, 4, 4, 1), dtype=np.uint8)
  dec = rng.integers(0, 256, (L, P, 4, 4, 1), dtype=np.uint8)
  g = figures.interpolation_grid(a, b, dec, padding=1)
  assert g.shape == (P * 5 + 1, (L + 2) * 5 + 1, 1)
  cell = lambda r, c: g[1 + 5 * r:5 + 5 * r, 1 + 5 * c:5 + 5 * c]
  for r in range(P):
    np.testing.assert_array_equal(cell(r, 0), a[r])
    np.testing.assert_array_equal(cell(r, L + 1), b[r])
    for j in range(L):
      np.testing.assert_array_equal(cell(r, j + 1), dec[j, r])


# --------------------------------------------------------------------------------- interpolation
T = 40
SCHED = jd.make_schedule("cosine", T)
AB = np.cumprod(1.0 - np.asarray(jd.beta_schedule("cosine", T), np.float64))


def two_point_eps(params, x, t):
  """Exact E[eps | x_t] for data uniform on two images p0, p1: x0_hat = sum_i w_i p_i with
  w = softmax(-|x_t - a p_i|^2 / (2 s^2)), eps = (x_t - a x0_hat) / s (a^2 = alphabar_t, s^2 = 1 - a^2)."""
  pts = params["points"]  # [2, H, W, C]
  ab = jnp.asarray(AB, jnp.float32)[t][:, None, None, None]
  a, s = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
  d2 = jnp.stack([jnp.sum((x - a * p) ** 2, axis=(1, 2, 3)) for p in pts], -1)  # [B, 2]
  w = jax.nn.softmax(-d2 / (2 * s[:, 0, 0, 0, None] ** 2), axis=-1)
  x0 = jnp.einsum("bk,khwc->bhwc", w, pts)
  return (x - a * x0) / s


def test_interpolate_two_point_data():
  rng = np.random.default_rng(2)
  pa = np.clip(rng.normal(-0.5, 0.3, (4, 4, 1)), -1, 1).astype(np.float32)
  pb = np.clip(rng.normal(0.5, 0.3, (4, 4, 1)), -1, 1).astype(np.float32)
  params = {"points": jnp.asarray(np.stack([pa, pb]))}
  P = 3
  x_a, x_b = np.stack([pa] * P), np.stack([pb] * P)
  lambdas = np.linspace(0, 1, 5)
  small, large = 2, 30
  out = {t: figures.interpolate(two_point_eps, params, SCHED, x_a, x_b, t, lambdas, jax.random.key(t))
         for t in (small, large)}
  for t, res in out.items():
    lat, dec = res["latents"], res["decoded"]
    assert lat.shape == dec.shape == (5, P, 4, 4, 1)
    # Shared noise: x_t' - x_t = sqrt(alphabar_t) (x_b - x_a); the latents are linear in lambda.
    np.testing.assert_allclose(lat[-1] - lat[0], math.sqrt(AB[t]) * (x_b - x_a), atol=2e-5)
    for j, lam in enumerate(lambdas):
      np.testing.assert_allclose(lat[j], (1 - lam) * lat[0] + lam * lat[-1], atol=2e-5)
    # Every decoded image is one of the two data points, not a blend of them.
    err = np.minimum(np.abs(dec - pa).max(axis=(2, 3, 4)), np.abs(dec - pb).max(axis=(2, 3, 4)))
    assert err.max() < 1e-3, (t, err)
  # From small t the endpoints decode to the images they encode.
  dec = out[small]["decoded"]
  np.testing.assert_allclose(dec[0], x_a, atol=1e-3)
  np.testing.assert_allclose(dec[-1], x_b, atol=1e-3)
  # From large t the reverse process decides: both images appear among the decodes of the middle lambdas.
  mid = out[large]["decoded"][1:-1].reshape(-1, 16)
  near_a = np.abs(mid - pa.reshape(16)).max(-1) < 1e-3
  assert 0 < near_a.sum() < near_a.size, near_a


def test_interpolate_bad_input():
  x = np.zeros((2, 4, 4, 1), np.float32)
  args = (two_point_eps, {"points": jnp.zeros((2, 4, 4, 1))}, SCHED)
  with pytest.raises(ValueError, match=r"t must be an integer schedule index in \[0, 40\)"):
    figures.interpolate(*args, x, x, 40, [0, 1], jax.random.key(0))
  with pytest.raises(ValueError, match=r"lambdas must lie in \[0, 1\]"):
    figures.interpolate(*args, x, x, 3, [0, 1.5], jax.random.key(0))
  with pytest.raises(ValueError, match="x_a and x_b must both have shape"):
    figures.interpolate(*args, x, x[:1], 3, [0, 1], jax.random.key(0))
  with pytest.raises(ValueError, match="method must be one of"):
    figures.interpolate(*args, x, x, 3, [0, 1], jax.random.key(0), method="euler")


# ------------------------------------------------------------------------------------- bound plot
def test_bpd_curves_and_plot(tmp_path):
  terms = np.array([2.0, 1.0, 0.5, 0.25])
  mse = np.array([1e-4, 1e-3, 1e-2, 1e-1])
  t, rate, dist = figures.bpd_curves(terms, 0.1, mse)
  np.testing.assert_array_equal(t, [1, 2, 3, 4])
  for i, tt in enumerate(t):  # rate(t) = L_T + sum_{s=t+1}^{T} L_{s-1}
    np.testing.assert_allclose(rate[i], 0.1 + sum(terms[s - 1] for s in range(tt + 1, 5)))
  np.testing.assert_allclose(dist, 127.5 * np.sqrt(mse))
  from PIL import Image
  path = figures.plot_bpd_terms(tmp_path / "sub" / "bpd.png", terms, 0.1, mse, title="x")
  im = Image.open(path)
  assert im.format == "PNG" and im.size[0] > 2 * im.size[1]  # two panels side by side
  with pytest.raises(ValueError, match="terms_bpd must be a non-empty 1-D array"):
    figures.plot_bpd_terms(tmp_path / "bad.png", np.zeros((2, 2)), 0.1)
