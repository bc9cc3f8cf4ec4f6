"""The DDPM training loop every image experiment uses: resumable, logged, data parallel.

`train_ddpm(config, workdir, dataset)` trains ε_θ with `train.train_step` on all devices and

* checkpoints the `TrainState` to <workdir>/checkpoints every `training.checkpoint_every`
  steps and at the end (orbax, the newest `training.keep_checkpoints` kept);
* resumes from the newest checkpoint found there: batches continue at the checkpoint's step
  (`data.batch_iterator(start_step=step)`) and the step keys are fold_in(rng, step), so the
  final parameters equal those of an uninterrupted run (bit for bit on CPU);
* stops on a non-finite loss or parameters with `NonFiniteLossError`, never writing a
  checkpoint of a diverged state, so the last good checkpoint stays the newest;
* logs step, loss, steps/s and ETA every `training.log_every` steps, appends the same to
  <workdir>/metrics.jsonl, and writes a grid of EMA samples to <workdir>/grids/step_<k>.png
  every `training.sample_every` steps. On every start metrics.jsonl is cut back to the step
  the run starts from (the checkpoint's, or 0 without one), so lines a killed run wrote
  after its last checkpoint are not repeated. Each record has `loss` (the last step's) and
  `loss_mean` = (1/W) Σ loss over the W steps since the previous record, summed on the device
  (no per-step host sync on accelerators).

Sampling (grids here, final samples in train_ddpm) runs on the continuous-time view that
matches training.loss_type (`sampling_schedule`: `samplers.noise_schedule(schedule,
loss_type)`); `TrainResult.schedule` stays the DDPM DiscreteSchedule (ᾱ_i tables).

Config fields read (see configs/digits_ddpm.py for the documented defaults): seed; data.flip;
model.* (UNet fields); diffusion.{num_steps, beta_start, beta_end}; training.{num_steps,
batch_size, num_devices, lr, warmup_steps, grad_clip, ema_decay, ema_warmup, loss_type,
log_every, checkpoint_every, keep_checkpoints, sample_every, grid_samples,
grid_sampler_steps}.

Seeds: parameters, training noise, grids and final samples use fold_in(PRNGKey(seed), s) for
the streams s = 0, 1, 2, 3 below; the data order uses `seed` in `data.batch_iterator`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging as logging_std
import math
import os
import time
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from ddpm_ot_jax import checkpoints
from ddpm_ot_jax import data
from ddpm_ot_jax import samplers
from ddpm_ot_jax import sde
from ddpm_ot_jax import train
from ddpm_ot_jax.experiments import common
from ddpm_ot_jax.models import unet

# Streams derived from config.seed: parameter init, training noise, grids, final samples.
INIT_STREAM, TRAIN_STREAM, GRID_STREAM, SAMPLE_STREAM = 0, 1, 2, 3
BatchFn = Callable[[int], Iterator[tuple[np.ndarray, np.ndarray]]]


class NonFiniteLossError(ValueError):
  """Training diverged: the loss or the parameters stopped being finite."""


@dataclasses.dataclass
class TrainResult:
  """What `train_ddpm` hands back.

  state: the final TrainState (replicated over `mesh`).
  schedule: the DDPM discretization (ᾱ_i); sampling_schedule: the samplers' view of it that
    matches training.loss_type (pass this one to `samplers`).
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


def class_labels(model: flax.linen.Module, count: int) -> jax.Array | None:
  """Labels 0, 1, …, K−1, 0, 1, … for a class-conditional model; None otherwise."""
  num_classes = getattr(model, "num_classes", 0)
  return jnp.arange(count, dtype=jnp.int32) % num_classes if num_classes > 0 else None


@dataclasses.dataclass
class Samples:
  """images (n, H, W, C) clipped to [−1, 1]; nfe: network evaluations per image; seconds:
  total wall time; images_per_second: throughput over the chunks after the first (which
  compiles), or over all when there is one chunk."""

  images: np.ndarray
  nfe: int
  seconds: float
  images_per_second: float


def shard_rows(x: np.ndarray | jax.Array, mesh: jax.sharding.Mesh | None) -> jax.Array:
  """x (n, ...) as one array split along the 'data' axis of `mesh` (as is without a mesh).

  When n is not a multiple of the D devices, rows are appended by wrapping around (row
  n + j is a copy of row j mod n) up to the next multiple of D, so the batch always runs
  sharded; `gather_rows(result, n)` drops them again. On several hosts every process must
  pass the same x (each contributes its own rows, `train.global_batch`).
  """
  if mesh is None:
    return jnp.asarray(x)
  x = np.asarray(x)
  n, d = x.shape[0], int(mesh.devices.size)
  padded = -(-n // d) * d
  if padded != n:
    x = np.take(x, np.arange(padded) % n, axis=0)
  return train.global_batch(mesh, x)


def gather_rows(x: jax.Array, count: int) -> np.ndarray:
  """The first `count` rows of a (possibly sharded, possibly multi-host) array, on the host:
  the inverse of `shard_rows`."""
  if jax.process_count() > 1 and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)[:count]


def sample_images(model: flax.linen.Module, params: Any,
                  schedule: sde.DiscreteSchedule | samplers.NoiseSchedule,
                  key: jax.Array, num_images: int, image_shape: tuple[int, ...],
                  sampler: str = "ddim", num_steps: int | None = 50, eta: float = 0.0,
                  batch_size: int | None = None,
                  mesh: jax.sharding.Mesh | None = None, *, order: int = 3,
                  variant: str = "dpmsolver++") -> Samples:
  """Draws `num_images` images from ε_θ with `samplers.sample` in chunks of `batch_size`.

  schedule: the samplers' view matching how ε_θ was trained (`sampling_schedule`; a
  DiscreteSchedule means loss_type 'discrete'). Chunk k starts from x_T ~ N(0, I) drawn with
  fold_in(key, k) and runs split along the 'data' axis of `mesh` (padded to a multiple of
  the device count, `shard_rows`); class-conditional models get labels 0, 1, …, K−1, 0, …
  in order. sampler: 'ddpm' (every step from N − 1: N network calls, `num_steps` is not
  used), 'ddim' (num_steps calls, η = eta), 'dpm_solver' (num_steps calls, multistep
  DPM-Solver of `order` 1–3, `variant` 'dpmsolver++' (data prediction) or 'dpmsolver'
  (noise prediction)) or 'pf_ode' (adaptive).
  """
  batch_size = min(batch_size or num_images, num_images)
  labels = class_labels(model, num_images)
  if sampler == "ddpm":
    num_steps = None  # ancestral sampling takes all N steps
  kwargs = {"ddim": {"eta": eta}, "dpm_solver": {"order": order, "variant": variant}}.get(
      sampler, {})
  chunks, nfe = [], 0
  start_time = time.perf_counter()
  steady_start, steady_images = None, 0
  for k, start in enumerate(range(0, num_images, batch_size)):
    count = min(batch_size, num_images - start)
    key_noise, key_sampler = jax.random.split(jax.random.fold_in(key, k))
    x_start = jax.random.normal(key_noise, (count,) + tuple(image_shape), jnp.float32)
    x_start = shard_rows(x_start, mesh)
    y = None if labels is None else shard_rows(labels[start:start + count], mesh)
    eps_fn = samplers.model_eps_fn(model.apply, params, y)
    result = samplers.sample(sampler, eps_fn, schedule, x_start, key=key_sampler,
                             num_steps=num_steps, **kwargs)
    chunks.append(gather_rows(jnp.clip(result.x, -1.0, 1.0), count))
    nfe = int(result.nfe)
    if k == 0:
      steady_start = time.perf_counter()
    elif count == batch_size:
      steady_images += count
  end_time = time.perf_counter()
  if steady_images:
    throughput = steady_images / max(end_time - steady_start, 1e-9)
  else:
    throughput = num_images / max(end_time - start_time, 1e-9)
  return Samples(np.concatenate(chunks), nfe, end_time - start_time, throughput)


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
  """Tiles (n, H, W, C) images on [−1, 1] into one (rows·(H+1)−1, cols·(W+1)−1, C) array on
  [0, 1] with one-pixel white gutters."""
  n, height, width, channels = images.shape
  columns = columns or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / columns))
  grid = np.ones((rows * (height + 1) - 1, columns * (width + 1) - 1, channels), np.float32)
  for i, image in enumerate(np.clip((images + 1.0) / 2.0, 0.0, 1.0)):
    r, c = divmod(i, columns)
    top, left = r * (height + 1), c * (width + 1)
    grid[top:top + height, left:left + width] = image
  return grid


def save_image_grid(images: np.ndarray, path: str, title: str = "",
                    columns: int | None = None) -> None:
  """Writes `image_grid(images)` as a PNG (grey colormap for one channel), atomically."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  grid = image_grid(np.asarray(images), columns)
  fig = Figure(figsize=(6, 6 * grid.shape[0] / grid.shape[1] + (0.3 if title else 0)))
  ax = fig.subplots()
  if grid.shape[-1] == 1:
    ax.imshow(grid[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
  else:
    ax.imshow(grid, interpolation="nearest")
  ax.set_axis_off()
  if title:
    ax.set_title(title, fontsize=9)
  common.save_figure(fig, path)


@functools.lru_cache(maxsize=4)
def _compiled(model: flax.linen.Module, schedule: sde.DiscreteSchedule,
              hparams: train.TrainHparams, image_shape: tuple[int, ...],
              device_ids: tuple[int, ...]):
  """(mesh, tx, init_fn, step_fn) for one setup, cached so that runs in one process (tests,
  sweeps) reuse the compiled functions instead of compiling them again.

  init_fn(key, rng) returns a state replicated over the mesh: on one host it is compiled once
  for any mesh and then copied to the devices; on several hosts it is born replicated.
  """
  devices = {d.id: d for d in jax.devices()}
  mesh = train.make_data_mesh([devices[i] for i in device_ids])
  tx = train.make_optimizer(hparams)
  if jax.process_count() == 1:
    host_init = _host_init_fn(model, hparams, image_shape)
    init_fn = lambda key, rng: train.place_state(host_init(key, rng), mesh)  # noqa: E731
  else:
    init_fn = train.make_init_fn(model, tx, image_shape, mesh)
  step_fn = train.make_train_step(model, tx, schedule, hparams, mesh)
  return mesh, tx, init_fn, step_fn


@functools.lru_cache(maxsize=4)
def _host_init_fn(model: flax.linen.Module, hparams: train.TrainHparams,
                  image_shape: tuple[int, ...]):
  tx = train.make_optimizer(hparams)
  return jax.jit(lambda key, rng: train.init_train_state(key, model, image_shape, tx, rng))


def check_interval(log_every: int) -> int:
  """Steps between host reads of the loss: 1 on CPU (each step is waited on anyway: sharded
  all-reduces can time out otherwise), else `log_every` (no per-step host sync)."""
  return 1 if jax.default_backend() == "cpu" else max(1, int(log_every))


def _devices(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Ids of the devices to train on: the first training.num_devices (0 or absent: all)."""
  devices = jax.devices()
  count = int(config.training.get("num_devices", 0) or len(devices))
  if not 1 <= count <= len(devices):
    raise ValueError(f"training.num_devices={count}, but there are {len(devices)} devices.")
  return tuple(d.id for d in devices[:count])


def _truncate_metrics(path: str, last_step: int) -> None:
  """Drops metrics.jsonl lines past `last_step` (written after the checkpoint we resume)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = []
  for line in lines:
    try:
      if json.loads(line).get("step", 0) <= last_step:
        kept.append(line)
    except json.JSONDecodeError:  # a line cut short by a kill
      continue
  if len(kept) != len(lines):
    with common.atomic_path(path) as tmp:
      with open(tmp, "w") as f:
        f.writelines(kept)


class _QuietOrbax(logging_std.Filter):
  """Drops orbax's INFO chatter (a dozen lines per save) from the absl log; keeps warnings."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or "orbax" not in record.pathname


def quiet_orbax_logs() -> None:
  """Installs `_QuietOrbax` on the absl handler (once)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
    handler.addFilter(_QuietOrbax())


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _nonfinite_message(step: int, what: str, last_good: int | None, directory: str) -> str:
  kept = (f"the last good checkpoint (step {last_good}) is kept in {directory} and a new run "
          "resumes from it" if last_good is not None else "no checkpoint was written")
  return (f"training diverged: the {what} became non-finite at step {step}; {kept}. Lower "
          "training.lr, lengthen training.warmup_steps or set training.grad_clip, then run again.")


def train_ddpm(config: ml_collections.ConfigDict, workdir: str, dataset: data.ImageDataset,
               *, model: flax.linen.Module | None = None, init_params: Any = None,
               batches: BatchFn | None = None) -> TrainResult:
  """Trains (or resumes training of) a DDPM on `dataset` up to `training.num_steps` steps.

  model: the UNet (default `unet_from_config(config.model)`); init_params: starting
  parameters instead of a random init (e.g. imported diffusers weights); batches:
  start_step ↦ iterator of global (images, labels) batches, by default
  `data.batch_iterator(dataset, batch_size, config.seed, start_step, flip=data.flip)`.
  """
  quiet_orbax_logs()
  tc = config.training
  model = model if model is not None else unet.unet_from_config(config.model)
  schedule = schedule_from_config(config)
  hparams = hparams_from_config(config, model)
  image_shape = dataset.image_shape
  mesh, tx, init_fn, step_fn = _compiled(model, schedule, hparams, image_shape,
                                         _devices(config))
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

  ckpt_dir = os.path.join(workdir, "checkpoints")
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  checkpointer = checkpoints.Checkpointer(ckpt_dir, keep=tc.keep_checkpoints)
  try:
    last_good = checkpointer.latest_step()
    if last_good is not None:
      state = checkpointer.restore(state, last_good)
      logging.info("Resuming from the checkpoint at step %d in %s.", last_good, ckpt_dir)
    start_step = int(jax.device_get(state.step))
    if start_step > num_steps:
      raise ValueError(f"the checkpoint in {ckpt_dir} is at step {start_step}, past "
                       f"training.num_steps={num_steps}; raise num_steps or use a new workdir.")
    if jax.process_index() == 0:  # lines past the start were written by a killed run
      _truncate_metrics(metrics_path, start_step)

    if batches is None:
      batches = lambda start: data.batch_iterator(  # noqa: E731
          dataset, tc.batch_size, config.seed, start_step=start,
          flip=bool(config.data.get("flip", False)))
    iterator = batches(start_step)
    # CPU: wait on every step (sharded all-reduces can time out otherwise) and check the loss
    # each step; accelerators: check every log_every steps and before each checkpoint.
    check_every = check_interval(tc.log_every)
    sample_view = sampling_schedule(config)
    grid_key = jax.random.fold_in(base_key, GRID_STREAM)

    is_chief = jax.process_index() == 0  # one host writes metrics and grids
    loss = float("nan")
    loop_start = time.perf_counter()
    steady_start, steady_images, excluded_seconds = None, 0, 0.0
    # The window's losses: host sums of the device-side partial sums read so far, and the
    # device sum of the steps since the last read (added without waiting on the device).
    window_start, window_step, window_sums, pending_loss = loop_start, start_step, [], None
    if start_step < num_steps:
      logging.info("Training %s steps %d → %d, batch %d on %d device(s), %d parameters.",
                   type(model).__name__, start_step, num_steps, tc.batch_size,
                   mesh.devices.size, unet.count_params(state.params))
    for step in range(start_step, num_steps):
      images, labels = next(iterator)
      state, metrics = step_fn(state, train.global_batch(mesh, images),
                               train.global_batch(mesh, labels))
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
          raise NonFiniteLossError(_nonfinite_message(done, "loss", last_good, ckpt_dir))
      if is_log:
        now = time.perf_counter()
        steps_per_second = (done - window_step) / max(now - window_start, 1e-9)
        num_losses = done - window_step
        loss_mean = float(np.sum(window_sums) / num_losses)
        window_start, window_step, window_sums = now, done, []
        eta = (num_steps - done) / max(steps_per_second, 1e-9)
        record = dict(step=done, **host_metrics, loss_mean=loss_mean,
                      steps_per_second=steps_per_second,
                      images_per_second=steps_per_second * tc.batch_size,
                      seconds=now - loop_start)
        if is_chief:
          with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        logging.info("%s step %d/%d  loss %.5f (mean of %d steps)  %.2f steps/s  ETA %s",
                     common.progress_bar(done, num_steps), done, num_steps, loss_mean, num_losses,
                     steps_per_second, _format_seconds(eta))
      if is_ckpt:
        if not train.tree_is_finite(state.params):
          raise NonFiniteLossError(_nonfinite_message(done, "parameters", last_good, ckpt_dir))
        checkpointer.save(done, state)
        last_good = done
      if tc.get("sample_every", 0) and done % tc.sample_every == 0:
        grid_start = time.perf_counter()
        grid = sample_images(model, state.ema_params, sample_view,
                             jax.random.fold_in(grid_key, done), tc.grid_samples, image_shape,
                             "ddim", tc.grid_sampler_steps, mesh=mesh)
        if is_chief:
          save_image_grid(grid.images, os.path.join(workdir, "grids", f"step_{done:07d}.png"),
                          f"EMA samples at step {done} (DDIM, {grid.nfe} NFE)")
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
