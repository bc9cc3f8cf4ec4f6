"""Tests for semidiscrete.py: the semi-discrete OT potential, the blocked map, diagnostics."""
from __future__ import annotations

import functools

from absl.testing import absltest
import numpy as np

import jax
import jax.numpy as jnp

from ddpm_ot_jax import ot
from ddpm_ot_jax import semidiscrete

TARGETS_2D = np.array([[0.0, 0.0], [1.0, 0.5], [-1.0, 1.0], [2.0, -2.0], [0.3, -1.0]],
                      np.float32)


def _dense_assign(z, y, g):
  """argmax_j (g_j − ‖z − y_j‖²) with the full (B, N, d) difference tensor."""
  return np.argmax(np.asarray(g)[None] - ((z[:, None, :] - y[None]) ** 2).sum(-1), axis=1)


def _discrete_source(points, key, shape, dtype):
  """Uniform law on a fixed point set: a discrete source for the semi-discrete solver."""
  return points[jax.random.randint(key, shape[:1], 0, points.shape[0])].astype(dtype)


def _grid_masses(y, g, lo, hi, density, n=801):
  """Cell masses by midpoint quadrature on a grid (an independent integration method)."""
  xs = lo + (np.arange(n) + 0.5) * (hi - lo) / n
  grid = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2)
  weights = density(grid)
  weights = weights / weights.sum()
  idx = np.asarray(semidiscrete.assign(jnp.asarray(grid, jnp.float32), y, g, block_size=2))
  return np.bincount(idx, weights=weights, minlength=len(y))


class SolvePotentialTest(absltest.TestCase):

  def test_gaussian_source_cells_hold_equal_mass(self):
    """5 targets in 2-D, N(0, I) source: every Laguerre cell has mass 1/5 (grid quadrature)."""
    g, diag = semidiscrete.solve_potential(
        jax.random.key(0), TARGETS_2D, "gaussian", num_iterations=1500, batch_size=512,
        learning_rate=0.05, error_eval_every=500, stop_early=False, num_check_samples=100_000)
    self.assertEqual(g.shape, (5,))
    self.assertAlmostEqual(float(jnp.mean(g)), 0.0, places=5)
    masses = _grid_masses(TARGETS_2D, g, -7.0, 7.0,
                          lambda x: np.exp(-0.5 * np.sum(x**2, axis=1)))
    np.testing.assert_allclose(masses, 0.2, atol=0.01)
    # The Monte-Carlo diagnostics agree with the quadrature, and sit near their noise floor.
    self.assertEqual(diag["empty_cells"], 0)
    self.assertLess(diag["max_relative_error"], 0.05)
    self.assertLess(diag["total_variation"], 3 * diag["floor_total_variation"] + 0.005)
    self.assertEqual(diag["iterations"], 1500)
    self.assertTrue(diag["converged"])

  def test_uniform_source_cells_hold_equal_mass(self):
    """The reference code's source U[0, 1]²: cells of mass 1/5 by quadrature on [0, 1]²."""
    y = 0.2 * TARGETS_2D + 0.5
    g, _ = semidiscrete.solve_potential(
        jax.random.key(1), y, "uniform", num_iterations=1500, batch_size=512,
        learning_rate=0.05, error_eval_every=500, stop_early=False)
    masses = _grid_masses(y, g, 0.0, 1.0, lambda x: np.ones(len(x)))
    np.testing.assert_allclose(masses, 0.2, atol=0.01)

  def test_discrete_source_gives_the_exact_assignment_of_pot(self):
    """n source points, n targets: the potential's map is POT's optimal permutation."""
    k1, k2 = jax.random.split(jax.random.key(0))
    x = np.asarray(jax.random.normal(k1, (8, 2)))
    y = np.asarray(jax.random.normal(k2, (8, 2))) + 1.0
    source = functools.partial(_discrete_source, jnp.asarray(x))
    g, _ = semidiscrete.solve_potential(
        jax.random.key(1), y, source, num_iterations=2000, batch_size=256,
        learning_rate=0.05, error_eval_every=500, stop_early=False)
    idx = np.asarray(semidiscrete.assign(x, y, g))
    perm = ot.optimal_assignment(x, y, "pot")
    self.assertEqual(sorted(idx.tolist()), list(range(8)))  # a permutation
    np.testing.assert_array_equal(idx, perm)
    self.assertAlmostEqual(ot.pairing_cost(x, y, idx), ot.pairing_cost(x, y, perm), places=6)

  def test_early_stop_and_converged_flag_follow_the_error_history(self):
    """With a loose χ² threshold the solver stops at the first check below it."""
    g, diag = semidiscrete.solve_potential(
        jax.random.key(2), TARGETS_2D, num_iterations=3000, batch_size=256,
        learning_rate=0.05, error_eval_every=250, chi2_threshold=0.05)
    errors = diag["chi2_errors"]
    self.assertLen(errors, diag["iterations"] // 250)
    self.assertLessEqual(errors[-1], 0.05)
    self.assertTrue(all(e > 0.05 for e in errors[:-1]))
    self.assertTrue(diag["converged"])
    self.assertLess(diag["iterations"], 3000)

  def test_learning_rate_bounds_how_far_the_potential_travels(self):
    """The documented step bound: Adam moves each g_j by ≲ lr per step, so under the cosine
    decay (mean lr/2) the range of g stays ≤ lr · num_iterations. Targets spread 4× wider
    need a range (≈ 115, from the converged run at 10× the rate) beyond the small rate's
    reach (0.05 · 1500 = 75): that run stalls above the threshold, the other converges."""
    y = 4.0 * TARGETS_2D
    kwargs = dict(num_iterations=1500, batch_size=512, error_eval_every=500, stop_early=False)
    g_slow, slow = semidiscrete.solve_potential(jax.random.key(3), y, learning_rate=0.05, **kwargs)
    g_fast, fast = semidiscrete.solve_potential(jax.random.key(3), y, learning_rate=0.5, **kwargs)
    self.assertLessEqual(float(np.ptp(np.asarray(g_slow))), 0.05 * 1500 * 1.01)
    self.assertGreater(float(np.ptp(np.asarray(g_fast))), 0.05 * 1500)
    self.assertFalse(slow["converged"])
    self.assertTrue(fast["converged"])

  def test_bad_source_is_a_clear_error(self):
    """An unknown source name raises ValueError naming the choices."""
    with self.assertRaisesRegex(ValueError, "gaussian"):
      semidiscrete.solve_potential(jax.random.key(0), TARGETS_2D, "laplace", num_iterations=10)


class AssignTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    self.y = np.asarray(jax.random.normal(k1, (203, 12)))
    self.g = np.asarray(3.0 * jax.random.normal(k2, (203,)))
    self.z = np.asarray(jax.random.normal(k3, (97, 12)))

  def test_blocked_equals_dense_argmax(self):
    """Running max over blocks (incl. a ragged last block) = argmax over all targets."""
    expected = _dense_assign(self.z, self.y, self.g)
    for block in (16, 203, 1000):
      np.testing.assert_array_equal(semidiscrete.assign(self.z, self.y, self.g, block), expected)

  def test_host_streamed_targets_equal_device_targets(self):
    """Targets given as a host numpy array (streamed block by block) give the same indices."""
    np.testing.assert_array_equal(semidiscrete.assign(self.z, self.y, self.g, 32),
                                  semidiscrete.assign(self.z, jnp.asarray(self.y), self.g, 32))

  def test_ties_go_to_the_smallest_index(self):
    """Duplicated targets with equal g: every block size picks the first copy, as jnp.argmax."""
    y = np.concatenate([self.y[:10], self.y[:10]])
    g = np.concatenate([self.g[:10], self.g[:10]])
    for block in (3, 7, 20):
      idx = np.asarray(semidiscrete.assign(self.z, y, g, block))
      self.assertTrue((idx < 10).all())

  def test_heights_give_the_same_cells(self):
    """argmax_j ⟨x, y_j⟩ + h_j with h = (g − ‖y‖²)/2 is the same map; g ↔ h round-trips."""
    h = np.asarray(semidiscrete.heights_from_potential(self.g, self.y))
    np.testing.assert_array_equal(np.argmax(self.z @ self.y.T + h[None], axis=1),
                                  semidiscrete.assign(self.z, self.y, self.g))
    np.testing.assert_allclose(semidiscrete.potential_from_heights(h, self.y), self.g, rtol=1e-5,
                               atol=1e-4)

  def test_monge_map_returns_the_assigned_targets(self):
    """T_g(z) = (y[j(z)], j(z)) with j the dense argmax, for images of any shape."""
    y_img = self.y.reshape(203, 2, 6, 1)
    mapped, index = semidiscrete.monge_map(y_img, self.g, block_size=64)(self.z)
    expected = _dense_assign(self.z, self.y, self.g)
    np.testing.assert_array_equal(index, expected)
    np.testing.assert_array_equal(mapped, y_img[expected])

  def test_marginal_error_sees_a_collapsed_potential(self):
    """g with one huge entry sends all mass to that cell: N − 1 empty cells, error N − 1."""
    g = np.zeros(20, np.float32)
    g[7] = 1e4
    err = semidiscrete.marginal_error(jax.random.key(0), self.y[:20], g, 5000, batch_size=1000)
    self.assertEqual(err["empty_cells"], 19)
    self.assertAlmostEqual(err["max_relative_error"], 19.0, places=5)
    self.assertAlmostEqual(err["total_variation"], 0.95, places=6)
    # The floor (exact potential, same sample count) is small.
    self.assertEqual(err["floor_empty_cells"], 0)
    self.assertLess(err["floor_total_variation"], 0.05)


if __name__ == "__main__":
  absltest.main()
