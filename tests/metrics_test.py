"""Tests for metrics.py: Fréchet distance, precision/recall, MMR, memorization."""
from __future__ import annotations

from absl.testing import absltest
import numpy as np
import scipy.spatial.distance

import jax

from ddpm_ot_jax import gaussian
from ddpm_ot_jax import metrics

import helpers


def _brute_precision_recall(real, fake, k):
  """Kynkäänniemi et al. 2019 with full distance matrices (independent reference)."""
  d_rr = scipy.spatial.distance.cdist(real, real)
  d_ff = scipy.spatial.distance.cdist(fake, fake)
  r_real = np.sort(d_rr, axis=1)[:, k]
  r_fake = np.sort(d_ff, axis=1)[:, k]
  d_fr = scipy.spatial.distance.cdist(fake, real)
  precision = np.mean(np.any(d_fr <= r_real[None, :], axis=1))
  recall = np.mean(np.any(d_fr.T <= r_fake[None, :], axis=1))
  return precision, recall


class FrechetTest(absltest.TestCase):

  def test_matches_w2_closed_form_for_random_gaussians(self):
    """frechet_distance (scipy sqrtm of Σ1Σ2) = W2² by the symmetric form of gaussian.py."""
    with helpers.float64():
      m1, s1 = gaussian.random_gaussian(jax.random.key(0), 6)
      m2, s2 = gaussian.random_gaussian(jax.random.key(1), 6)
      expected = float(gaussian.w2_squared(m1, s1, m2, s2))
    got = metrics.frechet_distance(np.asarray(m1), np.asarray(s1), np.asarray(m2), np.asarray(s2))
    self.assertAlmostEqual(got, expected, delta=1e-8 * expected)

  def test_commuting_covariances(self):
    """Diagonal covariances: FID = ‖μ1 − μ2‖² + Σ_i (√a_i − √b_i)²."""
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1.0 + 4.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    self.assertAlmostEqual(metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), expected,
                           places=10)

  def test_features_of_gaussian_samples_converge_to_closed_form(self):
    """fid_from_features on 20k samples per set ≈ the population W2² (sampling error only)."""
    rng = np.random.default_rng(0)
    a, b = np.array([1.0, 2.0, 0.5, 1.5]), np.array([2.0, 0.5, 0.5, 1.0])
    mu2 = np.array([0.5, 0.0, -0.5, 0.0])
    x = rng.standard_normal((20000, 4)) * np.sqrt(a)
    y = rng.standard_normal((20000, 4)) * np.sqrt(b) + mu2
    expected = np.sum(mu2**2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    self.assertAlmostEqual(metrics.fid_from_features(x, y), expected, delta=0.03)

  def test_identity_and_symmetry(self):
    """FID(X, X) = 0 and FID(X, Y) = FID(Y, X)."""
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((500, 8)), rng.standard_normal((400, 8)) * 1.3 + 0.2
    self.assertAlmostEqual(metrics.fid_from_features(x, x), 0.0, places=8)
    self.assertAlmostEqual(metrics.fid_from_features(x, y), metrics.fid_from_features(y, x),
                           places=8)

  def test_statistics_shapes_and_errors(self):
    """feature_statistics gives (d,), (d, d); one sample or mismatched dims is a ValueError."""
    mu, sigma = metrics.feature_statistics(np.ones((3, 5)))
    self.assertEqual((mu.shape, sigma.shape), ((5,), (5, 5)))
    with self.assertRaises(ValueError):
      metrics.feature_statistics(np.ones((1, 5)))
    with self.assertRaises(ValueError):
      metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


class KernelDistanceTest(absltest.TestCase):

  def test_matches_brute_force_formula(self):
    """kid_from_features = the unbiased MMD² written out as explicit double loops over
    k(x, y) = (xᵀy/d + 1)³ (i ≠ j within a set), on sets of different sizes."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(0.5, 1.2, size=(5, 3))
    k = lambda a, b: (a @ b / 3 + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(5)) / (7 * 5)
    self.assertAlmostEqual(metrics.kid_from_features(x, y), xx + yy - 2 * xy, places=10)
    self.assertAlmostEqual(metrics.kid_from_features(x, y), metrics.kid_from_features(y, x),
                           places=10)
    # scale s: the same as dividing every feature by s.
    self.assertAlmostEqual(metrics.kid_from_features(x, y, scale=2.5),
                           metrics.kid_from_features(x / 2.5, y / 2.5), places=12)

  def test_unbiased_where_fid_is_not(self):
    """Two samples of the same law: the mean KID over 200 draws of 20 points is 0 within its
    standard error, at any size, while the FID of the same draws is biased far above 0 (and
    shrinks as n grows); a shifted law has KID clearly above 0."""
    rng = np.random.default_rng(1)
    kids, fids = [], []
    for _ in range(200):
      a, b = rng.normal(size=(20, 4)), rng.normal(size=(20, 4))
      kids.append(metrics.kid_from_features(a, b))
      fids.append(metrics.fid_from_features(a, b))
    self.assertLess(abs(np.mean(kids)), 3 * np.std(kids) / np.sqrt(len(kids)))
    self.assertGreater(np.mean(fids), 10 * np.std(fids) / np.sqrt(len(fids)))
    shifted = [metrics.kid_from_features(rng.normal(size=(20, 4)),
                                         rng.normal(1.0, 1.0, size=(20, 4))) for _ in range(50)]
    self.assertGreater(np.mean(shifted), 5 * np.std(shifted) / np.sqrt(len(shifted)))


class SpreadTest(absltest.TestCase):

  def test_mean_std_and_compare(self):
    """mean ± sample std (ddof 1); A beats B only when the mean ± std intervals separate,
    in either orientation of 'better'; overlapping intervals are a tie."""
    self.assertEqual(metrics.mean_std([1.0, 3.0]), (2.0, float(np.sqrt(2.0))))
    a, b = metrics.mean_std([1.0, 1.2]), metrics.mean_std([2.0, 2.2])
    self.assertEqual(metrics.compare(a, b), 1)
    self.assertEqual(metrics.compare(b, a), -1)
    self.assertEqual(metrics.compare(a, b, lower_is_better=False), -1)
    self.assertEqual(metrics.compare(metrics.mean_std([1.0, 2.0]), metrics.mean_std([1.5, 2.5])), 0)
    self.assertEqual(metrics.compare((1.0, float("nan")), (1.1, 0.05)), 1)  # nan std = 0


class PrecisionRecallTest(absltest.TestCase):

  def test_matches_brute_force(self):
    """Blocked k-NN precision/recall (small blocks) = full-distance-matrix computation."""
    rng = np.random.default_rng(0)
    real = rng.standard_normal((230, 5))
    fake = rng.standard_normal((170, 5)) * 1.4 + 0.3
    got = metrics.precision_recall(real, fake, k=3, block_size=64)
    p, r = _brute_precision_recall(real, fake, 3)
    self.assertAlmostEqual(got["precision"], p, places=6)
    self.assertAlmostEqual(got["recall"], r, places=6)

  def test_identical_sets_and_dropped_mode(self):
    """Same set: precision = recall = 1. Fake covering one of two real modes: recall ≈ 1/2."""
    rng = np.random.default_rng(1)
    real = np.concatenate([rng.standard_normal((300, 2)), rng.standard_normal((300, 2)) + 20])
    self.assertEqual(metrics.precision_recall(real, real), {"precision": 1.0, "recall": 1.0})
    fake = rng.standard_normal((300, 2))
    pr = metrics.precision_recall(real, fake)
    self.assertGreater(pr["precision"], 0.9)
    self.assertAlmostEqual(pr["recall"], 0.5, delta=0.06)

  def test_smallest_distances_blocked(self):
    """smallest_sq_distances over ragged blocks = sorted full distance matrix."""
    rng = np.random.default_rng(2)
    q, r = rng.standard_normal((37, 6)), rng.standard_normal((53, 6))
    got = metrics.smallest_sq_distances(q, r, 4, block_size=10)
    expected = np.sort(scipy.spatial.distance.cdist(q, r, "sqeuclidean"), axis=1)[:, :4]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


class ClassifierMetricsTest(absltest.TestCase):

  def test_mode_mixture_ratio_counts_samples_with_two_likely_classes(self):
    """MMR: [0.5, 0.45, …] is mixed at λ = 0.11; [0.9, 0.05, …] is not; sweep is monotone."""
    probs = np.array([[0.5, 0.45, 0.05], [0.9, 0.05, 0.05], [0.34, 0.33, 0.33],
                      [0.8, 0.11, 0.09]])
    self.assertAlmostEqual(metrics.mode_mixture_ratio(probs), 0.75)
    sweep = metrics.mmr_sweep(probs, (0.1, 0.2, 0.3, 0.4))
    self.assertEqual(sweep, [0.75, 0.5, 0.5, 0.25])
    self.assertTrue(all(a >= b for a, b in zip(sweep, sweep[1:])))

  def test_recognized_fraction(self):
    """Share of rows with max probability ≥ threshold."""
    probs = np.array([[0.5, 0.5], [0.7, 0.3], [0.45, 0.55], [0.4, 0.6]])
    self.assertEqual(metrics.recognized_fraction(probs), 1.0)
    self.assertEqual(metrics.recognized_fraction(probs, threshold=0.6), 0.5)


class MemorizationTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.targets = rng.uniform(-1, 1, (400, 8, 8, 1)).astype(np.float32)
    self.heldout = rng.uniform(-1, 1, (150, 8, 8, 1)).astype(np.float32)
    self.fresh = rng.uniform(-1, 1, (200, 8, 8, 1)).astype(np.float32)
    self.copies = self.targets[rng.integers(0, 400, 200)] + 0.01 * rng.standard_normal(
        (200, 8, 8, 1)).astype(np.float32)

  def test_copies_are_detected(self):
    """Near-copies of targets: copy_fraction 1 and a nearest-target distance ratio ≪ 1."""
    mem = metrics.memorization(self.copies, self.targets, self.heldout, block_size=64)
    self.assertEqual(mem["copy_fraction"], 1.0)
    self.assertLess(mem["nn_distance_ratio"], 0.05)
    self.assertEqual(mem["heldout_copy_fraction"], 0.0)

  def test_fresh_samples_look_like_heldout(self):
    """New draws from the data law: no copies, ratio ≈ 1 (both are held-out-like)."""
    mem = metrics.memorization(self.fresh, self.targets, self.heldout, block_size=64)
    self.assertEqual(mem["copy_fraction"], 0.0)
    self.assertAlmostEqual(mem["nn_distance_ratio"], 1.0, delta=0.1)

  def test_distances_match_brute_force(self):
    """Median nearest-target distance equals the one from a full distance matrix."""
    mem = metrics.memorization(self.fresh, self.targets, self.heldout, block_size=37)
    d = scipy.spatial.distance.cdist(self.fresh.reshape(200, -1), self.targets.reshape(400, -1))
    self.assertAlmostEqual(mem["median_nn_distance"], float(np.median(d.min(1))), places=4)


if __name__ == "__main__":
  absltest.main()
