"""The shared default every config in configs/ starts from, and the check that a config
carries, and a command line overrides, only fields its experiment reads."""
from __future__ import annotations

from collections.abc import Iterable

import ml_collections

# Fields every run has: read by scripts/main.py (experiment, x64) and every experiment (seed).
BASE_FIELDS = ("experiment", "seed", "x64")


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


def is_read(key: str, fields: Iterable[str]) -> bool:
  """Whether the dotted `key` (e.g. 'dpmot.ot.learning_rate') lies under one of the dotted
  `fields` an experiment reads (or `BASE_FIELDS`)."""
  return any(key == f or key.startswith(f + ".") for f in (*BASE_FIELDS, *fields))


def unread_fields(config: ml_collections.ConfigDict, fields: Iterable[str]) -> list[str]:
  """The top-level fields of `config` its experiment does not read (dead fields)."""
  fields = tuple(fields)
  return sorted(k for k in config.keys() if not is_read(k, fields))
