"""Image datasets as tfds data sources: per-process shards, shuffling, flips, batches.

Training batches are made one numpy operation per batch (`jaxddpm.batching`); the one-pass evaluation
iterator reads through grain.

Conventions (DESIGN.md): data enter as uint8 HWC and leave as float32 NHWC in [-1, 1],
x = x_uint8 / 127.5 - 1. Every process reads a disjoint, contiguous part of the split (an even split:
process p of P reads examples [p*n//P, (p+1)*n//P)) and yields its local batch of
global_batch_size // P examples; the caller assembles the global batch
(`jax.make_array_from_process_local_data`).

Datasets (`DATASETS`): tfds datasets the user prepares in array_record format (`cifar10`, `mnist`,
`celeb_a_hq/256`, `lsun/church_outdoor`, `lsun/bedroom`; e.g. `tfds build cifar10
--file_format=array_record --data_dir=...`; TensorFlow is not needed to read them) and the built-in
`digits` and `mnist5k` (see `builtin_datasets`), written to `data_dir` on first use.
"""
import functools
import math
import os
from typing import Any, NamedTuple

import grain
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from jaxddpm import batching, builtin_datasets


class DatasetSpec(NamedTuple):
  """What the pipeline needs to know about a dataset without reading it.

  image_shape: stored (H, W, C); None for sides that vary between examples (LSUN).
  upscale: how a smaller stored image reaches `image_size`: 'pad' (zeros, centred) or 'resize'.
  """
  tfds_name: str
  image_shape: tuple[int | None, int | None, int]
  splits: tuple[str, ...]
  label_key: str | None = "label"
  num_classes: int = 0
  upscale: str = "resize"


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec("cifar10", (32, 32, 3), ("train", "test"), num_classes=10),
    "mnist": DatasetSpec("mnist", (28, 28, 1), ("train", "test"), num_classes=10, upscale="pad"),
    "celeb_a_hq/256": DatasetSpec("celeb_a_hq/256", (256, 256, 3), ("train",), label_key=None),
    "lsun/church_outdoor": DatasetSpec("lsun/church_outdoor", (None, None, 3), ("train", "validation"),
                                       label_key=None),
    "lsun/bedroom": DatasetSpec("lsun/bedroom", (None, None, 3), ("train", "validation"), label_key=None),
    "digits": DatasetSpec("jaxddpm_digits", (8, 8, 1), ("train", "test"), num_classes=10),
    "mnist5k": DatasetSpec("jaxddpm_mnist5k", (32, 32, 1), ("train", "test"), num_classes=10, upscale="pad"),
}


class DatasetInfo(NamedTuple):
  """What `dataset_info` returns: the shape of the yielded images and the split sizes."""
  image_shape: tuple[int, int, int]  # (H, W, C) of the images the iterators yield
  num_examples: dict[str, int]       # split -> number of examples
  num_classes: int                   # 0 when the dataset has no labels (label is then always 0)


def default_data_dir() -> str:
  """$TFDS_DATA_DIR if set, else ~/tensorflow_datasets (the tfds default)."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _spec(dataset: str) -> DatasetSpec:
  if dataset not in DATASETS:
    raise ValueError(f"dataset={dataset!r} is unknown; allowed: {sorted(DATASETS)}")
  return DATASETS[dataset]


def _check_int(name: str, value: Any, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def validate_data_config(dataset: str, *, split: str = "train", global_batch_size: int,
                         process_index: int = 0, process_count: int = 1, image_size: int | None = None,
                         seed: int = 0, device_count: int | None = None) -> None:
  """Raises ValueError naming the bad argument; reads no data, so call it before any compilation.

  Checks: dataset in DATASETS; split among the dataset's splits; global_batch_size >= 1 and divisible
  by process_count (and device_count, if given); 0 <= process_index < process_count; image_size >= 1
  (required for datasets of varying image size, LSUN); 0 <= seed < 2**32.
  """
  spec = _spec(dataset)
  if split not in spec.splits:
    raise ValueError(f"split={split!r} is not a split of dataset {dataset!r}; allowed: {list(spec.splits)}")
  _check_int("global_batch_size", global_batch_size, 1)
  _check_int("process_count", process_count, 1)
  _check_int("process_index", process_index, 0)
  if process_index >= process_count:
    raise ValueError(f"process_index={process_index} must be < process_count={process_count}")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be divisible by "
                     f"process_count={process_count}")
  if device_count is not None:
    _check_int("device_count", device_count, 1)
    if global_batch_size % device_count:
      raise ValueError(f"global_batch_size={global_batch_size} must be divisible by "
                       f"device_count={device_count}")
  if image_size is None:
    if None in spec.image_shape:
      raise ValueError(f"image_size=None: dataset {dataset!r} has images of varying size, set image_size")
  else:
    _check_int("image_size", image_size, 1)
  _check_int("seed", seed, 0)
  if seed >= 2**32:
    raise ValueError(f"seed={seed} must be < 2**32")


def data_source(dataset: str, split: str, data_dir: str | None = None):
  """The random-access tfds source (len, [i] -> dict of numpy features) of one split.

  Built-in datasets are built in `data_dir` on first use; other datasets must already be prepared
  there in array_record format (nothing is downloaded).
  """
  spec = _spec(dataset)
  data_dir = data_dir or default_data_dir()
  if dataset in builtin_datasets.BUILDERS:
    return builtin_datasets.builtin_builder(dataset, data_dir).as_data_source(split=split)
  try:
    return tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises several types here, some misleading (NotImplementedError)
    raise FileNotFoundError(
        f"cannot open tfds dataset {spec.tfds_name!r} split {split!r} in data_dir={data_dir!r}; prepare "
        f"it first: tfds build {spec.tfds_name} --file_format=array_record --data_dir={data_dir}"
        f" ({type(e).__name__}: {e})") from e


def dataset_info(dataset: str, data_dir: str | None = None, image_size: int | None = None) -> DatasetInfo:
  """Image shape the iterators yield and the size of every split (opens the sources, reads no example)."""
  spec = _spec(dataset)
  if image_size is None and None in spec.image_shape:
    raise ValueError(f"image_size=None: dataset {dataset!r} has images of varying size, set image_size")
  h, w, c = spec.image_shape if image_size is None else (image_size, image_size, spec.image_shape[2])
  counts = {s: len(data_source(dataset, s, data_dir)) for s in spec.splits}
  return DatasetInfo((h, w, c), counts, spec.num_classes)


def shard_bounds(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
  """[start, stop) of process `process_index`'s contiguous part of an even split of range(num_examples)."""
  return (process_index * num_examples // process_count,
          (process_index + 1) * num_examples // process_count)


def resize_image(image: np.ndarray, image_size: int, upscale: str = "resize") -> np.ndarray:
  """uint8 [H, W, C] -> uint8 [image_size, image_size, C].

  Unchanged if already that size. With upscale='pad' and both sides <= image_size: zero-padded,
  centred (MNIST 28 -> 32). Otherwise: centre-cropped to a square of side min(H, W), then resized with
  PIL's bicubic filter, whose support widens with the scale factor (antialiased when shrinking).
  """
  h, w, c = image.shape
  if h == w == image_size:
    return image
  if upscale == "pad" and h <= image_size and w <= image_size:
    top, left = (image_size - h) // 2, (image_size - w) // 2
    return np.pad(image, ((top, image_size - h - top), (left, image_size - w - left), (0, 0)))
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  crop = image[top:top + side, left:left + side]
  pil = Image.fromarray(crop[..., 0] if c == 1 else crop)
  out = np.asarray(pil.resize((image_size, image_size), Image.Resampling.BICUBIC))
  return out[..., None] if c == 1 else out


def _example_fn(spec: DatasetSpec, image_size: int | None, start: int, stop: int):
  """(index in the shard [start, stop), possibly past its end under repeat; tfds record)
  -> {'image': uint8 [H, W, C], 'label': int32, 'index': int32 position in the split}."""
  def fn(i, record):
    image = np.asarray(record["image"], np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    if image_size is not None:
      image = resize_image(image, image_size, spec.upscale)
    label = record[spec.label_key] if spec.label_key else 0
    return {"image": image, "label": np.int32(label), "index": np.int32(start + i % (stop - start))}
  return fn


def _to_float(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """uint8 -> float32 in [-1, 1]: x / 127.5 - 1."""
  return dict(batch, image=batching.TO_FLOAT[batch["image"]])


def _process_seeds(seed: int, process_index: int) -> tuple[int, int]:
  """Independent uint32 seeds (shuffle, flip) for one process, derived from (seed, process_index)."""
  shuffle_seed, flip_seed = np.random.SeedSequence([seed, process_index]).generate_state(2)
  return int(shuffle_seed), int(flip_seed)


# A shard of at most this many bytes (uint8, after resizing) is read into memory once; larger ones
# (CelebA-HQ 256: 5.9 GB, LSUN) are read per batch from the random-access tfds source.
IN_MEMORY_BYTES = 4 << 30


def _record_reader(src, spec: DatasetSpec, image_size: int | None, start: int, pool):
  """read(shard indices [k]) -> (uint8 images [k, H, W, C], int32 labels [k]), records read in one call
  (`__getitems__`) or, with a thread pool, in `pool`'s threads (decoding and resizing in parallel)."""
  def one(record):
    image = np.asarray(record["image"], np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    if image_size is not None:
      image = resize_image(image, image_size, spec.upscale)
    return image, (record[spec.label_key] if spec.label_key else 0)

  def read(idx):
    keys = [start + int(i) for i in idx]
    if pool is None:
      try:
        records = src.__getitems__(keys)
      except (AttributeError, TypeError):  # no batched read (tfds.testing.mock_data's source)
        records = [src[k] for k in keys]
      pairs = [one(r) for r in records]
    else:
      pairs = list(pool.map(lambda k: one(src[k]), keys))
    images = np.stack([p[0] for p in pairs]) if pairs else np.zeros((0,), np.uint8)
    return images, np.asarray([p[1] for p in pairs], np.int32)
  return read


def make_train_iterator(dataset: str, *, split: str = "train", data_dir: str | None = None,
                        global_batch_size: int, process_index: int = 0, process_count: int = 1,
                        seed: int = 0, random_flip: bool = False, image_size: int | None = None,
                        num_threads: int = 4, prefetch_batches: int = 4) -> batching.TrainIterator:
  """Endless iterator of this process's training batches, checkpointable (`jaxddpm.batching`).

  This process's shard of the split, in a fresh permutation every epoch (seeded by (seed, process,
  epoch)), optional horizontal flips x[:, ::-1] with per-example random bits of (seed, process,
  position), batches of global_batch_size // process_count (batches may span an epoch boundary),
  x / 127.5 - 1. The shard is read into memory as uint8 once (in the background, while the caller
  compiles) when it fits `IN_MEMORY_BYTES`, else each batch's records are read from the tfds source.
  num_threads = 0: batches are made in `next()`; >= 1: a background thread keeps `prefetch_batches`
  batches ready, and `num_threads` threads read records when they are read per batch.

  Yields {'image': float32 [b, H, W, C] in [-1, 1], 'label': int32 [b], 'index': int32 [b] (position
  of each example in the split)}, b = global_batch_size // process_count.
  `it.get_state()` is a JSON-serialisable dict (the examples consumed); `it.set_state(state)` on an
  iterator made with the same arguments continues bitwise identically to the uninterrupted sequence.
  """
  validate_data_config(dataset, split=split, global_batch_size=global_batch_size,
                       process_index=process_index, process_count=process_count,
                       image_size=image_size, seed=seed)
  _check_int("num_threads", num_threads, 0)
  _check_int("prefetch_batches", prefetch_batches, 1)
  spec = _spec(dataset)
  src = data_source(dataset, split, data_dir)
  start, stop = shard_bounds(len(src), process_index, process_count)
  if stop == start:
    raise ValueError(f"process_count={process_count} exceeds the {len(src)} examples of {dataset}/{split}")
  shuffle_seed, flip_seed = _process_seeds(seed, process_index)
  h, w, c = spec.image_shape if image_size is None else (image_size, image_size, spec.image_shape[2])
  in_memory = h is not None and (stop - start) * h * w * c <= IN_MEMORY_BYTES
  reader = _record_reader(src, spec, image_size, start, None if in_memory else batching.thread_pool(num_threads))
  examples = batching.Examples(stop - start, reader, in_memory)
  produce = functools.partial(batching.make_batch, examples, size=global_batch_size // process_count,
                              offset=start, shuffle_seed=shuffle_seed,
                              flip_seed=flip_seed if random_flip else None, perms={})
  return batching.TrainIterator(produce, global_batch_size // process_count, num_threads=num_threads,
                                prefetch=prefetch_batches)


def num_eval_batches(num_examples: int, global_batch_size: int, process_count: int = 1) -> int:
  """Batches every process yields over a split: ceil(ceil(n / P) / (global_batch_size / P))."""
  return math.ceil(math.ceil(num_examples / process_count) / (global_batch_size // process_count))


def make_eval_iterator(dataset: str, *, split: str = "test", data_dir: str | None = None,
                       global_batch_size: int, process_index: int = 0, process_count: int = 1,
                       image_size: int | None = None, num_threads: int = 4,
                       prefetch_batches: int = 4) -> grain.DatasetIterator:
  """One pass over this process's shard of a split, in order, no flip, for bits/dim and FID statistics.

  Every process yields the same number of batches, `num_eval_batches(n, global_batch_size,
  process_count)`, of b = global_batch_size // process_count examples; the tail is padded with
  zero images (x = -1) marked invalid. Over all processes, the examples with mask True are exactly
  the split, each once.

  Yields {'image': float32 [b, H, W, C] in [-1, 1], 'label': int32 [b], 'index': int32 [b] (-1 for
  padding), 'mask': bool [b]}.
  """
  validate_data_config(dataset, split=split, global_batch_size=global_batch_size,
                       process_index=process_index, process_count=process_count, image_size=image_size)
  _check_int("num_threads", num_threads, 0)
  _check_int("prefetch_batches", prefetch_batches, 1)
  spec = _spec(dataset)
  src = data_source(dataset, split, data_dir)
  start, stop = shard_bounds(len(src), process_index, process_count)
  local_batch = global_batch_size // process_count
  total = num_eval_batches(len(src), global_batch_size, process_count) * local_batch
  example = _example_fn(spec, image_size, start, stop)
  shape = spec.image_shape if image_size is None else (image_size, image_size, spec.image_shape[2])

  def padded_example(i):
    if start + i < stop:
      return dict(example(i, src[start + i]), mask=np.True_)
    return {"image": np.zeros(shape, np.uint8), "label": np.int32(0), "index": np.int32(-1),
            "mask": np.False_}

  ds = grain.MapDataset.range(total).map(padded_example).batch(local_batch).map(_to_float)
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)
  return iter(ds.to_iter_dataset(read))
