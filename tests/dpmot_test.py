"""Tests of the DPM-OT experiment (experiments/dpmot.py) on tiny runs.

A tiny UNet (ch 8, one level, a few training steps), 48 digit targets, 100 OT iterations and
24 samples per method: the numbers are not the point, the plumbing is (NFE counted by the
sampler, starting latents chosen by the OT map, caching by fingerprint, imported weights used
without training, the flagship CIFAR-10 config on a fake folder with a tiny random Inception
network, and one error naming every missing input).
"""
import glob
import os
import tempfile
from unittest import mock

from absl.testing import absltest
import jax
import numpy as np

from configs import cifar10_dpmot
from configs import digits_dpmot
from ddpm_ot_jax import checkpoints
from ddpm_ot_jax import semidiscrete
from ddpm_ot_jax.experiments import dpmot
from ddpm_ot_jax.experiments import stages
from ddpm_ot_jax.models import diffusers_import
from ddpm_ot_jax.models import unet

import data_test
import fake_weights
import experiment_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), norm_groups=4)
NUM_TARGETS = 48


def tiny(config):
  """Tiny model, training, OT and evaluation sizes on top of a DPM-OT config."""
  config.model.update(TINY_MODEL)
  config.training.update(dict(num_steps=0, batch_size=8, warmup_steps=1, log_every=1,
                              checkpoint_every=1, sample_every=0))  # the random init
  config.dpmot.max_targets = NUM_TARGETS
  config.dpmot.switch_sweep = ()
  config.dpmot.ot.update(dict(num_iterations=100, batch_size=128, error_eval_every=50,
                              check_samples=2000, error_batch_size=512))
  config.evaluation.update(dict(methods=("ddim_10", "dpmot_10"), num_samples=24, batch_size=24,
                                classifier_steps=20))
  return config


def _mtimes(pattern: str) -> dict[str, int]:
  return {os.path.basename(p): os.stat(p).st_mtime_ns for p in glob.glob(pattern)}


def _assert_numbers(test: absltest.TestCase, results: dict) -> None:
  """Every results value is an int or float (not bool, not str) or a list of them."""
  for key, value in results.items():
    values = value if isinstance(value, list) else [value]
    for v in values:
      test.assertIsInstance(v, (int, float), key)
      test.assertNotIsInstance(v, bool, key)


class DigitsRunTest(experiment_case.ExperimentRunCase):
  """One tiny digits run shared by the tests below (reruns go to the same workdir, so the
  first run's sample files are recorded here, before any test adds more)."""

  @classmethod
  def run_experiment(cls):
    cls.config = tiny(digits_dpmot.get_config())
    cls.results = dpmot.run(cls.config, cls.workdir)
    cls.sample_files = {
        method: glob.glob(os.path.join(cls.workdir, f"samples-{method}-*.npz"))
        for method in ("dpm_ot_10", "ddim_10")}

  def test_table_nfe_and_keys(self):
    """comparison.md has a row per method and the data floor; both methods take 10 network
    evaluations as counted by the sampler; results are numbers with the OT counts as ints."""
    with open(os.path.join(self.workdir, "comparison.md")) as f:
      rows = [line.split("|")[1].strip() for line in f if line.startswith("| ")]
    self.assertEqual(rows, ["method", "DDIM-10", "DPM-OT-10", "data floor (heldout)"])
    self.assertEqual(self.results["nfe_dpm_ot_10"], 10)
    self.assertEqual(self.results["nfe_ddim_10"], 10)
    _assert_numbers(self, self.results)
    for method in ("ddim_10", "dpm_ot_10", "data_floor"):
      for key in ("fid", "precision", "recall", "mmr", "copy_fraction", "nn_distance_ratio"):
        self.assertTrue(np.isfinite(self.results[f"{key}_{method}"]), f"{key}_{method}")
    self.assertIsInstance(self.results["ot_converged"], int)
    self.assertIn(self.results["ot_converged"], (0, 1))
    self.assertIsInstance(self.results["ot_empty_cells"], int)
    self.assertIn(self.results["ot_iterations"], (50, 100))
    self.assertEqual(self.results["num_targets"], NUM_TARGETS)
    self.assertEqual((self.results["train_steps"], self.results["imported_weights"]), (0, 0))
    self.assertIn("classifier_accuracy", self.results)
    self.assertLen(self.results["mmr_sweep_dpm_ot_10"], len(self.config.evaluation.mmr_sweep))

  def test_dpmot_starts_from_the_ot_map_of_the_stored_potential(self):
    """Each DPM-OT sample started from target j = argmax_j g_j − ‖z − x_M^j‖², recomputed here
    by brute force from the run's noise z (same keys), its saved latents and its saved
    potential g; the baseline's file has no target indices."""
    (latent_path,) = glob.glob(os.path.join(self.workdir, "latents-*.npz"))
    (ot_dir,) = glob.glob(os.path.join(self.workdir, "ot-*"))
    (dpmot_path,) = self.sample_files["dpm_ot_10"]
    (ddim_path,) = self.sample_files["ddim_10"]
    latents = np.load(latent_path)["latents"].reshape(NUM_TARGETS, -1).astype(np.float64)
    with checkpoints.Checkpointer(ot_dir) as ckpt:
      g = np.asarray(ckpt.restore({"g": np.zeros(NUM_TARGETS, np.float32),
                                   "diagnostics": np.zeros(len(dpmot._DIAG_KEYS), np.float32)}
                                  )["g"], np.float64)
    index = np.load(dpmot_path)["target_index"]
    self.assertNotIn("target_index", np.load(ddim_path).files)
    self.assertEqual(index.shape, (self.config.evaluation.num_samples,))
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self.config.seed),
                                                dpmot.METHOD_STREAM), dpmot._stream("DPM-OT-10"))
    key_noise, _ = jax.random.split(jax.random.fold_in(key, 0))  # one chunk
    z = np.asarray(semidiscrete.sample_source(key_noise, (len(index), latents.shape[1])), np.float64)
    scores = g[None, :] - ((z[:, None, :] - latents[None, :, :]) ** 2).sum(-1)
    chosen = scores[np.arange(len(index)), index]
    np.testing.assert_allclose(chosen, scores.max(axis=1), rtol=1e-5)

  def test_rerun_reuses_and_a_changed_input_writes_new_files(self):
    """The same config again rewrites no sample file and gives the same numbers; a new
    evaluation.batch_size (other chunks, other noise keys) writes a new file for each method
    beside the older ones, which stay untouched."""
    pattern = os.path.join(self.workdir, "samples-*.npz")
    before = _mtimes(pattern)
    self.assertLen(before, 2)
    self.assertEqual(sorted(before),
                     sorted(os.path.basename(p) for p in sum(self.sample_files.values(), [])))
    again = dpmot.run(tiny(digits_dpmot.get_config()), self.workdir)
    self.assertEqual(_mtimes(pattern), before)
    self.assertEqual(again["fid_dpm_ot_10"], self.results["fid_dpm_ot_10"])

    config = tiny(digits_dpmot.get_config())
    config.evaluation.batch_size = 12
    changed = dpmot.run(config, self.workdir)
    after = _mtimes(pattern)
    self.assertLen(after, 4)
    self.assertEqual({k: after[k] for k in before}, before)
    self.assertEqual(changed["nfe_dpm_ot_10"], 10)
    self.assertLen(glob.glob(os.path.join(self.workdir, "ot-*")), 1)  # the potential is reused


class ParseMethodTest(absltest.TestCase):

  def test_dpmot_steps_beyond_the_switch_step_are_rejected(self):
    """dpmot_<k> with k > switch_index + 1 is a ValueError for ddim and dpm_solver;
    k = switch_index + 1 is accepted."""
    config = digits_dpmot.get_config()
    for sampler in ("ddim", "dpm_solver"):
      config.dpmot.sampler = sampler
      self.assertEqual(dpmot.parse_method("dpmot_10", config, 1000).num_steps, 10)
      with self.assertRaisesRegex(ValueError, "switch_index"):
        dpmot.parse_method("dpmot_11", config, 1000)

  def test_dpm_solver_settings_match_the_baseline(self):
    """The DPM-OT row with sampler='dpm_solver' runs DPM-Solver++ of order 3, like the
    DPM-Solver baseline row."""
    config = digits_dpmot.get_config()
    config.dpmot.sampler = "dpm_solver"
    baseline = dpmot.parse_method("dpm_solver_10", config, 1000)
    ours = dpmot.parse_method("dpmot_10", config, 1000)
    self.assertEqual(dict(ours.kwargs), {"order": 3, "variant": "dpmsolver++"})
    self.assertEqual(ours.kwargs, baseline.kwargs)
    self.assertTrue(ours.dpmot)

  def test_bad_method_fails_before_any_work(self):
    """A bad method name stops the run in validation: the workdir stays empty."""
    config = tiny(digits_dpmot.get_config())
    config.evaluation.methods = ("ddim_10", "dpmot_50")
    with tempfile.TemporaryDirectory() as workdir:
      with self.assertRaisesRegex(ValueError, "dpmot_50"):
        dpmot.run(config, workdir)
      self.assertEqual(os.listdir(workdir), [])


class Cifar10FlagshipTest(absltest.TestCase):

  def test_tiny_flagship_run_with_imported_weights(self):
    """configs/cifar10_dpmot.py with tiny overrides, a fake CIFAR-10 folder, a tiny random
    pytorch-fid Inception file and (mocked) diffusers weights runs end to end: the imported
    UNet is sampled as it is (0 training steps although training.num_steps=50, no
    checkpoint) in a model stage named by the weights' fingerprint; Inception FID for every
    row, NFE 10, no classifier keys (no NaN placeholder); the switch-step sweep writes its
    samples file and figure."""
    with tempfile.TemporaryDirectory() as tmp:
      data_test.fake_cifar(tmp, per_batch=8)
      weights = os.path.join(tmp, "fid.pth")
      fake_weights.write_fake_fid_weights(weights)
      folders = [os.path.join(tmp, name) for name in ("ddpm-a", "ddpm-b")]
      for folder in folders:
        os.makedirs(folder)
        open(os.path.join(folder, diffusers_import.WEIGHTS_NAME), "wb").close()
      config = tiny(cifar10_dpmot.get_config())
      config.data.root = tmp
      config.dpmot.max_targets = 0  # all 8 test images
      config.training.update(dict(num_steps=50, init_from_diffusers=folders[0]))
      config.dpmot.update(dict(switch_sweep=(9,), sweep_ot_iterations=50))
      config.evaluation.update(dict(inception_weights=weights, inception_width=fake_weights.WIDTH,
                                    inception_resize=fake_weights.RESIZE, num_samples=8,
                                    batch_size=8))
      model = unet.unet_from_config(config.model)
      params = model.init(jax.random.PRNGKey(7), np.zeros((1, 32, 32, 3), np.float32),
                          np.zeros((1,), np.float32))["params"]
      workdir = os.path.join(tmp, "run")
      with mock.patch.object(diffusers_import, "load_diffusers_unet",
                             return_value=(model, params)) as loader:
        results = dpmot.run(config, workdir)
      loader.assert_called_once_with(folders[0], (32, 32, 3))
      _assert_numbers(self, results)
      self.assertEqual((results["train_steps"], results["imported_weights"]), (0, 1))
      self.assertEqual(results["nfe_dpm_ot_10"], 10)
      self.assertEqual(results["nfe_ddim_10"], 10)
      self.assertEqual(results["num_targets"], 8)
      for method in ("ddim_10", "dpm_ot_10", "data_floor"):
        self.assertTrue(np.isfinite(results[f"fid_{method}"]), method)
      self.assertNotIn("classifier_accuracy", results)
      self.assertNotIn("mmr_dpm_ot_10", results)
      self.assertNotIn("copy_fraction_data_floor", results)  # floor = targets = test split
      self.assertLen(results["sweep_fid"], 1)
      self.assertLen(glob.glob(os.path.join(workdir, "sweep-9-*.npz")), 1)
      self.assertTrue(os.path.exists(os.path.join(workdir, "fid_vs_memorization.png")))
      self.assertEqual(glob.glob(os.path.join(workdir, "model-*")), [])  # nothing trained
      fingerprints = []
      for folder in folders:
        config.training.init_from_diffusers = folder
        fingerprints.append(stages.fingerprint(dpmot._imported_model_inputs(config)))
      self.assertNotEqual(fingerprints[0], fingerprints[1])


class MissingInputsTest(absltest.TestCase):

  def test_missing_data_and_inception_weights_in_one_message(self):
    """scripts/main.py with cifar10_dpmot, no CIFAR-10 folder and no Inception weights: exit
    code 2, one error line naming both paths, no traceback, nothing trained."""
    with tempfile.TemporaryDirectory() as tmp:
      missing_data = os.path.join(tmp, "no-cifar")
      missing_weights = os.path.join(tmp, "no-weights.pth")
      workdir = os.path.join(tmp, "run")
      proc = experiment_case.run_main(
          "--config=" + os.path.join(ROOT, "configs", "cifar10_dpmot.py"),
          f"--config.data.root={missing_data}",
          f"--config.evaluation.inception_weights={missing_weights}", f"--workdir={workdir}",
          timeout=180)
      self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
      errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
      self.assertLen(errors, 1, proc.stderr[-2000:])
      self.assertIn(missing_data, errors[0])
      self.assertIn(missing_weights, errors[0])
      self.assertIn("2 input(s)", errors[0])
      self.assertNotIn("Traceback", proc.stderr)
      self.assertEqual(glob.glob(os.path.join(workdir, "model-*")), [])


if __name__ == "__main__":
  absltest.main()
