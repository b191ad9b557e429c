"""Convert the published pytorch-fid Inception weights to a flat .npz of the Flax `InceptionV3` tree.

    python -m jaxddpm.metrics.convert pt_inception-2015-12-05-6726825d.pth inception_fid.npz

torch is not needed: a torch checkpoint is a pickle whose tensors reference raw storages, either inside a
zip archive (`<prefix>/data.pkl` + `<prefix>/data/<key>`, torch >= 1.6) or, in the legacy format, as a
stream of pickles (magic number, protocol, sys info, the object, the storage keys) followed by each
storage as an int64 element count and raw little-endian bytes. The reader below resolves only the few
globals a state dict needs (OrderedDict, tensor rebuild functions, storage types) and refuses any other;
every pickle of both formats (the legacy stream's header, object and key list included) goes through it,
so loading an untrusted file cannot execute code. A refused or malformed file is a ValueError (exit 2).

Layout mapping (torch -> Flax):
  <m>.conv.weight [O, I, kh, kw]  -> params/<m>/conv/kernel [kh, kw, I, O]
  <m>.bn.weight / .bn.bias        -> params/<m>/bn/scale / params/<m>/bn/bias
  <m>.bn.running_mean / _var      -> batch_stats/<m>/bn/mean / batch_stats/<m>/bn/var
  fc.weight [K, 2048] / fc.bias   -> params/fc/kernel [2048, K] / params/fc/bias
`num_batches_tracked` and `AuxLogits.*` entries are ignored.
"""
import collections
import io
import os
import pickle
import struct
import sys
import zipfile

import numpy as np

__all__ = ["Refused", "read_torch_state_dict", "torch_to_flax", "convert", "main"]

_STORAGE_DTYPES = {
  "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
  "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
  "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class Refused(pickle.UnpicklingError):
  """The file asks the unpickler for something a state dict does not need (its code is never run)."""


class _StorageType:
  def __init__(self, name):
    if name not in _STORAGE_DTYPES:
      raise Refused(f"unsupported torch storage type torch.{name}")
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """A flat typed buffer; `data` (1-D numpy) is filled in once the raw bytes are read."""

  def __init__(self, dtype, numel):
    self.dtype, self.numel, self.data = dtype, numel, None
    self.base, self.offset = None, 0  # legacy storage views


class _Tensor:
  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def numpy(self):
    st = self.storage
    offset = self.offset
    while st.base is not None:
      offset += st.offset
      st = st.base
    if st.data is None:
      raise ValueError("tensor storage was never read (truncated file?)")
    if not self.size or 0 not in self.size:
      last = offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
      if offset < 0 or last >= st.data.size:
        raise ValueError(f"tensor of size {self.size} and stride {self.stride} at offset {offset} overruns "
                         f"its storage of {st.data.size} elements")
    else:
      return np.zeros(self.size, st.dtype)
    item = st.data.itemsize
    return np.lib.stride_tricks.as_strided(st.data[offset:], shape=self.size,
                                           strides=[s * item for s in self.stride]).copy()


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  return data


_GLOBALS = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
  """Builds only plain containers, numbers, strings and the globals in `_GLOBALS` (plus torch storage
  types); persistent ids (tensor storages) go to `persistent_load`, or are refused when it is None."""

  def __init__(self, file, persistent_load=None):
    super().__init__(file)
    self._persistent_load = persistent_load

  def find_class(self, module, name):
    if (module, name) in _GLOBALS:
      return _GLOBALS[(module, name)]
    if module == "torch" and name.endswith("Storage"):
      return _StorageType(name)
    raise Refused(f"refusing to load global {module}.{name}: not part of a torch state dict")

  def persistent_load(self, pid):
    if self._persistent_load is None:
      raise Refused("refusing a persistent id outside the state dict's pickle")
    return self._persistent_load(pid)


def _load(f, persistent_load=None):
  """One pickle from the binary file f through the restricted unpickler."""
  return _Unpickler(f, persistent_load).load()


def _read_zip(path):
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
      raise ValueError(f"{path!r}: zip archive without a single data.pkl, not a torch checkpoint")
    prefix = pkl[0][:-len("data.pkl")]
    order = "little"
    if prefix + "byteorder" in names:
      order = z.read(prefix + "byteorder").decode().strip()
    storages = {}

    def load(pid):
      if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
        raise Refused(f"refusing persistent id {repr(pid)[:100]}")
      _, stype, key, _location, numel = pid[:5]
      if key not in storages:
        dtype = stype.dtype.newbyteorder("<" if order == "little" else ">")
        raw = z.read(f"{prefix}data/{key}")
        st = _Storage(stype.dtype, numel)
        st.data = np.frombuffer(raw, dtype).astype(stype.dtype)
        storages[key] = st
      return storages[key]

    return _load(io.BytesIO(z.read(pkl[0])), load)


def _read_legacy(path):
  with open(path, "rb") as f:
    try:
      magic = _load(f)
    except Refused:
      raise
    except Exception as e:  # noqa: BLE001  (any garbage: not a pickle)
      raise ValueError(f"{path!r} is neither a zip nor a legacy torch checkpoint ({e})") from e
    if magic != _LEGACY_MAGIC:
      raise ValueError(f"{path!r}: bad magic number, not a torch checkpoint")
    protocol = _load(f)
    if protocol != 1001:
      raise ValueError(f"{path!r}: unsupported legacy torch protocol {protocol}")
    sys_info = _load(f)
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
      raise ValueError(f"{path!r}: big-endian legacy checkpoints are not supported")
    storages = {}

    def load(pid):
      if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
        raise Refused(f"refusing persistent id {repr(pid)[:100]}")
      _, stype, key, _location, numel, view = pid[:6]
      if key not in storages:
        storages[key] = _Storage(stype.dtype, numel)
      if view is None:
        return storages[key]
      view_key, offset, view_size = view
      v = _Storage(stype.dtype, view_size)
      v.base, v.offset = storages[key], offset
      return v

    obj = _load(f, load)
    keys = _load(f)
    for key in keys:
      st = storages[key]
      (numel,) = struct.unpack("<q", f.read(8))
      raw = f.read(numel * st.dtype.itemsize)
      if len(raw) != numel * st.dtype.itemsize:
        raise ValueError(f"{path!r}: truncated storage {key}")
      st.data = np.frombuffer(raw, st.dtype.newbyteorder("<")).astype(st.dtype)
  return obj


# What malformed bytes make the readers raise besides ValueError: reported as "not a torch checkpoint".
_MALFORMED = (EOFError, struct.error, KeyError, IndexError, TypeError, AttributeError, OverflowError,
              UnicodeDecodeError, zipfile.BadZipFile, zipfile.LargeZipFile)


def read_torch_state_dict(path):
  """Read a torch state dict file (zip or legacy format) without torch: {name: np.ndarray}.

  Raises FileNotFoundError, `Refused` (a pickle.UnpicklingError: a global or persistent id a state dict
  does not use; nothing of the file is executed) or ValueError (anything else wrong with the file).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"torch weight file not found: {path!r}")
  try:
    obj = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
      obj = obj["state_dict"]
    if not isinstance(obj, dict):
      raise ValueError(f"{path!r} does not hold a state dict (got {type(obj).__name__})")
    out = {}
    for k, v in obj.items():
      if isinstance(v, _Tensor):
        out[k] = v.numpy()
      elif isinstance(v, (int, float)):
        out[k] = np.asarray(v)
  except Refused as e:
    raise Refused(f"{path!r} refused: {e}") from None
  except (pickle.UnpicklingError, ValueError, *_MALFORMED) as e:
    if isinstance(e, ValueError) and repr(path) in str(e):
      raise
    raise ValueError(f"{path!r} is not a readable torch checkpoint ({type(e).__name__}: {e})") from None
  return out


def torch_to_flax(state_dict):
  """Map a pytorch-fid Inception state dict {torch name: array} to flat Flax keys {"params/...": array}.

  See the module docstring for the layout. Raises ValueError on names it does not know.
  """
  out = {}
  for name, value in state_dict.items():
    parts = name.split(".")
    if parts[-1] == "num_batches_tracked" or parts[0] == "AuxLogits":
      continue
    if len(parts) < 2 or (len(parts) < 3 and parts[0] != "fc"):
      raise ValueError(f"unknown entry {name!r} in the Inception state dict")
    value = np.asarray(value, np.float32)
    mod, kind, leaf = "/".join(parts[:-2]), parts[-2], parts[-1]
    if parts[:-1] == ["fc"]:
      if leaf == "weight":
        out["params/fc/kernel"] = value.T
      elif leaf == "bias":
        out["params/fc/bias"] = value
      else:
        raise ValueError(f"unknown fc entry {name!r}")
    elif kind == "conv" and leaf == "weight":
      if value.ndim != 4:
        raise ValueError(f"{name!r} must be a 4-d conv weight [O, I, kh, kw], got shape {value.shape}")
      out[f"params/{mod}/conv/kernel"] = value.transpose(2, 3, 1, 0)
    elif kind == "bn" and leaf in ("weight", "bias"):
      out[f"params/{mod}/bn/{'scale' if leaf == 'weight' else 'bias'}"] = value
    elif kind == "bn" and leaf in ("running_mean", "running_var"):
      out[f"batch_stats/{mod}/bn/{'mean' if leaf == 'running_mean' else 'var'}"] = value
    else:
      raise ValueError(f"unknown entry {name!r} in the Inception state dict")
  return out


def convert(src, dst):
  """Read the torch file `src`, map it to the Flax layout, check it against `InceptionV3`, save `dst`.

  Returns the number of arrays written.
  """
  from jaxddpm.metrics.inception import inception_variable_shapes

  flat = torch_to_flax(read_torch_state_dict(src))
  expected = inception_variable_shapes()
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  bad = [(k, flat[k].shape, s) for k, s in expected.items() if k in flat and flat[k].shape != s]
  if missing or unexpected or bad:
    raise ValueError(f"{os.fspath(src)!r} is not the pytorch-fid Inception state dict: missing {missing[:3]} "
                     f"({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)}), "
                     f"wrong shapes {bad[:3]} ({len(bad)})")
  dst = os.fspath(dst)
  if os.path.dirname(dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
  with open(dst, "wb") as f:  # np.savez would append .npz to a path without it
    np.savez(f, **flat)
  return len(flat)


def main(argv=None):
  """`python -m jaxddpm.metrics.convert SRC DST`: 0 on success, 2 (and one `error:` line) on bad input."""
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 2 or argv[0] in ("-h", "--help"):
    print("usage: python -m jaxddpm.metrics.convert SRC.pth DST.npz\n"
          "Converts pytorch-fid's pt_inception-2015-12-05-6726825d.pth to jaxddpm's Flax weights.",
          file=sys.stderr)
    return 2
  try:
    n = convert(argv[0], argv[1])
  except (OSError, ValueError, pickle.UnpicklingError) as e:  # FileNotFoundError is an OSError
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
    return 2
  print(f"wrote {n} arrays to {argv[1]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
