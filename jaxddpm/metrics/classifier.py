"""An offline in-domain score for the built-in datasets (digits 8x8x1, mnist5k 32x32x1).

Inception weights are not available offline and Inception features mean little on 8x8 greyscale digits,
so the project trains its own small classifier on the dataset's train split (seconds on a CPU) and uses

* its penultimate-layer features for a Frechet distance (an "in-domain FID", same formula as FID);
* its mean max-confidence E_x[max_y p(y|x)] on samples (recognisable digits -> high confidence);
* its classifier score exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016 "Inception Score" form; between
  1 and num_classes, high when samples are both confident and spread over classes);
* its accuracy on labelled images (to check the classifier itself).

The classifier is cached as .npz (params + JSON metadata including a fingerprint of the training data and
settings); a cache whose fingerprint does not match is retrained.
"""
import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import os
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from jaxddpm.metrics import frechet

__all__ = [
  "ConvClassifier",
  "Classifier",
  "train_classifier",
  "save_classifier",
  "load_classifier",
  "load_or_train_classifier",
  "classifier_outputs",
  "classifier_accuracy",
  "classifier_statistics",
  "in_domain_score",
]


class ConvClassifier(nn.Module):
  """A small all-conv classifier whose cost grows slowly with the image side.

  conv3x3(width/2; stride 2 if the side is > 8) -> stride-2 conv3x3s, doubling channels up to 2 width,
  until the side is <= 4 -> conv3x3(2 width) -> flatten -> dense(feature_dim) + ReLU (the features) ->
  dense(num_classes) (the logits). 8x8 digits: 8 -> 4; 32x32: 16 -> 8 -> 4.

  x: [N, H, W, C] in [-1, 1]. Returns (features [N, feature_dim], logits [N, num_classes]).
  """
  num_classes: int
  width: int = 32
  feature_dim: int = 128

  @nn.compact
  def __call__(self, x):
    side = max(x.shape[1], x.shape[2])
    ch = max(self.width // 2, 1)
    stride = 2 if side > 8 else 1
    h = nn.relu(nn.Conv(ch, (3, 3), strides=(stride, stride))(x))
    side = -(-side // stride)
    while side > 4:
      ch = min(2 * ch, 2 * self.width)
      h = nn.relu(nn.Conv(ch, (3, 3), strides=(2, 2))(h))
      side = -(-side // 2)
    h = nn.relu(nn.Conv(2 * self.width, (3, 3))(h))
    feats = nn.relu(nn.Dense(self.feature_dim)(h.reshape(h.shape[0], -1)))
    return feats, nn.Dense(self.num_classes)(feats)


@dataclasses.dataclass(frozen=True)
class Classifier:
  """A trained classifier: Flax params, its module hyper-parameters and what it was trained on."""
  params: Any
  num_classes: int
  image_shape: Tuple[int, int, int]
  width: int = 32
  feature_dim: int = 128
  name: str = "classifier"
  meta: Any = None

  @property
  def module(self):
    return ConvClassifier(self.num_classes, self.width, self.feature_dim)


def _to_float(images):
  return images.astype(jnp.float32) / 127.5 - 1.0


def _check_images(name, images, image_shape=None):
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"{name} must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
  if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
    raise ValueError(f"{name} must have image shape {tuple(image_shape)} (the classifier's), "
                     f"got {tuple(images.shape[1:])}")
  return images


def _check_labels(images, labels, num_classes):
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers of shape [{images.shape[0]}], got {labels.dtype} {labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
  return labels.astype(np.int32)


def _fingerprint(images, labels, settings):
  h = hashlib.sha256()
  h.update(str(images.shape).encode())
  h.update(np.ascontiguousarray(images).tobytes())
  h.update(np.ascontiguousarray(labels.astype(np.int64)).tobytes())
  h.update(json.dumps(settings, sort_keys=True).encode())
  return h.hexdigest()[:16]


def _settings(**kw):
  """Training settings as JSON-able plain types (what the cache fingerprint hashes)."""
  return {k: (float(v) if k in ("learning_rate", "weight_decay") else int(v)) for k, v in kw.items()}


def _init_params(model, image_shape, seed):
  """LeCun-normal kernels W ~ N(0, 1 / fan_in) and zero biases, drawn with numpy.

  (Flax's jax.random initialisers cost seconds of compilation per layer on a CPU; this costs nothing.)
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32))["params"]
  rng = np.random.default_rng(seed)

  def init(path, sd):
    if path[-1].key == "kernel":
      fan_in = int(np.prod(sd.shape[:-1]))
      return (rng.standard_normal(sd.shape) / np.sqrt(fan_in)).astype(np.float32)
    return np.zeros(sd.shape, np.float32)

  return jax.tree_util.tree_map_with_path(init, shapes)


def train_classifier(images, labels, *, num_classes=None, steps=400, batch_size=128, learning_rate=2e-3,
                     weight_decay=1e-4, shift=1, seed=0, width=32, feature_dim=128, name="classifier"):
  """Train a ConvClassifier with AdamW on cross-entropy -sum_i log p(y_i | x_i) (uint8 [N,H,W,C], int [N]).

  `shift` > 0 adds random translations of up to `shift` pixels (edge-padded) as augmentation. The
  minibatch sequence is fixed by `seed`. Returns a Classifier (its meta records the settings, the data
  fingerprint and the final train accuracy).
  """
  images = _check_images("images", images)
  labels = np.asarray(labels)
  if num_classes is None:
    num_classes = int(labels.max()) + 1 if labels.size else 0
  if int(num_classes) != num_classes or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
  labels = _check_labels(images, labels, num_classes)
  for arg, v in (("steps", steps), ("batch_size", batch_size), ("width", width), ("feature_dim", feature_dim)):
    if int(v) != v or v < 1:
      raise ValueError(f"{arg} must be a positive integer, got {v!r}")
  if int(shift) != shift or shift < 0:
    raise ValueError(f"shift must be a non-negative integer, got {shift!r}")
  n, h, w, c = images.shape
  settings = _settings(num_classes=num_classes, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                       weight_decay=weight_decay, shift=shift, seed=seed, width=width, feature_dim=feature_dim)
  model = ConvClassifier(int(num_classes), int(width), int(feature_dim))
  key = jax.random.key(seed)
  params = _init_params(model, (h, w, c), seed)
  tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps), weight_decay=weight_decay)
  bs = min(int(batch_size), n)
  s = int(shift)

  # Minibatch indices for every step: epochs of a seeded permutation (the remainder of each is dropped).
  rng = np.random.default_rng(seed)
  per_epoch = n // bs
  epochs = -(-int(steps) // per_epoch)
  batches = np.concatenate([rng.permutation(n)[:per_epoch * bs].reshape(per_epoch, bs) for _ in range(epochs)])
  batches = batches[:int(steps)].astype(np.int32)

  @jax.jit
  def step(params, opt_state, x, y, i):
    x = _to_float(x)
    if s:  # random translation by up to s pixels, edges repeated
      xp = jnp.pad(x, ((0, 0), (s, s), (s, s), (0, 0)), mode="edge")
      off = jax.random.randint(jax.random.fold_in(key, i), (x.shape[0], 2), 0, 2 * s + 1)
      x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(xp, off)

    def loss_fn(p):
      _, logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  # (A Python loop of one jitted step: XLA:CPU runs these convolutions far slower inside a lax.scan.)
  opt_state = jax.jit(tx.init)(params)
  for i, idx in enumerate(batches):
    params, opt_state, loss = step(params, opt_state, images[idx], labels[idx], np.int32(i))
  clf = Classifier(jax.device_get(params), int(num_classes), (h, w, c), int(width), int(feature_dim), name)
  acc = classifier_accuracy(clf, images, labels)
  meta = dict(settings, name=name, image_shape=[h, w, c], num_train=int(n), train_accuracy=acc,
              final_loss=float(loss), fingerprint=_fingerprint(images, labels, settings))
  return dataclasses.replace(clf, meta=meta)


_TRAIN_DEFAULTS = {k: v.default for k, v in inspect.signature(train_classifier).parameters.items()
                   if v.kind == inspect.Parameter.KEYWORD_ONLY and k != "name"}


def save_classifier(path, clf):
  """Write a Classifier to .npz: flat params under "params/..." plus a JSON "meta" string."""
  meta = dict(clf.meta or {}, name=clf.name, num_classes=clf.num_classes, image_shape=list(clf.image_shape),
              width=clf.width, feature_dim=clf.feature_dim)
  flat = {"params/" + k: np.asarray(v) for k, v in traverse_util.flatten_dict(clf.params, sep="/").items()}
  path = os.fspath(path)
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, meta=np.asarray(json.dumps(meta)), **flat)
  os.replace(tmp, path)
  return path


def load_classifier(path):
  """Read a Classifier written by `save_classifier`. Raises FileNotFoundError / ValueError."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"classifier file not found: {path!r}")
  try:
    with np.load(path, allow_pickle=False) as f:
      meta = json.loads(str(f["meta"]))
      flat = {k[len("params/"):]: np.asarray(f[k]) for k in f.files if k.startswith("params/")}
  except Exception as e:
    raise ValueError(f"could not read classifier file {path!r}: {e}") from e
  params = traverse_util.unflatten_dict(flat, sep="/")
  clf = Classifier(params, int(meta["num_classes"]), tuple(meta["image_shape"]), int(meta["width"]),
                   int(meta["feature_dim"]), meta.get("name", "classifier"), meta)
  expected = jax.eval_shape(clf.module.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1,) + clf.image_shape, jnp.float32))["params"]
  if jax.tree.structure(expected) != jax.tree.structure(params) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(params))):
    raise ValueError(f"classifier file {path!r} does not match its recorded architecture {meta}")
  return clf


def load_or_train_classifier(cache_path, images, labels, **train_kwargs):
  """Load the classifier cached at `cache_path` if it was trained on exactly these images, labels and
  settings (same fingerprint); otherwise train one and cache it. Returns a Classifier.

  Use one path per dataset, e.g. f"{data_dir}/classifiers/{dataset}.npz".
  """
  images = _check_images("images", images)
  labels = np.asarray(labels)
  defaults = _TRAIN_DEFAULTS
  unknown = set(train_kwargs) - set(defaults) - {"name"}
  if unknown:
    raise ValueError(f"unknown training arguments {sorted(unknown)}; allowed: {sorted(defaults)} and 'name'")
  settings = {k: train_kwargs.get(k, v) for k, v in defaults.items()}
  if settings["num_classes"] is None:
    settings["num_classes"] = int(labels.max()) + 1 if labels.size else 0
  settings = _settings(**settings)
  fp = _fingerprint(images, _check_labels(images, labels, settings["num_classes"]), settings)
  if os.path.isfile(os.fspath(cache_path)):
    try:
      clf = load_classifier(cache_path)
      if (clf.meta or {}).get("fingerprint") == fp:
        return clf
      logging.info("classifier cache %s was trained on other data/settings; retraining", cache_path)
    except ValueError as e:
      logging.warning("ignoring unreadable classifier cache %s (%s); retraining", cache_path, e)
  clf = train_classifier(images, labels, **train_kwargs)
  save_classifier(cache_path, clf)
  return clf


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, params, images):
  feats, logits = module.apply({"params": params}, _to_float(images))
  return feats, jax.nn.softmax(logits, axis=-1)


def classifier_outputs(clf, images, batch_size=500):
  """Penultimate features [N, feature_dim] (float64) and class probabilities p(y|x) [N, K] of uint8 images."""
  images = _check_images("images", images, clf.image_shape)
  if images.shape[0] == 0:
    raise ValueError("images must contain at least one image")
  module = clf.module
  feats, probs = [], []
  for i in range(0, images.shape[0], batch_size):
    chunk = images[i:i + batch_size]
    n = chunk.shape[0]
    if n < batch_size and images.shape[0] > batch_size:  # keep one compiled shape
      chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], np.uint8)])
    f, p = _apply(module, clf.params, chunk)
    feats.append(np.asarray(f, np.float64)[:n])
    probs.append(np.asarray(p, np.float64)[:n])
  return np.concatenate(feats), np.concatenate(probs)


def classifier_accuracy(clf, images, labels):
  """Fraction of images whose argmax_y p(y|x) equals the label."""
  images = _check_images("images", images, clf.image_shape)
  labels = _check_labels(images, labels, clf.num_classes)
  _, probs = classifier_outputs(clf, images)
  return float(np.mean(np.argmax(probs, axis=-1) == labels))


def classifier_statistics(clf, images):
  """(mu [D], sigma [D, D]) of the classifier's penultimate features on uint8 images (float64)."""
  feats, _ = classifier_outputs(clf, images)
  return frechet.feature_statistics(feats)


def in_domain_score(clf, samples, ref_mu, ref_sigma):
  """Score uint8 samples [N, H, W, C] with the in-domain classifier against reference statistics.

  Returns a dict of floats:
    frechet_distance: d^2 between N(mu_s, S_s) of the samples' features and N(ref_mu, ref_sigma);
    mean_max_confidence: (1/N) sum_i max_y p(y | x_i);
    classifier_score: exp((1/N) sum_i KL(p(y | x_i) || p_hat(y))), p_hat(y) = (1/N) sum_i p(y | x_i);
    class_entropy: H(p_hat) in nats (log K when the samples cover all classes evenly).
  """
  feats, probs = classifier_outputs(clf, samples)
  if feats.shape[0] < 2:
    raise ValueError("samples must contain at least 2 images to estimate a covariance")
  mu, sigma = frechet.feature_statistics(feats)
  p_hat = probs.mean(axis=0)
  eps = 1e-12
  kl = np.sum(probs * (np.log(probs + eps) - np.log(p_hat + eps)), axis=-1)
  return {
    "frechet_distance": frechet.frechet_distance(mu, sigma, ref_mu, ref_sigma),
    "mean_max_confidence": float(np.mean(np.max(probs, axis=-1))),
    "classifier_score": float(np.exp(np.mean(kl))),
    "class_entropy": float(-np.sum(p_hat * np.log(p_hat + eps))),
  }
