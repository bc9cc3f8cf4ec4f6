"""What every experiment needs: atomic file writes, figures, float64 switch, timing, the
theory experiments' end time (`schedule_and_end`), and the training loop's reporting
(progress lines, metrics.jsonl, sample grids).

In a run of several processes (scripts/main.py joins them, `distributed.initialize`) every
process computes everything, and only process 0 writes files: the writers here (`write_json`,
`write_text`, `write_bytes`, `save_npz`, `save_figure`, `save_image_grid`, the training hooks)
return without writing in the other processes. orbax checkpoints are the exception: every
process calls their save and restore (orbax writes from the primary host).
"""
from __future__ import annotations

import contextlib
import json
import logging as logging_std
import os
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any, Iterator

from absl import logging
import jax
import numpy as np

from ddpm_ot_jax import checkpoints
from ddpm_ot_jax import distributed
from ddpm_ot_jax import plotting
from ddpm_ot_jax import sde
from ddpm_ot_jax import trainer

if TYPE_CHECKING:
  import matplotlib.figure


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read (and restored): the mode a plain open() would give new files


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path beside `path`; renames it onto `path` only on success.

  A crash mid-write leaves the previous file (if any) untouched.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  suffix = os.path.splitext(path)[1]
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
  os.close(fd)
  os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make every result file private
  try:
    yield tmp
    checkpoints.fault_point("atomic_write")  # written, not yet renamed
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def remove_temporaries(workdir: str) -> list[str]:
  """Deletes the `atomic_path` temporaries (.tmp-*) under `workdir` that a killed run left;
  returns their paths. Only while no other run writes there (scripts/main.py, at the start)."""
  removed = []
  for dirpath, _, filenames in os.walk(workdir):
    for name in filenames:
      if name.startswith(".tmp-"):
        path = os.path.join(dirpath, name)
        os.remove(path)
        removed.append(path)
  if removed:
    logging.info("Removed %d temporary file(s) a killed run left: %s", len(removed),
                 ", ".join(removed))
  return removed


def _to_jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_jsonable(v) for v in value]
  if isinstance(value, (np.ndarray, jax.Array)):
    return _to_jsonable(np.asarray(value).tolist())
  if isinstance(value, (np.floating, np.integer, np.bool_)):
    value = value.item()
  if isinstance(value, float) and not np.isfinite(value):
    return None  # JSON has no NaN/Inf: an undefined number is null
  return value


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` (numpy/jax values converted, NaN/Inf as null) as indented JSON, atomically
  (process 0 only)."""
  write_text(path, json.dumps(_to_jsonable(obj), indent=2, sort_keys=True, allow_nan=False)
             + "\n")


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path`, atomically (process 0 only)."""
  write_bytes(path, text.encode())


def write_bytes(path: str, blob: bytes) -> None:
  """Writes `blob` to `path`, atomically (process 0 only)."""
  if not distributed.is_chief():
    return
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(blob)


def save_npz(path: str, **arrays: Any) -> None:
  """Saves arrays to a compressed .npz, atomically (process 0 only)."""
  if not distributed.is_chief():
    return
  with atomic_path(path) as tmp:
    np.savez_compressed(tmp, **{k: np.asarray(v) for k, v in arrays.items()})


def save_figure(fig: "matplotlib.figure.Figure", path: str, dpi: int = 120) -> None:
  """Saves a matplotlib figure as PNG, atomically; closes it if pyplot manages it.

  Figures here are plain `matplotlib.figure.Figure`s (no pyplot, so no backend is chosen or
  switched, in scripts or notebooks alike). Process 0 only.
  """
  if distributed.is_chief():
    with atomic_path(path) as tmp:
      fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
  if "matplotlib.pyplot" in sys.modules:
    sys.modules["matplotlib.pyplot"].close(fig)


def save_image_grid(images: np.ndarray, path: str, title: str = "",
                    columns: int | None = None) -> None:
  """Writes `plotting.image_grid_figure(images, title)` as a PNG, atomically (process 0
  only)."""
  if distributed.is_chief():
    save_figure(plotting.image_grid_figure(images, title, columns), path)


def format_seconds(seconds: float) -> str:
  """h:mm:ss, for ETAs and durations in log lines."""
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_bar(done: int, total: int, width: int = 20) -> str:
  """'[#####...............]' for `done` of `total`, the prefix of long runs' log lines."""
  filled = min(width, done * width // max(total, 1))
  return "[" + "#" * filled + "." * (width - filled) + "]"


def schedule_and_end(config: Any) -> tuple[sde.Schedule, float]:
  """(schedule, t_end in its own clock) of config.schedule reaching the OU time config.t_end
  (s = ½ B(t), Eq. 8; `sde.make_schedule_until_ou_time`); a ValueError naming both keys when
  the schedule ends before it."""
  try:
    return sde.make_schedule_until_ou_time(config.schedule, config.t_end)
  except ValueError as e:
    raise ValueError(f"config.t_end / config.schedule: {e}") from None


def set_precision(x64: bool) -> None:
  """Turns float64 on (theory experiments) or off (networks), for this process."""
  jax.config.update("jax_enable_x64", bool(x64))


class Stopwatch:
  """Wall-clock seconds since construction, reading after all queued JAX work."""

  def __init__(self):
    self._start = time.perf_counter()

  def seconds(self) -> float:
    jax.effects_barrier()
    return time.perf_counter() - self._start


class _QuietOrbax(logging_std.Filter):
  """Drops orbax's INFO chatter (a dozen lines per save) from the absl log; keeps warnings."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or "orbax" not in record.pathname


def quiet_orbax_logs() -> None:
  """Installs `_QuietOrbax` on the absl handler (once)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
    handler.addFilter(_QuietOrbax())


def truncate_metrics(path: str, last_step: int) -> None:
  """Drops metrics.jsonl lines past `last_step` (written by a killed run after the checkpoint
  that is resumed) and lines cut short by a kill."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = []
  for line in lines:
    try:
      if json.loads(line).get("step", 0) <= last_step:
        kept.append(line)
    except json.JSONDecodeError:  # a line cut short by a kill
      continue
  if len(kept) != len(lines):
    with atomic_path(path) as tmp:
      with open(tmp, "w") as f:
        f.writelines(kept)


def training_hooks(workdir: str, grids: bool = True) -> trainer.TrainHooks:
  """How an experiment reports `trainer.train_ddpm`: a log line at the start and every
  training.log_every steps (progress bar, loss, steps/s, ETA), the same records appended to
  <workdir>/metrics.jsonl (cut back on every start to the step the run starts from, so lines
  a killed run wrote after its last checkpoint are not repeated) and, with `grids`, EMA sample
  grids to <workdir>/grids/step_<k>.png. Files are written by process 0 only."""
  quiet_orbax_logs()
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  is_chief = distributed.is_chief()

  def on_start(start_step: int, num_steps: int, info: dict) -> None:
    if info.get("resumed"):
      logging.info("Resuming from the checkpoint at step %d in %s.", start_step,
                   info["checkpoint_dir"])
    if is_chief:
      truncate_metrics(metrics_path, start_step)
    if start_step < num_steps:
      logging.info("Training %s steps %d → %d, batch %d on %d device(s), %s parameters.",
                   info["model"], start_step, num_steps, info["batch_size"], info["devices"],
                   f"{info['params']:,}")

  def on_record(record: dict) -> None:
    if is_chief:
      with open(metrics_path, "a") as f:
        f.write(json.dumps({k: v for k, v in record.items() if k != "num_steps"}) + "\n")
    logging.info("%s step %d/%d  loss %.5f (mean of %d steps)  %.2f steps/s  ETA %s",
                 progress_bar(record["step"], record["num_steps"]), record["step"],
                 record["num_steps"], record["loss_mean"], record["losses"],
                 record["steps_per_second"], format_seconds(record["eta_seconds"]))

  def on_grid(step: int, samples) -> None:
    save_image_grid(samples.images, os.path.join(workdir, "grids", f"step_{step:07d}.png"),
                    f"EMA samples at step {step} (DDIM, {samples.nfe} NFE)")

  return trainer.TrainHooks(on_start, on_record, on_grid if grids else None)
