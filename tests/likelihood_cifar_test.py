"""configs/cifar10_likelihood.py end to end through scripts/main.py on a fake CIFAR-10 folder,
sharded over 4 virtual CPU devices."""
import json
import os
import tempfile

from absl.testing import absltest
import numpy as np

import helpers

ROOT = helpers.ROOT


class CifarLikelihoodTest(absltest.TestCase):

  def test_sharded_test_set_bits_per_dim_through_main(self):
    """A tiny UNet trained 2 steps on fake CIFAR-10, then the 6 test images in batches of 4
    on 4 devices (the second batch, 2 images, padded to 4): exit 0, one progress line per
    batch, results.json with finite bits_per_dim, bits_per_dim_stderr and nfe_mean, 3072
    dims, 256 levels, num_devices 4, and one value per test image."""
    with tempfile.TemporaryDirectory() as tmp:
      helpers.fake_cifar(tmp, per_batch=6)
      workdir = os.path.join(tmp, "run")
      proc = helpers.run_on_cpu_devices(
          os.path.join(ROOT, "scripts", "main.py"),
          "--config=" + os.path.join(ROOT, "configs", "cifar10_likelihood.py"),
          f"--config.data.root={tmp}", *helpers.tiny_model_flags(omit=("norm_groups",)),
          "--config.training.num_steps=2", "--config.training.batch_size=4",
          "--config.training.warmup_steps=1", "--config.training.log_every=1",
          "--config.training.checkpoint_every=2", "--config.training.sample_every=0",
          "--config.likelihood.batch_size=4", "--config.likelihood.solver.rtol=1e-3",
          "--config.likelihood.solver.atol=1e-3", f"--workdir={workdir}", timeout=600)
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
      progress = [line for line in proc.stderr.splitlines() if "bits/dim so far" in line]
      self.assertLen(progress, 2, proc.stderr[-3000:])
      self.assertIn("batch 1/2", progress[0])
      self.assertIn("6/6 images", progress[1])
      with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
      for key in ("bits_per_dim", "bits_per_dim_stderr", "nfe_mean"):
        self.assertTrue(np.isfinite(results[key]), key)
      self.assertEqual((results["num_images"], results["num_dims"], results["num_levels"],
                        results["num_devices"], results["train_steps"]), (6, 3072, 256, 4, 2))
      per_image = np.load(os.path.join(workdir, "bits_per_dim.npz"))["bits_per_dim"]
      self.assertEqual(per_image.shape, (6,))
      self.assertAlmostEqual(results["bits_per_dim"], float(per_image.mean()), places=5)


if __name__ == "__main__":
  absltest.main()
