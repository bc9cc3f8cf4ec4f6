"""Exact discrete OT against brute force, and the Brenier checks on known matrices."""
import itertools

from absl.testing import absltest
import jax.numpy as jnp
import numpy as np

from ddpm_ot_jax import ot


class OTTest(absltest.TestCase):

  def test_assignment_matches_brute_force(self):
    """POT and scipy find the permutation of least cost among all 7! (brute force)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 3))
    best = min(itertools.permutations(range(7)), key=lambda p: ot.pairing_cost(x, y, np.array(p)))
    for method in ("pot", "scipy"):
      np.testing.assert_array_equal(ot.optimal_assignment(x, y, method), best)

  def test_monotone_maps_are_optimal_and_shuffles_are_not(self):
    """y = 2x + c (gradient of a convex potential) gives ε_rel = 0 and identity fraction 1;

    shuffling y makes the pairing suboptimal (ε_rel > 0) and OT recovers the inverse shuffle.
    """
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 4))
    y = 2.0 * x + 0.5
    res = ot.ot_relative_error(x, y)
    self.assertEqual(res["ot_relative_error"], 0.0)
    self.assertEqual(res["identity_fraction"], 1.0)
    perm = rng.permutation(300)
    res = ot.ot_relative_error(x, y[perm])
    self.assertGreater(res["ot_relative_error"], 0.5)
    np.testing.assert_array_equal(y[perm][ot.optimal_assignment(x, y[perm])], y)

  def test_pot_and_scipy_agree_on_larger_problem(self):
    """Both exact solvers reach the same optimal cost on 400 points."""
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(400, 2)), rng.normal(size=(400, 2))
    costs = [ot.pairing_cost(x, y, ot.optimal_assignment(x, y, m)) for m in ("pot", "scipy")]
    self.assertAlmostEqual(costs[0], costs[1], places=10)

  def test_brenier_checks(self):
    """Asymmetry is 0 for symmetric J and √2·‖A‖/‖J‖... exact for a known J; λ_min of (J+Jᵀ)/2."""
    sym = jnp.array([[2.0, 1.0], [1.0, 3.0]])
    self.assertEqual(float(ot.jacobian_asymmetry(sym)), 0.0)
    rot = jnp.array([[1.0, -1.0], [1.0, 1.0]])  # J − Jᵀ = [[0,−2],[2,0]], ‖·‖_F = 2√2, ‖J‖_F = 2
    self.assertAlmostEqual(float(ot.jacobian_asymmetry(rot)), np.sqrt(2), places=6)
    self.assertAlmostEqual(float(ot.min_symmetric_eigenvalue(sym)), (5 - np.sqrt(5)) / 2, places=5)
    self.assertAlmostEqual(float(ot.min_symmetric_eigenvalue(rot)), 1.0, places=6)

  def test_pairing_test_against_brute_force(self):
    """pairing_test's π, costs, ε_rel, identity and nearest-code fractions equal brute force
    over all 6! permutations and a loop over nearest neighbours; a map that moves every point
    far but keeps the order (x ↦ 10x) is optimal although no code is its image's nearest."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 2))
    y = x + 0.8 * rng.normal(size=(6, 2))
    test = ot.pairing_test(x, y)
    best = min(itertools.permutations(range(6)), key=lambda p: ot.pairing_cost(x, y, np.array(p)))
    np.testing.assert_array_equal(test["perm"], best)
    cost_e = np.mean([np.sum((x[i] - y[i]) ** 2) for i in range(6)])
    cost_ot = np.mean([np.sum((x[i] - y[best[i]]) ** 2) for i in range(6)])
    self.assertAlmostEqual(test["cost_encoder"], cost_e, places=12)
    self.assertAlmostEqual(test["ot_relative_error"], (cost_e - cost_ot) / cost_ot, places=12)
    self.assertAlmostEqual(test["identity_fraction"], np.mean(np.array(best) == np.arange(6)))
    nearest = [min(range(6), key=lambda j: np.sum((x[i] - y[j]) ** 2)) for i in range(6)]
    self.assertAlmostEqual(test["nearest_code_fraction"], np.mean(np.array(nearest) == np.arange(6)))
    self.assertEqual({k: test[k] for k in ot.ot_relative_error(x, y)}, ot.ot_relative_error(x, y))
    line = np.linspace(0.0, 1.0, 6)[:, None]
    scaled = ot.pairing_test(line, 10.0 * line)
    self.assertEqual(scaled["identity_fraction"], 1.0)
    self.assertLess(scaled["nearest_code_fraction"], 1.0)

  def test_unequal_sizes_and_bad_method_are_clear_errors(self):
    """Mismatched sizes and unknown methods raise ValueError."""
    with self.assertRaisesRegex(ValueError, "equal sizes"):
      ot.optimal_assignment(np.zeros((3, 2)), np.zeros((4, 2)))
    with self.assertRaisesRegex(ValueError, "pot"):
      ot.optimal_assignment(np.zeros((3, 2)), np.zeros((3, 2)), "sinkhorn")


if __name__ == "__main__":
  absltest.main()
