"""Tests for ddpm_ot_jax.checkpoints: exact round trips, retention, crash safety, clear errors."""
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddpm_ot_jax import checkpoints
from ddpm_ot_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trained_state(seed: int = 0, updates: int = 3) -> train.TrainState:
  """A TrainState whose Adam moments, EMA and step are all non-trivial."""
  key = jax.random.PRNGKey(seed)
  params = {"dense": {"kernel": jax.random.normal(key, (5, 3)), "bias": jnp.zeros(3)},
            "scale": jnp.float32(2.0)}
  tx = train.make_optimizer(train.TrainHparams(lr=1e-2, warmup_steps=2, ema_decay=0.9))
  state = train.TrainState(step=jnp.int32(0), params=params, ema_params=params,
                           opt_state=tx.init(params), rng=jax.random.PRNGKey(seed + 1))
  for k in range(updates):
    grads = jax.tree.map(lambda p, k=k: jnp.sin(p + k) + 0.1, state.params)
    updates_, opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates_)
    state = state.replace(step=state.step + 1, params=new_params, opt_state=opt_state,
                          ema_params=train.ema_update(state.ema_params, new_params, 0.9))
  return state


def _assert_trees_equal(test, a, b):
  test.assertEqual(jax.tree.structure(a), jax.tree.structure(b))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    test.assertEqual(np.asarray(x).dtype, np.asarray(y).dtype)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class CheckpointerTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)

  def test_round_trip_is_exact_for_params_and_optax_state(self):
    """A TrainState (params, EMA, Adam moments and counts, step, key) comes back bit for bit,
    restored onto a zeroed target of the same structure, with the same pytree types."""
    state = _trained_state()
    with checkpoints.Checkpointer(self.dir) as ckpt:
      ckpt.save(3, state)
      ckpt.wait()
      target = jax.tree.map(jnp.zeros_like, state)
      restored = ckpt.restore(target)
    self.assertIsInstance(restored, train.TrainState)
    self.assertIsInstance(restored.opt_state[1][0], optax.ScaleByAdamState)
    _assert_trees_equal(self, restored, state)
    self.assertEqual(int(restored.step), 3)

  def test_restore_from_abstract_target_in_a_new_manager(self):
    """A second Checkpointer on the same folder (a restarted process) finds the latest step and
    restores from shapes/dtypes alone (jax.ShapeDtypeStruct leaves)."""
    state = _trained_state()
    with checkpoints.Checkpointer(self.dir) as ckpt:
      ckpt.save(1, _trained_state(seed=5))
      ckpt.save(2, state)
    with checkpoints.Checkpointer(self.dir) as ckpt:
      self.assertEqual(ckpt.latest_step(), 2)
      restored = ckpt.restore(checkpoints.abstract_like(state))
    _assert_trees_equal(self, restored, state)

  def test_keeps_only_the_newest_k(self):
    """With keep=2, saving steps 1..5 leaves exactly steps 4 and 5 on disk."""
    state = _trained_state(updates=1)
    with checkpoints.Checkpointer(self.dir, keep=2) as ckpt:
      for step in range(1, 6):
        ckpt.save(step, state)
      ckpt.wait()
      self.assertEqual(ckpt.all_steps(), [4, 5])
    self.assertEqual(sorted(int(d) for d in os.listdir(self.dir) if d.isdigit()), [4, 5])

  def test_unfinished_temporary_checkpoint_is_ignored(self):
    """A half-written step (orbax's temporary folder, as a kill mid-save leaves it) is not a
    checkpoint: the latest step stays the last finished one and restores."""
    state = _trained_state()
    with checkpoints.Checkpointer(self.dir) as ckpt:
      ckpt.save(1, state)
    partial = os.path.join(self.dir, "2.orbax-checkpoint-tmp")
    shutil.copytree(os.path.join(self.dir, "1"), partial)
    os.remove(os.path.join(partial, "commit_success.txt"))
    with checkpoints.Checkpointer(self.dir) as ckpt:
      self.assertEqual(ckpt.all_steps(), [1])
      _assert_trees_equal(self, ckpt.restore(state), state)

  def test_process_killed_during_save_leaves_restorable_checkpoints(self):
    """A process killed (os._exit) in the middle of saving step 2 — deterministically, at the
    moment orbax renames the fully written temporary folder onto its final name — leaves
    orbax's own leftover `2.orbax-checkpoint-tmp` (the name orbax-checkpoint 0.12.8 uses: no
    timestamp suffix) and step 1 as the latest checkpoint, which restores exactly; a new
    manager saves step 2 again, and the leftover is gone once it has (orbax removes it in
    the background, finished before the manager's first save)."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {ROOT!r})
        import jax.numpy as jnp
        from orbax.checkpoint._src.path import async_path
        from ddpm_ot_jax import checkpoints

        rename = async_path.rename

        async def rename_or_die(src, dst):
          if os.path.basename(str(src)) == "2.orbax-checkpoint-tmp":
            os._exit(17)  # killed between writing step 2 and finalizing it
          return await rename(src, dst)

        async_path.rename = rename_or_die
        ckpt = checkpoints.Checkpointer({self.dir!r})
        ckpt.save(1, {{"w": jnp.full((100, 100), 1.0)}})
        ckpt.wait()
        ckpt.save(2, {{"w": jnp.full((100, 100), 2.0)}})
        ckpt.wait()
        os._exit(3)  # not reached: the save of step 2 never finalizes
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    self.assertEqual(proc.returncode, 17, proc.stderr[-2000:])
    leftover = os.path.join(self.dir, "2.orbax-checkpoint-tmp")
    self.assertEqual(sorted(d for d in os.listdir(self.dir) if not d.startswith("_")),
                     ["1", "2.orbax-checkpoint-tmp"])
    self.assertTrue(os.path.isfile(os.path.join(leftover, "state", "commit_success.txt")))
    target = {"w": jnp.zeros((100, 100))}
    with checkpoints.Checkpointer(self.dir) as ckpt:
      self.assertEqual(ckpt.all_steps(), [1])
      np.testing.assert_array_equal(ckpt.restore(target)["w"], 1.0)
      ckpt.save(2, {"w": jnp.full((100, 100), 3.0)})
      ckpt.wait()
      self.assertEqual(ckpt.all_steps(), [1, 2])
      self.assertFalse(os.path.exists(leftover))
      np.testing.assert_array_equal(ckpt.restore(target)["w"], 3.0)

  def test_corrupt_checkpoint_gives_a_clear_message(self):
    """Garbage in the array files of the latest step raises ValueError naming the step, the
    folder, and what to do (delete it to resume from the previous step)."""
    state = _trained_state()
    with checkpoints.Checkpointer(self.dir) as ckpt:
      ckpt.save(1, state)
      ckpt.save(2, state)
    for root, _, files in os.walk(os.path.join(self.dir, "2", "state")):
      for name in files:
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"not a checkpoint")
    with checkpoints.Checkpointer(self.dir) as ckpt:
      with self.assertRaisesRegex(ValueError, "step 2 .* cannot be restored") as caught:
        ckpt.restore(state)
      message = str(caught.exception)
      self.assertIn(os.path.join(self.dir, "2"), message)
      self.assertIn("resume from step 1", message)
      _assert_trees_equal(self, ckpt.restore(state, step=1), state)

  def test_missing_checkpoint_raises_file_not_found(self):
    """Restoring from an empty folder or an absent step raises FileNotFoundError."""
    with checkpoints.Checkpointer(self.dir) as ckpt:
      self.assertIsNone(ckpt.latest_step())
      with self.assertRaisesRegex(FileNotFoundError, "no checkpoint"):
        ckpt.restore(_trained_state())
      ckpt.save(1, _trained_state())
      with self.assertRaisesRegex(FileNotFoundError, "step 7"):
        ckpt.restore(_trained_state(), step=7)


if __name__ == "__main__":
  absltest.main()
