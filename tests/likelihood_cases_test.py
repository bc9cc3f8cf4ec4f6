"""The `likelihood` experiment's inputs: an imported (diffusers) model used as it is, and the
scores of the Fokker–Planck exact cases."""
import glob
import os
from unittest import mock

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_ot_jax import samplers
from ddpm_ot_jax import sde
from ddpm_ot_jax.experiments import likelihood
from ddpm_ot_jax.models import diffusers_import
from ddpm_ot_jax.models import unet

import helpers


class ImportedModelTest(helpers.ExperimentRunCase):

  @classmethod
  def run_experiment(cls):
    """Nothing shared: the class only wants the float32 temporary workdir."""

  def test_imported_model_is_used_as_it_is(self):
    """training.init_from_diffusers: the loader's network is evaluated without training (no
    model-<fingerprint> folder for it), train_steps 0, imported_weights 1."""
    config = helpers.without_exact(helpers.tiny_likelihood_config())
    config.likelihood.max_images = 4
    config.training.init_from_diffusers = "/nowhere/ddpm-digits"
    model = unet.unet_from_config(config.model)
    params = model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 8, 8, 1)),
                        jnp.zeros((1,)), train=False)["params"]
    workdir = os.path.join(self.workdir, "imported")
    with mock.patch.object(diffusers_import, "load_diffusers_unet",
                           return_value=(model, params)) as loader:
      results = likelihood.run(config, workdir)
    loader.assert_called_once_with("/nowhere/ddpm-digits", (8, 8, 1))
    self.assertEqual((results["train_steps"], results["imported_weights"]), (0, 1))
    self.assertTrue(np.isfinite(results["bits_per_dim"]))
    self.assertEqual(glob.glob(os.path.join(workdir, "model-*")), [])
    self.assertNotIn("gaussian_nll_ode", results)


class ExactCasesTest(absltest.TestCase):

  def test_every_exact_case_serves_the_score_of_its_density(self):
    """For the two Fokker–Planck cases, at points of their own samples near t = 0, the grid
    score handed to the ODE (256² base grid, 16 time levels) is the gradient of the closed-form
    log density it is compared with, to 1e-3 (the Gaussian and mixture scores are exact:
    likelihood_test.py)."""
    config = helpers.tiny_likelihood_config()
    view = samplers.ContinuousTimeSchedule(sde.ConstantSchedule(2.0, config.exact.t_end))
    with helpers.float64():
      for i, case in enumerate(("perturbed_gaussian", "quartic_2d")):
        score, log_prob, x = likelihood.exact_case(case, jax.random.PRNGKey(i), config.exact,
                                                   view)
        self.assertEqual(x.shape, (4, 2))
        served = jax.vmap(lambda xi: score(xi, 1e-10))(x)
        expected = jax.vmap(jax.grad(log_prob))(x)
        np.testing.assert_allclose(served, expected, atol=1e-3, err_msg=case)


if __name__ == "__main__":
  absltest.main()
