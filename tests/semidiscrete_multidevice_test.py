"""assign_sharded and monge_map on 4 virtual CPU devices give the same indices as one device.

XLA_FLAGS must be set before jax starts its backend, and setting it from a test module would
change the device count of every other test in the pytest process. So unless jax already
sees 4 devices, the test re-runs this file in a fresh subprocess with the flag set.
"""
from __future__ import annotations

import os

from absl.testing import absltest
import numpy as np

import jax
import jax.numpy as jnp

import helpers


class ShardedAssignTest(absltest.TestCase):

  def test_sharded_equals_single_device(self):
    """Targets split over 4 (and 2) devices, N not divisible by 4: same indices as `assign`."""
    if jax.device_count() < 4:
      proc = helpers.run_on_cpu_devices(os.path.abspath(__file__))
      self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
      self.assertIn("OK", proc.stderr)
      return
    from ddpm_ot_jax import semidiscrete  # pylint: disable=g-import-not-at-top
    from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top

    self.assertEqual(jax.device_count(), 4)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    y = jax.random.normal(k1, (1003, 16))
    g = 3.0 * jax.random.normal(k2, (1003,))
    z = jax.random.normal(k3, (257, 16))
    expected = np.asarray(semidiscrete.assign(z, y, g, block_size=100))
    dense = np.argmax(np.asarray(g)[None] - ((np.asarray(z)[:, None] - np.asarray(y)[None]) ** 2
                                             ).sum(-1), axis=1)
    np.testing.assert_array_equal(expected, dense)

    sharded = semidiscrete.assign_sharded(z, y, g, block_size=100)
    np.testing.assert_array_equal(np.asarray(sharded), expected)
    # Host targets placed per device, a 2-device mesh, another block size.
    mesh = Mesh(np.array(jax.devices()[:2]), ("targets",))
    np.testing.assert_array_equal(
        np.asarray(semidiscrete.assign_sharded(z, np.asarray(y), g, mesh, block_size=64)), expected)
    # Placed once, reused for two batches; each device holds only its slice of the targets.
    placed = semidiscrete.shard_targets(y, g)
    self.assertEqual(placed.targets.addressable_shards[0].data.shape, (251, 16))
    for batch in (z[:100], z[100:]):
      np.testing.assert_array_equal(np.asarray(semidiscrete.assign_sharded(batch, placed)),
                                    dense[:100] if batch.shape[0] == 100 else dense[100:])
    # Ties (duplicated targets, equal g) resolve to the smallest index across devices too.
    y_dup = jnp.concatenate([y[:8]] * 4)
    g_dup = jnp.concatenate([g[:8]] * 4)
    idx = np.asarray(semidiscrete.assign_sharded(z, y_dup, g_dup, block_size=3))
    np.testing.assert_array_equal(idx, np.asarray(semidiscrete.assign(z, y_dup, g_dup, 3)))
    self.assertTrue((idx < 8).all())
    # The Monge map placed once across all 4 devices = the map on one device (indices and
    # the looked-up targets), for image-shaped targets.
    y_img = np.asarray(y).reshape(1003, 4, 4, 1)
    mapped4, index4 = semidiscrete.monge_map(y_img, g, jax.devices(), block_size=50)(z)
    mapped1, index1 = semidiscrete.monge_map(y_img, g, jax.devices()[:1], block_size=50)(z)
    np.testing.assert_array_equal(index4, dense)
    np.testing.assert_array_equal(index4, index1)
    np.testing.assert_array_equal(mapped4, mapped1)


if __name__ == "__main__":
  absltest.main()
