r"""Semi-discrete optimal transport from noise to N targets: DPM-OT's "expressway", the map
z ↦ x_M^{j(z)} that replaces the reverse chain from T down to the switch step M (`samplers.dpm_ot`).

Source μ: N(0, I_d) ('gaussian') or the uniform law on [0, 1]^d ('uniform', what the DPM-OT
reference code samples). Target ν = (1/N) Σ_j δ_{y_j}, the N target latents x_M. Cost
c(x, y) = ‖x − y‖² (ott-jax's `SqEuclidean`, no factor ½). With a dual weight g_j per target,
the Laguerre cells and the map are

    L_j(g) = {x : j = argmax_k (g_k − ‖x − y_k‖²)},      T_g(x) = y_{j(x)}.

The semi-discrete dual (Kantorovich, c-transform g^c(x) = min_j ‖x − y_j‖² − g_j)

    max_g  F(g) = E_{x∼μ}[g^c(x)] + (1/N) Σ_j g_j,       ∂F/∂g_j = 1/N − μ(L_j(g)),

is concave; at its maximiser every cell holds mass μ(L_j) = 1/N and T_g is the Monge map
(Brenier). `solve_potential` maximises a Monte-Carlo estimate of F with
`ott.solvers.linear.semidiscrete.SemidiscreteSolver` (ε = 0, hard assignment) and optax Adam
with cosine decay. Since argmax_j (g_j − ‖x − y_j‖²) = argmax_j (⟨x, y_j⟩ + h_j) with

    h_j = (g_j − ‖y_j‖²) / 2,

g is the same object as the height vector h of the DPM-OT / AE-OT code (Brenier potential
u_h(x) = max_j ⟨x, y_j⟩ + h_j, T = ∇u_h, energy E(h) = ∫u_h dμ − Σ_j h_j / N, ∇E = μ(W_j) − 1/N);
`heights_from_potential` / `potential_from_heights` convert. g and h are defined up to an
additive constant.

`assign` evaluates j(x) over blocks of targets with a running maximum, so neither the
(B, N) score matrix nor a copy of the (N, d) targets is ever formed; `assign_sharded` splits
the target axis across devices and reduces the per-device maxima. Ties go to the smallest
index everywhere (as `jnp.argmax`), so blocked, sharded and dense evaluations agree.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Sequence

import numpy as np
import optax
from ott.geometry import semidiscrete_pointcloud
from ott.problems.linear import semidiscrete_linear_problem
from ott.solvers.linear import semidiscrete as ott_semidiscrete

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Array = jax.Array

SOURCES = ("gaussian", "uniform")
# A custom source: (key, shape, dtype) -> samples of that shape (e.g. a discrete law in tests).
Sampler = Callable[[Array, tuple, Any], Array]


def _gaussian_sampler(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
  return jax.random.normal(key, shape, dtype)


def _uniform_sampler(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
  return jax.random.uniform(key, shape, dtype)


_SAMPLERS = {"gaussian": _gaussian_sampler, "uniform": _uniform_sampler}


def _sampler(source: str | Sampler) -> Sampler:
  if callable(source):
    return source
  if source not in _SAMPLERS:
    raise ValueError(f"Unknown OT source {source!r}; choose one of {SOURCES}.")
  return _SAMPLERS[source]


def sample_source(key: Array, shape: Sequence[int], source: str | Sampler = "gaussian",
                  dtype=jnp.float32) -> Array:
  """Draws x ∼ μ: N(0, I) for 'gaussian', U[0, 1]^d for 'uniform', or a custom `Sampler`."""
  return _sampler(source)(key, tuple(shape), dtype)


def _flat(x: Any) -> Any:
  return x.reshape(x.shape[0], -1)


def heights_from_potential(g: Array, targets: Array) -> Array:
  """h_j = (g_j − ‖y_j‖²)/2: the reference code's heights (argmax_j ⟨x, y_j⟩ + h_j)."""
  y = _flat(jnp.asarray(targets))
  return 0.5 * (g - jnp.sum(y * y, axis=1))


def potential_from_heights(h: Array, targets: Array) -> Array:
  """g_j = 2 h_j + ‖y_j‖², inverse of `heights_from_potential`."""
  y = _flat(jnp.asarray(targets))
  return 2.0 * h + jnp.sum(y * y, axis=1)


# --------------------------------------------------------------------------------------
# Solver.


@functools.lru_cache(maxsize=16)
def _jitted_solver(source: str | Sampler, num_iterations: int, batch_size: int,
                   learning_rate: float, error_eval_every: int, error_batch_size: int, error_num_repeats: int,
                   threshold: float, potential_ema: float):
  optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, num_iterations))
  solver = ott_semidiscrete.SemidiscreteSolver(
      num_iterations=num_iterations,
      batch_size=batch_size,
      optimizer=optimizer,
      error_eval_every=error_eval_every,
      error_batch_size=error_batch_size,
      error_num_repeats=error_num_repeats,
      threshold=threshold,
      potential_ema=potential_ema,
  )
  sampler = _sampler(source)

  @jax.jit
  def run(key: Array, targets: Array, g_init: Array):
    geom = semidiscrete_pointcloud.SemidiscretePointCloud(sampler, targets, epsilon=0.0)
    prob = semidiscrete_linear_problem.SemidiscreteLinearProblem(geom)
    out = solver(key, prob, g_init=g_init)
    return out.g, out.it, out.losses, out.errors

  return run


def solve_potential(
    key: Array,
    targets: Array,
    source: str | Sampler = "gaussian",
    num_iterations: int = 20_000,
    batch_size: int = 1024,
    learning_rate: float = 0.01,
    *,
    error_eval_every: int = 1000,
    error_batch_size: int | None = None,
    error_num_repeats: int = 4,
    chi2_threshold: float = 2.5e-3,
    stop_early: bool = True,
    potential_ema: float = 0.99,
    g_init: Array | None = None,
    num_check_samples: int = 0,
    check_block_size: int = 2048,
) -> tuple[Array, dict[str, Any]]:
  r"""Maximises the semi-discrete dual F(g) with ott-jax's `SemidiscreteSolver`.

  Each iteration draws `batch_size` source points, takes an Adam step (learning rate
  cosine-decayed from `learning_rate` to 0 over `num_iterations`) along the stochastic
  gradient 1/N − μ̂(L_j(g)), and keeps an EMA of g (`potential_ema`), which is what is
  returned. Every `error_eval_every` iterations the solver estimates the χ² divergence of the
  cell masses from uniform, χ²(m‖ν) = N Σ_j (m_j − 1/N)² (≈ the mean squared relative cell
  error), from `error_num_repeats` × `error_batch_size` fresh source points with an unbiased
  estimator whose noise is ≈ √(2N) / (error_batch_size · √error_num_repeats); with
  `stop_early` it stops at the first check with χ² ≤ `chi2_threshold`. Keep that noise well
  below the threshold (default error_batch_size: max(batch_size, 8N)).

  Args:
    key: PRNG key.
    targets: (N, ...) target points y_j (flattened to (N, d)).
    source: 'gaussian' (N(0, I)), 'uniform' (U[0, 1]^d) or a `Sampler` (a module-level
      function, so that the jitted solver is cached).
    num_iterations: maximum iterations (rounded up to a multiple of `error_eval_every`).
    batch_size: source samples per iteration.
    learning_rate: initial Adam learning rate (units of g, i.e. of squared distance). Adam
      moves each g_j by at most ≈ learning_rate per iteration, so with the cosine decay g
      travels ≲ learning_rate · num_iterations / 2 from g_init: raise it when the targets
      are spread wider (the range of the optimal g grows with their spread), or the solve
      stalls above the threshold.
    chi2_threshold: the χ² level that counts as converged.
    stop_early: stop at the first check below `chi2_threshold` (else run all iterations, the
      full cosine decay).
    g_init: optional (N,) warm start.
    num_check_samples: if > 0, also run `marginal_error` on that many fresh samples and merge
      its entries into the diagnostics.

  Returns:
    (g, diagnostics): g of shape (N,), centred to mean 0; diagnostics with 'iterations',
    'converged' (last χ² check ≤ `chi2_threshold` and all losses finite; computed here because
    ott-jax 0.6.0's own flag reads the slot after the last check), 'chi2_error' (last check),
    'chi2_errors' (all checks), 'dual_objective' (mean of F over the last ≤ 100 iterations), 'seconds', and the
    `marginal_error` entries if requested.
  """
  y = _flat(jnp.asarray(targets))
  n = y.shape[0]
  if n < 2:
    raise ValueError(f"Semi-discrete OT needs at least 2 targets, got {n}.")
  if num_iterations < 1 or batch_size < 1 or error_eval_every < 1:
    raise ValueError("num_iterations, batch_size and error_eval_every must be positive.")
  num_iterations = error_eval_every * math.ceil(num_iterations / error_eval_every)
  if error_batch_size is None:
    error_batch_size = max(batch_size, 8 * n)
  run = _jitted_solver(source, int(num_iterations), int(batch_size), float(learning_rate),
                       int(error_eval_every), int(error_batch_size), int(error_num_repeats),
                       float(chi2_threshold) if stop_early else -math.inf,
                       float(potential_ema))
  g0 = jnp.zeros((n,), y.dtype) if g_init is None else jnp.asarray(g_init, y.dtype)
  key_solve, key_check = jax.random.split(key)
  start = time.perf_counter()
  compiled = run.lower(key_solve, y, g0).compile()
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  g, it, losses, errors = jax.block_until_ready(compiled(key_solve, y, g0))
  seconds = time.perf_counter() - start
  it = int(it)
  checks = it // error_eval_every
  errors = np.asarray(errors)[:checks]
  losses = np.asarray(losses)[:it]
  last_error = float(errors[-1]) if checks else float("inf")
  converged = bool(checks > 0 and last_error <= chi2_threshold and np.isfinite(losses).all())
  g = g - jnp.mean(g)
  diagnostics: dict[str, Any] = {
      "iterations": it,
      "converged": converged,
      "chi2_error": last_error,
      "chi2_errors": errors.tolist(),
      # ott-jax minimises −F; report F itself.
      "dual_objective": float(-np.mean(losses[-100:])) if it else float("nan"),
      "seconds": seconds,
      "compile_seconds": compile_seconds,
  }
  if num_check_samples > 0:
    diagnostics.update(marginal_error(key_check, y, g, num_check_samples, source=source,
                                      block_size=check_block_size))
  return g, diagnostics


# --------------------------------------------------------------------------------------
# The map: blocked running argmax.


def _block_update(best_val: Array, best_idx: Array, z: Array, y_block: Array,
                  offset_block: Array, start: Array) -> tuple[Array, Array]:
  """Merges scores s_j = 2⟨z, y_j⟩ + (g_j − ‖y_j‖²) of one target block into the running max.

  s_j differs from g_j − ‖z − y_j‖² by ‖z‖², the same for every j. A later block wins only
  on a strictly larger score, so ties keep the smallest index.
  """
  scores = 2.0 * (z @ y_block.T) + offset_block[None, :]
  val = jnp.max(scores, axis=1)
  idx = jnp.argmax(scores, axis=1).astype(jnp.int32) + start
  better = val > best_val
  return jnp.where(better, val, best_val), jnp.where(better, idx, best_idx)


def _init_best(num: int, dtype) -> tuple[Array, Array]:
  return jnp.full((num,), -jnp.inf, dtype), jnp.zeros((num,), jnp.int32)


def _offsets(targets: Array, g: Array) -> Array:
  """g_j − ‖y_j‖², computed block-free (an (N,) vector)."""
  return g - jnp.sum(targets * targets, axis=1)


def _assign_device(z: Array, targets: Array, offsets: Array,
                   block_size: int) -> tuple[Array, Array]:
  """(max score, argmax) over the rows of `targets`, one block of targets at a time.

  Full blocks are read with `dynamic_slice` inside a loop (no padded copy of the targets); the
  remainder is one static slice.
  """
  n = targets.shape[0]
  block = min(block_size, n)
  num_full = n // block
  best = _init_best(z.shape[0], jnp.result_type(z.dtype, targets.dtype))
  z = z.astype(best[0].dtype)

  def body(i, best):
    start = i * block
    y_block = jax.lax.dynamic_slice_in_dim(targets, start, block, axis=0)
    off_block = jax.lax.dynamic_slice_in_dim(offsets, start, block, axis=0)
    return _block_update(*best, z, y_block, off_block, start.astype(jnp.int32))

  best = jax.lax.fori_loop(0, num_full, body, best)
  if num_full * block < n:
    start = num_full * block
    best = _block_update(*best, z, targets[start:], offsets[start:], jnp.int32(start))
  return best


@functools.partial(jax.jit, static_argnames=("block_size",))
def _assign_jit(z: Array, targets: Array, g: Array, block_size: int) -> Array:
  return _assign_device(z, targets, _offsets(targets, g), block_size)[1]


_block_update_jit = jax.jit(_block_update)


def assign(z: Array, targets: Array | np.ndarray, g: Array, block_size: int = 2048) -> Array:
  r"""j(z) = argmax_j (g_j − ‖z − y_j‖²) for a batch z of shape (B, ...): indices (B,) int32.

  Evaluated as argmax_j (2⟨z, y_j⟩ + g_j − ‖y_j‖²) over blocks of `block_size` targets with a
  running maximum: memory O(B · block_size), never (B, N). If `targets` is a host numpy array
  the blocks are streamed to the device one by one, so the (N, d) targets never need to sit
  on the device at all (large image sets); otherwise the whole loop is one jitted program.
  """
  z = _flat(jnp.asarray(z))
  g = jnp.asarray(g)
  if isinstance(targets, np.ndarray):
    y = targets.reshape(targets.shape[0], -1)
    n = y.shape[0]
    best = _init_best(z.shape[0], jnp.result_type(z.dtype, y.dtype))
    z = z.astype(best[0].dtype)
    for start in range(0, n, block_size):
      y_block = jnp.asarray(y[start:start + block_size])
      off = g[start:start + block_size] - jnp.sum(y_block * y_block, axis=1)
      best = _block_update_jit(*best, z, y_block, off, jnp.int32(start))
    return best[1]
  return _assign_jit(z, _flat(jnp.asarray(targets)), g, block_size)


# --------------------------------------------------------------------------------------
# Sharded along the target axis.


@dataclasses.dataclass(frozen=True)
class ShardedTargets:
  """Targets and offsets g_j − ‖y_j‖² split along the target axis over `mesh[axis_name]`.

  targets: (N_pad, d), offsets: (N_pad,), padded so each device holds N_pad / D rows; padded
  rows have offset −∞ and are never chosen.
  """
  targets: Array
  offsets: Array
  num_targets: int
  mesh: Mesh
  axis_name: str


def _default_mesh(axis_name: str) -> Mesh:
  return Mesh(np.array(jax.devices()), (axis_name,))


def shard_targets(targets: Array | np.ndarray, g: Array, mesh: Mesh | None = None,
                  axis_name: str = "targets") -> ShardedTargets:
  """Places targets (and g_j − ‖y_j‖²) on the devices of `mesh`, split along the target axis.

  Each device receives only its own slice (built by `jax.make_array_from_callback`), so no
  device and no padded host copy ever holds all N × d values at once. Default mesh: all
  devices on one axis.
  """
  mesh = _default_mesh(axis_name) if mesh is None else mesh
  if isinstance(mesh, (list, tuple)):
    mesh = Mesh(np.array(mesh), (axis_name,))
  num_shards = mesh.shape[axis_name]
  y = targets.reshape(targets.shape[0], -1)
  n, d = y.shape
  per_shard = -(-n // num_shards)
  n_pad = per_shard * num_shards
  g_host = np.asarray(g)
  dtype = y.dtype

  def rows(index) -> tuple[int, int]:
    sl = index[0]
    return sl.start or 0, n_pad if sl.stop is None else sl.stop

  def target_slice(index):
    lo, hi = rows(index)
    part = np.asarray(y[lo:min(hi, n)])
    if hi > n:
      part = np.concatenate([part, np.zeros((hi - max(lo, n), d), dtype)])
    return part

  def offset_slice(index):
    lo, hi = rows(index)
    part_y = np.asarray(y[lo:min(hi, n)], np.float64)
    off = (g_host[lo:min(hi, n)].astype(np.float64) - np.sum(part_y * part_y, axis=1))
    off = off.astype(dtype)
    if hi > n:
      off = np.concatenate([off, np.full((hi - max(lo, n),), -np.inf, dtype)])
    return off

  y_sharding = NamedSharding(mesh, P(axis_name, None))
  o_sharding = NamedSharding(mesh, P(axis_name))
  sharded_y = jax.make_array_from_callback((n_pad, d), y_sharding, target_slice)
  sharded_off = jax.make_array_from_callback((n_pad,), o_sharding, offset_slice)
  return ShardedTargets(sharded_y, sharded_off, n, mesh, axis_name)


@functools.lru_cache(maxsize=16)
def _sharded_assign_fn(mesh: Mesh, axis_name: str, block_size: int):

  def local(z, y_local, off_local):
    val, idx = _assign_device(z, y_local, off_local, block_size)
    shard = jax.lax.axis_index(axis_name)
    idx = idx + (shard * y_local.shape[0]).astype(jnp.int32)
    vals = jax.lax.all_gather(val, axis_name)  # (D, B)
    idxs = jax.lax.all_gather(idx, axis_name)
    # argmax over devices takes the first (smallest-index) device on ties, like jnp.argmax.
    winner = jnp.argmax(vals, axis=0)
    return jnp.take_along_axis(idxs, winner[None, :], axis=0)[0]

  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis_name, None), P(axis_name)),
                     out_specs=P(), check_vma=False)
  return jax.jit(fn)


def assign_sharded(z: Array, targets: Array | np.ndarray | ShardedTargets, g: Array | None = None,
                   mesh: Mesh | Sequence[Any] | None = None, *, axis_name: str = "targets",
                   block_size: int = 2048) -> Array:
  """`assign` with the target axis split across devices: indices (B,) int32.

  Every device runs the blocked running argmax over its own N/D targets for the whole
  (replicated) batch z; the D per-device maxima are all-gathered and the largest wins (ties to
  the smaller index). Pass a `ShardedTargets` from `shard_targets` to place the targets once
  and reuse them across batches; otherwise `targets`, `g` and `mesh` (a Mesh or a list of
  devices; default all devices) are placed on every call. A mesh over several processes
  works alike: every process passes the same z (and targets, g) and gets the same indices,
  bitwise those of one process (an all-gather and an argmax, no sums across processes).
  """
  if not isinstance(targets, ShardedTargets):
    if g is None:
      raise ValueError("assign_sharded needs the potential g unless targets is ShardedTargets.")
    targets = shard_targets(targets, g, mesh, axis_name)
  fn = _sharded_assign_fn(targets.mesh, targets.axis_name, int(block_size))
  z = _flat(jnp.asarray(z)).astype(targets.targets.dtype)
  z = jax.device_put(z, NamedSharding(targets.mesh, P()))
  return fn(z, targets.targets, targets.offsets)


# --------------------------------------------------------------------------------------
# The Monge map, placed once.


@dataclasses.dataclass(frozen=True)
class MongeMap:
  r"""T_g(z) = y_{j(z)}, j(z) = argmax_j g_j − ‖z − y_j‖²: the semi-discrete Monge map.

  Built by `monge_map`, which places the targets on the devices once; calling it on a batch
  z (B, d) returns the chosen targets (B, ...) as a host array and their indices (B,) int32.
  """

  targets: np.ndarray
  index_fn: Callable[[Array], Array]

  def __call__(self, z: Array) -> tuple[np.ndarray, np.ndarray]:
    index = np.asarray(self.index_fn(z), np.int32)
    return self.targets[index], index


def monge_map(targets: np.ndarray, g: Any, devices: Sequence[Any] | None = None,
              block_size: int = 2048) -> MongeMap:
  """The map T_g for targets (N, ...) and potential g (N,) on `devices` (default: this
  process's first).

  The targets stay on the host for the lookup; on one device the flattened targets are placed
  once and passed to the jitted blocked argmax as an argument (`assign`: never baked into the
  program as an N × d constant); on several the target axis is split across them
  (`shard_targets` once, `assign_sharded` per batch), so no device holds all N × d values.
  The devices may span several processes: each then places its own devices' targets, every
  process calls the map with the same z and gets the same (replicated) j(z).
  """
  targets = np.asarray(targets)
  flat = targets.reshape(len(targets), -1)
  devices = list(devices) if devices is not None else jax.local_devices()[:1]
  if len(devices) > 1:
    sharded = shard_targets(flat, g, mesh=devices)
    index_fn = lambda z: assign_sharded(z, sharded, block_size=block_size)  # noqa: E731
  else:
    y = jax.device_put(flat, devices[0])
    g_dev = jax.device_put(np.asarray(g, flat.dtype), devices[0])
    index_fn = lambda z: assign(z, y, g_dev, block_size)  # noqa: E731
  return MongeMap(targets, index_fn)


# --------------------------------------------------------------------------------------
# Diagnostics.


def _mass_errors(counts: np.ndarray, num_samples: int) -> dict[str, float]:
  n = counts.shape[0]
  masses = counts / num_samples
  return {
      "max_relative_error": float(np.max(np.abs(masses * n - 1.0))),
      "total_variation": float(0.5 * np.sum(np.abs(masses - 1.0 / n))),
      "empty_cells": int(np.sum(counts == 0)),
      "chi2": float(n * np.sum((masses - 1.0 / n) ** 2)),
  }


def marginal_error(key: Array, targets: Array, g: Array, num_samples: int,
                   source: str | Sampler = "gaussian", *, batch_size: int = 4096,
                   block_size: int = 2048) -> dict[str, float]:
  r"""Cell masses m_j = μ̂(L_j(g)) from `num_samples` fresh source points vs ν_j = 1/N.

  Returns 'max_relative_error' max_j |N m_j − 1|, 'total_variation' ½ Σ_j |m_j − 1/N|,
  'empty_cells' #{j : m_j = 0}, 'chi2' N Σ_j (m_j − 1/N)², and the same four for a perfect
  potential at the same sample count ('floor_*': counts Multinomial(S, 1/N), drawn as uniform
  random indices), i.e. the Monte-Carlo noise floor: with S samples even the exact potential
  shows TV ≈ √((N − 1)/(2πS)) and χ² ≈ (N − 1)/S.
  """
  y = jnp.asarray(targets).reshape(targets.shape[0], -1)
  n = y.shape[0]
  dtype = y.dtype
  key_src, key_floor = jax.random.split(key)
  counts = np.zeros((n,), np.int64)
  done = 0
  i = 0
  while done < num_samples:
    b = min(batch_size, num_samples - done)
    # A fixed batch shape (padding the last batch) keeps one compiled program.
    z = sample_source(jax.random.fold_in(key_src, i), (batch_size, y.shape[1]), source, dtype)
    idx = np.asarray(assign(z, y, g, block_size))[:b]
    counts += np.bincount(idx, minlength=n)
    done += b
    i += 1
  result = _mass_errors(counts, num_samples)
  floor_idx = np.asarray(jax.random.randint(key_floor, (num_samples,), 0, n))
  floor = _mass_errors(np.bincount(floor_idx, minlength=n), num_samples)
  result.update({f"floor_{k}": v for k, v in floor.items()})
  result["num_samples"] = int(num_samples)
  return result
