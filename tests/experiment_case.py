"""A test case that runs one experiment per class, in float32, in a temporary workdir."""
import tempfile

from absl.testing import absltest
import jax

from ddpm_ot_jax.experiments import common


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
