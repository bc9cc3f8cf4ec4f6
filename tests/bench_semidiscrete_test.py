"""scripts/bench_semidiscrete.py: the reference's doubling rule, ours = the library's solver, and
a tiny end-to-end run through the config flag (stops at the first check under the χ² target,
ratios are those of the reported runs)."""
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np

import jax
import jax.numpy as jnp

from ddpm_ot_jax import semidiscrete

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_ROOT, "scripts", "bench_semidiscrete.py")


def _load_bench():
  spec = importlib.util.spec_from_file_location("bench_semidiscrete", _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


bench = _load_bench()


class DoublingRuleTest(absltest.TestCase):

  def test_doubles_after_more_than_50_bad_steps_at_most_3_times(self):
    rule = bench.SampleDoubling(patience=50, max_doublings=3)
    # A flat ‖∇E‖: equal is not an improvement (the authors' strict <).
    doubled = [step for step in range(1, 1001) if rule.update(1.0)]
    self.assertEqual(doubled, [52, 104, 156])
    self.assertEqual(rule.doublings, 3)

  def test_improvement_resets_the_count(self):
    rule = bench.SampleDoubling(patience=50, max_doublings=3)
    norms = [1.0] * 40 + [0.5] + [1.0] * 50  # 50 bad steps after the improvement: not > 50
    self.assertFalse(any(rule.update(x) for x in norms))
    self.assertTrue(rule.update(1.0))


class ChiSquareTest(absltest.TestCase):

  def test_unbiased_chi2_is_otts_estimator(self):
    rng = np.random.default_rng(0)
    n, s = 7, 500
    counts = np.bincount(rng.integers(0, n, s), minlength=n)
    plug_in = n * np.sum((counts / s - 1.0 / n) ** 2)
    ott_estimate = n * np.sum(counts * (counts - 1.0)) / (s * (s - 1.0)) - 1.0
    self.assertAlmostEqual(bench.unbiased_chi2(plug_in, n, s), ott_estimate, places=12)


class OursIsTheLibrarySolverTest(absltest.TestCase):

  def test_bench_driver_matches_solve_potential(self):
    """The bench's chunked ott driver (eval every 10 steps) returns solve_potential's g."""
    n, d, iters, batch, lr = 12, 3, 20, 64, 0.05
    targets = np.asarray(jax.random.normal(jax.random.key(3), (n, d)))
    key = jax.random.key(7)
    g_lib, _ = semidiscrete.solve_potential(
        key, jnp.asarray(targets), "uniform", num_iterations=iters, batch_size=batch,
        learning_rate=lr, error_eval_every=iters, stop_early=False,
        g_init=jnp.zeros(n))
    judge = bench.Judge(targets, jax.random.key(0), 4096, -1.0, "uniform", 2048)  # never reached
    result = bench.run_ott(targets, np.zeros(n, np.float32), judge, key, learning_rate=lr,
                           max_iterations=iters, batch_size=batch, potential_ema=0.99,
                           eval_every=10, log=False)
    self.assertEqual(result.iterations, iters)
    g_bench = result.extra["g"] - np.mean(result.extra["g"])
    np.testing.assert_allclose(g_bench, np.asarray(g_lib), atol=1e-5)


class TinyBenchTest(absltest.TestCase):

  def test_both_reach_the_target_and_ratios_are_those_of_the_runs(self):
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "bench.json")
      proc = subprocess.run(
          [sys.executable, _SCRIPT, "--config.problems=digits", "--config.digits.num_targets=24",
           "--config.num_seeds=3", "--config.ott.learning_rates=(0.05,0.2)",
           "--config.ott.max_iterations=600", "--config.reference.learning_rates=(0.05,)",
           "--config.reference.max_iterations=600", "--config.source=uniform",
           f"--config.out={out}"],
          cwd=_ROOT, capture_output=True, text=True, timeout=600)
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
      self.assertIn("Reference / ott: time", proc.stdout)
      with open(out) as f:
        result = json.load(f)
    p = result["problems"]["digits"]
    target = result["config"]["chi2_target"]
    self.assertTrue(p["ratio_is_at_equal_accuracy"])
    for solver, s in p["solvers"].items():
      self.assertLen(s["runs"], 3)
      reached = [r for r in s["sweep"] if r["reached"]]
      self.assertEqual(s["learning_rate"], min(reached, key=lambda r: r["seconds"])["learning_rate"])
      for r in s["runs"]:
        self.assertTrue(r["reached"], (solver, r["seed"]))
        self.assertEqual(r["learning_rate"], s["learning_rate"])
        history = [h[2] for h in r["history"]]
        # Checked every 10 iterations; stopped at the first check under the target.
        self.assertEqual([h[0] for h in r["history"]],
                         list(range(10, r["iterations"] + 1, 10)))
        self.assertLessEqual(history[-1], target)
        self.assertTrue(all(c > target for c in history[:-1]))
        if solver == "reference":
          self.assertLessEqual(r["extra"]["doublings"], 3)
    ott_runs, ref_runs = p["solvers"]["ott"]["runs"], p["solvers"]["reference"]["runs"]
    ratios = [r["seconds"] / o["seconds"] for o, r in zip(ott_runs, ref_runs)]
    np.testing.assert_allclose(p["time_ratio_reference_over_ott"]["per_seed"], ratios)
    self.assertAlmostEqual(p["time_ratio_reference_over_ott"]["median"],
                           statistics.median(ratios))
    self.assertAlmostEqual(p["time_ratio_reference_over_ott"]["min"], min(ratios))
    iters = [r["iterations"] / o["iterations"] for o, r in zip(ott_runs, ref_runs)]
    self.assertAlmostEqual(p["iteration_ratio_reference_over_ott"]["median"],
                           statistics.median(iters))


if __name__ == "__main__":
  absltest.main()
