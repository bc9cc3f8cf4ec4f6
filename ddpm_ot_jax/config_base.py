"""The shared default every config in configs/ starts from."""
from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
  """Fields every experiment has; each config adds its own and sets `experiment`.

  experiment: module name in ddpm_ot_jax.experiments that runs this config.
  seed: the one PRNG seed every random draw of the run derives from.
  x64: run in float64 (theory experiments); networks train in float32.
  """
  config = ml_collections.ConfigDict()
  config.experiment = ""
  config.seed = 0
  config.x64 = False
  return config
