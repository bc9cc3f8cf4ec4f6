"""The gmm_ot experiment: its saved arrays reproduce its numbers; the finding is above the floor."""
import os
import tempfile

from absl.testing import absltest
import jax
import numpy as np

from configs import gmm_ot as gmm_ot_config
from ddpm_ot_jax import gmm
from ddpm_ot_jax import ot
from ddpm_ot_jax.experiments import gmm_ot

jax.config.update("jax_enable_x64", True)


class GMMOTExperimentTest(absltest.TestCase):

  def test_small_run(self):
    """Two 2-D mixtures, n ∈ {60, 120}: keys present; arrays.npz re-derives the asymmetry and
    ε_rel; samples follow the saved mixture; the Gaussian floor is at solver precision while
    the mixtures' Jacobians are measurably asymmetric (Lavenant & Santambrogio 2022)."""
    config = gmm_ot_config.get_config()
    config.num_mixtures = 2
    config.dims = (2,)
    config.sample_sizes = (60, 120)
    config.num_jacobian_points = 8
    with tempfile.TemporaryDirectory() as workdir:
      results = gmm_ot.run(config, workdir)
      arrays = np.load(os.path.join(workdir, "arrays.npz"))
      self.assertTrue(os.path.exists(os.path.join(workdir, "gmm_ot_tests.png")))
    for key in ("ot_relative_error_median", "ot_relative_error_max", "jacobian_asymmetry_median",
                "jacobian_asymmetry_max", "num_mixtures", "ot_relative_error_median_n60",
                "ot_relative_error_median_n120", "jacobian_asymmetry_floor"):
      self.assertIn(key, results)
    for i in range(2):
      asym = np.median(np.asarray(ot.jacobian_asymmetry(arrays[f"m{i}_jacobians"])))
      self.assertAlmostEqual(asym, results["jacobian_asymmetry"][i], places=12)
      x, codes = arrays[f"m{i}_x"], arrays[f"m{i}_codes"]
      rel = ot.ot_relative_error(x[:120], codes[:120])["ot_relative_error"]
      self.assertAlmostEqual(rel, results["ot_relative_error_n120"][i], places=12)
      mixture = gmm.GaussianMixture(arrays[f"m{i}_weights"], arrays[f"m{i}_means"], arrays[f"m{i}_covs"])
      self.assertTrue(np.all(np.isfinite(jax.vmap(lambda p: gmm.log_prob(mixture, p))(x))))
    self.assertLess(results["jacobian_asymmetry_floor"], 1e-9)
    self.assertGreater(results["jacobian_asymmetry_median"], 1e3 * results["jacobian_asymmetry_floor"])


if __name__ == "__main__":
  absltest.main()
