"""Tests for classifier.py: the digits classifier used for recognized fraction, MMR and FID."""
from __future__ import annotations

from absl.testing import absltest
import flax.serialization
import numpy as np

import jax

from ddpm_ot_jax import classifier
from ddpm_ot_jax import data
from ddpm_ot_jax import metrics


class DigitsClassifierTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.train = data.load_digits("train")
    cls.heldout = data.load_digits("heldout")
    cls.params = classifier.train_classifier(jax.random.key(0), cls.train)

  def test_heldout_accuracy(self):
    """Held-out accuracy on the fixed digits split is at least 0.95."""
    self.assertGreaterEqual(
        classifier.accuracy(self.params, self.heldout.images, self.heldout.labels), 0.95)

  def test_noise_is_not_recognized(self):
    """Held-out digits are recognized (top p ≥ 0.5); uniform and Gaussian noise images are not.

    Uniform noise is part of training (outlier exposure); Gaussian noise is not.
    """
    rng = np.random.default_rng(0)
    uniform = rng.uniform(-1, 1, (300, 8, 8, 1)).astype(np.float32)
    gauss = np.clip(rng.normal(-0.5, 0.5, (300, 8, 8, 1)), -1, 1).astype(np.float32)
    held = metrics.recognized_fraction(classifier.predict_probs(self.params, self.heldout.images))
    self.assertGreater(held, 0.95)
    for noise in (uniform, gauss):
      self.assertLess(metrics.recognized_fraction(classifier.predict_probs(self.params, noise)),
                      0.2)

  def test_outputs_shapes_and_batch_invariance(self):
    """Probabilities sum to 1; features are (N, 128); results do not depend on batch size."""
    images = self.heldout.images[:50]
    probs = np.asarray(classifier.predict_probs(self.params, images))
    self.assertEqual(probs.shape, (50, 10))
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(classifier.predict_probs(self.params, images, batch_size=7), probs,
                               rtol=1e-5, atol=1e-6)
    feats = np.asarray(classifier.features(self.params, images))
    self.assertEqual(feats.shape, (50, classifier.FEATURE_DIM))
    np.testing.assert_allclose(classifier.features(self.params, images, batch_size=16), feats,
                               rtol=1e-5, atol=1e-5)

  def test_msgpack_round_trip(self):
    """Params restored from msgpack (as the experiments cache them) predict identically."""
    blob = flax.serialization.msgpack_serialize(jax.device_get(self.params))
    restored = flax.serialization.msgpack_restore(blob)
    np.testing.assert_array_equal(classifier.logits(restored, self.heldout.images[:20]),
                                  classifier.logits(self.params, self.heldout.images[:20]))

  def test_feature_fid_data_floor_is_small(self):
    """Classifier-feature FID of held-out vs train is far below that of noise vs train."""
    train_f = classifier.features(self.params, self.train.images)
    held_f = classifier.features(self.params, self.heldout.images)
    noise = np.random.default_rng(1).uniform(-1, 1, (300, 8, 8, 1)).astype(np.float32)
    noise_f = classifier.features(self.params, noise)
    self.assertLess(10 * metrics.fid_from_features(train_f, held_f),
                    metrics.fid_from_features(train_f, noise_f))

  def test_arrays_or_dataset(self):
    """train_classifier needs labels unless given a dataset; a bad shape is a ValueError."""
    with self.assertRaises(TypeError):
      classifier.train_classifier(jax.random.key(0), self.train.images)
    with self.assertRaises(ValueError):
      classifier.train_classifier(jax.random.key(0), self.train.images[0], self.train.labels)


if __name__ == "__main__":
  absltest.main()
