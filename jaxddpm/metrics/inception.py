"""The FID Inception-v3 network in Flax linen, and pool3 features of uint8 images.

This is the network of the TF graph `inception-2015-12-05` that the TTUR FID code uses, as re-expressed by
pytorch-fid (Seitzer, `FIDInceptionA/C/E`) on top of the torchvision Inception-v3 layout (Szegedy et al.
2016, "Rethinking the Inception architecture"). It differs from the torchvision/Keras Inception-v3 in the
pooling branches, which is why FID needs its own network:

* the 3x3 average pools of the A, C and first E blocks (Mixed_5b-d, Mixed_6b-e, Mixed_7b) divide by the
  number of *valid* inputs in the window (`count_include_pad=False`);
* the last E block (Mixed_7c) uses a 3x3 *max* pool, stride 1, in its pool branch.

Every conv is `BasicConv2d`: conv without bias -> batch norm (eps 1e-3, running statistics) -> ReLU.
Feature extraction (`preprocess`): uint8 -> [0, 1] -> bilinear resize to 299x299 (half-pixel centres, no
antialiasing, like `F.interpolate(mode="bilinear", align_corners=False)`) -> 2 x - 1 in [-1, 1]; features
are the 2048-d global average ("pool3") of the last block. Greyscale images are repeated to 3 channels.

Weights are never downloaded: convert the published pytorch-fid file once with
`python -m jaxddpm.metrics.convert pt_inception-2015-12-05-6726825d.pth inception_fid.npz`
and pass the .npz to `load_inception_variables`. Module names match the torch state-dict names, so
`Mixed_6b.branch7x7_2.conv.weight` lives at `params/Mixed_6b/branch7x7_2/conv/kernel`.
"""
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = [
  "BasicConv2d",
  "InceptionA",
  "InceptionB",
  "InceptionC",
  "InceptionD",
  "InceptionE",
  "InceptionV3",
  "INCEPTION_SIZE",
  "FEATURE_DIM",
  "WEIGHTS_HELP",
  "preprocess",
  "inception_variable_shapes",
  "load_inception_variables",
  "make_inception_feature_fn",
]

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the TF graph has 1008 logits (1000 classes + 8 unused)
WEIGHTS_HELP = (
  "The FID Inception weights are not downloaded by jaxddpm. Obtain the published pytorch-fid file "
  "pt_inception-2015-12-05-6726825d.pth (release 'fid_weights' of github.com/mseitzer/pytorch-fid) and "
  "convert it once with:  python -m jaxddpm.metrics.convert pt_inception-2015-12-05-6726825d.pth "
  "inception_fid.npz")


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
  """conv (no bias) -> BatchNorm(eps=1e-3, running stats) -> ReLU. NHWC in, NHWC out."""
  features: int
  kernel_size: Any = (1, 1)
  strides: int = 1
  padding: Any = 0  # symmetric zero padding (ph, pw) as in torch.nn.Conv2d

  @nn.compact
  def __call__(self, x):
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.strides),
                padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def avg_pool_3x3_exclude_pad(x):
  """3x3 average pool, stride 1, zero padding 1, dividing by the number of valid inputs (FID quirk)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def max_pool_3x3_same(x):
  """3x3 max pool, stride 1, padding 1 (padding never wins): the pool branch of the last E block."""
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def max_pool_3x3_s2(x):
  """3x3 max pool, stride 2, no padding: out = floor((H - 3) / 2) + 1."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """Mixed_5b/c/d (35x35): channels 64 + 64 + 96 + pool_features."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, 1, name="branch1x1")(x)
    b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
    b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (35x35 -> 17x17): channels 384 + 96 + C_in."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, 3, strides=2, name="branch3x3")(x)
    bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, 3, strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b/c/d/e (17x17), factorised 7x7 convs: channels 4 x 192 = 768."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, 1, name="branch1x1")(x)
    b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, 1, name="branch_pool")(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (17x17 -> 8x8): channels 320 + 192 + C_in."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
    b3 = BasicConv2d(320, 3, strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, 3, strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b/c (8x8): channels 320 + 768 + 768 + 192 = 2048.

  pool = "avg": average pool excluding padding (Mixed_7b, FIDInceptionE_1);
  pool = "max": max pool (Mixed_7c, FIDInceptionE_2) -- the TF graph's quirk.
  """
  pool: str = "avg"

  @nn.compact
  def __call__(self, x):
    if self.pool not in ("avg", "max"):
      raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
    b1 = BasicConv2d(320, 1, name="branch1x1")(x)
    b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    pooled = avg_pool_3x3_exclude_pad(x) if self.pool == "avg" else max_pool_3x3_same(x)
    bp = BasicConv2d(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """The FID Inception-v3. x: [N, H, W, 3] in [-1, 1] with H, W >= 75 (299 for FID).

  Returns (pool3 [N, 2048], logits [N, num_classes]); FID uses pool3, the Inception Score the logits.
  """
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x):
    x = BasicConv2d(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = max_pool_3x3_s2(x)
    x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
    x = max_pool_3x3_s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, name="fc")(pool3)
    return pool3, logits


def preprocess(images, size=INCEPTION_SIZE):
  """uint8 images [N, H, W, C], C in {1, 3} -> float32 [N, size, size, 3] in [-1, 1].

  x = 2 * resize_bilinear(u / 255) - 1, with half-pixel-centre bilinear interpolation without
  antialiasing (torch `align_corners=False`, the pytorch-fid choice). Greyscale is repeated to RGB.
  Works on numpy or jax arrays, inside or outside jit.
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must have shape [N, H, W, C] with C in {{1, 3}}, got {images.shape}")
  if images.dtype != jnp.uint8:
    raise ValueError(f"images must be uint8 (quantise samples with jaxddpm.images.to_uint8), "
                     f"got dtype {images.dtype}")
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, 3), method="bilinear", antialias=False)
  return 2.0 * x - 1.0


def inception_variable_shapes(num_classes=NUM_CLASSES):
  """Flat {"params/Mixed_5b/branch1x1/conv/kernel": shape, ...} of InceptionV3 (no compute, eval_shape)."""
  shapes = jax.eval_shape(InceptionV3(num_classes).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32))
  flat = traverse_util.flatten_dict(shapes, sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def load_inception_variables(path):
  """Load converted FID Inception weights (.npz from `jaxddpm.metrics.convert`) into a Flax variable tree.

  Returns {"params": ..., "batch_stats": ...} for `InceptionV3().apply`. Every array is checked against the
  network's shapes. Raises FileNotFoundError (missing file, with instructions) or ValueError (a .pth given,
  or wrong keys/shapes).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"FID Inception weights file not found: {path!r}. {WEIGHTS_HELP}")
  if path.endswith((".pth", ".pt")):
    raise ValueError(f"{path!r} looks like a torch weight file; convert it first. {WEIGHTS_HELP}")
  try:
    with np.load(path, allow_pickle=False) as f:
      flat = {k: np.asarray(f[k]) for k in f.files}
  except Exception as e:  # not a zip/npz
    raise ValueError(f"could not read {path!r} as a .npz of FID Inception weights ({e}). {WEIGHTS_HELP}") from e
  expected = inception_variable_shapes()
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  if missing or unexpected:
    raise ValueError(f"{path!r} is not an FID Inception weight file: {len(missing)} missing keys "
                     f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). "
                     f"{WEIGHTS_HELP}")
  bad = [(k, flat[k].shape, s) for k, s in expected.items() if flat[k].shape != s]
  if bad:
    raise ValueError(f"{path!r}: wrong shapes for {len(bad)} arrays, e.g. (key, got, expected) {bad[:3]}")
  return traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}, sep="/")


def _local_mesh(devices):
  from jax.sharding import Mesh
  return Mesh(np.asarray(devices), ("data",))


def make_inception_feature_fn(variables, devices=None, size=INCEPTION_SIZE):
  """Returns features(images_uint8 [N, H, W, C]) -> np.float64 [N, 2048] pool3 features.

  `size` is the side the images are resized to: keep the default 299 for FID (smaller values, >= 75,
  only serve tests).

  `variables` is the tree from `load_inception_variables` (or a path to the .npz). The batch is split
  over `devices` (default: this process's local devices) with a NamedSharding on a ("data",) mesh, the
  parameters replicated; N need not divide the device count (the batch is padded and cropped). Each
  process computes features of its own images; merge statistics across hosts with `moments_merge`.
  """
  from jax.sharding import NamedSharding, PartitionSpec as P

  if int(size) != size or size < 75:
    raise ValueError(f"size must be an integer >= 75 (299 for FID), got {size!r}")
  if isinstance(variables, (str, os.PathLike)):
    variables = load_inception_variables(variables)
  devices = list(jax.local_devices() if devices is None else devices)
  mesh = _local_mesh(devices)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  variables = jax.device_put(variables, replicated)
  model = InceptionV3()

  @jax.jit
  def _features(variables, images):
    pool3, _ = model.apply(variables, preprocess(images, size))
    return jax.lax.with_sharding_constraint(pool3, batch_sharding)

  def features(images):
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 of shape [N, H, W, C] with C in {{1, 3}}, got "
                       f"{images.dtype} {images.shape}")
    n = images.shape[0]
    pad = (-n) % len(devices)
    if pad:
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.uint8)])
    out = _features(variables, jax.device_put(images, batch_sharding))
    return np.asarray(out, np.float64)[:n]

  return features
