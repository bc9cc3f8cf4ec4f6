"""Shared test helpers: a case that runs one experiment per class (float32, temporary
workdir), scripts/main.py in a subprocess, and Python on several virtual CPU devices."""
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import jax

from ddpm_ot_jax.experiments import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args: str, cwd: str = ROOT, timeout: float = 600,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  """`python scripts/main.py *args` in `cwd` (env: extra environment variables); returns the
  finished process (text output)."""
  return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "main.py"), *args],
                        cwd=cwd, capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, **(env or {})))


def run_on_cpu_devices(*args: str, num_devices: int = 4,
                       timeout: float = 300) -> subprocess.CompletedProcess:
  """`python *args` in the repo root (importable) on `num_devices` virtual CPU devices: the
  XLA flag is set before jax starts, and JAX_PLATFORMS=cpu so that an accelerator install
  gets them too. Returns the finished process (text output)."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)


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
