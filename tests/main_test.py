"""scripts/main.py end to end: overrides, output files, and one clear message per user error."""
import glob
import importlib
import json
import os
import tempfile
import textwrap

from absl.testing import absltest

from ddpm_ot_jax import config_base
import helpers

_main = helpers.run_main


class MainTest(absltest.TestCase):

  def test_gaussian_run_writes_results_config_and_figure(self):
    """A small gaussian_ot run (overrides from the CLI) writes the documented outputs.

    It also checks the issue's quality bar at d = 64 scale-down: encoder vs closed form
    ≤ 1e-6 and a symmetric Jacobian, in float64.
    """
    with tempfile.TemporaryDirectory() as workdir:
      proc = _main("--config=configs/gaussian_ot.py", "--config.dims=16", "--config.num_samples=64",
                   "--config.num_jacobian_points=2", f"--workdir={workdir}")
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
      with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
      with open(os.path.join(workdir, "config.json")) as f:
        self.assertEqual(json.load(f)["dims"], 16)
      self.assertTrue(os.path.exists(os.path.join(workdir, "fig1_gaussian_flow.png")))
      for key in ("max_abs_err_vs_closed_form", "ot_relative_error", "identity_fraction",
                  "jacobian_asymmetry_max", "nfe_mean", "seconds"):
        self.assertIsInstance(results[key], (int, float), key)
      self.assertLess(results["max_abs_err_vs_closed_form"], 1e-6)
      self.assertLess(results["jacobian_asymmetry_max"], 1e-8)
      self.assertEqual(results["identity_fraction"], 1.0)

  def test_misspelt_key_names_valid_keys(self):
    """A misspelt override stops with exit code 2, one message listing the valid keys, no traceback."""
    proc = _main("--config=configs/gaussian_ot.py", "--config.dimz=3")
    self.assertEqual(proc.returncode, 2)
    self.assertIn("Valid keys of gaussian_ot.py", proc.stderr)
    self.assertIn('"dims"', proc.stderr)
    self.assertNotIn("Traceback", proc.stderr)

  def test_incomplete_run_of_several_processes_is_one_line(self):
    """DDPM_OT_NUM_PROCESSES=2 without the coordinator's address and the process index: exit
    code 2 and one line naming both, before anything is created or computed."""
    with tempfile.TemporaryDirectory() as root:
      workdir = os.path.join(root, "run")
      proc = _main("--config=configs/gaussian_ot.py", f"--workdir={workdir}",
                   env={"DDPM_OT_NUM_PROCESSES": "2"})
      self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
      self.assertIn("error: cannot join the run of several processes: DDPM_OT_NUM_PROCESSES=2 "
                    "but DDPM_OT_COORDINATOR_ADDRESS, DDPM_OT_PROCESS_ID unset.", proc.stderr)
      self.assertNotIn("Traceback", proc.stderr)
      self.assertFalse(os.path.exists(workdir))

  def test_default_config_loads_from_any_directory(self):
    """With no --config, main.py loads configs/digits_dpmot.py (which imports another config)
    from any working directory: a misspelt override of it names its valid keys."""
    with tempfile.TemporaryDirectory() as cwd:
      proc = _main("--config.evaluation.num_sampels=3", cwd=cwd)
    self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
    self.assertIn("Valid keys of digits_dpmot.py", proc.stderr)
    self.assertIn("evaluation.num_samples", proc.stderr)
    self.assertNotIn("Traceback", proc.stderr)

  def test_bad_value_and_missing_config_are_clear(self):
    """A wrongly typed value, a bad value caught by the experiment and a missing config file."""
    proc = _main("--config=configs/gaussian_ot.py", "--config.dims=abc")
    self.assertEqual(proc.returncode, 2)
    self.assertIn("invalid literal", proc.stderr)
    proc = _main("--config=configs/nope.py")
    self.assertEqual(proc.returncode, 2)
    self.assertIn("gaussian_ot.py", proc.stderr)
    with tempfile.TemporaryDirectory() as workdir:
      proc = _main("--config=configs/gaussian_ot.py", "--config.solver.solver=euler", f"--workdir={workdir}")
      self.assertEqual(proc.returncode, 2)
      self.assertIn("Unknown ODE solver 'euler'", proc.stderr)
      self.assertNotIn("Traceback", proc.stderr)
      self.assertFalse(os.path.exists(os.path.join(workdir, "results.json")))
      self.assertFalse(os.path.exists(os.path.join(workdir, "config.json")))


class ConfigFieldsTest(absltest.TestCase):
  """Every config field is read by its experiment, and main.py refuses one that is not."""

  def test_every_config_carries_only_fields_its_experiment_reads(self):
    """configs/*.py: no top-level field outside the experiment's CONFIG_FIELDS (and the
    shared experiment/seed/x64); a dead field would make its override a silent no-op."""
    paths = sorted(glob.glob(os.path.join(helpers.ROOT, "configs", "*.py")))
    checked = 0
    for path in paths:
      module = importlib.import_module(f"configs.{os.path.basename(path)[:-3]}")
      if not hasattr(module, "get_config"):
        continue
      config = module.get_config()
      experiment = importlib.import_module(f"ddpm_ot_jax.experiments.{config.experiment}")
      self.assertEqual(config_base.unread_fields(config, experiment.CONFIG_FIELDS), [], path)
      checked += 1
    self.assertGreaterEqual(checked, 14)

  def test_no_config_borrows_a_training_field_its_experiment_ignores(self):
    """latent_ot / shared_latents take imported weights from a model spec (source='diffusers'),
    so their configs carry no training.init_from_diffusers (an override of it would be a
    silent no-op); the experiments that do read it (train_ddpm, dpmot, likelihood) keep it."""
    readers = {"train_ddpm", "dpmot", "likelihood"}
    for path in sorted(glob.glob(os.path.join(helpers.ROOT, "configs", "*.py"))):
      module = importlib.import_module(f"configs.{os.path.basename(path)[:-3]}")
      if not hasattr(module, "get_config"):
        continue
      config = module.get_config()
      if "training" in config:
        self.assertEqual("init_from_diffusers" in config.training,
                         config.experiment in readers, path)

  def test_override_or_field_the_experiment_does_not_read_is_refused(self):
    """--config.sampling.num_steps=10 with the DPM-OT config (which has no sampling block)
    stops with exit code 2 and no traceback; a config file that adds a block the experiment
    never reads stops naming that block, before any work (the workdir it made is removed)."""
    proc = _main("--config=configs/digits_dpmot.py", "--config.sampling.num_steps=10")
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertNotIn("Traceback", proc.stderr)
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "dead_field.py")
      with open(path, "w") as f:
        f.write(textwrap.dedent("""
            import ml_collections
            from configs import digits_dpmot

            def get_config():
              config = digits_dpmot.get_config()
              config.sampling = ml_collections.ConfigDict(dict(num_steps=10))
              return config
            """))
      workdir = os.path.join(tmp, "run")
      proc = _main(f"--config={path}", f"--workdir={workdir}")
      self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
      self.assertIn("does not read: sampling", proc.stderr)
      self.assertNotIn("Traceback", proc.stderr)
      self.assertFalse(os.path.exists(workdir))


if __name__ == "__main__":
  absltest.main()
