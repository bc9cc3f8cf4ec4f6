"""experiments/common.py: results files are valid JSON and writes are atomic."""
import json
import os
import tempfile

from absl.testing import absltest
import numpy as np

from ddpm_ot_jax.experiments import common


class WriteJsonTest(absltest.TestCase):

  def test_numpy_values_and_non_finite_numbers(self):
    """numpy scalars/arrays become plain numbers and lists; NaN and ±Inf become null, so the
    file parses under strict JSON (no 'NaN' tokens)."""
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "r.json")
      common.write_json(path, {"a": np.float32(1.5), "b": np.array([1, 2]), "c": float("nan"),
                               "d": [np.inf, -1.0], "e": np.int64(3), "f": np.bool_(True)})
      with open(path) as f:
        text = f.read()
      self.assertNotIn("NaN", text)
      self.assertNotIn("Infinity", text)
      loaded = json.loads(text, parse_constant=lambda c: self.fail(f"non-JSON constant {c}"))
    self.assertEqual(loaded, {"a": 1.5, "b": [1, 2], "c": None, "d": [None, -1.0], "e": 3,
                              "f": True})

  def test_failed_write_keeps_the_old_file(self):
    """An object that cannot be serialised leaves the previous file intact and no temp file."""
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "r.json")
      common.write_json(path, {"x": 1})
      with self.assertRaises(TypeError):
        common.write_json(path, {"x": object()})
      with open(path) as f:
        self.assertEqual(json.load(f), {"x": 1})
      self.assertEqual(os.listdir(d), ["r.json"])


class ProgressBarTest(absltest.TestCase):

  def test_fill_is_proportional_and_clamped(self):
    """Filled cells are floor(done · width / total), never more than the width."""
    self.assertEqual(common.progress_bar(0, 150), "[" + "." * 20 + "]")
    self.assertEqual(common.progress_bar(75, 150), "[" + "#" * 10 + "." * 10 + "]")
    self.assertEqual(common.progress_bar(149, 150, width=10), "[" + "#" * 9 + "." + "]")
    self.assertEqual(common.progress_bar(200, 150, width=4), "[####]")


class ScheduleAndEndTest(absltest.TestCase):

  def test_end_is_the_ou_time_and_too_late_names_the_keys(self):
    """The returned t_end has OU time s(t_end) = config.t_end on every schedule that reaches
    it; a schedule that ends before it is a ValueError naming config.t_end."""
    import ml_collections  # pylint: disable=g-import-not-at-top
    from ddpm_ot_jax import sde  # pylint: disable=g-import-not-at-top

    for name, t_end in (("constant", 12.0), ("linear", 3.0), ("cosine", 2.0)):
      config = ml_collections.ConfigDict(dict(schedule=name, t_end=t_end))
      schedule, end = common.schedule_and_end(config)
      self.assertAlmostEqual(float(sde.ou_time(schedule, end)), t_end, places=5)
    with self.assertRaisesRegex(ValueError, "config.t_end"):
      common.schedule_and_end(ml_collections.ConfigDict(dict(schedule="linear", t_end=10.0)))


if __name__ == "__main__":
  absltest.main()
