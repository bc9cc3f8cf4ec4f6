"""scripts/bench_reliability.py in small: 3 kill-and-resume runs of a tiny digits DDPM (a kill
inside an asynchronous checkpoint write, one between an atomic file's write and its rename,
one at a seeded random moment) are bit-identical to the uninterrupted run and leave no
half-written or stray file; 10 cheap bad inputs each end in one 'error:' line. The full
harness (20 kills incl. the DPM-OT stages, 36 bad inputs) is the benchmark."""
import importlib.util
import os
import sys
import tempfile

from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
  spec = importlib.util.spec_from_file_location(
      "bench_reliability", os.path.join(ROOT, "scripts", "bench_reliability.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


class ReliabilityTest(absltest.TestCase):

  def test_kills_resume_bit_identical_and_bad_inputs_fail_cleanly(self):
    bench = _bench()
    with tempfile.TemporaryDirectory() as root:
      report = bench.run_harness(
          root, kills=3, cases="quick", seed=0, log=lambda s: None, ddpm_steps=20, jobs=1,
          targeted=(("ddpm", "checkpoint_save@2"), ("ddpm", "atomic_write@2")))
    summary = report["kill_summary"]
    self.assertEqual(summary["runs"], 3)
    self.assertEqual(summary["killed"], 3, report["kill_runs"])
    self.assertEqual(summary["resumes_completed"], 3, report["kill_runs"])
    self.assertEqual(summary["bit_identical"], 3, report["kill_runs"])
    self.assertEqual(summary["half_written"], 0, report["kill_runs"])
    self.assertEqual(summary["left_behind"], 0, report["kill_runs"])
    self.assertEqual(summary["crashes_on_restart"], 0, report["kill_runs"])
    self.assertLen(report["bad_inputs"], 10)
    for case in report["bad_inputs"]:
      self.assertTrue(case["ok"], case)


if __name__ == "__main__":
  absltest.main()
