"""Tests for the training loop (trainer.train_ddpm) and the train_ddpm experiment.

All digits runs share one tiny UNet and hyperparameters, so the train step compiles once.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from unittest import mock

from absl.testing import absltest
import jax
import numpy as np

from configs import cifar10_ddpm
from configs import digits_ddpm
from ddpm_ot_jax import checkpoints
from ddpm_ot_jax import data
from ddpm_ot_jax import samplers
from ddpm_ot_jax import sde
from ddpm_ot_jax import trainer
from ddpm_ot_jax.experiments import common
from ddpm_ot_jax.experiments import train_ddpm
from ddpm_ot_jax.models import diffusers_import

import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_digits_config(num_steps: int = 6):
  config = digits_ddpm.get_config()
  helpers.tiny_model(config)
  config.training.update(dict(num_steps=num_steps, batch_size=16, warmup_steps=2,
                              log_every=2, checkpoint_every=3, sample_every=0))
  config.sampling.update(dict(num_steps=3, num_samples=16, batch_size=8, grid_size=16))
  config.evaluate.classifier_steps = 200  # ≈ 2 s; confident on real digits (≈ 0.98 recognized)
  return config


def _train(config, workdir, dataset, **kwargs):
  """trainer.train_ddpm as the experiments call it: checkpoints in <workdir>/checkpoints,
  progress reported by common.training_hooks (metrics.jsonl in the workdir)."""
  return trainer.train_ddpm(config, os.path.join(workdir, "checkpoints"), dataset,
                            hooks=common.training_hooks(workdir), **kwargs)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


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
  return [record["step"] for record in _metrics(workdir)]


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
    straight = _train(config, os.path.join(self.root, "a"), self.dataset)
    self.assertEqual(straight.steps_run, 6)

    workdir = os.path.join(self.root, "b")
    with self.assertRaises(_Killed):
      _train(config, workdir, self.dataset,
                               batches=_killed_at(self.dataset, config, 5))
    self.assertEqual(_metrics_steps(workdir), [2, 4])
    self.assertEqual(checkpoints.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps(),
                     [3])
    resumed = _train(config, workdir, self.dataset)
    self.assertEqual(resumed.start_step, 3)
    self.assertEqual(resumed.steps_run, 3)
    self.assertEqual(int(resumed.state.step), 6)
    self.assertTrue(_tree_equal(resumed.state, straight.state))
    self.assertEqual(resumed.final_loss, straight.final_loss)
    self.assertEqual(_metrics_steps(workdir), [2, 4, 6])

    # Started again when already finished: nothing to do, same state.
    again = _train(config, workdir, self.dataset)
    self.assertEqual(again.steps_run, 0)
    self.assertTrue(_tree_equal(again.state, straight.state))

  def test_kill_before_first_checkpoint_restarts_metrics(self):
    """A run killed after the log line of step 2 but before its first checkpoint (step 3)
    leaves metrics.jsonl = [2] and no checkpoint; started again it begins at step 0 and
    metrics.jsonl is cut back to step 0 first, so it ends as [2, 4, 6] (no duplicate line)."""
    config = tiny_digits_config(num_steps=6)
    workdir = os.path.join(self.root, "early")
    with self.assertRaises(_Killed):
      _train(config, workdir, self.dataset,
                               batches=_killed_at(self.dataset, config, 2))
    self.assertEqual(_metrics_steps(workdir), [2])
    with checkpoints.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
      self.assertEqual(ckpt.all_steps(), [])
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      f.write('{"step": 4, "lo')  # and a line cut short by the kill
    restarted = _train(config, workdir, self.dataset)
    self.assertEqual((restarted.start_step, restarted.steps_run), (0, 6))
    self.assertEqual(_metrics_steps(workdir), [2, 4, 6])

  def test_loss_mean_is_the_window_mean_when_the_host_reads_rarely(self):
    """With the accelerator schedule of host reads (every log_every = 2 steps and at the
    checkpoints, steps 3 and 6), loss_mean of each record is the mean of the per-step losses
    of its window — taken from a run that logs every step — although the host read only some
    of them (the device sums the rest); `loss` is the last step's."""
    per_step_config = tiny_digits_config(num_steps=6)
    per_step_config.training.log_every = 1
    _train(per_step_config, os.path.join(self.root, "every"), self.dataset)
    losses = {r["step"]: r["loss"] for r in _metrics(os.path.join(self.root, "every"))}
    self.assertEqual(sorted(losses), [1, 2, 3, 4, 5, 6])

    workdir = os.path.join(self.root, "rare")
    with mock.patch.object(trainer, "check_interval", return_value=2) as interval:
      _train(tiny_digits_config(num_steps=6), workdir, self.dataset)
    interval.assert_called_once_with(2)
    records = _metrics(workdir)
    self.assertEqual([r["step"] for r in records], [2, 4, 6])
    for record in records:
      step = record["step"]
      self.assertAlmostEqual(record["loss"], losses[step], places=6)
      expected = (losses[step - 1] + losses[step]) / 2
      self.assertAlmostEqual(record["loss_mean"], expected, delta=1e-6 * expected)
      self.assertGreater(abs(record["loss_mean"] - record["loss"]), 1e-4)  # not one step's

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

    with self.assertRaisesRegex(trainer.NonFiniteLossError,
                                r"non-finite at step 5.*last good checkpoint \(step 3\)"):
      _train(config, workdir, self.dataset, batches=batches)
    with checkpoints.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
      self.assertEqual(ckpt.all_steps(), [3])
    # A new run resumes from that checkpoint (here with nothing left to do at num_steps=3).
    resumed = _train(tiny_digits_config(num_steps=3), workdir, self.dataset)
    self.assertEqual((resumed.start_step, resumed.steps_run), (3, 0))
    self.assertTrue(all(np.all(np.isfinite(x)) for x in jax.tree.leaves(resumed.state.params)))

  def test_digits_experiment_end_to_end(self):
    """train_ddpm.run with the digits config at a tiny size: results.json keys with sane
    values, the sample grid PNG, samples in [−1, 1], metrics.jsonl and checkpoints. The
    parameter count ("UNet: <n> parameters", n = results' params) is logged before the first
    training step. The classifier recognizes real held-out digits (≥ 0.9) but not the
    samples of a 4-step model (≤ 0.25): the metric separates digits from noise. Every
    sampler call (grid and final) runs on the discrete chain's view (loss_type 'discrete')."""
    config = tiny_digits_config(num_steps=4)
    config.training.sample_every = 4
    config.training.update(dict(grid_samples=8, grid_sampler_steps=3))  # = final sampling
    workdir = os.path.join(self.root, "digits")
    with self.assertLogs("absl", "INFO") as logs, \
         mock.patch.object(samplers, "sample", wraps=samplers.sample) as sample:
      results = train_ddpm.run(config, workdir)
    messages = [r.getMessage() for r in logs.records]
    count_line = next(i for i, m in enumerate(messages) if m.endswith(" parameters"))
    self.assertEqual(messages[count_line], f"UNet: {results['params']:,} parameters")
    first_step = next(i for i, m in enumerate(messages) if "] step 2/4 " in m)
    self.assertLess(count_line, first_step)
    self.assertEqual(sample.call_count, 3)  # one grid + two chunks of final samples
    for call in sample.call_args_list:
      self.assertEqual(call.args[2], samplers.noise_schedule(sde.DiscreteSchedule()))
    for key in ("recognized_fraction", "classifier_accuracy", "params", "train_seconds",
                "images_per_second", "sampling_nfe", "samples_per_second"):
      self.assertIn(key, results)
    self.assertGreaterEqual(results["recognized_fraction_heldout"], 0.9)
    self.assertLessEqual(results["recognized_fraction"], 0.25)
    self.assertGreater(results["classifier_accuracy"], 0.9)
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
    imported_model = helpers.tiny_unet(dropout=0.0)
    imported = imported_model.init(jax.random.PRNGKey(7), np.zeros((1, 8, 8, 1), np.float32),
                                   np.zeros((1,), np.float32))["params"]
    config = tiny_digits_config(num_steps=0)
    config.training.init_from_diffusers = "/weights/ddpm"
    config.model.dropout = 0.3
    with mock.patch.object(diffusers_import, "load_diffusers_unet",
                           return_value=(imported_model, imported)) as loader:
      model, params = trainer.model_from_config(config)
    loader.assert_called_once_with("/weights/ddpm", None)
    self.assertEqual(model.dropout, 0.3)
    self.assertEqual(model.ch, helpers.TINY_UNET["ch"])
    result = _train(config, os.path.join(self.root, "ft"), self.dataset,
                                      model=model, init_params=params)
    self.assertEqual(result.steps_run, 0)
    self.assertTrue(_tree_equal(result.state.params, imported))
    self.assertTrue(_tree_equal(result.state.ema_params, imported))
    self.assertTrue(all(not np.any(np.asarray(m)) for m in
                        jax.tree.leaves(result.state.opt_state[1][0].mu)))


  def test_init_from_diffusers_with_other_image_shape_stops_before_training(self):
    """Weights whose config.json says 32×32×3 (google/ddpm-cifar10-32) with the 8×8×1 digits:
    one ValueError naming both shapes, raised before the weights are read (a placeholder
    file) and before any training (no checkpoint folder)."""
    folder = os.path.join(self.root, "ddpm-cifar10-32")
    os.makedirs(folder)
    with open(os.path.join(folder, diffusers_import.CONFIG_NAME), "w") as f:
      json.dump(diffusers_import.DDPM_CIFAR10_CONFIG, f)
    with open(os.path.join(folder, diffusers_import.WEIGHTS_NAME), "wb") as f:
      f.write(b"placeholder")
    config = tiny_digits_config(num_steps=2)
    config.training.init_from_diffusers = folder
    workdir = os.path.join(self.root, "mismatch")
    with self.assertRaisesRegex(ValueError, r"takes 32×32 images with 3 channel.*are 8×8×1"):
      train_ddpm.run(config, workdir)
    self.assertFalse(os.path.exists(os.path.join(workdir, "checkpoints")))

  def test_continuous_loss_samples_on_the_continuous_view(self):
    """training.loss_type='continuous': the grid and the final samples are drawn on
    ContinuousTimeSchedule(linear SDE of the chain) — the noise levels ε_θ was trained on —
    and TrainResult exposes that view beside the DDPM DiscreteSchedule."""
    config = tiny_digits_config(num_steps=2)
    config.training.update(dict(loss_type="continuous", sample_every=2, grid_samples=4,
                                grid_sampler_steps=2, log_every=1))
    config.sampling.update(dict(num_samples=4, batch_size=4, num_steps=2))
    config.evaluate.classifier = False
    expected = samplers.ContinuousTimeSchedule(sde.DiscreteSchedule().continuous_schedule(),
                                               1000)
    with mock.patch.object(samplers, "sample", wraps=samplers.sample) as sample:
      results = train_ddpm.run(config, os.path.join(self.root, "continuous"))
    self.assertEqual(sample.call_count, 2)
    for call in sample.call_args_list:
      self.assertEqual(call.args[2], expected)
    self.assertEqual(results["sampling_nfe"], 2)
    self.assertEqual(trainer.sampling_schedule(config), expected)

  def test_bad_sampling_config_stops_before_training(self):
    """sampling.order 4 or an unknown sampling.variant / sampler stops with a ValueError naming
    the key before any training (no checkpoint folder in the workdir)."""
    for key, value, pattern in (("order", 4, "sampling.order"),
                                ("variant", "dpmsolver+", "sampling.variant"),
                                ("sampler", "euler", "sampling.sampler")):
      config = tiny_digits_config(num_steps=2)
      config.sampling.sampler = "dpm_solver"
      config.sampling[key] = value
      workdir = os.path.join(self.root, f"bad_{key}")
      with self.assertRaisesRegex(ValueError, pattern):
        train_ddpm.run(config, workdir)
      self.assertFalse(os.path.exists(os.path.join(workdir, "checkpoints")))


class SampleImagesTest(absltest.TestCase):

  def test_ddpm_takes_all_steps_and_dpm_solver_settings_pass_through(self):
    """sampler='ddpm' with the config default num_steps=50 runs all 1000 steps (NFE 1000)
    instead of failing; 'dpm_solver' passes order and variant to the solver (called with
    order=2, variant='dpmsolver'), which changes the samples against order 3."""
    model, params = helpers.noisy_tiny_unet()
    view = samplers.noise_schedule(sde.DiscreteSchedule())
    key = jax.random.PRNGKey(5)
    network = samplers.Network(model, params, view)
    ddpm = samplers.sample_images(network, key, 2, (8, 8, 1), "ddpm", 50)
    self.assertEqual(ddpm.nfe, 1000)
    self.assertTrue(np.all(np.isfinite(ddpm.images)))
    with mock.patch.object(samplers, "dpm_solver", wraps=samplers.dpm_solver) as solver:
      second = samplers.sample_images(network, key, 4, (8, 8, 1), "dpm_solver", 6, order=2,
                                      variant="dpmsolver")
    self.assertEqual(solver.call_args.kwargs["order"], 2)
    self.assertEqual(solver.call_args.kwargs["variant"], "dpmsolver")
    self.assertEqual(second.nfe, 6)
    third = samplers.sample_images(network, key, 4, (8, 8, 1), "dpm_solver", 6, order=3,
                                   variant="dpmsolver")
    self.assertGreater(np.max(np.abs(second.images - third.images)), 1e-4)


_PADDED_SAMPLING_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from ddpm_ot_jax import samplers, sde, train
    import helpers
    assert jax.device_count() == 4
    model, params = helpers.noisy_tiny_unet(num_classes=3)
    mesh = train.make_data_mesh()
    params = jax.device_put(params, train.replicated(mesh))
    view = samplers.noise_schedule(sde.DiscreteSchedule())
    seen = []  # (rows, devices) of every x_start the sampler is given
    original = samplers.sample
    def recording(method, eps_fn, schedule, x, **kwargs):
      seen.append((x.shape[0], len(x.sharding.device_set)))
      return original(method, eps_fn, schedule, x, **kwargs)
    run = lambda mesh: samplers.sample_images(
        samplers.Network(model, params, view, mesh), jax.random.PRNGKey(6), 7, (8, 8, 1),
        "ddim", 3, batch_size=5)
    samplers.sample = recording
    sharded = run(mesh)
    samplers.sample = original
    single = run(None)
    assert sharded.images.shape == (7, 8, 8, 1), sharded.images.shape
    assert seen == [(8, 4), (4, 4)], seen  # chunks of 5 and 2 padded to 8 and 4, on 4 devices
    # float32 convolutions over 8-row shards vs 5-row batches sum in another order (1.9e-5
    # seen after 3 steps); distinct samples differ by > 1e-3 (checked next).
    np.testing.assert_allclose(sharded.images, single.images, atol=1e-4)
    assert np.max(np.abs(single.images[:5] - single.images[5:6])) > 1e-3
    print("OK")
""")


class PaddedShardedSamplingTest(absltest.TestCase):

  def test_chunks_that_do_not_split_run_padded_and_sharded(self):
    """On 4 virtual CPU devices, 7 class-conditional samples in chunks of 5: each chunk is
    padded (to 8 and 4 rows) and runs on all 4 devices, the pad is dropped (7 images), and
    the images equal those of an unsharded run (DDIM is per-row; to 1e-4, float32 summation
    order), 10× below the difference between two samples."""
    proc = helpers.run_on_cpu_devices("-c", _PADDED_SAMPLING_SCRIPT)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("OK", proc.stdout)


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
    helpers.fake_cifar(self.root)
    config = cifar10_ddpm.get_config()
    config.data.root = self.root
    helpers.tiny_model(config)
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
