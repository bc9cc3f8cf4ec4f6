"""Tests of the shared-latents experiment (Figures 5–6) on a tiny digits run, and its clear errors."""
import itertools
import os
import tempfile
from unittest import mock

from absl.testing import absltest
import numpy as np

from configs import digits_shared_latents
from ddpm_ot_jax import model_sources
from ddpm_ot_jax.experiments import shared_latents

import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = (0, 1, 2)


def tiny_config():
  config = helpers.tiny_latent_ot_models(digits_shared_latents.get_config())
  # No training step (latent_ot_test covers training and resuming): the zero-initialised
  # output layer makes every DDPM decode z to the same image, which the tests do not mind.
  config.training.num_steps = 0
  config.models.conditional.labels = LABELS
  config.shared_latents.num_latents = 6
  config.shared_latents.num_steps = 3
  config.shared_latents.batch_size = 6
  config.control.vae_steps = 50
  return config


class PairStatisticsTest(absltest.TestCase):

  def test_closed_form(self):
    """Constant images a_i = b_i = c_i: same-latent distance 0, ratio 0, NN match 1; with
    b_i = c_i + 1 the same-latent distance is 1 and the different-latent one is the mean of
    |c_i − c_j + ... | computed by hand."""
    c = np.arange(4, dtype=np.float64)[:, None, None, None] * np.ones((4, 2, 2, 1))
    stats = shared_latents.pair_statistics(c, c)
    self.assertEqual(stats["distance_same_latent"], 0.0)
    self.assertEqual(stats["distance_ratio"], 0.0)
    self.assertEqual(stats["nn_match_fraction"], 1.0)
    self.assertAlmostEqual(stats["distance_different_latent"],
                           np.mean([abs(i - j) for i in range(4) for j in range(4) if i != j]))
    shifted = shared_latents.pair_statistics(c, c + 1.0)
    self.assertAlmostEqual(shifted["distance_same_latent"], 1.0)
    self.assertAlmostEqual(shifted["distance_different_latent"],
                           np.mean([abs(i - j - 1) for i in range(4) for j in range(4) if i != j]))

  def test_independent_sets_have_ratio_near_one(self):
    """Two independent noise sets (no shared structure): ratio ≈ 1, NN match near chance."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 8, 8, 1)), rng.normal(size=(200, 8, 8, 1))
    stats = shared_latents.pair_statistics(a, b)
    self.assertAlmostEqual(stats["distance_ratio"], 1.0, delta=0.03)
    self.assertLess(stats["nn_match_fraction"], 0.05)


class SharedLatentsRunTest(helpers.ExperimentRunCase):

  @classmethod
  def run_experiment(cls):
    cls.results = shared_latents.run(tiny_config(), cls.workdir)
    with np.load(os.path.join(cls.workdir, "decoded.npz")) as stored:
      cls.decoded = {k: stored[k] for k in stored.files}

  def test_groups_pairs_and_figures(self):
    """Pairs are grouped by training data: 0–4 vs 5–9 (twice: two 0–4 seeds) is
    different_data, the two 0–4 seeds same_data, label pairs conditional, VAEs the control;
    the class-conditional model 'conditional' has its own figure file."""
    self.assertEqual(self.results["num_pairs_different_data"], 2)
    self.assertEqual(self.results["num_pairs_same_data"], 1)
    self.assertEqual(self.results["num_pairs_conditional"], 3)
    self.assertEqual(self.results["num_pairs_vae_control"], 1)
    for group in shared_latents.GROUPS:
      for key in ("distance_same_latent", "distance_different_latent", "distance_ratio",
                  "nn_match_fraction"):
        self.assertIn(f"{key}_{group}", self.results)
    for figure in ("shared_latents.png", "shared_latents_conditional_conditional.png"):
      self.assertTrue(os.path.exists(os.path.join(self.workdir, figure)))

  def test_numbers_recomputed_from_saved_images(self):
    """Every group mean follows from the decoded images in decoded.npz; distances are
    symmetric in the pair (d(A(z_i), B(z_j)) = d(B(z_j), A(z_i)))."""
    rows = {"different_data": [("digits_0to4", "digits_5to9"),
                               ("digits_0to4_seed1", "digits_5to9")],
            "same_data": [("digits_0to4", "digits_0to4_seed1")],
            "conditional": list(itertools.combinations(
                [f"conditional_y{y}" for y in LABELS], 2)),
            "vae_control": [("vae_01234", "vae_56789")]}
    for group, pairs in rows.items():
      stats = [shared_latents.pair_statistics(self.decoded[a], self.decoded[b]) for a, b in pairs]
      for key in stats[0]:
        self.assertAlmostEqual(self.results[f"{key}_{group}"],
                               float(np.mean([s[key] for s in stats])), places=9)
      a, b = pairs[0]
      np.testing.assert_allclose(shared_latents.rms_distances(self.decoded[a], self.decoded[b]),
                                 shared_latents.rms_distances(self.decoded[b], self.decoded[a]).T,
                                 atol=1e-12)
    ratio = self.decoded["distance_ratio_matrix_conditional"]
    np.testing.assert_allclose(ratio, ratio.T)
    self.assertAlmostEqual(ratio[0, 1], shared_latents.pair_statistics(
        self.decoded["conditional_y0"], self.decoded["conditional_y1"])["distance_ratio"])

  def test_images_in_range_and_latents_shared(self):
    """Every decoder saw the same latents (saved once) and produced images on [−1, 1]."""
    self.assertEqual(self.decoded["latents"].shape, (6, 8, 8, 1))
    for name in ("digits_0to4", "conditional_y2", "vae_56789"):
      self.assertEqual(self.decoded[name].shape, (6, 8, 8, 1))
      self.assertLessEqual(np.abs(self.decoded[name]).max(), 1.0)


class PaperScaleErrorsTest(absltest.TestCase):

  def test_missing_afhq_folder_through_main(self):
    """scripts/main.py with the AFHQ config and no images: exit code 2, one message naming
    the folder it looked for, no traceback."""
    missing = os.path.join(tempfile.gettempdir(), "no-afhq-here-7f3a")
    with tempfile.TemporaryDirectory() as workdir:
      proc = helpers.run_main(
          "--config=" + os.path.join(ROOT, "configs", "afhq_shared_latents.py"),
          f"--config.data.root={missing}", f"--workdir={workdir}", timeout=120)
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertIn(os.path.join(missing, "train", "cat"), proc.stderr)
    self.assertNotIn("Traceback", proc.stderr)

  def test_missing_last_folder_fails_before_the_first_model_is_trained(self):
    """AFHQ with train/cat and train/wild present but no dog images: the run stops with
    FileNotFoundError naming the missing dog folder before the cat model is trained (no
    training call, no models folder)."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from configs import afhq_shared_latents  # pylint: disable=g-import-not-at-top

    with tempfile.TemporaryDirectory() as tmp:
      for animal in ("cat", "wild"):
        os.makedirs(os.path.join(tmp, "afhq", "train", animal))
        Image.new("RGB", (8, 8), (200, 10, 10)).save(
            os.path.join(tmp, "afhq", "train", animal, "0.png"))
      config = afhq_shared_latents.get_config()
      config.data.root = os.path.join(tmp, "afhq")
      with mock.patch.object(model_sources.trainer, "train_ddpm") as trainer:
        with self.assertRaisesRegex(FileNotFoundError,
                                    os.path.join(tmp, "afhq", "train", "dog")):
          shared_latents.run(config, os.path.join(tmp, "work"))
      trainer.assert_not_called()
      self.assertFalse(os.path.exists(os.path.join(tmp, "work", "models")))

  def test_missing_checkpoint(self):
    """A model to restore from a run that does not exist stops with FileNotFoundError
    naming that path (and creates nothing there)."""
    from configs import afhq_shared_latents  # pylint: disable=g-import-not-at-top

    with tempfile.TemporaryDirectory() as tmp:
      config = afhq_shared_latents.get_config()
      missing = os.path.join(tmp, "runs", "afhq_cat")
      config.models.cat.source = "checkpoint"
      config.models.cat.path = missing
      with self.assertRaisesRegex(FileNotFoundError, missing):
        shared_latents.run(config, os.path.join(tmp, "work"))
      self.assertFalse(os.path.exists(missing))


if __name__ == "__main__":
  absltest.main()
