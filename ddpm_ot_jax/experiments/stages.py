"""Cached stages of a long run: recompute a stage only when its inputs changed.

A stage's inputs are a JSON-able dict (the config fields it reads plus the fingerprints of
the stages it consumes). Its fingerprint is the SHA-256 of that dict; the stage's files live
under <workdir>/<stage>-<fingerprint[:12]>/ or carry the fingerprint inside them, so a
changed input never silently reuses an old result and never overwrites it either.

`model_folder` / `load_model`: a trained DDPM as a cached stage, named by the fingerprint of
its training inputs.

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

from absl import logging
import jax
import ml_collections
import numpy as np

from ddpm_ot_jax import distributed
from ddpm_ot_jax import model_sources
from ddpm_ot_jax.experiments import common

# Stream derived from a model's seed: the init of a restored checkpoint's abstract target.
RESTORE_STREAM = 22


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


def stage_dir(workdir: str, name: str, digest: str) -> str:
  """<workdir>/<name>-<digest[:12]>: the folder of one version of a stage."""
  return os.path.join(workdir, f"{name}-{digest[:12]}")


def cached_arrays(path: str, digest: str, compute: Callable[[], dict[str, np.ndarray]]
                  ) -> tuple[dict[str, np.ndarray], bool]:
  """Loads the arrays at `path` if they were written for fingerprint `digest` (and every process
  finds them), else computes, writes (process 0, atomically, fingerprint inside) and returns
  them. Returns (arrays, was_cached).
  """
  stored = _load_arrays(path, digest)
  if distributed.all_processes(stored is not None):
    return stored, True
  arrays = compute()
  common.save_npz(path, _fingerprint=np.array(digest), **arrays)
  return arrays, False


def _load_arrays(path: str, digest: str) -> dict[str, np.ndarray] | None:
  """The arrays at `path` if they were written for fingerprint `digest`; None otherwise
  (missing, unreadable or foreign: recomputed and written atomically beside it)."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as stored:
      if str(stored["_fingerprint"]) == digest:
        return {k: stored[k] for k in stored.files if k != "_fingerprint"}
  except (OSError, ValueError, KeyError):
    pass
  return None


def model_folder(config: ml_collections.ConfigDict, workdir: str,
                 spec: ml_collections.ConfigDict) -> str:
  """<models_dir>/<what it is trained on>-<fingerprint[:8]>, e.g. models/digits-c01234-1f0e9a2b
  (`model_sources.folder_name`; the fingerprint covers every input of the training run,
  `model_sources.training_inputs`). models_dir is config.models_dir, or <workdir>/models when
  empty: experiments given the same models_dir share models with equal specs."""
  cfg = model_sources.model_config(config, spec)
  root = config.get("models_dir") or os.path.join(workdir, "models")
  name = model_sources.folder_name(cfg, spec)
  return os.path.join(root, name + "-" + fingerprint(model_sources.training_inputs(cfg, spec))[:8])


def load_model(config: ml_collections.ConfigDict, name: str, spec: ml_collections.ConfigDict,
               workdir: str, shape: tuple[int, ...]) -> model_sources.LoadedModel:
  """`model_sources.load_model` for `config.models.<name>`: a source='train' model is trained
  (or resumed, or found finished) in `model_folder(config, workdir, spec)` with the
  experiments' progress log and metrics (`common.training_hooks`); a changed input trains a
  new model beside the old one."""
  directory = model_folder(config, workdir, spec)
  if spec.source == "train":
    logging.info("Model '%s': training → %s", name, directory)
  init_key = jax.random.fold_in(
      jax.random.PRNGKey(model_sources.model_config(config, spec).seed), RESTORE_STREAM)
  loaded = model_sources.load_model(config, name, spec, shape, directory, init_key,
                                    common.training_hooks(directory))
  logging.info("Model '%s' (%s): %d steps, from %s.", name, spec.source, loaded.steps,
               loaded.directory)
  return loaded
