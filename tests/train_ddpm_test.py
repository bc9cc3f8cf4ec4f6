"""Tests for the training loop (experiments/ddpm_training) and the train_ddpm experiment.

All digits runs share one tiny UNet and hyperparameters, so the train step compiles once.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
import jax
import numpy as np

from configs import cifar10_ddpm
from configs import digits_ddpm
from ddpm_ot_jax import checkpoints
from ddpm_ot_jax import data
from ddpm_ot_jax.experiments import ddpm_training
from ddpm_ot_jax.experiments import train_ddpm
from ddpm_ot_jax.models import diffusers_import
from ddpm_ot_jax.models import unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.1,
                  norm_groups=4)


def tiny_digits_config(num_steps: int = 6):
  config = digits_ddpm.get_config()
  config.model.update(TINY_MODEL)
  config.training.update(dict(num_steps=num_steps, batch_size=16, warmup_steps=2,
                              log_every=2, checkpoint_every=3, sample_every=0))
  config.sampling.update(dict(num_steps=3, num_samples=16, batch_size=8, grid_size=16))
  config.evaluate.classifier_steps = 20
  return config


class _Killed(Exception):
  pass


def _killed_at(dataset, config, kill_step):
  """Batches as in the loop, but asking for batch `kill_step` kills the run."""

  def batches(start):
    for step, batch in enumerate(data.batch_iterator(dataset, config.training.batch_size,
                                                     config.seed, start_step=start), start):
      if step == kill_step:
        raise _Killed()
      yield batch

  return batches


def _tree_equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _metrics_steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


class TrainLoopTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dataset = data.load_digits("train")

  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

  def test_kill_and_resume_equals_uninterrupted_run(self):
    """2k = 6 steps straight vs. a run killed while fetching batch 5 (after the checkpoint at
    step k = 3 and the log line of step 4), its state dropped, then started again in the same
    workdir: it resumes at step 3 and ends with bit-identical params, EMA, optimizer state and
    key; metrics.jsonl holds each logged step once (step 4's stale line is replaced)."""
    config = tiny_digits_config(num_steps=6)
    straight = ddpm_training.train_ddpm(config, os.path.join(self.root, "a"), self.dataset)
    self.assertEqual(straight.steps_run, 6)

    workdir = os.path.join(self.root, "b")
    with self.assertRaises(_Killed):
      ddpm_training.train_ddpm(config, workdir, self.dataset,
                               batches=_killed_at(self.dataset, config, 5))
    self.assertEqual(_metrics_steps(workdir), [2, 4])
    self.assertEqual(checkpoints.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps(),
                     [3])
    resumed = ddpm_training.train_ddpm(config, workdir, self.dataset)
    self.assertEqual(resumed.start_step, 3)
    self.assertEqual(resumed.steps_run, 3)
    self.assertEqual(int(resumed.state.step), 6)
    self.assertTrue(_tree_equal(resumed.state, straight.state))
    self.assertEqual(resumed.final_loss, straight.final_loss)
    self.assertEqual(_metrics_steps(workdir), [2, 4, 6])

    # Started again when already finished: nothing to do, same state.
    again = ddpm_training.train_ddpm(config, workdir, self.dataset)
    self.assertEqual(again.steps_run, 0)
    self.assertTrue(_tree_equal(again.state, straight.state))

  def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(self):
    """NaN images from batch 4 on: training stops at step 5 with NonFiniteLossError (a
    ValueError) that names the step and the kept checkpoint; the newest checkpoint is the
    finite state of step 3, from which a new run resumes."""
    config = tiny_digits_config(num_steps=9)
    workdir = os.path.join(self.root, "nan")

    def batches(start):
      for step, (images, labels) in enumerate(data.batch_iterator(
          self.dataset, 16, config.seed, start_step=start), start):
        yield (images * np.nan if step >= 4 else images), labels

    with self.assertRaisesRegex(ddpm_training.NonFiniteLossError,
                                r"non-finite at step 5.*last good checkpoint \(step 3\)"):
      ddpm_training.train_ddpm(config, workdir, self.dataset, batches=batches)
    with checkpoints.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
      self.assertEqual(ckpt.all_steps(), [3])
    # A new run resumes from that checkpoint (here with nothing left to do at num_steps=3).
    resumed = ddpm_training.train_ddpm(tiny_digits_config(num_steps=3), workdir, self.dataset)
    self.assertEqual((resumed.start_step, resumed.steps_run), (3, 0))
    self.assertTrue(all(np.all(np.isfinite(x)) for x in jax.tree.leaves(resumed.state.params)))

  def test_digits_experiment_end_to_end(self):
    """train_ddpm.run with the digits config at a tiny size: results.json keys with sane
    values, the sample grid PNG, samples in [−1, 1], metrics.jsonl and checkpoints."""
    config = tiny_digits_config(num_steps=4)
    config.training.sample_every = 4
    config.training.update(dict(grid_samples=8, grid_sampler_steps=3))  # = final sampling
    workdir = os.path.join(self.root, "digits")
    results = train_ddpm.run(config, workdir)
    for key in ("recognized_fraction", "classifier_accuracy", "params", "train_seconds",
                "images_per_second", "sampling_nfe", "samples_per_second"):
      self.assertIn(key, results)
    self.assertBetween(results["recognized_fraction"], 0.0, 1.0)
    self.assertGreater(results["classifier_accuracy"], 0.2)  # 20 steps: better than chance
    self.assertEqual(results["train_steps"], 4)
    self.assertEqual(results["sampling_nfe"], 3)
    self.assertGreater(results["params"], 1000)
    self.assertGreater(results["images_per_second"], 0)
    samples = np.load(os.path.join(workdir, "samples.npz"))["samples"]
    self.assertEqual(samples.shape, (16, 8, 8, 1))
    self.assertTrue(np.all(np.abs(samples) <= 1.0))
    for name in ("samples.png", "metrics.jsonl", os.path.join("grids", "step_0000004.png")):
      self.assertTrue(os.path.exists(os.path.join(workdir, name)), name)
    self.assertEqual(_metrics_steps(workdir), [2, 4])

  def test_init_from_diffusers_weights(self):
    """training.init_from_diffusers: the imported architecture (with config.model.dropout) and
    weights are the starting state; θ = θ_ema = the imported params, Adam moments zero."""
    imported_model = unet.UNet(**{**TINY_MODEL, "dropout": 0.0})
    imported = imported_model.init(jax.random.PRNGKey(7), np.zeros((1, 8, 8, 1), np.float32),
                                   np.zeros((1,), np.float32))["params"]
    config = tiny_digits_config(num_steps=0)
    config.training.init_from_diffusers = "/weights/ddpm"
    config.model.dropout = 0.3
    with mock.patch.object(diffusers_import, "load_diffusers_unet",
                           return_value=(imported_model, imported)) as loader:
      model, params = train_ddpm._load_model(config)  # pylint: disable=protected-access
    loader.assert_called_once_with("/weights/ddpm")
    self.assertEqual(model.dropout, 0.3)
    self.assertEqual(model.ch, TINY_MODEL["ch"])
    result = ddpm_training.train_ddpm(config, os.path.join(self.root, "ft"), self.dataset,
                                      model=model, init_params=params)
    self.assertEqual(result.steps_run, 0)
    self.assertTrue(_tree_equal(result.state.params, imported))
    self.assertTrue(_tree_equal(result.state.ema_params, imported))
    self.assertTrue(all(not np.any(np.asarray(m)) for m in
                        jax.tree.leaves(result.state.opt_state[1][0].mu)))


def _write_fake_cifar(root: str, per_batch: int = 4) -> None:
  """cifar-10-batches-py with 5 training batches and a test batch of random uint8 images."""
  folder = os.path.join(root, data.CIFAR10_FOLDER)
  os.makedirs(folder)
  rng = np.random.default_rng(0)
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
             b"labels": list(rng.integers(0, 10, per_batch))}
    with open(os.path.join(folder, name), "wb") as f:
      pickle.dump(batch, f)


class Cifar10ConfigTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

  def test_paper_setup(self):
    """The config is the DDPM paper's: batch 128, lr 2e-4, warmup 5000, clip 1, EMA 0.9999,
    dropout 0.1, flips, 1000 linear β steps 1e-4..0.02, ch 128 × (1, 2, 2, 2), attention 16."""
    config = cifar10_ddpm.get_config()
    self.assertEqual((config.training.batch_size, config.training.lr,
                      config.training.warmup_steps, config.training.grad_clip,
                      config.training.ema_decay), (128, 2e-4, 5000, 1.0, 0.9999))
    self.assertEqual((config.diffusion.num_steps, config.diffusion.beta_start,
                      config.diffusion.beta_end), (1000, 1e-4, 0.02))
    self.assertEqual((config.model.ch, tuple(config.model.ch_mult), config.model.num_res_blocks,
                      tuple(config.model.attn_resolutions), config.model.dropout),
                     (128, (1, 2, 2, 2), 2, (16,), 0.1))
    self.assertTrue(config.data.flip)

  def test_tiny_run_on_fake_cifar_folder(self):
    """With tiny overrides the CIFAR-10 config trains 2 steps on a fake cifar-10-batches-py,
    checkpoints both steps, and samples 32×32×3 images."""
    _write_fake_cifar(self.root)
    config = cifar10_ddpm.get_config()
    config.data.root = self.root
    config.model.update(dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                             norm_groups=4))
    config.training.update(dict(num_steps=2, batch_size=4, warmup_steps=1, log_every=1,
                                checkpoint_every=1, sample_every=0))
    config.sampling.update(dict(num_steps=2, num_samples=4, batch_size=4))
    workdir = os.path.join(self.root, "run")
    results = train_ddpm.run(config, workdir)
    self.assertEqual(results["train_steps"], 2)
    self.assertTrue(np.isfinite(results["final_loss"]))
    with checkpoints.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
      self.assertEqual(ckpt.all_steps(), [1, 2])
    samples = np.load(os.path.join(workdir, "samples.npz"))["samples"]
    self.assertEqual(samples.shape, (4, 32, 32, 3))
    self.assertTrue(os.path.exists(os.path.join(workdir, "samples.png")))

  def test_missing_folder_stops_with_one_clear_message(self):
    """scripts/main.py with the CIFAR-10 config and an empty data root exits with status 2 and
    one message naming the folder it looked in and how to get the data (no traceback)."""
    missing = os.path.join(self.root, "nowhere")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "main.py"),
         f"--config={os.path.join(ROOT, 'configs', 'cifar10_ddpm.py')}",
         f"--config.data.root={missing}", f"--workdir={os.path.join(self.root, 'run')}"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertIn(missing, proc.stderr)
    self.assertIn("cifar-10-python.tar.gz", proc.stderr)
    self.assertNotIn("Traceback", proc.stderr)


if __name__ == "__main__":
  absltest.main()
