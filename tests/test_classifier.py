"""The in-domain score: a small classifier trained on real digits separates real held-out digits from
noise and from blurred digits; its cache is reused only for the same data and settings."""
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from jaxddpm.metrics import classifier as clf_lib


@pytest.fixture(scope="module")
def digits():
  d = load_digits()
  x = np.round(d.images * (255 / 16)).astype(np.uint8)[..., None]  # [1797, 8, 8, 1]
  return train_test_split(x, d.target, test_size=0.25, random_state=0, stratify=d.target)


@pytest.fixture(scope="module")
def trained(digits):
  xtr, _, ytr, _ = digits
  return clf_lib.train_classifier(xtr, ytr)


def test_accuracy_on_held_out_digits(trained, digits):
  _, xte, _, yte = digits
  assert clf_lib.classifier_accuracy(trained, xte, yte) > 0.9
  # the accuracy agrees with a plain argmax over the returned probabilities
  feats, probs = clf_lib.classifier_outputs(trained, xte)
  assert feats.shape == (len(xte), 128) and probs.shape == (len(xte), 10)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_score_separates_real_from_noise_and_blur(trained, digits):
  xtr, xte, _, _ = digits
  ref_mu, ref_sigma = clf_lib.classifier_statistics(trained, xtr)
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, size=xte.shape, dtype=np.uint8)
  blur = np.clip(np.round(gaussian_filter(xte.astype(np.float64), sigma=(0, 1.0, 1.0, 0))), 0, 255)
  blur = blur.astype(np.uint8)
  real = clf_lib.in_domain_score(trained, xte, ref_mu, ref_sigma)
  s_noise = clf_lib.in_domain_score(trained, noise, ref_mu, ref_sigma)
  s_blur = clf_lib.in_domain_score(trained, blur, ref_mu, ref_sigma)
  assert s_noise["frechet_distance"] > 10 * real["frechet_distance"]
  assert s_blur["frechet_distance"] > 10 * real["frechet_distance"]
  assert real["mean_max_confidence"] > 0.95
  assert real["mean_max_confidence"] - s_noise["mean_max_confidence"] > 0.1
  assert real["mean_max_confidence"] - s_blur["mean_max_confidence"] > 0.1
  # real held-out digits cover the 10 balanced classes confidently: score near 10, entropy near log 10
  assert real["classifier_score"] > 8.0 and real["classifier_score"] > 2 * s_noise["classifier_score"]
  assert real["class_entropy"] == pytest.approx(np.log(10), abs=0.02)


def test_cache_is_reused_only_for_the_same_data(trained, digits, tmp_path, monkeypatch):
  xtr, xte, ytr, _ = digits
  path = clf_lib.save_classifier(tmp_path / "classifiers" / "digits.npz", trained)

  def no_training(*args, **kwargs):
    raise RuntimeError("retrained")

  monkeypatch.setattr(clf_lib, "train_classifier", no_training)
  loaded = clf_lib.load_or_train_classifier(path, xtr, ytr)
  assert loaded.image_shape == (8, 8, 1) and loaded.num_classes == 10
  _, p1 = clf_lib.classifier_outputs(trained, xte)
  _, p2 = clf_lib.classifier_outputs(loaded, xte)
  np.testing.assert_array_equal(p1, p2)
  with pytest.raises(RuntimeError, match="retrained"):  # other labels -> other fingerprint
    clf_lib.load_or_train_classifier(path, xtr, np.roll(ytr, 1))
  with pytest.raises(RuntimeError, match="retrained"):  # other settings -> other fingerprint
    clf_lib.load_or_train_classifier(path, xtr, ytr, steps=10)


def test_bad_input(trained, digits, tmp_path):
  xtr, _, ytr, _ = digits
  with pytest.raises(ValueError, match="image shape"):
    clf_lib.classifier_outputs(trained, np.zeros((2, 32, 32, 1), np.uint8))
  with pytest.raises(ValueError, match="uint8"):
    clf_lib.classifier_outputs(trained, np.zeros((2, 8, 8, 1), np.float32))
  with pytest.raises(ValueError, match="labels"):
    clf_lib.train_classifier(xtr, ytr + 5, num_classes=10)
  with pytest.raises(ValueError, match="steps"):
    clf_lib.train_classifier(xtr, ytr, steps=0)
  with pytest.raises(ValueError, match="unknown training arguments"):
    clf_lib.load_or_train_classifier(tmp_path / "c.npz", xtr, ytr, lr=1.0)
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    clf_lib.load_classifier(tmp_path / "missing.npz")
