"""The gmm_ot experiment: its saved arrays reproduce its numbers; the finding is above the floor."""
import os
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from configs import gmm_ot as gmm_ot_config
from ddpm_ot_jax import flow
from ddpm_ot_jax import gmm
from ddpm_ot_jax import ot
from ddpm_ot_jax import sde
from ddpm_ot_jax.experiments import gmm_ot

import helpers


def small_config():
  config = gmm_ot_config.get_config()
  config.num_mixtures = 2
  config.dims = (2,)
  config.sample_sizes = (60, 120)
  config.num_jacobian_points = 8
  return config


class GMMOTExperimentTest(helpers.Float64TestCase):

  def test_small_run(self):
    """Two 2-D mixtures, n ∈ {60, 120}, started in float32 (run() must switch to float64 itself):
    keys present; arrays.npz is float64 and re-derives the per-mixture median asymmetry, the
    pooled max over all points of all mixtures, and ε_rel; re-encoding saved points with the
    saved mixture reproduces the saved codes; the floor is the asymmetry's shift when the
    Jacobians are re-solved at 100× tighter tolerances (checked here by an independent re-solve
    of one point), the Gaussian control is at round-off below it, and the mixtures' Jacobians
    are asymmetric far above the floor (Lavenant & Santambrogio 2022)."""
    config = small_config()
    self.enterContext(helpers.float64(False))  # restored to the class's float64 after the test
    with tempfile.TemporaryDirectory() as workdir:
      results = gmm_ot.run(config, workdir)
      arrays = dict(np.load(os.path.join(workdir, "arrays.npz")))
      self.assertTrue(os.path.exists(os.path.join(workdir, "gmm_ot_tests.png")))
    self.assertTrue(jax.config.jax_enable_x64)
    for key in ("ot_relative_error_median", "ot_relative_error_max", "jacobian_asymmetry_median",
                "jacobian_asymmetry_max", "num_mixtures", "ot_relative_error_median_n60",
                "ot_relative_error_median_n120", "jacobian_asymmetry_floor",
                "jacobian_asymmetry_per_mixture_median", "jacobian_asymmetry_per_mixture_max"):
      self.assertIn(key, results)
    pooled = []
    schedule = sde.ConstantSchedule(t_max=config.t_end)
    options = flow.SolverOptions(**config.solver)
    for i in range(2):
      self.assertEqual(arrays[f"m{i}_codes"].dtype, np.float64)
      asym = np.asarray(ot.jacobian_asymmetry(arrays[f"m{i}_jacobians"]))
      pooled.append(asym)
      self.assertAlmostEqual(np.median(asym), results["jacobian_asymmetry_per_mixture_median"][i], places=12)
      self.assertAlmostEqual(asym.max(), results["jacobian_asymmetry_per_mixture_max"][i], places=12)
      x, codes = arrays[f"m{i}_x"], arrays[f"m{i}_codes"]
      rel = ot.ot_relative_error(x[:120], codes[:120])["ot_relative_error"]
      self.assertAlmostEqual(rel, results["ot_relative_error_n120"][i], places=12)
      mixture = gmm.GaussianMixture(arrays[f"m{i}_weights"], arrays[f"m{i}_means"], arrays[f"m{i}_covs"])
      if i == 0:
        mixture0 = mixture
      again = flow.encode(schedule, gmm.score_fn(mixture, schedule), jnp.asarray(x[:4]), config.t_end, options).x
      np.testing.assert_allclose(again, codes[:4], atol=1e-9 * np.abs(codes[:4]).max())
    pooled = np.concatenate(pooled)
    self.assertAlmostEqual(pooled.max(), results["jacobian_asymmetry_max"], places=12)
    self.assertAlmostEqual(np.median(pooled), results["jacobian_asymmetry_median"], places=12)
    floor = results["jacobian_asymmetry_floor"]
    self.assertEqual(floor, results["jacobian_asymmetry_tolerance_shift_max"])
    self.assertEqual(results["tight_solver_rtol"], config.solver.rtol / 100)
    # One point of mixture 0 re-solved here at rtol/100: its shift is within the reported max.
    tight = flow.SolverOptions(config.solver.solver, config.solver.rtol / 100,
                               config.solver.atol / 100, 4 * config.solver.max_steps)
    x0 = jnp.asarray(arrays["m0_x"][:1])
    shift = abs(float(ot.jacobian_asymmetry(flow.encoder_jacobian(schedule, gmm.score_fn(mixture0, schedule), x0, config.t_end, tight))[0])
                - float(ot.jacobian_asymmetry(arrays["m0_jacobians"][:1])[0]))
    self.assertLessEqual(shift, floor * (1 + 1e-6) + 1e-15)
    self.assertLess(floor, 1e-6)
    self.assertLess(results["jacobian_asymmetry_gaussian_roundoff"], 1e-12)
    self.assertGreater(results["jacobian_asymmetry_median"], 1e3 * floor)

  def test_t_end_beyond_the_schedule_is_a_clear_error(self):
    """t_end is OU time: 16 is past the cosine schedule's end (OU time 4.78), a ValueError that
    names the config fields, before any work."""
    config = small_config()
    config.schedule = "cosine"
    with tempfile.TemporaryDirectory() as workdir, \
         self.assertRaisesRegex(ValueError, "config.t_end"):
      gmm_ot.run(config, workdir)


if __name__ == "__main__":
  absltest.main()
