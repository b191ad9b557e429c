"""Quantisation, grids, upscaling and PNG writing against plain numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxddpm import images


def test_to_uint8_matches_formula_and_jax_agrees():
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.uniform(-1.2, 1.2, 1000),
                      [-1.0, 1.0, 0.0, -1.0 + 0.5 / 127.5, 1.0 - 0.5 / 127.5, -3.0, 3.0]]).astype(np.float32)
  # independent reference: per-element Python arithmetic in float32 with round-half-even
  ref = np.array([min(255, max(0, round(float((np.float32(v) + np.float32(1)) * np.float32(127.5)))))
                  for v in x], np.uint8)
  got = images.to_uint8(x)
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, ref)
  got_jax = images.to_uint8(jnp.asarray(x))
  assert isinstance(got_jax, jax.Array)
  np.testing.assert_array_equal(np.asarray(got_jax), ref)
  np.testing.assert_array_equal(np.asarray(jax.jit(images.to_uint8)(jnp.asarray(x))), ref)
  assert images.to_uint8(np.float32([-1.0, 1.0])).tolist() == [0, 255]


def test_from_uint8_inverts_to_uint8():
  u = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(images.to_uint8(images.from_uint8(u)), u)
  np.testing.assert_allclose(images.from_uint8(u), u / 127.5 - 1, atol=1e-6)


def test_make_grid_against_loop_reference():
  rng = np.random.default_rng(1)
  x = rng.integers(0, 255, size=(7, 3, 5, 2), dtype=np.uint8)
  g = images.make_grid(x, ncols=3, padding=2, pad_value=255)
  assert g.shape == (3 * (3 + 2) + 2, 3 * (5 + 2) + 2, 2)
  ref = np.full(g.shape, 255, np.uint8)
  for i in range(7):
    r, c = i // 3, i % 3
    ref[2 + r * 5:2 + r * 5 + 3, 2 + c * 7:2 + c * 7 + 5] = x[i]
  np.testing.assert_array_equal(g, ref)
  # default ncols = ceil(sqrt(N)); padding 0 is a plain reshape/transpose
  y = rng.integers(0, 255, size=(9, 2, 2, 1), dtype=np.uint8)
  g0 = images.make_grid(y, padding=0)
  np.testing.assert_array_equal(g0, y.reshape(3, 3, 2, 2, 1).transpose(0, 2, 1, 3, 4).reshape(6, 6, 1))


def test_upscale_nearest():
  rng = np.random.default_rng(2)
  x = rng.integers(0, 255, size=(2, 8, 8, 1), dtype=np.uint8)
  up = images.upscale(x, 4)
  assert up.shape == (2, 32, 32, 1)
  i, j = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
  np.testing.assert_array_equal(up, x[:, i // 4, j // 4, :])


def test_save_png_roundtrip(tmp_path):
  rng = np.random.default_rng(3)
  grey = rng.integers(0, 255, size=(6, 5, 1), dtype=np.uint8)
  rgb = rng.integers(0, 255, size=(6, 5, 3), dtype=np.uint8)
  p1 = images.save_png(tmp_path / "sub" / "g.png", grey)
  p2 = images.save_png(tmp_path / "c.png", rgb)
  with Image.open(p1) as im:
    assert im.mode == "L"
    np.testing.assert_array_equal(np.asarray(im), grey[..., 0])
  with Image.open(p2) as im:
    assert im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im), rgb)


def test_bad_input():
  with pytest.raises(ValueError, match="uint8"):
    images.make_grid(np.zeros((2, 4, 4, 1), np.float32))
  with pytest.raises(ValueError, match="ncols"):
    images.make_grid(np.zeros((2, 4, 4, 1), np.uint8), ncols=0)
  with pytest.raises(ValueError, match="factor"):
    images.upscale(np.zeros((2, 4, 4, 1), np.uint8), 1.5)
  with pytest.raises(ValueError, match="shape"):
    images.save_png("/tmp/never.png", np.zeros((4, 4, 2), np.uint8))
  with pytest.raises(ValueError, match="floating"):
    images.to_uint8(np.zeros(3, np.uint8))
