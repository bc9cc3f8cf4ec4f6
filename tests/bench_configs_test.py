"""Every configs/bench/*.py loads, and its benchmark script reads it through scripts/cli.py:
a bad key (or an old-style flag) is one error line listing the config's valid keys (exit
code 2, no traceback). No benchmark runs."""
import glob
import os
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized
from ml_collections import config_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "scripts"))
import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIGS = sorted(glob.glob(os.path.join(_ROOT, "configs", "bench", "*.py")))
_NAMES = [os.path.basename(p)[:-len(".py")] for p in _CONFIGS if not p.endswith("__init__.py")]


def _load(name):
  return config_flags.config_flags._LoadConfigModule(  # pylint: disable=protected-access
      f"bench_{name}_config", os.path.join(_ROOT, "configs", "bench", f"{name}.py")).get_config()


def _run(name, *args):
  script = os.path.join(_ROOT, "scripts", f"bench_{name}.py")
  return subprocess.run([sys.executable, script, *args], cwd=_ROOT, capture_output=True,
                        text=True, timeout=300)


class BenchConfigsTest(parameterized.TestCase):

  def test_every_bench_script_has_a_config_and_back(self):
    scripts = sorted(os.path.basename(p)[len("bench_"):-len(".py")]
                     for p in glob.glob(os.path.join(_ROOT, "scripts", "bench_*.py")))
    self.assertEqual(scripts, sorted(_NAMES))

  @parameterized.parameters(*_NAMES)
  def test_config_loads_with_an_out_path(self, name):
    config = _load(name)
    self.assertIn("out", config)
    self.assertTrue(config.out.endswith(".json"), config.out)

  @parameterized.parameters(*_NAMES)
  def test_bad_key_is_one_line_with_the_valid_keys(self, name):
    self._assert_one_line_error(name, _run(name, "--config.nonexistent=1"))

  def test_an_old_flag_is_refused_the_same_way(self):
    # bench_train's --configs became --config.configs (bench_train imports jax only in main).
    self._assert_one_line_error("train", _run("train", "--configs=digits"))

  def _assert_one_line_error(self, name, proc):
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertNotIn("Traceback", proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    self.assertLen(errors, 1, proc.stderr)
    self.assertIn("bad config override", errors[0])
    keys = cli.config_keys(_load(name))
    self.assertIn(f"Valid keys of {name}.py: {', '.join(keys)}", proc.stderr)
    self.assertEqual(proc.stdout, "")


if __name__ == "__main__":
  absltest.main()
