"""The DDPM training loop every image experiment uses: resumable, reported, data parallel.

`train_ddpm(config, checkpoint_dir, dataset)` trains ε_θ with `train.train_step` on all
devices (or the first `training.num_devices`) and

* checkpoints the `TrainState` to `checkpoint_dir` every `training.checkpoint_every` steps
  and at the end (orbax through `checkpoints.Checkpointer`, the newest
  `training.keep_checkpoints` kept; the loop's one kind of file);
* resumes from the newest checkpoint found there: batches continue at the checkpoint's step
  (`data.batch_iterator(start_step=step)`) and the step keys are fold_in(rng, step), so the
  final parameters equal those of an uninterrupted run (bit for bit on CPU);
* stops on a non-finite loss or parameters with `NonFiniteLossError`, never writing a
  checkpoint of a diverged state, so the last good checkpoint stays the newest;
* reports through `TrainHooks` and nothing else: `on_start(start_step, num_steps, info)` once,
  `on_record(record)` every `training.log_every` steps (step, loss of the last step,
  `loss_mean` = (1/W) Σ loss over the W steps since the previous record, summed on the device
  without per-step host syncs, steps/s, images/s, ETA) and `on_grid(step, samples)` with EMA
  samples every `training.sample_every` steps. The caller decides what to log and write
  (`experiments.common.training_hooks` logs a progress line, appends metrics.jsonl and saves
  the grids).

`samplers.Network` is what sampling needs from a model, trained here (`TrainResult.network`)
or imported (`place_network`): the module, its (EMA) parameters replicated over the data
mesh and the samplers' view of the schedule matching `training.loss_type`.

Config fields read (see configs/digits_ddpm.py for the documented defaults): seed; data.flip;
model.* (UNet fields); diffusion.{num_steps, beta_start, beta_end}; training.{num_steps,
batch_size, num_devices, lr, warmup_steps, grad_clip, ema_decay, ema_warmup, loss_type,
log_every, checkpoint_every, keep_checkpoints, sample_every, grid_samples,
grid_sampler_steps}.

Seeds: parameters, training noise and grids use fold_in(PRNGKey(seed), s) for the streams
INIT_STREAM, TRAIN_STREAM, GRID_STREAM; the data order uses `seed` in `data.batch_iterator`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_ot_jax import checkpoints
from ddpm_ot_jax import data
from ddpm_ot_jax import distributed
from ddpm_ot_jax import samplers
from ddpm_ot_jax import sde
from ddpm_ot_jax import train
from ddpm_ot_jax.models import unet

# Streams derived from config.seed: parameter init, training noise, sample grids. Experiments
# use other streams for their own draws (each names its streams at the top of its module).
INIT_STREAM, TRAIN_STREAM, GRID_STREAM = 0, 1, 2
BatchFn = Callable[[int], Iterator[tuple[np.ndarray, np.ndarray]]]


class NonFiniteLossError(ValueError):
  """Training diverged: the loss or the parameters stopped being finite."""


@dataclasses.dataclass
class TrainResult:
  """What `train_ddpm` hands back.

  state: the final TrainState (replicated over `mesh`).
  start_step: the step this process started from (0, or a resumed checkpoint's step).
  steps_run: optimizer steps taken by this process.
  train_seconds: wall time of those steps (compilation, checkpoints and grids included).
  images_per_second: training throughput after the first (compiling) step, sample grids
    excluded.
  final_loss: the loss of the last step run (nan when no step ran).
  """

  state: train.TrainState
  model: flax.linen.Module
  schedule: sde.DiscreteSchedule
  sampling_schedule: samplers.NoiseSchedule
  mesh: jax.sharding.Mesh
  start_step: int
  steps_run: int
  train_seconds: float
  images_per_second: float
  final_loss: float

  @property
  def num_params(self) -> int:
    return unet.count_params(self.state.params)

  @property
  def network(self) -> samplers.Network:
    """The EMA network, ready to sample."""
    return samplers.Network(self.model, self.state.ema_params, self.sampling_schedule, self.mesh)


@dataclasses.dataclass(frozen=True)
class TrainHooks:
  """How the loop reports; each is optional (None: not reported).

  on_start(start_step, num_steps, info): once, before the first step (also when no step is
    left); info has 'model' (class name), 'batch_size', 'devices', 'params', 'checkpoint_dir'.
  on_record(record): every training.log_every steps and at the last; record has step, loss,
    loss_mean, losses (W, the steps averaged), grad_norm, lr, steps_per_second,
    images_per_second, seconds (since the loop started) and eta_seconds.
  on_grid(step, samples): `samplers.Samples` of EMA DDIM samples every training.sample_every
    steps (called on every process; write files on process 0 only).
  """

  on_start: Callable[[int, int, dict], None] | None = None
  on_record: Callable[[dict], None] | None = None
  on_grid: Callable[[int, samplers.Samples], None] | None = None


def schedule_from_config(config: ml_collections.ConfigDict) -> sde.DiscreteSchedule:
  """DDPM's N-step schedule from config.diffusion.{num_steps, beta_start, beta_end}."""
  d = config.diffusion
  return sde.DiscreteSchedule(num_steps=d.num_steps, beta_start=d.beta_start,
                              beta_end=d.beta_end)


def sampling_schedule(config: ml_collections.ConfigDict) -> samplers.NoiseSchedule:
  """The samplers' continuous-time view for a network trained with this config:
  `samplers.noise_schedule(schedule_from_config(config), training.loss_type)`."""
  return samplers.noise_schedule(schedule_from_config(config),
                                 config.training.get("loss_type", "discrete"))


def hparams_from_config(config: ml_collections.ConfigDict,
                        model: flax.linen.Module) -> train.TrainHparams:
  """train.TrainHparams from config.training; class-conditional when the model has classes."""
  t = config.training
  return train.TrainHparams(
      lr=t.lr, warmup_steps=t.warmup_steps, grad_clip=t.grad_clip, ema_decay=t.ema_decay,
      ema_warmup=t.get("ema_warmup", False), loss_type=t.get("loss_type", "discrete"),
      class_conditional=getattr(model, "num_classes", 0) > 0)


def data_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The 1-D 'data' mesh over the first training.num_devices devices (0 or absent: all; in a
  run of several processes it must be all, so that every process feeds its devices)."""
  devices = jax.devices()
  count = int(config.training.get("num_devices", 0) or len(devices))
  if not 1 <= count <= len(devices):
    raise ValueError(f"training.num_devices={count}, but there are {len(devices)} devices.")
  if jax.process_count() > 1 and count != len(devices):
    raise ValueError(f"training.num_devices={count}: a run of {jax.process_count()} processes "
                     f"uses all {len(devices)} devices; set it to 0.")
  return train.make_data_mesh(devices[:count])


def place_network(config: ml_collections.ConfigDict, model: flax.linen.Module,
                  params: Any) -> samplers.Network:
  """An imported network (e.g. diffusers weights) as it is: params replicated over
  `data_mesh(config)`, sampled on the view of config.diffusion and training.loss_type."""
  mesh = data_mesh(config)
  placed = jax.device_put(params, train.replicated(mesh))
  return samplers.Network(model, placed, sampling_schedule(config), mesh)


def model_from_config(config: ml_collections.ConfigDict,
                      image_shape: tuple[int, int, int] | None = None
                      ) -> tuple[flax.linen.Module, Any]:
  """(model, init_params): the UNet of config.model (params None: a random init), or the
  architecture and weights of the diffusers UNet2DModel at training.init_from_diffusers
  (config.model unused except dropout), checked against the data's `image_shape` (H, W, C)
  when given."""
  path = config.training.get("init_from_diffusers", "")
  if not path:
    return unet.unet_from_config(config.model), None
  from ddpm_ot_jax.models import diffusers_import  # pylint: disable=g-import-not-at-top

  model, params = diffusers_import.load_diffusers_unet(os.path.expanduser(path), image_shape)
  if "dropout" in config.get("model", {}):
    model = model.clone(dropout=config.model.dropout)
  return model, params


def count_model_params(model: flax.linen.Module, image_shape: tuple[int, ...]) -> int:
  """The exact number of scalars in `model`'s parameters for (H, W, C) images, from shapes
  alone (`jax.eval_shape` of the init: nothing is computed or allocated)."""
  y = jnp.zeros((1,), jnp.int32) if getattr(model, "num_classes", 0) > 0 else None
  abstract = jax.eval_shape(lambda: model.init(
      {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)},
      jnp.zeros((1,) + tuple(image_shape), jnp.float32), jnp.zeros((1,), jnp.float32), y,
      train=False))
  return unet.count_params(abstract["params"])


@functools.lru_cache(maxsize=4)
def _compiled(model: flax.linen.Module, schedule: sde.DiscreteSchedule,
              hparams: train.TrainHparams, image_shape: tuple[int, ...],
              mesh: jax.sharding.Mesh):
  """(tx, init_fn, step_fn) for one setup, cached so that runs in one process (tests,
  sweeps) reuse the compiled functions instead of compiling them again.

  init_fn(key, rng) returns a state replicated over the mesh: on one host it is compiled once
  for any mesh and then copied to the devices; on several hosts it is born replicated.
  """
  tx = train.make_optimizer(hparams)
  if jax.process_count() == 1:
    host_init = _host_init_fn(model, hparams, image_shape)
    init_fn = lambda key, rng: train.place_state(host_init(key, rng), mesh)  # noqa: E731
  else:
    init_fn = train.make_init_fn(model, tx, image_shape, mesh)
  step_fn = train.make_train_step(model, tx, schedule, hparams, mesh)
  return tx, init_fn, step_fn


@functools.lru_cache(maxsize=4)
def _host_init_fn(model: flax.linen.Module, hparams: train.TrainHparams,
                  image_shape: tuple[int, ...]):
  tx = train.make_optimizer(hparams)
  return jax.jit(lambda key, rng: train.init_train_state(key, model, image_shape, tx, rng))


def check_training(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the training.* key whose value cannot be trained with (checked
  before any data is read or file written)."""
  tc = config.training
  ints = dict(num_steps=0, batch_size=1, warmup_steps=0, log_every=1, checkpoint_every=1,
              keep_checkpoints=1, sample_every=0)
  for key, low in ints.items():
    value = tc.get(key, low)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f"training.{key} must be an int ≥ {low}, got {value!r}.")
  for key in ("lr", "grad_clip", "ema_decay"):
    value = tc.get(key, 0.0)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
      raise ValueError(f"training.{key} must be a finite number, got {value!r}.")
  if not tc.lr > 0:
    raise ValueError(f"training.lr must be > 0 (Adam's peak learning rate), got {tc.lr!r}.")


def check_interval(log_every: int) -> int:
  """Steps between host reads of the loss: 1 on CPU (each step is waited on anyway: sharded
  all-reduces can time out otherwise), else `log_every` (no per-step host sync)."""
  return 1 if jax.default_backend() == "cpu" else max(1, int(log_every))


def _nonfinite_message(step: int, what: str, last_good: int | None, directory: str) -> str:
  kept = (f"the last good checkpoint (step {last_good}) is kept in {directory} and a new run "
          "resumes from it" if last_good is not None else "no checkpoint was written")
  return (f"training diverged: the {what} became non-finite at step {step}; {kept}. Lower "
          "training.lr, lengthen training.warmup_steps or set training.grad_clip, then run again.")


def train_ddpm(config: ml_collections.ConfigDict, checkpoint_dir: str, dataset: data.ImageDataset,
               *, model: flax.linen.Module | None = None, init_params: Any = None,
               batches: BatchFn | None = None, hooks: TrainHooks = TrainHooks()) -> TrainResult:
  """Trains (or resumes training of) a DDPM on `dataset` up to `training.num_steps` steps.

  checkpoint_dir: where the orbax checkpoints live (resumed from when present).
  model: the UNet (default `unet_from_config(config.model)`); init_params: starting
  parameters instead of a random init (fine-tuning imported weights); batches:
  start_step ↦ iterator of this process's rows (`distributed.process_rows`) of the global
  (images, labels) batches, by default `data.batch_iterator(dataset, batch_size,
  config.seed, start_step, flip=data.flip, num_shards=P, shard_index=p)` for process p of P
  (each process loads only its own rows; the global batch is the same for any P);
  hooks: how progress is reported (`TrainHooks`).

  Several processes: every one calls this with the same arguments; all take part in every
  step and in the orbax saves and restores; only the hooks decide who writes files.
  """
  check_training(config)
  tc = config.training
  model = model if model is not None else unet.unet_from_config(config.model)
  schedule = schedule_from_config(config)
  hparams = hparams_from_config(config, model)
  image_shape = dataset.image_shape
  mesh = data_mesh(config)
  tx, init_fn, step_fn = _compiled(model, schedule, hparams, image_shape, mesh)
  train.check_batch_size(tc.batch_size, mesh)
  num_steps = int(tc.num_steps)

  base_key = jax.random.PRNGKey(config.seed)
  init_key = jax.random.fold_in(base_key, INIT_STREAM)
  train_rng = jax.random.fold_in(base_key, TRAIN_STREAM)
  if init_params is None:
    state = init_fn(init_key, train_rng)
  else:
    state = train.place_state(
        train.init_train_state(init_key, model, image_shape, tx, train_rng, init_params), mesh)

  checkpointer = checkpoints.Checkpointer(checkpoint_dir, keep=tc.keep_checkpoints)
  try:
    last_good = checkpointer.latest_step()
    if last_good is not None:
      state = checkpointer.restore(state, last_good)
    start_step = int(jax.device_get(state.step))
    if start_step > num_steps:
      raise ValueError(f"the checkpoint in {checkpoint_dir} is at step {start_step}, past "
                       f"training.num_steps={num_steps}; raise num_steps or use a new workdir.")
    if hooks.on_start is not None:
      hooks.on_start(start_step, num_steps, dict(
          model=type(model).__name__, batch_size=int(tc.batch_size),
          devices=int(mesh.devices.size), params=unet.count_params(state.params),
          checkpoint_dir=checkpoint_dir, resumed=last_good is not None))

    if batches is None:
      batches = lambda start: data.batch_iterator(  # noqa: E731
          dataset, tc.batch_size, config.seed, start_step=start,
          flip=bool(config.data.get("flip", False)), num_shards=jax.process_count(),
          shard_index=jax.process_index())
    iterator = batches(start_step)
    # CPU: wait on every step (sharded all-reduces can time out otherwise) and check the loss
    # each step; accelerators: check every log_every steps and before each checkpoint.
    check_every = check_interval(tc.log_every)
    sample_view = sampling_schedule(config)
    grid_key = jax.random.fold_in(base_key, GRID_STREAM)

    loss = float("nan")
    loop_start = time.perf_counter()
    steady_start, steady_images, excluded_seconds = None, 0, 0.0
    # The window's losses: host sums of the device-side partial sums read so far, and the
    # device sum of the steps since the last read (added without waiting on the device).
    window_start, window_step, window_sums, pending_loss = loop_start, start_step, [], None
    for step in range(start_step, num_steps):
      images, labels = next(iterator)
      state, metrics = step_fn(state, distributed.global_batch_from_local(mesh, images),
                               distributed.global_batch_from_local(mesh, labels))
      done = step + 1
      pending_loss = (metrics["loss"] if pending_loss is None
                      else pending_loss + metrics["loss"])
      if done == start_step + 1:  # the first step compiles; time the rest
        jax.block_until_ready(state)
        steady_start = time.perf_counter()
      else:
        steady_images += tc.batch_size
      is_log = done % tc.log_every == 0 or done == num_steps
      is_ckpt = done % tc.checkpoint_every == 0 or done == num_steps
      if done % check_every == 0 or is_log or is_ckpt:
        host, window_sum = jax.device_get((metrics, pending_loss))  # one transfer
        host_metrics = {k: float(v) for k, v in host.items()}
        loss = host_metrics["loss"]
        window_sums.append(float(window_sum))
        pending_loss = None
        if not math.isfinite(window_sums[-1]):  # the window's sum includes this step's loss
          raise NonFiniteLossError(_nonfinite_message(done, "loss", last_good, checkpoint_dir))
      if is_log:
        now = time.perf_counter()
        steps_per_second = (done - window_step) / max(now - window_start, 1e-9)
        num_losses = done - window_step
        loss_mean = float(np.sum(window_sums) / num_losses)
        window_start, window_step, window_sums = now, done, []
        if hooks.on_record is not None:
          hooks.on_record(dict(
              step=done, **host_metrics, loss_mean=loss_mean, losses=num_losses,
              steps_per_second=steps_per_second,
              images_per_second=steps_per_second * tc.batch_size, seconds=now - loop_start,
              eta_seconds=(num_steps - done) / max(steps_per_second, 1e-9),
              num_steps=num_steps))
      if is_ckpt:
        if not train.tree_is_finite(state.params):
          raise NonFiniteLossError(
              _nonfinite_message(done, "parameters", last_good, checkpoint_dir))
        checkpointer.save(done, state)
        last_good = done
      if tc.get("sample_every", 0) and done % tc.sample_every == 0 and hooks.on_grid:
        grid_start = time.perf_counter()
        network = samplers.Network(model, state.ema_params, sample_view, mesh)
        grid = samplers.sample_images(network, jax.random.fold_in(grid_key, done),
                                      tc.grid_samples, image_shape, "ddim",
                                      tc.grid_sampler_steps)
        hooks.on_grid(done, grid)
        excluded_seconds += time.perf_counter() - grid_start
    jax.block_until_ready(state)
    loop_end = time.perf_counter()
    checkpointer.wait()
  finally:
    checkpointer.close()

  steps_run = num_steps - start_step
  steady_seconds = (loop_end - steady_start - excluded_seconds
                    if steady_start is not None else 0.0)
  return TrainResult(
      state=state, model=model, schedule=schedule,
      sampling_schedule=sample_view, mesh=mesh, start_step=start_step,
      steps_run=steps_run, train_seconds=loop_end - loop_start,
      images_per_second=steady_images / steady_seconds if steady_seconds > 0 else float("nan"),
      final_loss=loss)
