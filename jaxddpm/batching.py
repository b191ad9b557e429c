"""The training input stream, one numpy operation per batch (floor 3, used by `data.make_train_iterator`).

The stream of one process is a pure function of (seed, process, position): the example at position
p >= 0 of the stream is

    epoch e = p // n, offset o = p % n (n = examples in this process's shard),
    shard index  i = perm_e[o],  perm_e = np.random.default_rng([shuffle_seed, e]).permutation(n),
    flipped      iff  random_flip and the top bit of splitmix64(flip_seed * 2**32 + p) is 1,

so every epoch is a fresh permutation of the shard and the flips are per-example random bits that do
not depend on the batch size. A batch of b examples is the positions [k b, (k + 1) b) (it may span an
epoch boundary), produced with one gather, one vectorised flip and one uint8 -> float32 table lookup
(x / 127.5 - 1). The iterator state is the number of examples consumed, so resuming is bitwise exact
wherever it stops. A background thread prepares up to `prefetch` batches ahead.

Where the examples come from (`Examples`): the whole shard read once into memory as uint8 (the
built-in datasets, MNIST, CIFAR-10: a few hundred MB at most), or, for shards too large for memory
(CelebA-HQ 256, LSUN), the records of each batch read from the random-access tfds source by
`num_threads` threads.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

STATE_KIND = "jaxddpm.batches/1"
# x_uint8 -> x_uint8 / 127.5 - 1 in float32, the same values as the per-example formula
TO_FLOAT = np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)

_M64 = (1 << 64) - 1


def splitmix64(x: np.ndarray) -> np.ndarray:
  """Steele et al.'s SplitMix64 finaliser of uint64 x + golden gamma (wrapping uint64 arithmetic)."""
  z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def flip_bits(flip_seed: int, positions: np.ndarray) -> np.ndarray:
  """bool [k]: flip the example at each stream position (top bit of splitmix64(seed * 2**32 + p))."""
  x = (np.uint64(flip_seed) << np.uint64(32)) + positions.astype(np.uint64)
  return (splitmix64(x) >> np.uint64(63)).astype(bool)


def epoch_permutation(shuffle_seed: int, epoch: int, n: int) -> np.ndarray:
  """int64 [n]: the order of the shard's examples in one epoch."""
  return np.random.default_rng([shuffle_seed, epoch]).permutation(n)


class Examples:
  """uint8 images [k, H, W, C] and int32 labels [k] of shard indices, in memory or read per call.

  read_records(indices) -> (images, labels) reads and preprocesses records of the shard (indices in
  [0, n)). With in_memory the whole shard is read once, on first use (from whichever thread first
  needs it), and batches are then a numpy gather.
  """

  def __init__(self, n: int, read_records: Callable, in_memory: bool, chunk: int = 1024):
    self.n, self._read, self.in_memory, self._chunk = n, read_records, in_memory, chunk
    self._lock = threading.Lock()
    self._images = self._labels = None

  def _load(self):
    with self._lock:
      if self._images is None:
        parts = [self._read(np.arange(s, min(s + self._chunk, self.n))) for s in range(0, self.n, self._chunk)]
        self._labels = np.concatenate([p[1] for p in parts])
        self._images = np.concatenate([p[0] for p in parts])
    return self._images, self._labels

  def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not self.in_memory:
      return self._read(idx)
    images, labels = self._load()
    return images[idx], labels[idx]


def make_batch(examples: Examples, position: int, size: int, *, offset: int, shuffle_seed: int,
               flip_seed: int | None, perms: dict) -> dict[str, np.ndarray]:
  """The batch of stream positions [position, position + size) (see the module docstring).

  Returns {'image': float32 [size, H, W, C] in [-1, 1], 'label': int32 [size], 'index': int32 [size]
  (position in the split: offset + shard index)}. `perms` caches epoch permutations (at most 2 kept).
  """
  n = examples.n
  pos = np.arange(position, position + size, dtype=np.int64)
  epochs, offs = np.divmod(pos, n)
  idx = np.empty(size, np.int64)
  for e in np.unique(epochs):
    e = int(e)
    if e not in perms:
      for old in sorted(perms)[:-1]:
        del perms[old]
      perms[e] = epoch_permutation(shuffle_seed, e, n)
    sel = epochs == e
    idx[sel] = perms[e][offs[sel]]
  images, labels = examples.take(idx)
  if flip_seed is not None:
    flip = flip_bits(flip_seed, pos)
    images[flip] = images[flip][:, :, ::-1]
  return {"image": TO_FLOAT[images], "label": labels.astype(np.int32), "index": (idx + offset).astype(np.int32)}


class TrainIterator:
  """Endless iterator of batches `produce(position)`, position advancing by `size` examples per batch.

  num_threads = 0: each batch is made in `next()`; otherwise a background thread keeps up to `prefetch`
  batches ready. `get_state()` -> {"kind": STATE_KIND, "examples": position}; `set_state` accepts only
  that (a checkpoint of another input pipeline is refused with a ValueError).
  """

  def __init__(self, produce: Callable[[int], dict], size: int, *, num_threads: int, prefetch: int):
    self._produce, self._size, self._background, self._prefetch = produce, size, num_threads > 0, prefetch
    self._position = 0
    self._worker = None
    if self._background:
      self._start()

  def _start(self):
    q, stop, produce, size = queue.Queue(self._prefetch), threading.Event(), self._produce, self._size

    def work(position):
      while not stop.is_set():
        try:
          item = (position, produce(position), None)
        except Exception as e:  # noqa: BLE001  (handed to next(), which raises it)
          item = (position, None, e)
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if item[2] is not None:
          return
        position += size

    thread = threading.Thread(target=work, args=(self._position,), daemon=True, name="jaxddpm-input")
    thread.start()
    self._worker = (thread, q, stop)

  def _stop(self):
    if self._worker is not None:
      thread, _, stop = self._worker
      stop.set()
      thread.join()
      self._worker = None

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if not self._background:
      batch = self._produce(self._position)
    else:
      position, batch, error = self._worker[1].get()
      assert position == self._position, (position, self._position)
      if error is not None:
        self._stop()
        raise error
    self._position += self._size
    return batch

  def get_state(self) -> dict:
    """JSON-serialisable position of the consumer (batches prefetched but not returned do not count)."""
    return {"kind": STATE_KIND, "examples": self._position}

  def set_state(self, state: dict) -> None:
    if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
      keys = sorted(state) if isinstance(state, dict) else type(state).__name__
      raise ValueError(
          f"the checkpoint's input-pipeline state ({keys}) is not a {STATE_KIND!r} state: it was written by "
          "another input pipeline (jaxddpm before the vectorised pipeline used grain), which this version "
          "cannot resume bitwise. Train in a new --workdir (or from the old run's version of jaxddpm).")
    examples = state.get("examples")
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 0:
      raise ValueError(f"input-pipeline state: 'examples' = {examples!r} must be an integer >= 0")
    self._stop()
    self._position = examples
    if self._background:
      self._start()

  def close(self) -> None:
    """Stops the background thread (also done when the iterator is garbage collected)."""
    self._stop()

  def __del__(self):
    try:
      self._stop()
    except Exception:  # noqa: BLE001
      pass


def thread_pool(num_threads: int) -> ThreadPoolExecutor | None:
  return ThreadPoolExecutor(num_threads, thread_name_prefix="jaxddpm-read") if num_threads > 1 else None
