"""A tiny end-to-end run of the Sec. 3.4 experiment through run(): keys, shapes, sanity."""
import json
import os
import tempfile

from absl.testing import absltest
import numpy as np

from configs import synthetic_2d as synthetic_2d_config
from ddpm_ot_jax.experiments import synthetic_2d

import helpers


def tiny_config():
  config = synthetic_2d_config.get_config()
  config.num_densities = 2
  config.grid_size = 256
  config.num_time_steps = 32
  config.num_samples = 200
  config.table_size = 48
  config.max_components = 1  # one K: the compiled solver is shared with the perturbed test
  config.num_jacobian_samples = 8
  config.sweep_num_samples = (100, 200)
  config.sweep_num_densities = 1
  config.num_figure_densities = 2
  config.num_trajectory_points = 10
  config.convergence_check_worst = 0
  return config


class Synthetic2DTest(helpers.Float64TestCase):

  def test_tiny_run(self):
    """run() returns the issue's keys with one entry per density, sane values, and writes
    arrays.npz and Figures 2–4; ε_rel ≥ 0 (the OT cost is a minimum) and every pairing cost
    is at least the OT cost."""
    config = tiny_config()
    with tempfile.TemporaryDirectory() as workdir:
      results = synthetic_2d.run(config, workdir)
      json.dumps(results)  # flat and serialisable
      for name in ("fig2_densities.png", "fig3_costs.png", "fig4_trajectories.png", "arrays.npz"):
        self.assertTrue(os.path.exists(os.path.join(workdir, name)), name)
      arrays = np.load(os.path.join(workdir, "arrays.npz"))
      self.assertEqual(arrays["x0"].shape, (2, 200, 2))
      self.assertEqual(arrays["x1"].shape, (2, 200, 2))
      self.assertEqual(arrays["a1"].shape, (2, 1, 2))
    for key in ("num_densities", "ot_relative_error", "ot_relative_error_median", "ot_relative_error_max",
                "identity_fraction", "jacobian_asymmetry_median", "grid_size", "num_time_steps", "num_samples",
                "seconds_per_density", "seconds_total", "sweep_num_samples", "ot_relative_error_n100"):
      self.assertIn(key, results)
    self.assertEqual(results["num_densities"], 2)
    self.assertLen(results["ot_relative_error"], 2)
    self.assertLen(results["ot_relative_error_n200"], 1)
    self.assertGreaterEqual(min(results["ot_relative_error"]), 0.0)
    self.assertTrue(all(0.0 <= f <= 1.0 for f in results["identity_fraction"]))
    self.assertTrue(all(0.0 <= a < 1.0 for a in results["jacobian_asymmetry_median"]))
    np.testing.assert_array_less(np.array(results["cost_ot"]) - 1e-12, np.array(results["cost_encoder"]))
    # X1 ≈ N(0, I): both coordinates have roughly unit variance.
    np.testing.assert_allclose(np.var(arrays["x1"].reshape(-1, 2), axis=0), 1.0, atol=0.35)

  def test_convergence_check_resolves_the_worst_density(self):
    """The check re-solves the density of largest ε_rel on the finer grid: it reports that
    index, and its codes move by far less than their scale (a wrong density or sample draw
    would move them by O(1))."""
    config = tiny_config()
    config.num_densities = 2
    config.sweep_num_samples = ()
    config.num_figure_densities = 1
    config.convergence_check_worst = 1
    with tempfile.TemporaryDirectory() as workdir:
      results = synthetic_2d.run(config, workdir)
    worst = int(np.argmax(results["ot_relative_error"]))
    self.assertEqual(results["convergence_indices"], [worst])
    self.assertLess(results["convergence_code_relative_change"][0], 1e-3)
    self.assertGreaterEqual(results["convergence_ot_relative_error_fine"][0], 0.0)

  def test_bad_config_is_a_clear_error(self):
    """A wrong value stops with a ValueError that names the field."""
    config = tiny_config()
    config.ot_method = "sinkhorn"
    with self.assertRaisesRegex(ValueError, "ot_method"):
      synthetic_2d.run(config, tempfile.mkdtemp())


if __name__ == "__main__":
  absltest.main()
