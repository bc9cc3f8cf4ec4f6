"""Cached stages of a long run: recompute a stage only when its inputs changed.

A stage's inputs are a JSON-able dict (the config fields it reads plus the fingerprints of
the stages it consumes). Its fingerprint is the SHA-256 of that dict; the stage's files live
under <workdir>/<stage>-<fingerprint[:12]>/ or carry the fingerprint inside them, so a
changed input never silently reuses an old result and never overwrites it either.

Several processes: the workdir must be one folder they all see (a shared file system, as
orbax needs too). A stage is reused only when every process finds it (`distributed.
all_processes`), else every process computes it, so all take the same branch and make the
same collective calls; stage computations give the same arrays in every process (samples are
gathered to all), and process 0 alone writes them. The others do not wait for the write:
they already hold the arrays.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

import numpy as np

from ddpm_ot_jax import distributed
from ddpm_ot_jax.experiments import common


def fingerprint(inputs: Any) -> str:
  """SHA-256 of the canonical JSON of `inputs` (ConfigDicts via to_dict())."""

  def plain(value):
    if hasattr(value, "to_dict"):
      value = value.to_dict()
    if isinstance(value, dict):
      return {str(k): plain(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
      return [plain(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
      return value.item()
    return value

  blob = json.dumps(plain(inputs), sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()


def stage_dir(workdir: str, name: str, fp: str) -> str:
  """<workdir>/<name>-<fp[:12]>: the folder of one version of a stage."""
  return os.path.join(workdir, f"{name}-{fp[:12]}")


def cached_arrays(path: str, fp: str, compute: Callable[[], dict[str, np.ndarray]]
                  ) -> tuple[dict[str, np.ndarray], bool]:
  """Loads the arrays at `path` if they were written for fingerprint `fp` (and every process
  finds them), else computes, writes (process 0, atomically, fingerprint inside) and returns
  them. Returns (arrays, was_cached).
  """
  stored = _load_arrays(path, fp)
  if distributed.all_processes(stored is not None):
    return stored, True
  arrays = compute()
  common.save_npz(path, _fingerprint=np.array(fp), **arrays)
  return arrays, False


def _load_arrays(path: str, fp: str) -> dict[str, np.ndarray] | None:
  """The arrays at `path` if they were written for fingerprint `fp`; None otherwise
  (missing, unreadable or foreign: recomputed and written atomically beside it)."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as stored:
      if str(stored["_fingerprint"]) == fp:
        return {k: stored[k] for k in stored.files if k != "_fingerprint"}
  except (OSError, ValueError, KeyError):
    pass
  return None
