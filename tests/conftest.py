"""Test-wide setup: the repo root on sys.path (configs/ is imported by path), no GPU memory
preallocation, so that the two pytest-xdist workers can share an accelerator, and float64
put back after every test.

float64 is switched per class (helpers.Float64TestCase) or per block (helpers.float64), never
at import; the fixture below also undoes a switch that a test left behind (the theory
experiments' run() turns float64 on for the process), so that no test's precision depends
on which tests ran before it in the same worker."""
import os
import sys

import pytest

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _float64_restored_after_each_test():
  """jax_enable_x64 as it was before the test (its class's setting) once the test is over."""
  import jax  # pylint: disable=g-import-not-at-top

  previous = jax.config.jax_enable_x64
  yield
  if jax.config.jax_enable_x64 != previous:
    jax.config.update("jax_enable_x64", previous)
