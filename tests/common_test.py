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


if __name__ == "__main__":
  absltest.main()
