"""Tests of the latent-code OT experiment (Figure 7) on a tiny digits run, and its clear errors."""
import json
import os
import tempfile
from unittest import mock

from absl.testing import absltest
import numpy as np
import scipy.optimize

from configs import cifar10_latent_ot
from configs import digits_latent_ot
from ddpm_ot_jax import data
from ddpm_ot_jax import model_sources
from ddpm_ot_jax import ot
from ddpm_ot_jax.experiments import latent_ot

import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KS = (8, 16)


def tiny_config():
  config = helpers.tiny_latent_ot_models(digits_latent_ot.get_config())
  config.latent_ot.num_images = KS + (400,)  # 400 > the 300 held-out digits: skipped
  config.latent_ot.ddim_steps = 4
  config.latent_ot.ode_rtol = 1e-3
  config.latent_ot.ode_atol = 1e-3
  config.latent_ot.batch_size = 16
  return config


class LatentOtRunTest(helpers.ExperimentRunCase):
  """One tiny run of `latent_ot.run` shared by the tests below."""

  @classmethod
  def run_experiment(cls):
    cls.results = latent_ot.run(tiny_config(), cls.workdir)
    with np.load(os.path.join(cls.workdir, "arrays.npz")) as stored:
      cls.arrays = {k: stored[k] for k in stored.files}

  def test_keys_and_skipped_sizes(self):
    """Every encoder/control × K has both keys; K larger than the split is reported skipped."""
    self.assertEqual(self.results["ks"], list(KS))
    self.assertEqual(self.results["skipped_ks"], [400])
    self.assertEqual(self.results["num_images_available"], 300)
    for name in ("ode", "ddim", "shuffled_ode", "shuffled_ddim", "other_ode", "other_ddim"):
      for k in KS:
        for metric in ("identity_fraction", "ot_relative_error", "nearest_code_fraction"):
          self.assertIn(f"{metric}_{name}_k{k}", self.results)
    for name in ("ode", "ddim", "other_ode", "other_ddim"):
      for metric in ("round_trip_rmse", "code_mean", "code_std", "nfe"):
        self.assertIn(f"{metric}_{name}", self.results)
    for figure in ("ot_matrix.png", "codes.png"):
      self.assertTrue(os.path.exists(os.path.join(self.workdir, figure)))

  def test_numbers_recomputed_from_saved_arrays(self):
    """ε_rel, the identity and nearest-code fractions follow from arrays.npz; the saved
    permutation is an optimal assignment (its cost equals scipy's Jonker–Volgenant optimum,
    an independent solver) and never costs more than the encoder pairing."""
    images = self.arrays["images"]
    for name in ("ode", "ddim", "shuffled_ode", "other_ddim"):
      for k in KS:
        base = name.replace("shuffled_", "")
        codes = self.arrays[f"codes_{base}"][:k]
        if name.startswith("shuffled_"):
          codes = codes[self.arrays[f"shuffle_k{k}"]]
        perm = self.arrays[f"perm_{name}_k{k}"]
        self.assertEqual(sorted(perm.tolist()), list(range(k)))
        cost = ot.squared_distances(images[:k], codes)
        rows, cols = scipy.optimize.linear_sum_assignment(cost)
        cost_ot = cost[rows, cols].mean()
        self.assertAlmostEqual(ot.pairing_cost(images[:k], codes, perm), cost_ot, places=9)
        cost_e = ot.pairing_cost(images[:k], codes)
        self.assertGreaterEqual(cost_e, cost_ot - 1e-12)
        self.assertAlmostEqual(self.results[f"ot_relative_error_{name}_k{k}"],
                               (cost_e - cost_ot) / cost_ot, places=9)
        self.assertAlmostEqual(self.results[f"identity_fraction_{name}_k{k}"],
                               float(np.mean(perm == np.arange(k))))
        self.assertAlmostEqual(self.results[f"nearest_code_fraction_{name}_k{k}"],
                               float(np.mean(np.argmin(cost, axis=1) == np.arange(k))))

  def test_shuffled_control_is_rejected(self):
    """A wrong pairing (the codes shuffled) is not the optimal one: few fixed points (the
    shuffle's own, ≈ 1 of K) and ε_rel > 0."""
    for enc in ("ode", "ddim"):
      for k in KS:
        fixed = float(np.mean(self.arrays[f"shuffle_k{k}"] == np.arange(k)))
        self.assertLessEqual(self.results[f"identity_fraction_shuffled_{enc}_k{k}"], 0.25)
        self.assertAlmostEqual(self.results[f"identity_fraction_shuffled_{enc}_k{k}"], fixed)
        self.assertGreater(self.results[f"ot_relative_error_shuffled_{enc}_k{k}"], 0.0)

  def test_code_statistics_and_round_trip(self):
    """code_mean/std are the saved codes' moments; reconstructions have the images' shape and
    round_trip_rmse is their RMS error."""
    images = self.arrays["images"]
    for name in ("ode", "ddim"):
      codes = self.arrays[f"codes_{name}"]
      self.assertEqual(codes.shape, images.shape)
      self.assertAlmostEqual(self.results[f"code_std_{name}"], float(np.std(codes)), places=6)
      recon = self.arrays[f"reconstructions_{name}"]
      rmse = np.sqrt(np.mean((recon - images).reshape(len(images), -1) ** 2, axis=1)).mean()
      self.assertAlmostEqual(self.results[f"round_trip_rmse_{name}"], float(rmse), places=6)

  def test_rerun_resumes_models_and_repeats_numbers(self):
    """A second run in the same workdir trains nothing new (same model folders, each at its
    final step) and reproduces the codes exactly (deterministic encoders, seeded subsets)."""
    before = sorted(os.listdir(os.path.join(self.workdir, "models")))
    config = tiny_config()
    config.latent_ot.encoders = ("ddim",)
    config.latent_ot.round_trip = False
    config.latent_ot.other_model = False
    results = latent_ot.run(config, self.workdir)  # the class's arrays are already in memory
    self.assertEqual(sorted(os.listdir(os.path.join(self.workdir, "models"))), before)
    self.assertEqual(results["train_steps_own"], 2)
    with np.load(os.path.join(self.workdir, "arrays.npz")) as stored:
      np.testing.assert_array_equal(stored["codes_ddim"], self.arrays["codes_ddim"])
    self.assertEqual(results["identity_fraction_ddim_k16"],
                     self.results["identity_fraction_ddim_k16"])


  def test_restore_from_checkpoint_source(self):
    """models.own.source='checkpoint' pointed at the trained model's folder restores the same
    EMA parameters: the DDIM codes equal those of the run that trained it."""
    config = tiny_config()
    own_folder = next(d for d in os.listdir(os.path.join(self.workdir, "models"))
                      if "transpose" not in d)
    config.models.own.source = "checkpoint"
    config.models.own.path = os.path.join(self.workdir, "models", own_folder)
    config.latent_ot.encoders = ("ddim",)
    config.latent_ot.round_trip = False
    config.latent_ot.other_model = False
    with tempfile.TemporaryDirectory() as workdir:
      results = latent_ot.run(config, workdir)
      self.assertEqual(results["train_steps_own"], 2)
      self.assertEqual(results["train_seconds_own"], 0.0)
      with np.load(os.path.join(workdir, "arrays.npz")) as stored:
        np.testing.assert_array_equal(stored["codes_ddim"], self.arrays["codes_ddim"])


class DataSelectionTest(absltest.TestCase):

  def test_class_subset_and_transpose(self):
    """select_classes keeps exactly the asked labels; transpose swaps the spatial axes."""
    digits = data.load_digits("train")
    low = model_sources.select_classes(digits, (0, 1))
    self.assertEqual(set(low.labels.tolist()), {0, 1})
    self.assertEqual(len(low), int(np.isin(digits.labels, [0, 1]).sum()))
    flipped = model_sources.apply_transform(low.images, "transpose")
    np.testing.assert_array_equal(flipped[3, 1, 5], low.images[3, 5, 1])
    with self.assertRaisesRegex(ValueError, "No images with labels"):
      model_sources.select_classes(digits, (42,))
    with self.assertRaisesRegex(KeyError, "Unknown model spec key"):
      model_sources.model_spec(clases=(1,))


class PaperScaleErrorsTest(absltest.TestCase):

  def test_missing_cifar_folder_through_main(self):
    """scripts/main.py with the CIFAR-10 config and no data: exit code 2, one message naming
    the folder it looked in, no traceback."""
    missing = os.path.join(tempfile.gettempdir(), "no-cifar-here-7f3a")
    with tempfile.TemporaryDirectory() as workdir:
      proc = helpers.run_main(
          "--config=" + os.path.join(ROOT, "configs", "cifar10_latent_ot.py"),
          f"--config.data.root={missing}", f"--workdir={workdir}", timeout=120)
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertIn(missing, proc.stderr)
    self.assertNotIn("Traceback", proc.stderr)

  def test_missing_weights_with_data_present(self):
    """With the (fake) CIFAR-10 test batch present but no diffusers weights, the run stops
    with FileNotFoundError naming the weights path, before any training."""
    with tempfile.TemporaryDirectory() as tmp:
      helpers.fake_cifar(tmp, per_batch=12)  # ≥ the 5 test images asked for
      config = cifar10_latent_ot.get_config()
      config.data.root = tmp
      config.latent_ot.num_images = (5,)
      weights = os.path.join(tmp, "no-weights")
      config.models.own.path = weights
      with self.assertRaisesRegex(FileNotFoundError, weights):
        latent_ot.run(config, os.path.join(tmp, "work"))
      self.assertFalse(os.path.exists(os.path.join(tmp, "work", "models")))

  def test_missing_second_model_fails_before_the_first_is_trained(self):
    """models.other restored from a checkpoint folder that does not exist: the run stops with
    FileNotFoundError naming it before 'own' (source='train') is trained — no models folder
    is created, nothing is trained."""
    with tempfile.TemporaryDirectory() as tmp:
      config = tiny_config()
      missing = os.path.join(tmp, "runs", "other-model")
      config.models.other = model_sources.model_spec(source="checkpoint", path=missing)
      with mock.patch.object(model_sources.trainer, "train_ddpm") as trainer:
        with self.assertRaisesRegex(FileNotFoundError, f"model 'other'.*{missing}"):
          latent_ot.run(config, os.path.join(tmp, "work"))
      trainer.assert_not_called()
      self.assertFalse(os.path.exists(os.path.join(tmp, "work", "models")))
      self.assertFalse(os.path.exists(missing))

  def test_diffusers_weights_of_another_image_shape_fail_up_front(self):
    """models.own from diffusers weights whose config.json says 32×32×3 while the experiment
    encodes 8×8×1 digits: one ValueError naming models.own and both shapes, before anything
    is loaded or trained."""
    from ddpm_ot_jax.models import diffusers_import  # pylint: disable=g-import-not-at-top

    with tempfile.TemporaryDirectory() as tmp:
      with open(os.path.join(tmp, diffusers_import.CONFIG_NAME), "w") as f:
        json.dump(diffusers_import.DDPM_CIFAR10_CONFIG, f)
      with open(os.path.join(tmp, diffusers_import.WEIGHTS_NAME), "wb") as f:
        f.write(b"placeholder")
      config = tiny_config()
      config.models.own = model_sources.model_spec(source="diffusers", path=tmp)
      with mock.patch.object(model_sources.trainer, "train_ddpm") as trainer:
        with self.assertRaisesRegex(ValueError, r"models\.own .*takes 32×32.*are 8×8×1"):
          latent_ot.run(config, os.path.join(tmp, "work"))
      trainer.assert_not_called()


if __name__ == "__main__":
  absltest.main()
