"""Tests of the DPM-OT experiment (experiments/dpmot.py) on tiny runs.

A tiny UNet (ch 8, one level, the random init), 48 digit targets, 100 OT iterations, 2 draws
of 24 samples per row: the numbers are not the point, the plumbing is (roles of the splits,
rows with their spread and both controls, spacing tuning on validation draws, NFE counted by
the sampler, starting latents chosen by the OT map, caching by fingerprint, imported weights
used without training, the flagship CIFAR-10 config on a fake folder with a tiny random
Inception network, and one error naming every missing input).
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

import fake_weights
import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TARGETS = helpers.DPMOT_NUM_TARGETS


def _mtimes(pattern: str) -> dict[str, int]:
  return {os.path.basename(p): os.stat(p).st_mtime_ns for p in glob.glob(pattern)}


def _assert_numbers(test: absltest.TestCase, results: dict) -> None:
  """Every results value is an int or float (not bool, not str) or a list of them."""
  for key, value in results.items():
    values = value if isinstance(value, list) else [value]
    for v in values:
      test.assertIsInstance(v, (int, float), key)
      test.assertNotIsInstance(v, bool, key)


class DigitsRunTest(helpers.ExperimentRunCase):
  """One tiny digits run shared by the tests below (reruns go to the same workdir, so the
  first run's sample files are recorded here, before any test adds more)."""

  @classmethod
  def run_experiment(cls):
    cls.config = helpers.tiny_dpmot(digits_dpmot.get_config())
    cls.results = dpmot.run(cls.config, cls.workdir)
    cls.sample_files = {
        method: sorted(glob.glob(os.path.join(cls.workdir, f"samples-{method}-*.npz")))
        for method in ("dpm_ot_10", "ddim_10")}

  def test_table_rows_spread_and_keys(self):
    """comparison.md has a row per method and both controls, each stochastic cell as
    mean ± std; both methods take 10 network evaluations as counted by the sampler; every
    metric has its mean, std and per-draw values; results are numbers, OT counts ints."""
    with open(os.path.join(self.workdir, "comparison.md")) as f:
      lines = [line for line in f if line.startswith("| ")]
    self.assertEqual([line.split("|")[1].strip() for line in lines],
                     ["method", "DDIM-10", "DPM-OT-10", "copy machine", "data floor"])
    for line in lines[1:]:
      self.assertIn("±", line.split("|")[3])  # FID
    _assert_numbers(self, self.results)
    self.assertEqual(self.results["nfe_dpm_ot_10"], 10)
    self.assertEqual(self.results["nfe_ddim_10"], 10)
    for row in ("ddim_10", "dpm_ot_10", "copy_machine", "data_floor"):
      for key in ("fid", "kid", "precision", "recall", "mmr", "copy_fraction",
                  "nn_distance_ratio"):
        self.assertTrue(np.isfinite(self.results[f"{key}_{row}"]), f"{key}_{row}")
        self.assertTrue(np.isfinite(self.results[f"{key}_{row}_std"]), f"{key}_{row}_std")
        self.assertLen(self.results[f"{key}_{row}_draws"], 2)
      self.assertAlmostEqual(self.results[f"fid_{row}_std"],
                             float(np.std(self.results[f"fid_{row}_draws"], ddof=1)), places=9)
    self.assertIn(self.results["ot_converged_m9"], (0, 1))
    self.assertIsInstance(self.results["ot_empty_cells_m9"], int)
    self.assertIn(self.results["ot_iterations_m9"], (50, 100))
    self.assertEqual(self.results["num_targets"], NUM_TARGETS)
    self.assertEqual((self.results["train_steps"], self.results["imported_weights"]), (0, 0))
    self.assertIn("classifier_accuracy", self.results)
    self.assertEqual(self.results["spacing_ddim_10"], dpmot.SPACINGS.index("time_uniform"))

  def test_controls_behave_as_controls(self):
    """The copy machine's samples are targets: every one is a copy (its nearest target at
    distance 0) and its NN-distance ratio is 0; the floor images are not targets (ratio 1 by
    construction, as they are the novelty reference)."""
    self.assertEqual(self.results["copy_fraction_copy_machine"], 1.0)
    self.assertEqual(self.results["nn_distance_ratio_copy_machine"], 0.0)
    self.assertAlmostEqual(self.results["nn_distance_ratio_data_floor"], 1.0)
    self.assertLess(self.results["copy_fraction_data_floor"], 0.5)

  def test_verdicts_follow_the_intervals(self):
    """verdicts.md and verdict_* keys: DPM-OT vs DDIM at equal NFE and every row vs both
    controls; each verdict is what metrics.compare gives for the rows' mean ± std."""
    for a, b in (("dpm_ot_10", "ddim_10"), ("ddim_10", "copy_machine"),
                 ("dpm_ot_10", "data_floor")):
      for metric in ("fid", "kid"):
        r = self.results
        expected = dpmot.metrics.compare((r[f"{metric}_{a}"], r[f"{metric}_{a}_std"]),
                                         (r[f"{metric}_{b}"], r[f"{metric}_{b}_std"]))
        self.assertEqual(r[f"verdict_{metric}_{a}_vs_{b}"], expected)
    self.assertTrue(os.path.exists(os.path.join(self.workdir, "verdicts.md")))
    self.assertTrue(os.path.exists(os.path.join(self.workdir, "fid_vs_nfe.png")))

  def test_dpmot_starts_from_the_ot_map_of_the_stored_potential(self):
    """Each DPM-OT sample of draw 0 started from target j = argmax_j g_j − ‖z − x_M^j‖²,
    recomputed here by brute force from the run's noise z (same keys), its saved latents and
    its saved potential g; the baseline's file has no target indices."""
    (latent_path,) = glob.glob(os.path.join(self.workdir, "latents-*.npz"))
    (ot_dir,) = glob.glob(os.path.join(self.workdir, "ot-*"))
    dpmot_path = next(p for p in self.sample_files["dpm_ot_10"] if "-dpm_ot_10-0-" in p)
    ddim_path = self.sample_files["ddim_10"][0]
    latents = np.load(latent_path)["latents"].reshape(NUM_TARGETS, -1).astype(np.float64)
    with checkpoints.Checkpointer(ot_dir) as ckpt:
      g = np.asarray(ckpt.restore({"g": np.zeros(NUM_TARGETS, np.float32),
                                   "diagnostics": np.zeros(len(dpmot._DIAG_KEYS), np.float32)}
                                  )["g"], np.float64)
    index = np.load(dpmot_path)["target_index"]
    self.assertNotIn("target_index", np.load(ddim_path).files)
    self.assertEqual(index.shape, (self.config.evaluation.num_samples,))
    key = jax.random.fold_in(dpmot._key(self.config, dpmot.METHOD_STREAM, "dpm_ot_10"), 0)
    key_noise, _ = jax.random.split(jax.random.fold_in(key, 0))  # draw 0, chunk 0
    z = np.asarray(semidiscrete.sample_source(key_noise, (len(index), latents.shape[1])), np.float64)
    scores = g[None, :] - ((z[:, None, :] - latents[None, :, :]) ** 2).sum(-1)
    chosen = scores[np.arange(len(index)), index]
    np.testing.assert_allclose(chosen, scores.max(axis=1), rtol=1e-5)

  def test_rerun_reuses_and_a_changed_input_writes_new_files(self):
    """The same config again rewrites no sample file and gives the same numbers; a new
    evaluation.batch_size (other chunks, other noise keys) writes new files for each draw of
    each method beside the older ones, which stay untouched; the potential is reused."""
    pattern = os.path.join(self.workdir, "samples-*.npz")
    before = _mtimes(pattern)
    self.assertLen(before, 4)  # 2 methods × 2 draws
    again = dpmot.run(helpers.tiny_dpmot(digits_dpmot.get_config()), self.workdir)
    self.assertEqual(_mtimes(pattern), before)
    self.assertEqual(again["fid_dpm_ot_10_draws"], self.results["fid_dpm_ot_10_draws"])

    config = helpers.tiny_dpmot(digits_dpmot.get_config())
    config.evaluation.batch_size = 12
    changed = dpmot.run(config, self.workdir)
    after = _mtimes(pattern)
    self.assertLen(after, 8)
    self.assertEqual({k: after[k] for k in before}, before)
    self.assertEqual(changed["nfe_dpm_ot_10"], 10)
    self.assertLen(glob.glob(os.path.join(self.workdir, "ot-*")), 1)


class SpacingTuningTest(helpers.ExperimentRunCase):

  @classmethod
  def run_experiment(cls):
    cls.config = helpers.tiny_dpmot(digits_dpmot.get_config())
    cls.config.evaluation.methods = ("ddim_5",)
    cls.config.evaluation.spacings = {}
    cls.results = dpmot.run(cls.config, cls.workdir)

  def test_the_spacing_of_lowest_validation_fid_is_used(self):
    """Without a fixed spacing, one validation draw per spacing is scored against the
    tuning split (the targets) and the lowest FID's spacing is the one reported and used;
    the validation draws are files of their own, not reported draws."""
    fids = [self.results[f"tuning_fid_ddim_5_{s}"] for s in dpmot.SPACINGS]
    self.assertEqual(self.results["spacing_ddim_5"], int(np.argmin(fids)))
    self.assertLen(glob.glob(os.path.join(self.workdir, "tuning-ddim_5-*.npz")), 3)
    self.assertLen(glob.glob(os.path.join(self.workdir, "samples-ddim_5-*.npz")), 2)


class DpmOtSamplerTest(absltest.TestCase):

  def test_library_sampler_equals_a_hand_rolled_loop(self):
    """samplers.dpm_ot (chunks of 4 from 10 samples, DDIM η = 1 for 5 steps from M = 20)
    equals the algorithm written out here: per chunk k, (key_z, key_run) = split(fold_in(key,
    k)), z ~ N(0, I) from key_z, j(z) = argmax_j g_j − ‖z − x_M^j‖² (dense), x_M = x_M^{j(z)},
    then samplers.ddim from index M with key_run; images clipped to [−1, 1]."""
    model, params = helpers.noisy_tiny_unet()
    view = dpmot.samplers.noise_schedule(dpmot.trainer.schedule_from_config(
        digits_dpmot.get_config()))
    network = dpmot.samplers.Network(model, params, view)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((30, 8, 8, 1)).astype(np.float32)
    g = rng.standard_normal(30).astype(np.float32)
    key = jax.random.PRNGKey(3)
    result = dpmot.samplers.dpm_ot(network, semidiscrete.monge_map(latents, g, block_size=7),
                                   key, 10, (8, 8, 1), 20, 5, "ddim", batch_size=4, eta=1.0)
    flat = latents.reshape(30, -1).astype(np.float64)
    images, indices = [], []
    for k, count in enumerate((4, 4, 2)):
      key_z, key_run = jax.random.split(jax.random.fold_in(key, k))
      # float32 draws as the library's source does, whatever jax_enable_x64 another test left on.
      z = np.asarray(jax.random.normal(key_z, (count, 64), np.float32), np.float64)
      j = np.argmax(g[None] - ((z[:, None] - flat[None]) ** 2).sum(-1), axis=1)
      eps_fn = dpmot.samplers.model_eps_fn(model.apply, params)
      x = dpmot.samplers.ddim(eps_fn, view, latents[j], 5, eta=1.0, key=key_run, start_index=20)
      images.append(np.clip(np.asarray(x.x), -1, 1))
      indices.append(j)
    np.testing.assert_array_equal(result.target_index, np.concatenate(indices))
    np.testing.assert_allclose(result.images, np.concatenate(images), atol=1e-6)
    self.assertEqual(result.nfe, 5)


class ParseMethodTest(absltest.TestCase):

  def test_names_labels_and_switch_steps(self):
    """One spelling per method: config names map to labels, families and switch steps;
    dpm_ot_<k> beyond M + 1 steps or outside the schedule is a ValueError."""
    config = digits_dpmot.get_config()
    method = dpmot.parse_method("dpm_solver_pp_3m_20", config)
    self.assertEqual((method.label, method.num_steps, dict(method.kwargs)),
                     ("DPM-Solver++(3M)-20", 20, {"order": 3, "variant": "dpmsolver++"}))
    self.assertEqual(dpmot.parse_method("dpm_ot_10", config).switch_index, 9)
    ours = dpmot.parse_method("dpm_ot_10_m99", config)
    self.assertEqual((ours.label, ours.switch_index), ("DPM-OT-10 (M=99)", 99))
    with self.assertRaisesRegex(ValueError, "only 10 reverse steps"):
      dpmot.parse_method("dpm_ot_11", config)
    with self.assertRaisesRegex(ValueError, "Unknown method"):
      dpmot.parse_method("dpmot_10", config)

  def test_bad_method_or_overlapping_roles_fail_before_any_work(self):
    """A bad method name, or a reference split that is also the targets, stops the run in
    validation: the workdir stays empty."""
    for edit, pattern in ((lambda c: setattr(c.evaluation, "methods", ("ddim_10", "dpm_ot_50")),
                           "dpm_ot_50"),
                          (lambda c: setattr(c.evaluation, "reference_split", c.dpmot.target_split),
                           "targets and reference")):
      config = helpers.tiny_dpmot(digits_dpmot.get_config())
      edit(config)
      with tempfile.TemporaryDirectory() as workdir:
        with self.assertRaisesRegex(ValueError, pattern):
          dpmot.run(config, workdir)
        self.assertEqual(os.listdir(workdir), [])


class Cifar10FlagshipTest(absltest.TestCase):

  def test_tiny_flagship_run_with_imported_weights(self):
    """configs/cifar10_dpmot.py with tiny overrides, a fake CIFAR-10 folder, a tiny random
    pytorch-fid Inception file and (mocked) diffusers weights runs end to end: the imported
    UNet is sampled as it is (0 training steps although training.num_steps=50, no model
    stage); Inception FID/KID for every row, NFE 10, no classifier keys (no NaN placeholder);
    the weights' fingerprint tells two imported models apart."""
    with tempfile.TemporaryDirectory() as tmp:
      helpers.fake_cifar(tmp, per_batch=8)
      weights = os.path.join(tmp, "fid.pth")
      fake_weights.write_fake_fid_weights(weights)
      folders = [os.path.join(tmp, name) for name in ("ddpm-a", "ddpm-b")]
      for folder in folders:
        os.makedirs(folder)
        open(os.path.join(folder, diffusers_import.WEIGHTS_NAME), "wb").close()
      config = helpers.tiny_dpmot(cifar10_dpmot.get_config())
      config.data.root = tmp
      config.dpmot.target_split = "test[:4]"
      config.training.update(dict(num_steps=50, init_from_diffusers=folders[0]))
      config.evaluation.update(dict(inception_weights=weights, inception_width=fake_weights.WIDTH,
                                    inception_resize=fake_weights.RESIZE, num_samples=8,
                                    batch_size=8, reference_split="test[4:]",
                                    floor_split="train[:8]", max_novelty_images=0))
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
      self.assertEqual(results["num_targets"], 4)
      for row in ("ddim_10", "dpm_ot_10", "copy_machine", "data_floor"):
        self.assertTrue(np.isfinite(results[f"fid_{row}"]), row)
        self.assertTrue(np.isfinite(results[f"kid_{row}"]), row)
      self.assertNotIn("classifier_accuracy", results)
      self.assertNotIn("mmr_dpm_ot_10", results)
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
      proc = helpers.run_main(
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
