"""The `likelihood` experiment on digits with a tiny DDPM: bits/dim, batch caching, per-image
values independent of the batch, the Gaussian exact case against its closed form."""
import glob
import os

from absl.testing import absltest
import numpy as np

from ddpm_ot_jax.experiments import likelihood

import helpers


class DigitsLikelihoodTest(helpers.ExperimentRunCase):

  @classmethod
  def run_experiment(cls):
    cls.results = likelihood.run(helpers.tiny_likelihood_config(), cls.workdir)
    cls.per_image = dict(np.load(os.path.join(cls.workdir, "bits_per_dim.npz")))
    cls.rerun = likelihood.run(helpers.without_exact(helpers.tiny_likelihood_config()),
                               cls.workdir)
    five = helpers.without_exact(helpers.tiny_likelihood_config())
    five.likelihood.max_images = 5  # batches [0..3] and [4] (padded with copies of image 4)
    cls.five = likelihood.run(five, cls.workdir)
    cls.five_per_image = np.load(os.path.join(cls.workdir, "bits_per_dim.npz"))["bits_per_dim"]

  def test_bits_per_dim_and_its_standard_error(self):
    """bits_per_dim is the mean of the 6 per-image values (bits_per_dim.npz), its stderr their
    std/√6, nfe_mean their mean NFE; 64 dims, 17 levels; the model was trained 4 steps."""
    r, bpd = self.results, self.per_image["bits_per_dim"]
    self.assertEqual((r["num_images"], r["num_dims"], r["num_levels"], r["train_steps"],
                      r["imported_weights"]), (6, 64, 17, 4, 0))
    self.assertEqual(bpd.shape, (6,))
    self.assertTrue(np.isfinite(bpd).all())
    self.assertAlmostEqual(r["bits_per_dim"], float(bpd.mean()), places=5)
    self.assertAlmostEqual(r["bits_per_dim_stderr"], float(bpd.std(ddof=1) / np.sqrt(6)),
                           places=5)
    self.assertAlmostEqual(r["nfe_mean"], float(self.per_image["nfe"].mean()), places=5)
    self.assertGreater(r["nfe_mean"], 6)
    self.assertLen(glob.glob(os.path.join(self.workdir, "model-*", "checkpoints", "4")), 1)

  def test_rerun_reuses_every_batch(self):
    """A second run in the same workdir (without the exact block) reads both finished batches
    instead of solving them again, and reports the same numbers."""
    self.assertEqual((self.results["batches_reused"], self.rerun["batches_reused"]), (0, 2))
    for key in ("bits_per_dim", "bits_per_dim_stderr", "nfe_mean"):
      self.assertEqual(self.rerun[key], self.results[key])

  def test_value_of_an_image_does_not_depend_on_its_batch(self):
    """With 5 images (a new cache folder) image 4 sits in a batch of its own copies instead of
    beside image 5, and keeps its bits/dim: its dequantization noise and probes come from its
    own index, and its solve from its own adaptive steps."""
    self.assertEqual(self.five["batches_reused"], 0)
    np.testing.assert_allclose(self.five_per_image, self.per_image["bits_per_dim"][:5],
                               rtol=1e-5)

  def test_exact_case_matches_its_closed_form(self):
    """The Gaussian exact case (d = 3, exact score) agrees with log N(x; a0, Σ0) to 1e-5 nats
    at every point and reports the ODE value, the exact value and NFE; the second run, without
    an exact block, has no such keys."""
    r = self.results
    for suffix in ("nll_ode", "nll_exact", "max_abs_diff", "median_abs_diff", "nfe_mean"):
      self.assertTrue(np.isfinite(r[f"gaussian_{suffix}"]), suffix)
    self.assertLess(r["gaussian_max_abs_diff"], 1e-5)
    self.assertEqual(r["gaussian_dims"], 3)
    self.assertAlmostEqual(r["gaussian_nll_ode"], r["gaussian_nll_exact"], delta=1e-5)
    self.assertNotIn("gaussian_nll_ode", self.rerun)

  def test_bad_settings_fail_before_any_work(self):
    """An unknown divergence is one ValueError naming the config key; nothing is trained."""
    config = helpers.tiny_likelihood_config()
    config.likelihood.divergence = "trace"
    workdir = os.path.join(self.workdir, "bad")
    with self.assertRaisesRegex(ValueError, "likelihood.divergence"):
      likelihood.run(config, workdir)
    self.assertFalse(os.path.exists(workdir))


if __name__ == "__main__":
  absltest.main()
