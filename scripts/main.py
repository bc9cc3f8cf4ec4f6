r"""Runs one experiment from an ml_collections config.

  python scripts/main.py --config=configs/gaussian_ot.py --config.dims=64 --workdir=runs/g

Writes <workdir>/results.json (flat, named numbers), <workdir>/config.json and the
experiment's figures (PNG) and arrays (.npz). --workdir defaults to runs/<config name>.

Several processes (hosts) as one run: start this same command once per process with
DDPM_OT_NUM_PROCESSES=P, DDPM_OT_PROCESS_ID=p (0 … P − 1) and
DDPM_OT_COORDINATOR_ADDRESS=host:port (process 0's host and a free port) in the environment,
or, on TPU pods and SLURM / Open MPI clusters where jax finds the run itself, with
--config.training.distributed=True. The run is joined here, before anything touches jax
devices (`ddpm_ot_jax.distributed.initialize`); the experiments never read the environment.
Only process 0 logs progress and writes files; all processes end together (a barrier).
"""
from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

import cli  # scripts/cli.py: the config flag shared with the benchmarks

_REPO = cli.REPO  # on sys.path: configs import each other (`from configs import digits_ddpm`)
_DEFAULT_CONFIG = os.path.join(_REPO, "configs", "digits_dpmot.py")  # the offline default run

_CONFIG = cli.define_config_flag(_DEFAULT_CONFIG, "Path to a config file in configs/.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default: runs/<config name>).")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the full traceback of user errors.")

# Errors a user can cause (bad config value, missing data or checkpoint): one clear message.
_USER_ERRORS = (ValueError, OSError, KeyError, TypeError)  # OSError: files, disk, permissions


# The workdir when this run created it: a run that fails removes it again if it holds no file.
_created_workdir: str | None = None


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  _remove_if_empty(_created_workdir)
  sys.exit(2)


def _remove_if_empty(workdir: str | None) -> None:
  """Removes `workdir` when it and its subfolders hold no file (nothing to lose)."""
  if not workdir or not os.path.isdir(workdir):
    return
  for dirpath, _, filenames in os.walk(workdir):
    if filenames:
      return
  shutil.rmtree(workdir, ignore_errors=True)


def _make_workdir(workdir: str) -> None:
  """Creates `workdir` (remembered for `_fail`) and checks that it takes files; one message
  otherwise (a file of that name, a read-only place)."""
  global _created_workdir
  existed = os.path.isdir(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    if not existed:
      _created_workdir = workdir
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    what = ("is a file, not a folder" if os.path.isfile(workdir) else
            f"cannot be written ({e.strerror or type(e).__name__})")
    _fail(f"workdir {workdir!r} {what}; pass --workdir=<a writable folder>.")


def _config_path(argv: list[str]) -> str:
  return cli.config_path(argv, _DEFAULT_CONFIG)


_override_keys = cli.override_keys
_parse_flags = cli.flags_parser(_DEFAULT_CONFIG)


def _join_run(config) -> None:
  """Joins the run of several processes named by the environment (`distributed.ENV_*`), or
  the one jax detects itself when config.training.distributed is set; a single process
  otherwise. Errors (a missing variable, the coordinator's port in use) end in one line."""
  from ddpm_ot_jax import distributed  # pylint: disable=g-import-not-at-top

  try:
    args = distributed.args_from_env(os.environ)
    if args["num_processes"] == 1 and config.get("training", {}).get("distributed", False):
      args = {}  # TPU pods, SLURM, Open MPI: jax finds the coordinator and the processes
    distributed.initialize(**args)
  except (ValueError, RuntimeError) as e:
    _fail(f"cannot join the run of several processes: {e}")
  if not distributed.is_chief():
    logging.set_verbosity(logging.WARNING)  # progress lines come from process 0


def main(argv: list[str]) -> None:
  del argv  # only the program name: `cli.flags_parser` refuses any other argument
  config = _CONFIG.value
  config_name = os.path.splitext(os.path.basename(_config_path(sys.argv)))[0]
  workdir = _WORKDIR.value or os.path.join("runs", config_name)
  _join_run(config)  # before anything touches jax devices

  from ddpm_ot_jax import distributed  # pylint: disable=g-import-not-at-top
  from ddpm_ot_jax.experiments import common  # pylint: disable=g-import-not-at-top

  if distributed.is_chief():
    _make_workdir(workdir)
    common.remove_temporaries(workdir)  # left by a run killed mid-write
  else:
    os.makedirs(workdir, exist_ok=True)

  if not config.get("experiment"):
    _fail(f"config {config_name} does not name an experiment (config.experiment).")
  try:
    experiment = importlib.import_module(f"ddpm_ot_jax.experiments.{config.experiment}")
  except ModuleNotFoundError as e:
    if e.name != f"ddpm_ot_jax.experiments.{config.experiment}":
      raise
    _fail(f"unknown experiment {config.experiment!r} in config {config_name}.")

  from ddpm_ot_jax import config_base  # pylint: disable=g-import-not-at-top

  fields = experiment.CONFIG_FIELDS
  dead = config_base.unread_fields(config, fields)
  if dead:
    _fail(f"config {config_name} has fields the {config.experiment} experiment does not read: "
          f"{', '.join(dead)}. Remove them (it reads {', '.join(fields)}).")
  for key in _override_keys(sys.argv[1:]):
    if not config_base.is_read(key, fields):
      _fail(f"--config.{key}: the {config.experiment} experiment does not read this field, so "
            f"the override would be ignored. It reads: {', '.join(config_base.BASE_FIELDS + tuple(fields))}.")

  logging.info("Running %s (experiment %s) in %s with config:\n%s", config_name,
               config.experiment, workdir, config)
  common.set_precision(config.get("x64", False))
  start = time.perf_counter()
  try:
    results = experiment.run(config, workdir)
  except _USER_ERRORS as e:
    if _TRACEBACK.value:
      raise
    _fail(f"{type(e).__name__}: {e}\n(run with --traceback for the full trace)")
  results = dict(results)
  results.setdefault("seconds_total", time.perf_counter() - start)
  # Written together at the end, so a failed run never leaves a config.json that does not
  # belong to the results.json beside it.
  common.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  common.write_json(os.path.join(workdir, "results.json"), results)
  # Processes exit together: jax aborts all of them when they exit further apart than its
  # shutdown timeout (process 0 was writing while the others had finished).
  distributed.barrier("scripts/main.py: end")
  if not distributed.is_chief():
    return
  print(f"Wrote {os.path.join(workdir, 'results.json')}")
  for key in sorted(results):
    value = results[key]
    if isinstance(value, bool) or isinstance(value, int):
      print(f"  {key:40s} {int(value):d}")
    elif isinstance(value, float):
      print(f"  {key:40s} {value:.6g}")


if __name__ == "__main__":
  os.environ.setdefault("MPLBACKEND", "Agg")  # figures go to files; no display needed
  app.run(main, flags_parser=_parse_flags)
