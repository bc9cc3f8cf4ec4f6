"""Experiment `train_ddpm`: train a DDPM, sample from its EMA parameters, evaluate.

Configs: configs/digits_ddpm.py (CPU, minutes) and configs/cifar10_ddpm.py (the DDPM paper's
CIFAR-10 setup). Stages (several processes: scripts/main.py has joined them; see
`common` for who writes):

1. Data: `data.load_dataset(data.name, 'train', data.root, data.resolution)`.
2. Model: `unet_from_config(config.model)`, or the architecture and weights of a diffusers
   UNet2DModel when `training.init_from_diffusers` names one (fine-tuning the published
   google/ddpm-cifar10-32 model instead of training for days; its sample_size and
   in_channels must match the data's images). Its exact parameter count is logged at once.
3. Training with `trainer.train_ddpm` (resumes from <workdir>/checkpoints; progress lines,
   metrics.jsonl and sample grids by `common.training_hooks`).
4. `sampling.num_samples` samples from the EMA parameters with `sampling.sampler`: 'ddim'
   (default; sampling.num_steps network calls, η = sampling.eta), 'dpm_solver'
   (sampling.num_steps calls, multistep of sampling.order 1–3, sampling.variant
   'dpmsolver++' or 'dpmsolver'), 'ddpm' (ancestral, all diffusion.num_steps steps;
   sampling.num_steps is not used) or 'pf_ode' (adaptive). They run on the continuous-time
   view matching training.loss_type (`trainer.sampling_schedule`). Grid
   <workdir>/samples.png and <workdir>/samples.npz. The sampling settings are checked before
   training starts.
5. With `evaluate.classifier` (digits): a classifier trained on the training split scores
   the samples. recognized_fraction = share of samples whose top class probability is
   ≥ `evaluate.threshold`; classifier_accuracy = its accuracy on the held-out split.

Results: params, train_steps, train_steps_this_run, train_seconds, images_per_second
(training), final_loss, num_devices, num_samples, sampling_nfe, sample_seconds,
samples_per_second (after the first, compiling, chunk), seconds; with the classifier also
recognized_fraction, recognized_fraction_heldout (the data's own value) and
classifier_accuracy. A checkpoint in <workdir>/checkpoints takes precedence over
init_from_diffusers (a restarted fine-tuning run resumes).
"""
from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from absl import logging

from ddpm_ot_jax import data
from ddpm_ot_jax import samplers
from ddpm_ot_jax import trainer
from ddpm_ot_jax.experiments import common
from ddpm_ot_jax.models import unet

# The config fields this experiment reads (scripts/main.py rejects any other field or override).
CONFIG_FIELDS = ("data", "model", "diffusion", "training", "sampling", "evaluate")

# Streams derived from config.seed (trainer uses 0–2): final samples, the classifier.
SAMPLE_STREAM, CLASSIFIER_STREAM = 3, 100


def check_sampling(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the config key when config.sampling cannot be run (checked
  before training, not after it)."""
  sampling = config.sampling
  if sampling.sampler not in samplers.SAMPLERS:
    raise ValueError(f"sampling.sampler={sampling.sampler!r} is not one of {samplers.SAMPLERS}.")
  if sampling.sampler in ("ddim", "dpm_solver") and not (
      isinstance(sampling.num_steps, int) and sampling.num_steps >= 1):
    raise ValueError(f"sampling.num_steps must be a positive int for sampler "
                     f"{sampling.sampler!r}, got {sampling.num_steps!r}.")
  if sampling.sampler == "dpm_solver":
    if sampling.get("order", 3) not in samplers.DPM_SOLVER_ORDERS:
      raise ValueError(f"sampling.order must be 1, 2 or 3 (DPM-Solver's multistep order), "
                       f"got {sampling.order!r}.")
    if sampling.get("variant", "dpmsolver++") not in samplers.DPM_SOLVER_VARIANTS:
      raise ValueError(f"sampling.variant must be one of {samplers.DPM_SOLVER_VARIANTS}, got "
                       f"{sampling.variant!r}.")
  if sampling.num_samples < 1:
    raise ValueError(f"sampling.num_samples must be ≥ 1, got {sampling.num_samples}.")


def _evaluate_with_classifier(config: ml_collections.ConfigDict, train_set: data.ImageDataset,
                              samples: np.ndarray) -> dict[str, float]:
  from ddpm_ot_jax import classifier  # pylint: disable=g-import-not-at-top
  from ddpm_ot_jax import metrics  # pylint: disable=g-import-not-at-top

  heldout = _load(config, config.evaluate.heldout_split)
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), CLASSIFIER_STREAM)
  params = classifier.train_classifier(key, train_set.images, train_set.labels,
                                       num_classes=train_set.num_classes,
                                       num_steps=config.evaluate.classifier_steps)
  heldout_probs = np.asarray(classifier.predict_probs(params, heldout.images))
  accuracy = classifier.accuracy(params, heldout.images, heldout.labels)
  sample_probs = np.asarray(classifier.predict_probs(params, samples))
  return {
      "classifier_accuracy": accuracy,
      "recognized_fraction": float(metrics.recognized_fraction(
          sample_probs, threshold=config.evaluate.threshold)),
      "recognized_fraction_heldout": float(metrics.recognized_fraction(
          heldout_probs, threshold=config.evaluate.threshold)),
  }


def _load(config: ml_collections.ConfigDict, split: str) -> data.ImageDataset:
  root = os.path.expanduser(config.data.get("root") or "") or None
  return data.load_dataset(config.data.name, split, root, config.data.get("resolution") or None)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, samples and evaluates; returns the flat results dict (see the module docstring)."""
  check_sampling(config)
  trainer.check_training(config)
  stopwatch = common.Stopwatch()
  dataset = _load(config, "train")
  logging.info("Loaded %s: %d training images of shape %s.", config.data.name, len(dataset),
               dataset.image_shape)
  model, init_params = trainer.model_from_config(config, dataset.image_shape)
  if init_params is not None:
    logging.info("Starting from the diffusers weights in %s (architecture from its "
                 "config.json; config.model is ignored except dropout).",
                 config.training.init_from_diffusers)
  num_params = (unet.count_params(init_params) if init_params is not None
                else trainer.count_model_params(model, dataset.image_shape))
  logging.info("%s: %s parameters", type(model).__name__, f"{num_params:,}")
  result = trainer.train_ddpm(config, os.path.join(workdir, "checkpoints"), dataset, model=model,
                              init_params=init_params, hooks=common.training_hooks(workdir))
  logging.info("Trained %d steps in %.1f s (%.1f images/s); final loss %.5f.",
               result.steps_run, result.train_seconds, result.images_per_second,
               result.final_loss)

  sampling = config.sampling
  if sampling.sampler == "ddpm" and sampling.num_steps != result.schedule.num_steps:
    logging.info("sampler='ddpm' runs all %d steps (sampling.num_steps=%s is not used).",
                 result.schedule.num_steps, sampling.num_steps)
  sample_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), SAMPLE_STREAM)
  kwargs = {"ddim": dict(eta=sampling.eta),
            "dpm_solver": dict(order=sampling.order, variant=sampling.variant)
            }.get(sampling.sampler, {})
  samples = samplers.sample_images(result.network, sample_key, sampling.num_samples,
                                   dataset.image_shape, sampling.sampler, sampling.num_steps,
                                   sampling.batch_size, **kwargs)
  nfe = samples.nfe
  title = f"{config.data.name}: {sampling.sampler}, {nfe} NFE, step {int(result.state.step)}"
  common.save_image_grid(samples.images[:sampling.grid_size], os.path.join(workdir, "samples.png"),
                         title)
  common.save_npz(os.path.join(workdir, "samples.npz"), samples=samples.images)

  results = {
      "params": result.num_params,
      "train_steps": int(jax.device_get(result.state.step)),
      "train_steps_this_run": result.steps_run,
      "train_seconds": result.train_seconds,
      "images_per_second": result.images_per_second,
      "final_loss": result.final_loss,
      "num_devices": int(result.mesh.devices.size),
      "num_samples": int(sampling.num_samples),
      "sampling_nfe": nfe,
      "sample_seconds": samples.seconds,
      "samples_per_second": samples.images_per_second,
  }
  if config.evaluate.classifier:
    results.update(_evaluate_with_classifier(config, dataset, samples.images))
  results["seconds"] = stopwatch.seconds()  # this run: data, training, sampling, evaluation
  return results
