"""Shared test helpers: a case that runs one experiment per class (float32, temporary
workdir), and scripts/main.py in a subprocess."""
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import jax

from ddpm_ot_jax.experiments import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args: str, cwd: str = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
  """`python scripts/main.py *args` in `cwd`; returns the finished process (text output)."""
  return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "main.py"), *args],
                        cwd=cwd, capture_output=True, text=True, timeout=timeout)


class ExperimentRunCase(absltest.TestCase):
  """Subclasses define `run_experiment(cls)` (called once, with `cls.workdir` ready); the
  float64 switch is restored and the workdir removed after the class."""

  @classmethod
  def run_experiment(cls) -> None:
    raise NotImplementedError

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._x64 = jax.config.jax_enable_x64
    common.set_precision(False)
    cls._tmp = tempfile.TemporaryDirectory()
    cls.workdir = cls._tmp.name
    cls.run_experiment()

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    common.set_precision(cls._x64)
    super().tearDownClass()
