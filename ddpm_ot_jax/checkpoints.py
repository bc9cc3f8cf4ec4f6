"""Checkpoints of a training run with orbax: save every N steps, keep the last K, resume.

Layout: <directory>/<step>/state/... . orbax (0.12.8) writes each step into a temporary
folder <step>.orbax-checkpoint-tmp (no timestamp suffix; the item inside it is written to
state.orbax-checkpoint-tmp first) and renames it onto <step> only once every file, its
commit_success.txt included, is written (its atomic finalize). A process killed mid-save
therefore leaves no folder that looks like a checkpoint; such leftovers are ignored, and a
manager opening the directory deletes them in the background (finished before its first
save). tests/checkpoints_test.py kills a process at that rename.

Restoring takes a target of the state's shapes and shardings (an abstract pytree), so the
state comes back directly onto the devices it lives on. This module is the one library module
that writes files (checkpoint I/O).
"""
from __future__ import annotations

import os
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any
_ITEM = "state"

# Fault injection for scripts/bench_reliability.py: DDPM_OT_FAULT=<point>[@k] SIGKILLs the
# process the k-th time (default 1st) it passes `fault_point(<point>)`. Unset: inert.
FAULT_ENV = "DDPM_OT_FAULT"
_fault_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
  """SIGKILLs this process here when $DDPM_OT_FAULT names this point (see FAULT_ENV)."""
  spec = os.environ.get(FAULT_ENV)
  if not spec or spec.split("@")[0] != name:
    return
  _fault_hits[name] = _fault_hits.get(name, 0) + 1
  if _fault_hits[name] == int(spec.partition("@")[2] or 1):
    os.kill(os.getpid(), signal.SIGKILL)


def abstract_like(tree: PyTree) -> PyTree:
  """jax.ShapeDtypeStruct (with sharding) for every leaf: the restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
  """Saves and restores a pytree (e.g. `train.TrainState`) by step.

  Args:
    directory: folder holding one sub-folder per step (created if missing).
    keep: how many of the newest checkpoints to keep (None: all).
    async_save: write in a background thread (call `wait()` before reading the files).
  """

  def __init__(self, directory: str, keep: int | None = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.expanduser(directory))
    if keep is not None and keep < 1:
      raise ValueError(f"keep must be ≥ 1 (or None for all), got {keep}.")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(_ITEM,))

  def all_steps(self) -> list[int]:
    """Steps of the finished checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest finished checkpoint's step, or None when there is none."""
    return self._manager.latest_step()

  def save(self, step: int, tree: PyTree) -> None:
    """Writes `tree` as checkpoint `step` (asynchronously if so configured); drops the oldest
    beyond `keep` once it is finished."""
    self._manager.save(int(step), args=ocp.args.Composite(**{_ITEM: ocp.args.StandardSave(tree)}),
                       force=True)
    fault_point("checkpoint_save")  # async: the write is in flight here

  def restore(self, target: PyTree, step: int | None = None) -> PyTree:
    """Reads checkpoint `step` (default: the latest) into the structure, shapes, dtypes and
    shardings of `target` (a concrete or abstract pytree).

    Raises FileNotFoundError when there is no checkpoint, ValueError with what to do when the
    checkpoint cannot be read (corrupt or written by a different model/config).
    """
    self.wait()
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no checkpoint in {self.directory}.")
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} "
                              f"(steps there: {steps}).")
    args = ocp.args.Composite(**{_ITEM: ocp.args.StandardRestore(abstract_like(target))})
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as e:  # pylint: disable=broad-except
      older = [s for s in steps if s < step]
      fallback = (f"delete {os.path.join(self.directory, str(step))} to resume from step "
                  f"{older[-1]}" if older else "delete it to start training from scratch")
      raise ValueError(
          f"checkpoint at step {step} in {self.directory} cannot be restored "
          f"({type(e).__name__}: {_first_line(e)}). It is corrupt or was written by a "
          f"different model or config; {fallback}, or use another workdir.") from e
    return restored[_ITEM]

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are finished on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases the manager."""
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _first_line(error: Exception) -> str:
  text = str(error).strip().split(" See full TensorStore details")[0]
  return text.splitlines()[0][:300] if text else ""
