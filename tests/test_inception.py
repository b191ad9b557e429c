"""The FID Inception network and its weight converter.

The reference is written in "torch land": a synthetic state dict with the key names and [O, I, kh, kw]
layout of pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, written to disk as a torch checkpoint
(zip and legacy formats) by a minimal pickle writer here, and a float64 numpy NCHW forward pass that reads
that state dict directly. The Flax network only sees the converted .npz.
"""
import collections
import io
import pickle
import struct
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxddpm.metrics import convert as convert_lib
from jaxddpm.metrics import inception

# ---------------------------------------------------------------------------------------------------
# The torch state dict layout (torchvision Inception3 with 1008 classes, no aux logits).


def _block_a(name, cin, pool):
  return [(f"{name}.branch1x1", cin, 64, 1, 1), (f"{name}.branch5x5_1", cin, 48, 1, 1),
          (f"{name}.branch5x5_2", 48, 64, 5, 5), (f"{name}.branch3x3dbl_1", cin, 64, 1, 1),
          (f"{name}.branch3x3dbl_2", 64, 96, 3, 3), (f"{name}.branch3x3dbl_3", 96, 96, 3, 3),
          (f"{name}.branch_pool", cin, pool, 1, 1)]


def _block_c(name, c7):
  return [(f"{name}.branch1x1", 768, 192, 1, 1), (f"{name}.branch7x7_1", 768, c7, 1, 1),
          (f"{name}.branch7x7_2", c7, c7, 1, 7), (f"{name}.branch7x7_3", c7, 192, 7, 1),
          (f"{name}.branch7x7dbl_1", 768, c7, 1, 1), (f"{name}.branch7x7dbl_2", c7, c7, 7, 1),
          (f"{name}.branch7x7dbl_3", c7, c7, 1, 7), (f"{name}.branch7x7dbl_4", c7, c7, 7, 1),
          (f"{name}.branch7x7dbl_5", c7, 192, 1, 7), (f"{name}.branch_pool", 768, 192, 1, 1)]


def _block_e(name, cin):
  return [(f"{name}.branch1x1", cin, 320, 1, 1), (f"{name}.branch3x3_1", cin, 384, 1, 1),
          (f"{name}.branch3x3_2a", 384, 384, 1, 3), (f"{name}.branch3x3_2b", 384, 384, 3, 1),
          (f"{name}.branch3x3dbl_1", cin, 448, 1, 1), (f"{name}.branch3x3dbl_2", 448, 384, 3, 3),
          (f"{name}.branch3x3dbl_3a", 384, 384, 1, 3), (f"{name}.branch3x3dbl_3b", 384, 384, 3, 1),
          (f"{name}.branch_pool", cin, 192, 1, 1)]


CONVS = (
  [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3), ("Conv2d_2b_3x3", 32, 64, 3, 3),
   ("Conv2d_3b_1x1", 64, 80, 1, 1), ("Conv2d_4a_3x3", 80, 192, 3, 3)]
  + _block_a("Mixed_5b", 192, 32) + _block_a("Mixed_5c", 256, 64) + _block_a("Mixed_5d", 288, 64)
  + [("Mixed_6a.branch3x3", 288, 384, 3, 3), ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),
     ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3), ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3)]
  + _block_c("Mixed_6b", 128) + _block_c("Mixed_6c", 160) + _block_c("Mixed_6d", 160)
  + _block_c("Mixed_6e", 192)
  + [("Mixed_7a.branch3x3_1", 768, 192, 1, 1), ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),
     ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1), ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
     ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1), ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3)]
  + _block_e("Mixed_7b", 1280) + _block_e("Mixed_7c", 2048))


def synthetic_state_dict(seed=0):
  """Random weights in the published file's layout; scaled so activations stay O(1) through the net."""
  rng = np.random.default_rng(seed)
  sd = collections.OrderedDict()
  for name, cin, cout, kh, kw in CONVS:
    sd[f"{name}.conv.weight"] = (rng.normal(size=(cout, cin, kh, kw)) * np.sqrt(2.0 / (cin * kh * kw))
                                 ).astype(np.float32)
    sd[f"{name}.bn.weight"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
    sd[f"{name}.bn.bias"] = rng.normal(scale=0.1, size=cout).astype(np.float32)
    sd[f"{name}.bn.running_mean"] = rng.normal(scale=0.1, size=cout).astype(np.float32)
    sd[f"{name}.bn.running_var"] = rng.uniform(0.5, 2.0, cout).astype(np.float32)
  sd["fc.weight"] = (rng.normal(size=(1008, 2048)) / np.sqrt(2048)).astype(np.float32)
  sd["fc.bias"] = rng.normal(scale=0.1, size=1008).astype(np.float32)
  return sd


# ---------------------------------------------------------------------------------------------------
# A minimal torch checkpoint writer (what torch.save produces), using stand-in `torch` modules so that
# pickle emits the same globals: torch._utils._rebuild_tensor_v2 and torch.FloatStorage / LongStorage.


def _install_fake_torch(mp):
  torch_mod = types.ModuleType("torch")
  utils_mod = types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):  # never called: only its name is pickled
    raise AssertionError

  _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
  utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
  storage_types = {}
  for tname in ("FloatStorage", "LongStorage"):
    cls = type(tname, (), {"__module__": "torch"})
    setattr(torch_mod, tname, cls)
    storage_types[tname] = cls
  torch_mod._utils = utils_mod
  mp.setitem(sys.modules, "torch", torch_mod)
  mp.setitem(sys.modules, "torch._utils", utils_mod)
  return types.SimpleNamespace(rebuild=_rebuild_tensor_v2, storage_types=storage_types)


@pytest.fixture
def fake_torch(monkeypatch):
  return _install_fake_torch(monkeypatch)


class _StorageRef:
  def __init__(self, key, dtype, data):
    self.key, self.dtype, self.data = key, dtype, data


class _TensorRef:
  def __init__(self, rebuild, storage, offset, shape, stride):
    self.args = (storage, offset, shape, stride)
    self.rebuild = rebuild

  def __reduce__(self):
    storage, offset, shape, stride = self.args
    return (self.rebuild, (storage, offset, tuple(shape), tuple(stride), False, collections.OrderedDict()))


def _tensor_refs(fake, sd):
  """State dict -> pickleable tensor refs. Exercise the storage layouts torch produces: the 4 BN vectors
  of a layer share one storage (views at offsets), and conv weights are stored transposed in memory
  (a non-contiguous [O, I, kh, kw] view with permuted strides)."""
  refs, storages = collections.OrderedDict(), []
  names = list(sd)
  i = 0
  while i < len(names):
    name = names[i]
    arr = sd[name]
    if name.endswith("bn.weight"):
      group = names[i:i + 4]
      flat = np.concatenate([sd[k] for k in group])
      st = _StorageRef(str(len(storages)), "FloatStorage", flat)
      storages.append(st)
      off = 0
      for k in group:
        refs[k] = _TensorRef(fake.rebuild, st, off, sd[k].shape, (1,))
        off += sd[k].size
      i += 4
      continue
    if arr.ndim == 4:
      mem = np.ascontiguousarray(arr.transpose(3, 2, 1, 0))  # memory order reversed
      o, ci, kh, kw = arr.shape
      st = _StorageRef(str(len(storages)), "FloatStorage", mem.ravel())
      stride = (1, o, o * ci, o * ci * kh)
    else:
      dtype = "LongStorage" if arr.dtype == np.int64 else "FloatStorage"
      st = _StorageRef(str(len(storages)), dtype, np.ascontiguousarray(arr).ravel())
      stride = tuple(int(np.prod(arr.shape[j + 1:])) for j in range(arr.ndim))
    storages.append(st)
    refs[name] = _TensorRef(fake.rebuild, st, 0, arr.shape, stride)
    i += 1
  return refs, storages


def write_torch_zip(path, fake, sd):
  refs, storages = _tensor_refs(fake, sd)
  buf = io.BytesIO()
  p = pickle.Pickler(buf, protocol=2)
  p.persistent_id = lambda o: (("storage", fake.storage_types[o.dtype], o.key, "cpu", o.data.size)
                               if isinstance(o, _StorageRef) else None)
  p.dump(refs)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", buf.getvalue())
    z.writestr("archive/byteorder", "little")
    for st in storages:
      z.writestr(f"archive/data/{st.key}", st.data.astype(st.data.dtype.newbyteorder("<")).tobytes())
    z.writestr("archive/version", "3\n")


def write_torch_legacy(path, fake, sd):
  refs, storages = _tensor_refs(fake, sd)
  with open(path, "wb") as f:
    pickle.dump(0x1950a86a20f9469cfc6c, f, protocol=2)
    pickle.dump(1001, f, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True,
                 "type_sizes": {"short": 2, "int": 4, "long": 4}}, f, protocol=2)
    p = pickle.Pickler(f, protocol=2)
    p.persistent_id = lambda o: (("storage", fake.storage_types[o.dtype], o.key, "cpu", o.data.size, None)
                                 if isinstance(o, _StorageRef) else None)
    p.dump(refs)
    pickle.dump([st.key for st in storages], f, protocol=2)
    for st in storages:
      f.write(struct.pack("<q", st.data.size))
      f.write(st.data.astype(st.data.dtype.newbyteorder("<")).tobytes())


# ---------------------------------------------------------------------------------------------------
# float64 numpy reference of the FID network, NCHW, reading the torch state dict.


def np_conv(x, w, stride=(1, 1), pad=(0, 0)):
  """torch.nn.functional.conv2d (cross-correlation): x [N, I, H, W], w [O, I, kh, kw]."""
  o, i, kh, kw = w.shape
  x = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
  ho = (x.shape[2] - kh) // stride[0] + 1
  wo = (x.shape[3] - kw) // stride[1] + 1
  out = np.zeros((x.shape[0], o, ho, wo))
  for a in range(kh):
    for b in range(kw):
      patch = x[:, :, a:a + stride[0] * (ho - 1) + 1:stride[0], b:b + stride[1] * (wo - 1) + 1:stride[1]]
      out += np.einsum("nihw,oi->nohw", patch, w[:, :, a, b])
  return out


def np_basic(sd, name, x, stride=1, pad=(0, 0)):
  g = lambda k: sd[f"{name}.{k}"].astype(np.float64)  # noqa: E731
  y = np_conv(x, g("conv.weight"), (stride, stride), pad)
  sh = (1, -1, 1, 1)
  y = (y - g("bn.running_mean").reshape(sh)) / np.sqrt(g("bn.running_var").reshape(sh) + 1e-3)
  return np.maximum(y * g("bn.weight").reshape(sh) + g("bn.bias").reshape(sh), 0.0)


def np_pool(x, k, stride, pad, op, count_include_pad=True):
  n, c, h, w = x.shape
  fill = -np.inf if op == "max" else 0.0
  xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=fill)
  ones = np.pad(np.ones((h, w)), pad)
  ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
  out = np.zeros((n, c, ho, wo))
  for y in range(ho):
    for z in range(wo):
      win = xp[:, :, y * stride:y * stride + k, z * stride:z * stride + k]
      if op == "max":
        out[:, :, y, z] = win.max(axis=(2, 3))
      else:
        cnt = k * k if count_include_pad else ones[y * stride:y * stride + k, z * stride:z * stride + k].sum()
        out[:, :, y, z] = win.sum(axis=(2, 3)) / cnt
  return out


def np_block_a(sd, m, x):
  b = lambda k, h, **kw: np_basic(sd, f"{m}.{k}", h, **kw)  # noqa: E731
  b1 = b("branch1x1", x)
  b5 = b("branch5x5_2", b("branch5x5_1", x), pad=(2, 2))
  b3 = b("branch3x3dbl_3", b("branch3x3dbl_2", b("branch3x3dbl_1", x), pad=(1, 1)), pad=(1, 1))
  bp = b("branch_pool", np_pool(x, 3, 1, 1, "avg", count_include_pad=False))
  return np.concatenate([b1, b5, b3, bp], axis=1)


def np_block_b(sd, m, x):
  b = lambda k, h, **kw: np_basic(sd, f"{m}.{k}", h, **kw)  # noqa: E731
  b3 = b("branch3x3", x, stride=2)
  bd = b("branch3x3dbl_3", b("branch3x3dbl_2", b("branch3x3dbl_1", x), pad=(1, 1)), stride=2)
  return np.concatenate([b3, bd, np_pool(x, 3, 2, 0, "max")], axis=1)


def np_block_c(sd, m, x):
  b = lambda k, h, **kw: np_basic(sd, f"{m}.{k}", h, **kw)  # noqa: E731
  b1 = b("branch1x1", x)
  b7 = b("branch7x7_3", b("branch7x7_2", b("branch7x7_1", x), pad=(0, 3)), pad=(3, 0))
  bd = b("branch7x7dbl_1", x)
  for k, p in (("2", (3, 0)), ("3", (0, 3)), ("4", (3, 0)), ("5", (0, 3))):
    bd = b(f"branch7x7dbl_{k}", bd, pad=p)
  bp = b("branch_pool", np_pool(x, 3, 1, 1, "avg", count_include_pad=False))
  return np.concatenate([b1, b7, bd, bp], axis=1)


def np_block_d(sd, m, x):
  b = lambda k, h, **kw: np_basic(sd, f"{m}.{k}", h, **kw)  # noqa: E731
  b3 = b("branch3x3_2", b("branch3x3_1", x), stride=2)
  b7 = b("branch7x7x3_3", b("branch7x7x3_2", b("branch7x7x3_1", x), pad=(0, 3)), pad=(3, 0))
  b7 = b("branch7x7x3_4", b7, stride=2)
  return np.concatenate([b3, b7, np_pool(x, 3, 2, 0, "max")], axis=1)


def np_block_e(sd, m, x, pool):
  b = lambda k, h, **kw: np_basic(sd, f"{m}.{k}", h, **kw)  # noqa: E731
  b1 = b("branch1x1", x)
  h = b("branch3x3_1", x)
  b3 = np.concatenate([b("branch3x3_2a", h, pad=(0, 1)), b("branch3x3_2b", h, pad=(1, 0))], axis=1)
  h = b("branch3x3dbl_2", b("branch3x3dbl_1", x), pad=(1, 1))
  bd = np.concatenate([b("branch3x3dbl_3a", h, pad=(0, 1)), b("branch3x3dbl_3b", h, pad=(1, 0))], axis=1)
  pooled = (np_pool(x, 3, 1, 1, "avg", count_include_pad=False) if pool == "avg"
            else np_pool(x, 3, 1, 1, "max"))
  return np.concatenate([b1, b3, bd, b("branch_pool", pooled)], axis=1)


def np_inception(sd, x):
  """x: [N, 3, H, W] in [-1, 1] -> (pool3 [N, 2048], logits [N, 1008]), all in float64."""
  x = np_basic(sd, "Conv2d_1a_3x3", x, stride=2)
  x = np_basic(sd, "Conv2d_2a_3x3", x)
  x = np_basic(sd, "Conv2d_2b_3x3", x, pad=(1, 1))
  x = np_pool(x, 3, 2, 0, "max")
  x = np_basic(sd, "Conv2d_3b_1x1", x)
  x = np_basic(sd, "Conv2d_4a_3x3", x)
  x = np_pool(x, 3, 2, 0, "max")
  for m in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
    x = np_block_a(sd, m, x)
  x = np_block_b(sd, "Mixed_6a", x)
  for m in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
    x = np_block_c(sd, m, x)
  x = np_block_d(sd, "Mixed_7a", x)
  x = np_block_e(sd, "Mixed_7b", x, "avg")
  x = np_block_e(sd, "Mixed_7c", x, "max")
  pool3 = x.mean(axis=(2, 3))
  return pool3, pool3 @ sd["fc.weight"].astype(np.float64).T + sd["fc.bias"]


def np_resize_bilinear(x, out_h, out_w):
  """torch F.interpolate(mode="bilinear", align_corners=False) on [N, H, W, C], float64."""
  def axis_weights(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), i0] += 1 - lam
    m[np.arange(n_out), i1] += lam
    return m
  return np.einsum("ph,nhwc,qw->npqc", axis_weights(x.shape[1], out_h), x, axis_weights(x.shape[2], out_w))


# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def state_dict():
  return synthetic_state_dict(seed=0)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, state_dict):
  tmp = tmp_path_factory.mktemp("inception")
  src, dst = tmp / "pt_inception-2015-12-05-6726825d.pth", tmp / "inception_fid.npz"
  with pytest.MonkeyPatch.context() as mp:
    write_torch_zip(src, _install_fake_torch(mp), state_dict)
  assert convert_lib.main([str(src), str(dst)]) == 0
  return dst


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_converter_roundtrip(tmp_path, fake_torch, state_dict, fmt):
  sd = collections.OrderedDict(state_dict)
  if fmt == "legacy":  # newer torch writes a num_batches_tracked counter per BN: ignored by the converter
    sd["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.asarray(7, np.int64)
  src = tmp_path / "weights.pth"
  (write_torch_zip if fmt == "zip" else write_torch_legacy)(src, fake_torch, sd)
  read = convert_lib.read_torch_state_dict(src)
  assert list(read) == list(sd)
  for k, v in sd.items():
    assert read[k].dtype == v.dtype
    np.testing.assert_array_equal(read[k], v)
  dst = tmp_path / "out.npz"
  assert convert_lib.main([str(src), str(dst)]) == 0
  variables = inception.load_inception_variables(dst)
  p, s = variables["params"], variables["batch_stats"]
  for name, _, _, _, _ in CONVS:
    path = name.split(".")
    node = lambda tree: [tree := tree[q] for q in path][-1]  # noqa: E731
    np.testing.assert_array_equal(node(p)["conv"]["kernel"], sd[f"{name}.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(node(p)["bn"]["scale"], sd[f"{name}.bn.weight"])
    np.testing.assert_array_equal(node(p)["bn"]["bias"], sd[f"{name}.bn.bias"])
    np.testing.assert_array_equal(node(s)["bn"]["mean"], sd[f"{name}.bn.running_mean"])
    np.testing.assert_array_equal(node(s)["bn"]["var"], sd[f"{name}.bn.running_var"])
  np.testing.assert_array_equal(p["fc"]["kernel"], sd["fc.weight"].T)
  np.testing.assert_array_equal(p["fc"]["bias"], sd["fc.bias"])


@pytest.fixture(scope="module")
def reference_139(state_dict):
  """3 uint8 images at 139x139 (no resize; every block's pooling visible: the E blocks run at 3x3) and
  the float64 reference (pool3, logits) of the network on x = 2 (u / 255) - 1."""
  rng = np.random.default_rng(0)
  u = rng.integers(0, 256, size=(3, 139, 139, 3), dtype=np.uint8)
  pool3, logits = np_inception(state_dict, (2 * (u / 255.0) - 1).transpose(0, 3, 1, 2))
  assert np.abs(pool3).max() > 1e-2
  return u, pool3, logits


def test_forward_matches_numpy_reference(converted, reference_139):
  u, ref_pool3, ref_logits = reference_139
  variables = inception.load_inception_variables(converted)
  pool3, logits = jax.jit(inception.InceptionV3().apply)(variables, inception.preprocess(u, size=139))
  assert pool3.shape == (3, 2048) and logits.shape == (3, 1008)
  np.testing.assert_allclose(np.asarray(pool3), ref_pool3, atol=2e-4 * np.abs(ref_pool3).max(), rtol=2e-3)
  np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=2e-4 * np.abs(ref_logits).max(), rtol=2e-3)


def test_feature_fn_over_devices_matches_reference(converted, reference_139):
  u, ref_pool3, _ = reference_139
  assert len(jax.local_devices()) == 8  # 3 images over 8 devices: padded and cropped
  feats = inception.make_inception_feature_fn(converted, size=139)(u)
  assert feats.shape == (3, 2048) and feats.dtype == np.float64
  np.testing.assert_allclose(feats, ref_pool3, atol=2e-4 * np.abs(ref_pool3).max(), rtol=2e-3)


def test_block_shapes_at_299():
  x = jax.ShapeDtypeStruct((2, 299, 299, 3), jnp.float32)
  model = inception.InceptionV3()
  variables = jax.eval_shape(model.init, jax.random.key(0), x)

  def run(v, x):
    return model.apply(v, x, capture_intermediates=lambda mdl, _: mdl.name and mdl.name.startswith("Mixed"),
                       mutable=["intermediates"])
  (pool3, logits), inter = jax.eval_shape(run, variables, x)
  shapes = {k: v["__call__"][0].shape for k, v in inter["intermediates"].items()}
  expected = {"Mixed_5b": (2, 35, 35, 256), "Mixed_5c": (2, 35, 35, 288), "Mixed_5d": (2, 35, 35, 288),
              "Mixed_6a": (2, 17, 17, 768), "Mixed_6b": (2, 17, 17, 768), "Mixed_6c": (2, 17, 17, 768),
              "Mixed_6d": (2, 17, 17, 768), "Mixed_6e": (2, 17, 17, 768), "Mixed_7a": (2, 8, 8, 1280),
              "Mixed_7b": (2, 8, 8, 2048), "Mixed_7c": (2, 8, 8, 2048)}
  assert shapes == expected
  assert pool3.shape == (2, inception.FEATURE_DIM) and logits.shape == (2, 1008)
  n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))
  expected_params = sum(o * i * kh * kw + 2 * o for _, i, o, kh, kw in CONVS) + 2048 * 1008 + 1008
  assert n_params == expected_params


def test_pooling_quirks():
  # Average pool excludes padding: a constant image stays constant at the borders (include-pad would
  # give 4/9 at corners and 6/9 at edges).
  x = jnp.full((1, 5, 5, 2), 3.0)
  np.testing.assert_allclose(np.asarray(inception.avg_pool_3x3_exclude_pad(x)), 3.0, rtol=1e-6)
  rng = np.random.default_rng(1)
  y = rng.normal(size=(2, 6, 5, 3)) - 5.0  # all negative: zero padding would win a max pool
  nchw = y.transpose(0, 3, 1, 2)
  np.testing.assert_allclose(np.asarray(inception.max_pool_3x3_same(jnp.asarray(y, jnp.float32))),
                             np_pool(nchw, 3, 1, 1, "max").transpose(0, 2, 3, 1), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(inception.avg_pool_3x3_exclude_pad(jnp.asarray(y, jnp.float32))),
                             np_pool(nchw, 3, 1, 1, "avg", False).transpose(0, 2, 3, 1), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(inception.max_pool_3x3_s2(jnp.asarray(y, jnp.float32))),
                             np_pool(nchw, 3, 2, 0, "max").transpose(0, 2, 3, 1), rtol=1e-6)


def test_preprocess_matches_torch_bilinear():
  rng = np.random.default_rng(2)
  u = rng.integers(0, 256, size=(2, 8, 8, 1), dtype=np.uint8)
  got = np.asarray(inception.preprocess(u))
  assert got.shape == (2, 299, 299, 3)
  ref = 2 * np_resize_bilinear(np.repeat(u, 3, axis=-1) / 255.0, 299, 299) - 1
  np.testing.assert_allclose(got, ref, atol=2e-6)
  assert got.min() >= -1 - 1e-6 and got.max() <= 1 + 1e-6
  big = rng.integers(0, 256, size=(1, 13, 17, 3), dtype=np.uint8)  # downsampling, no antialiasing
  np.testing.assert_allclose(np.asarray(inception.preprocess(big, size=5)),
                             2 * np_resize_bilinear(big / 255.0, 5, 5) - 1, atol=2e-6)
  with pytest.raises(ValueError, match="uint8"):
    inception.preprocess(np.zeros((1, 8, 8, 3), np.float32))


def test_weight_file_errors(tmp_path, fake_torch):
  with pytest.raises(FileNotFoundError, match=r"missing\.npz.*jaxddpm\.metrics\.convert"):
    inception.load_inception_variables(tmp_path / "missing.npz")
  pth = tmp_path / "w.pth"
  pth.write_bytes(b"x")
  with pytest.raises(ValueError, match="convert"):
    inception.load_inception_variables(pth)
  np.savez(tmp_path / "other.npz", a=np.zeros(3))
  with pytest.raises(ValueError, match="missing keys"):
    inception.load_inception_variables(tmp_path / "other.npz")
  # the converter rejects a state dict of another network: exit 2 (bad input)
  sd = synthetic_state_dict(seed=2)
  del sd["fc.weight"], sd["fc.bias"]
  sd["Mixed_5b.branch1x1.conv.weight"] = sd["Mixed_5b.branch1x1.conv.weight"][:, :-1]
  write_torch_zip(pth, fake_torch, sd)
  assert convert_lib.main([str(pth), str(tmp_path / "x.npz")]) == 2
  assert convert_lib.main([str(tmp_path / "nope.pth"), str(tmp_path / "x.npz")]) == 2
  write_torch_zip(pth, fake_torch, {"weight": np.zeros(3, np.float32)})  # some other network
  assert convert_lib.main([str(pth), str(tmp_path / "x.npz")]) == 2
  # a pickle asking for an arbitrary global is refused, not executed
  evil = tmp_path / "evil.pth"
  with zipfile.ZipFile(evil, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps(collections.Counter("ab"), protocol=2))
  with pytest.raises(pickle.UnpicklingError, match="refusing"):
    convert_lib.read_torch_state_dict(evil)
