"""Data-parallel training on 4 virtual CPU devices equals training on one device.

The check needs `XLA_FLAGS=--xla_force_host_platform_device_count=4` before jax starts. Run
inside the test suite (jax already started with one device) the test re-runs this file in a
subprocess with that flag; run directly with the flag set, it checks in process.
"""
import os
import shutil
import sys
import tempfile

from absl.testing import absltest
import jax
import numpy as np

import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DEVICES = 4


def _tiny_config(num_devices: int):
  from configs import digits_ddpm  # pylint: disable=g-import-not-at-top

  config = digits_ddpm.get_config()
  helpers.tiny_model(config)
  config.training.update(dict(num_steps=3, batch_size=16, num_devices=num_devices,
                              warmup_steps=2, log_every=1, checkpoint_every=2,
                              sample_every=0))
  return config


class DataParallelTest(absltest.TestCase):

  def test_four_devices_equal_one(self):
    """Three steps of the training loop (dropout on, checkpoint at step 2) with the batch split
    over 4 devices give the same loss, params, EMA and Adam state as on 1 device, up to float
    summation order (≤ 1e-5 relative); the 4-device state is replicated on all 4 devices and
    its checkpoint restores. A batch that does not split over 4 devices is a ValueError."""
    if jax.device_count() >= NUM_DEVICES:
      self._check_in_process()
      return
    proc = helpers.run_on_cpu_devices(os.path.abspath(__file__), num_devices=NUM_DEVICES,
                                              timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stdout[-3000:] + proc.stderr[-5000:])
    self.assertIn("OK", proc.stderr)

  def _check_in_process(self):
    from ddpm_ot_jax import checkpoints  # pylint: disable=g-import-not-at-top
    from ddpm_ot_jax import data  # pylint: disable=g-import-not-at-top
    from ddpm_ot_jax import trainer  # pylint: disable=g-import-not-at-top

    root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, root, ignore_errors=True)
    dataset = data.load_digits("train")
    runs = {}
    for count in (1, NUM_DEVICES):
      runs[count] = trainer.train_ddpm(_tiny_config(count),
                                       os.path.join(root, str(count), "checkpoints"), dataset)
    one, four = runs[1], runs[NUM_DEVICES]
    self.assertEqual(one.mesh.devices.size, 1)
    self.assertEqual(four.mesh.devices.size, NUM_DEVICES)
    leaf = jax.tree.leaves(four.state.params)[0]
    self.assertLen(leaf.sharding.device_set, NUM_DEVICES)
    self.assertTrue(leaf.sharding.is_fully_replicated)
    np.testing.assert_allclose(four.final_loss, one.final_loss, rtol=1e-5)
    self.assertEqual(int(four.state.step), 3)
    helpers.assert_states_close(helpers.state_leaves(four.state),
                                helpers.state_leaves(one.state), _tiny_config(1).training.lr)
    with checkpoints.Checkpointer(os.path.join(root, str(NUM_DEVICES), "checkpoints")) as ckpt:
      self.assertEqual(ckpt.all_steps(), [2, 3])
      restored = ckpt.restore(four.state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(four.state)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    bad = _tiny_config(NUM_DEVICES)
    bad.training.batch_size = 6
    with self.assertRaisesRegex(ValueError, "multiple of 4"):
      trainer.train_ddpm(bad, os.path.join(root, "bad"), dataset)


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  absltest.main()
