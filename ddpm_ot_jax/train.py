"""Training a DDPM: ε-prediction loss, Adam with warmup and clipping, EMA, data-parallel step.

The loss (Ho et al. 2020, "L_simple") on the N-step discretization (`sde.DiscreteSchedule`):

    i ~ Uniform{0, …, N−1},  ε ~ N(0, I),  x_i = √ᾱ_i x_0 + √(1 − ᾱ_i) ε,
    L(θ) = E ‖ε − ε_θ(x_i, i)‖²   (averaged over pixels).

As an option (`loss_type="continuous"`) the same objective in continuous time for the VP-SDE
that the discretization approximates (Song et al. 2021; Eq. 5 of Khrulkov et al. 2022):
t ~ U(1/N, 1), x_t = α(t) x_0 + σ(t) ε, and the network sees the step index i(t) = N t − 1,
so that ε_θ keeps one time convention (`DiscreteSchedule.continuous_time` is its inverse).
The two losses train ε_θ on different noise levels at the same index (ᾱ_i of the chain vs
exp(−B(t)) of the SDE: up to 0.7% apart in log ᾱ, 5% in σ at step 0), so a sampler must run
on the matching continuous-time view, `samplers.noise_schedule(schedule, loss_type)`:
`DiscreteTimeSchedule` for "discrete", `ContinuousTimeSchedule` for "continuous".

A `TrainState` holds everything a run needs to continue exactly: the step count, parameters,
their EMA, the optimizer state and the base PRNG key. The key of step k is
fold_in(rng, k), a function of (seed, k) alone, so a run resumed from a checkpoint at step k
draws the same noise as an uninterrupted one.

Data parallelism: one `jax.jit` over a 1-D device mesh with axis 'data'. The batch is split
along 'data', the state is replicated, and XLA inserts the gradient all-reduce. Random draws
inside the step use jax's partitionable threefry, so they do not depend on the number of
devices: the step on D devices computes the same numbers as on one (up to the order of the
float sums). Several hosts: join the run first (`distributed.initialize`, done by
scripts/main.py); each process then feeds its rows of the global batch (`global_batch`, or
`distributed.global_batch_from_local` from rows it loaded itself).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm_ot_jax import distributed
from ddpm_ot_jax import sde

Array = jax.Array
PyTree = Any
DATA_AXIS = "data"


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from one step to the next.

  step: number of optimizer updates applied so far (int32 scalar).
  params: the network parameters θ.
  ema_params: exponential moving average of θ (what samplers use).
  opt_state: the optax state (Adam moments, step count for the warmup).
  rng: base PRNG key (uint32[2]); step k uses fold_in(rng, k).
  """

  step: Array
  params: PyTree
  ema_params: PyTree
  opt_state: PyTree
  rng: Array


@dataclasses.dataclass(frozen=True)
class TrainHparams:
  """The optimization and loss settings of a run (static: hashable for jit).

  lr: Adam's peak learning rate; reached linearly over `warmup_steps` updates.
  grad_clip: global-norm clipping threshold (≤ 0: off).
  ema_decay: EMA decay ρ: θ_ema ← ρ θ_ema + (1 − ρ) θ.
  ema_warmup: use ρ_k = min(ρ, (1 + k)/(10 + k)) so short runs get a useful EMA.
  loss_type: "discrete" (DDPM's N steps) or "continuous" (VP-SDE time).
  class_conditional: pass labels y to the network.
  """

  lr: float = 2e-4
  warmup_steps: int = 5000
  grad_clip: float = 1.0
  ema_decay: float = 0.9999
  ema_warmup: bool = False
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  loss_type: str = "discrete"
  class_conditional: bool = False

  def __post_init__(self):
    if self.loss_type not in sde.LOSS_TYPES:
      raise ValueError(f"loss_type {self.loss_type!r} is not one of {sde.LOSS_TYPES}.")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}.")
    if self.lr <= 0:
      raise ValueError(f"lr must be positive, got {self.lr}.")


def learning_rate_schedule(lr: float, warmup_steps: int) -> optax.Schedule:
  """η_k = lr · min(1, (k + 1)/warmup_steps) for update k = 0, 1, … (DDPM's linear warmup)."""
  if warmup_steps <= 0:
    return optax.constant_schedule(lr)
  return lambda count: lr * jnp.minimum(1.0, (count + 1.0) / warmup_steps)


def make_optimizer(hparams: TrainHparams) -> optax.GradientTransformation:
  """Global-norm gradient clipping, then Adam with linear warmup (DDPM: lr 2e-4, clip 1)."""
  adam = optax.adam(learning_rate_schedule(hparams.lr, hparams.warmup_steps),
                    b1=hparams.adam_b1, b2=hparams.adam_b2, eps=hparams.adam_eps)
  if hparams.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(hparams.grad_clip), adam)
  return adam


def ema_update(ema_params: PyTree, params: PyTree, decay: Array) -> PyTree:
  """θ_ema ← ρ θ_ema + (1 − ρ) θ."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def noise_and_time(schedule: sde.DiscreteSchedule, key: Array, x0: Array,
                   loss_type: str = "discrete") -> tuple[Array, Array, Array]:
  """Draws the training input: returns (x_t, ε, network time index), one time per image.

  discrete:   i ~ U{0..N−1}, x_i = √ᾱ_i x0 + √(1−ᾱ_i) ε, network time i.
  continuous: t ~ U(1/N, 1), x_t = α(t) x0 + σ(t) ε for the VP-SDE with β(t) = N β_{t N}
              (`DiscreteSchedule.continuous_schedule`), network time N t − 1.
  """
  key_time, key_noise = jax.random.split(key)
  batch = x0.shape[0]
  noise = jax.random.normal(key_noise, x0.shape, x0.dtype)
  n = schedule.num_steps
  if loss_type == "discrete":
    index = jax.random.randint(key_time, (batch,), 0, n)
    alpha_bar = schedule.alphas_cumprod()[index]
    mean_coeff, std = jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)
    net_time = index.astype(jnp.float32)
  elif loss_type == "continuous":
    continuous = schedule.continuous_schedule()
    t = jax.random.uniform(key_time, (batch,), minval=1.0 / n, maxval=1.0)
    mean_coeff = sde.marginal_mean_coeff(continuous, t)
    std = sde.marginal_std(continuous, t)
    net_time = t * n - 1.0
  else:
    raise ValueError(f"loss_type {loss_type!r} is not one of {sde.LOSS_TYPES}.")
  shape = (batch,) + (1,) * (x0.ndim - 1)
  mean_coeff = mean_coeff.reshape(shape).astype(x0.dtype)
  x_t = mean_coeff * x0 + std.reshape(shape).astype(x0.dtype) * noise
  return x_t, noise, net_time


def diffusion_loss(params: PyTree, apply_fn: Callable, schedule: sde.DiscreteSchedule, key: Array,
                   x0: Array, labels: Array | None = None, loss_type: str = "discrete",
                   train: bool = True) -> Array:
  """L(θ) = mean ‖ε − ε_θ(x_i, i, y)‖² over the batch and pixels (Ho et al. 2020, Eq. 14).

  `apply_fn` is a Flax `apply` taking ({'params': θ}, x, t, y, train=, rngs=); dropout draws
  from the 'dropout' stream.
  """
  key_input, key_dropout = jax.random.split(key)
  x_t, noise, net_time = noise_and_time(schedule, key_input, x0, loss_type)
  eps_pred = apply_fn({"params": params}, x_t, net_time, labels, train=train,
                      rngs={"dropout": key_dropout})
  return jnp.mean(jnp.square(noise - eps_pred.astype(jnp.float32)))


def init_train_state(key: Array, model: flax.linen.Module, image_shape: tuple[int, ...],
                     tx: optax.GradientTransformation, rng: Array,
                     params: PyTree | None = None) -> TrainState:
  """A fresh state: θ from `model.init` with `key` (or the given `params`), EMA = θ.

  image_shape is (H, W, C) of one image; `rng` becomes the state's base key. Labels are
  passed to `model.init` when the model has num_classes > 0.
  """
  if params is None:
    x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if getattr(model, "num_classes", 0) > 0 else None
    params = model.init({"params": key, "dropout": key}, x, t, y, train=False)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                    rng=jnp.asarray(rng, jnp.uint32))


def train_step(state: TrainState, images: Array, labels: Array, *, apply_fn: Callable,
               tx: optax.GradientTransformation, schedule: sde.DiscreteSchedule,
               hparams: TrainHparams) -> tuple[TrainState, dict[str, Array]]:
  """One Adam update on the batch, then the EMA update. Pure; jit it (`make_train_step`).

  Returns the new state and metrics: loss (before the update), grad_norm (before clipping),
  lr (used by this update).
  """
  key = jax.random.fold_in(state.rng, state.step)
  y = labels if hparams.class_conditional else None
  loss, grads = jax.value_and_grad(diffusion_loss)(
      state.params, apply_fn, schedule, key, images, y, hparams.loss_type, True)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = jnp.asarray(hparams.ema_decay, jnp.float32)
  if hparams.ema_warmup:
    k = state.step.astype(jnp.float32)
    decay = jnp.minimum(decay, (1.0 + k) / (10.0 + k))
  ema_params = ema_update(state.ema_params, params, decay)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
             "lr": learning_rate_schedule(hparams.lr, hparams.warmup_steps)(state.step)}
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                            opt_state=opt_state)
  return new_state, metrics


# ----------------------------------------------------------------------------------------
# Devices: mesh, shardings, the jitted data-parallel step.
# ----------------------------------------------------------------------------------------


def make_data_mesh(devices: list | None = None) -> Mesh:
  """A 1-D mesh with axis 'data' over `devices` (default: all devices of all hosts).

  Auto axis types: shardings are given explicitly to jit (in jax 0.10 `make_mesh` would
  default to Explicit axes).
  """
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device of `mesh` holds the whole array (parameters, optimizer state)."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split across the 'data' axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """The global batch B must split evenly over the D devices of `mesh` (B mod D = 0) and over
  the P processes that feed it (B mod P = 0: each host passes B/P rows to `global_batch`).

  Raises ValueError naming the condition that fails and the smallest valid multiple.
  """
  num_devices = int(mesh.devices.size)
  num_processes = jax.process_count()
  multiple = math.lcm(num_devices, num_processes)
  if batch_size % num_devices:
    raise ValueError(
        f"training.batch_size={batch_size} does not split evenly across the {num_devices} "
        f"devices of the data mesh; set it to a multiple of {multiple}.")
  if batch_size % num_processes:
    raise ValueError(
        f"training.batch_size={batch_size} does not split evenly across the {num_processes} "
        f"processes (hosts) of this run, which each feed batch_size/{num_processes} rows; set "
        f"it to a multiple of {multiple}.")


def global_batch(mesh: Mesh, array: np.ndarray) -> Array:
  """Places a global batch, the same on every host, as one array split along 'data'.

  Each process passes on only its own rows (`distributed.process_rows`); a process that
  loaded only its own rows calls `distributed.global_batch_from_local` instead.
  """
  array = np.asarray(array)
  local = array[distributed.process_rows(array.shape[0])]
  return distributed.global_batch_from_local(mesh, local, DATA_AXIS)


def make_train_step(model: flax.linen.Module, tx: optax.GradientTransformation,
                    schedule: sde.DiscreteSchedule, hparams: TrainHparams, mesh: Mesh,
                    donate: bool = True) -> Callable[[TrainState, Array, Array],
                                                     tuple[TrainState, dict[str, Array]]]:
  """`train_step` jitted over `mesh`: state replicated, (images, labels) split along 'data'.

  With donate=True the input state's buffers are reused for the output (do not read the old
  state after the call).
  """
  step = functools.partial(train_step, apply_fn=model.apply, tx=tx, schedule=schedule,
                           hparams=hparams)
  return jax.jit(step,
                 in_shardings=(replicated(mesh), batch_sharded(mesh), batch_sharded(mesh)),
                 out_shardings=(replicated(mesh), replicated(mesh)),
                 donate_argnums=(0,) if donate else ())


def make_init_fn(model: flax.linen.Module, tx: optax.GradientTransformation,
                 image_shape: tuple[int, ...], mesh: Mesh) -> Callable[[Array, Array], TrainState]:
  """`init_train_state` jitted so that the state is born replicated over `mesh`
  (works on several hosts, where a host array cannot be placed on remote devices)."""
  return jax.jit(lambda key, rng: init_train_state(key, model, image_shape, tx, rng),
                 out_shardings=replicated(mesh))


def place_state(state: TrainState, mesh: Mesh) -> TrainState:
  """Replicates a host-side state (e.g. with imported params) over `mesh`."""
  return jax.device_put(state, replicated(mesh))


def tree_is_finite(tree: PyTree) -> bool:
  """True when every float leaf of `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
  return bool(jnp.all(jnp.stack(leaves))) if leaves else True
