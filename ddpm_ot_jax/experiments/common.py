"""What every experiment needs: atomic file writes, figures, float64 switch, timing."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any, Iterator

import jax
import numpy as np

if TYPE_CHECKING:
  import matplotlib.figure


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
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


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
  """Writes `obj` (numpy/jax values converted, NaN/Inf as null) as indented JSON, atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "w") as f:
      json.dump(_to_jsonable(obj), f, indent=2, sort_keys=True, allow_nan=False)
      f.write("\n")


def save_npz(path: str, **arrays: Any) -> None:
  """Saves arrays to a compressed .npz, atomically."""
  with atomic_path(path) as tmp:
    np.savez_compressed(tmp, **{k: np.asarray(v) for k, v in arrays.items()})


def save_figure(fig: "matplotlib.figure.Figure", path: str, dpi: int = 120) -> None:
  """Saves a matplotlib figure as PNG, atomically; closes it if pyplot manages it.

  Figures here are plain `matplotlib.figure.Figure`s (no pyplot, so no backend is chosen or
  switched, in scripts or notebooks alike).
  """
  with atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
  if "matplotlib.pyplot" in sys.modules:
    sys.modules["matplotlib.pyplot"].close(fig)


def progress_bar(done: int, total: int, width: int = 20) -> str:
  """'[#####...............]' for `done` of `total`, the prefix of long runs' log lines."""
  filled = min(width, done * width // max(total, 1))
  return "[" + "#" * filled + "." * (width - filled) + "]"


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
