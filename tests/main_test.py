"""scripts/main.py end to end: overrides, output files, and one clear message per user error."""
import json
import os
import tempfile

from absl.testing import absltest

import experiment_case

_main = experiment_case.run_main


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


if __name__ == "__main__":
  absltest.main()
