"""A tiny run of the perturbed-Gaussian sweep: the ε = 0 floor and a visible gap at ε > 0."""
import tempfile

from absl.testing import absltest

from configs import perturbed_gaussian as perturbed_gaussian_config
from ddpm_ot_jax.experiments import perturbed_gaussian

import helpers


def tiny_config():
  config = perturbed_gaussian_config.get_config()
  config.epsilons = (0.0, 0.3)
  config.num_samples = 200
  config.grid_size = 256
  config.num_time_steps = 32
  config.table_size = 48
  config.t_max = 8.0
  config.rtol = config.atol = 1e-8  # as in the synthetic_2d test: the compiled solver is shared
  config.num_jacobian_samples = 8
  config.sweep_num_samples = (100,)
  return config


class PerturbedGaussianTest(helpers.Float64TestCase):

  def test_tiny_run(self):
    """ε = 0: E = ∇u = id to ~1e-9 (the floor); ε = 0.3: E differs from ∇u far above the floor
    and its Jacobian is not symmetric; keys are per ε; the exact map's pairing is optimal."""
    with tempfile.TemporaryDirectory() as workdir:
      results = perturbed_gaussian.run(tiny_config(), workdir)
    self.assertEqual(results["epsilons"], [0.0, 0.3])
    err = results["encoder_vs_ot_map_err"]
    self.assertLess(err[0], 1e-9)
    self.assertEqual(results["encoder_error_floor"], err[0])
    self.assertGreater(err[1], 1e3 * max(err[0], 1e-15))
    self.assertLess(err[1], 0.05)  # the encoder is still close to ∇u
    asym = results["jacobian_asymmetry_median"]
    self.assertLess(asym[0], 1e-9)
    self.assertGreater(asym[1], 1e-5)
    self.assertEqual(results["ot_map_relative_error"][1], 0.0)  # (x, ∇u(x)) is an optimal pairing
    for key in ("ot_relative_error", "identity_fraction", "ot_relative_error_n100", "encoder_vs_ot_map_slope"):
      self.assertIn(key, results)
    self.assertLen(results["ot_relative_error_n100"], 2)
    # The finer re-solve (to estimate the numerical error at each ε) ran: at ε = 0 both
    # resolutions are exact; at this tiny resolution the estimate is not small.
    numerical = results["encoder_numerical_err"]
    self.assertLess(numerical[0], 1e-9)
    self.assertTrue(0.0 < numerical[1] < 1.0)

  def test_non_convex_epsilon_is_rejected(self):
    """|ε| beyond the convexity limit is a ValueError that says the limit."""
    config = tiny_config()
    config.epsilons = (0.0, 0.9)
    with self.assertRaisesRegex(ValueError, "non-convex"):
      perturbed_gaussian.run(config, tempfile.mkdtemp())


if __name__ == "__main__":
  absltest.main()
