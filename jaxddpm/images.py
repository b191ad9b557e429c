"""Images out: quantisation to uint8, grids, nearest-neighbour upscaling and PNG files.

The quantisation here is the one every metric uses, so FID is computed on exactly the pixels a user
would see in the saved PNGs.
"""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["to_uint8", "from_uint8", "make_grid", "upscale", "save_png"]


def to_uint8(x):
  """Quantise images in [-1, 1] to uint8 exactly as saved: u = clip(round((x + 1) * 127.5), 0, 255).

  `round` is round-half-to-even (np.rint / jnp.round). The arithmetic is float32 for numpy and jax
  inputs alike, so both give identical bytes. A jax array stays a jax array (usable under jit); anything
  else becomes a numpy array. Any shape.
  """
  if isinstance(x, jax.Array):  # also true for tracers under jit
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"x must be a floating array in [-1, 1], got dtype {x.dtype}")
    y = (x.astype(jnp.float32) + 1.0) * 127.5
    return jnp.clip(jnp.round(y), 0, 255).astype(jnp.uint8)
  x = np.asarray(x)
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"x must be a floating array in [-1, 1], got dtype {x.dtype}")
  y = (x.astype(np.float32) + np.float32(1.0)) * np.float32(127.5)
  return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def from_uint8(u):
  """uint8 images -> float32 in [-1, 1]: x = u / 127.5 - 1 (the inverse of `to_uint8` on its grid)."""
  u = np.asarray(u)
  if u.dtype != np.uint8:
    raise ValueError(f"u must be a uint8 array, got dtype {u.dtype}")
  return u.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _check_uint8_images(name, images, ndim=4):
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"{name} must be uint8 (use to_uint8 on [-1, 1] floats), got dtype {images.dtype}")
  if images.ndim != ndim:
    raise ValueError(f"{name} must have {ndim} dimensions, got shape {images.shape}")
  return images


def make_grid(images, ncols=None, padding=1, pad_value=255):
  """Tile uint8 images [N, H, W, C] into one image [H', W', C], row-major.

  With c = ncols (default ceil(sqrt(N))) and r = ceil(N / c): H' = r (H + p) + p, W' = c (W + p) + p
  for p = padding; the border, gaps and unused cells are `pad_value`.
  """
  images = _check_uint8_images("images", images)
  n, h, w, c = images.shape
  if n == 0:
    raise ValueError("images must contain at least one image, got N=0")
  if ncols is None:
    ncols = math.ceil(math.sqrt(n))
  if int(ncols) != ncols or ncols < 1:
    raise ValueError(f"ncols must be a positive integer or None, got {ncols!r}")
  ncols = min(int(ncols), n)
  if int(padding) != padding or padding < 0:
    raise ValueError(f"padding must be a non-negative integer, got {padding!r}")
  if int(pad_value) != pad_value or not 0 <= pad_value <= 255:
    raise ValueError(f"pad_value must be an integer in [0, 255], got {pad_value!r}")
  p = int(padding)
  nrows = math.ceil(n / ncols)
  grid = np.full([nrows * (h + p) + p, ncols * (w + p) + p, c], pad_value, np.uint8)
  for i in range(n):
    r, k = divmod(i, ncols)
    y, x = p + r * (h + p), p + k * (w + p)
    grid[y:y + h, x:x + w] = images[i]
  return grid


def upscale(images, factor):
  """Nearest-neighbour upscaling by an integer factor of the H, W axes of [..., H, W, C] images.

  out[..., i, j, :] = images[..., i // factor, j // factor, :]; makes 8x8 digits visible in a grid.
  """
  images = np.asarray(images)
  if images.ndim < 3:
    raise ValueError(f"images must have shape [..., H, W, C], got shape {images.shape}")
  if int(factor) != factor or factor < 1:
    raise ValueError(f"factor must be a positive integer, got {factor!r}")
  factor = int(factor)
  return np.repeat(np.repeat(images, factor, axis=-3), factor, axis=-2)


def save_png(path, image):
  """Write a uint8 image [H, W, C] (C in {1, 3, 4}) or [H, W] to `path` as PNG.

  C = 1 and [H, W] are saved as 8-bit greyscale ("L"), C = 3 as RGB, C = 4 as RGBA. Parent directories
  are created. Returns the path.
  """
  from PIL import Image

  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"image must be uint8 (use to_uint8 on [-1, 1] floats), got dtype {image.dtype}")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
    raise ValueError(f"image must have shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {image.shape}")
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  # PIL infers L / RGB / RGBA from a uint8 array of shape [H, W] / [H, W, 3] / [H, W, 4].
  Image.fromarray(np.ascontiguousarray(image)).save(path, format="PNG")
  return path
