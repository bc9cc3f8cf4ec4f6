r"""Semi-discrete OT: ott-jax's SemidiscreteSolver vs the DPM-OT / AE-OT reference algorithm.

  python scripts/bench_semidiscrete.py           # digits 1797×64 and 10000×3072
  python scripts/bench_semidiscrete.py --small   # quick CPU run (500×3072 CIFAR-sized set)

Targets: scikit-learn's digits (1797 × 64, pixels on [−1, 1]) and a CIFAR-sized set of random
smooth RGB images (N × 32·32·3). Both solvers get the same targets, the same source
(N(0, I)), the same initial potential (--init), the same stopping rule and the same judge: every --eval_every iterations the current potential is scored by
`semidiscrete.marginal_error` on the same S fresh source samples (one fixed key), and a solver
stops once the total variation of its cell masses from 1/N is ≤ --target_factor × the TV a
perfect potential shows at that S (the Monte-Carlo floor), or at its iteration cap. Seconds
count solver iterations only (compilation excluded; evaluation excluded for both).

Peers:
* ott-jax: `SemidiscreteSolver.step` (ott's loss, hard-assignment gradient and optax Adam with
  cosine decay from --ott_learning_rate over --ott_iterations, EMA of g as in its solver),
  --ott_batch_size samples per iteration, driven in jitted chunks of --eval_every steps.
* reference: the AE-OT `pyOMT_raw.run_gd` algorithm as DPM-OT uses it, re-written here in JAX:
  heights h, cells argmax_j ⟨x, y_j⟩ + h_j found over target blocks with a running max;
  cell masses from (--reference_samples_factor · N) source samples per iteration in chunks;
  Adam without bias correction (β = 0.9, 0.999, lr --reference_learning_rate = 0.1), h
  re-centred each step; when ‖∇E‖ has not improved for 30 iterations the sample count
  doubles and lr × 0.8. (The reference's own stop, ‖∇E‖ < 8e-4 with no empty cell, is
  replaced by the shared rule; it draws Sobol / uniform points, here Gaussian for both.)

Writes --out (JSON) and prints a table.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
import numpy as np
import optax

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddpm_ot_jax import semidiscrete  # pylint: disable=g-import-not-at-top
from ddpm_ot_jax.experiments import common  # pylint: disable=g-import-not-at-top
from ott.geometry import semidiscrete_pointcloud  # pylint: disable=g-import-not-at-top
from ott.problems.linear import semidiscrete_linear_problem  # pylint: disable=g-import-not-at-top
from ott.solvers.linear import semidiscrete as ott_semidiscrete  # pylint: disable=g-import-not-at-top,line-too-long

_PROBLEMS = flags.DEFINE_list("problems", ["digits", "cifar"], "Which target sets: digits, cifar.")
_SOLVERS = flags.DEFINE_list("solvers", ["ott", "reference"], "Which solvers to run.")
_SMALL = flags.DEFINE_bool("small", False, "Quick settings: smaller CIFAR-sized set, fewer steps.")
_CIFAR_N = flags.DEFINE_integer("cifar_num_targets", 10000, "N of the CIFAR-sized random set.")
_CIFAR_SIDE = flags.DEFINE_integer("cifar_side", 32, "Side of the CIFAR-sized random images "
                                   "(d = side² · 3).")
_INIT = flags.DEFINE_enum("init", "h0", ["h0", "g0"],
                          "Common start of both solvers: h = 0 (the reference's start, "
                          "g = ‖y‖² − mean) or g = 0 (ott's default start).")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 100, "Iterations between shared evaluations.")
_EVAL_FACTOR = flags.DEFINE_integer("eval_samples_per_target", 100,
                                    "S = this × N fresh samples for the shared evaluation.")
_TARGET = flags.DEFINE_float("target_factor", 1.5, "Stop at TV ≤ this × the Monte-Carlo floor.")
_OTT_ITERS = flags.DEFINE_integer("ott_iterations", 3000, "ott: cap and cosine-decay horizon.")
_OTT_BATCH = flags.DEFINE_integer("ott_batch_size", 1024, "ott: source samples per iteration.")
_OTT_LR = flags.DEFINE_float("ott_learning_rate", 0.05, "ott: initial Adam learning rate (g).")
_REF_ITERS = flags.DEFINE_integer("reference_iterations", 5000, "reference: iteration cap.")
_REF_LR = flags.DEFINE_float("reference_learning_rate", 0.1, "reference: Adam lr (units of h).")
_REF_FACTOR = flags.DEFINE_integer("reference_samples_factor", 10,
                                   "reference: initial samples per iteration = this × N.")
_REF_CHUNK = flags.DEFINE_integer("reference_chunk", 4096, "reference: samples per chunk.")
_BLOCK = flags.DEFINE_integer("block_size", 2048, "Target block size of the running argmax.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_OUT = flags.DEFINE_string("out", "bench_results/semidiscrete.json", "JSON output path.")


# --------------------------------------------------------------------------------------
# Targets.


def digits_targets() -> np.ndarray:
  import sklearn.datasets  # pylint: disable=g-import-not-at-top
  images = sklearn.datasets.load_digits().images.reshape(-1, 64)
  return (images / 8.0 - 1.0).astype(np.float32)


def random_image_targets(key: jax.Array, n: int, side: int) -> np.ndarray:
  """Random smooth RGB 'images' on [−1, 1], flattened to d = side² · 3.

  Uniform 4×4×3 colour fields upsampled bilinearly plus 0.1·N(0, 1) pixel noise, clipped: the
  pixels are correlated and the norms vary, as in real images. (I.i.d. uniform pixels would be
  a degenerate test: in high dimension such targets are nearly orthogonal with equal norms, so
  h = 0 already balances the cells.)
  """
  k_low, k_noise = jax.random.split(key)
  low = jax.random.uniform(k_low, (n, 4, 4, 3), jnp.float32, -1.0, 1.0)
  images = jax.image.resize(low, (n, side, side, 3), "bilinear")
  images = images + 0.1 * jax.random.normal(k_noise, images.shape)
  return np.asarray(jnp.clip(images, -1.0, 1.0).reshape(n, -1))


def initial_potential(targets: np.ndarray, init: str) -> np.ndarray:
  """g at the start of both solvers: 0, or ‖y_j‖² − mean (h = 0)."""
  if init == "g0":
    return np.zeros(len(targets), np.float32)
  sq = np.sum(targets.astype(np.float64) ** 2, axis=1)
  return (sq - sq.mean()).astype(np.float32)


# --------------------------------------------------------------------------------------
# The shared judge.


@dataclasses.dataclass
class Judge:
  targets: np.ndarray
  key: jax.Array
  num_samples: int
  target_factor: float
  block_size: int
  floor_tv: float = float("nan")
  seconds: float = 0.0

  def __call__(self, g: jax.Array) -> dict[str, float]:
    start = time.perf_counter()
    err = semidiscrete.marginal_error(self.key, self.targets, g, self.num_samples,
                                      block_size=self.block_size)
    self.floor_tv = err["floor_total_variation"]
    self.seconds += time.perf_counter() - start
    return err

  def reached(self, err: dict[str, float]) -> bool:
    return err["total_variation"] <= self.target_factor * err["floor_total_variation"]


@dataclasses.dataclass
class RunResult:
  name: str
  iterations: int
  seconds: float
  reached: bool
  total_variation: float
  max_relative_error: float
  empty_cells: int
  history: list[tuple[int, float, float]]  # (iteration, seconds, TV)
  extra: dict[str, Any]


# --------------------------------------------------------------------------------------
# ott-jax.


def _normal(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  return jax.random.normal(key, shape, dtype)


def run_ott(targets: np.ndarray, g_init: np.ndarray, judge: Judge, key: jax.Array,
            num_iterations: int, batch_size: int, learning_rate: float,
            eval_every: int) -> RunResult:
  y = jnp.asarray(targets)
  geom = semidiscrete_pointcloud.SemidiscretePointCloud(_normal, y, epsilon=0.0)
  prob = semidiscrete_linear_problem.SemidiscreteLinearProblem(geom)
  solver = ott_semidiscrete.SemidiscreteSolver(
      num_iterations=num_iterations, batch_size=batch_size,
      optimizer=optax.adam(optax.cosine_decay_schedule(learning_rate, num_iterations)),
      error_eval_every=num_iterations)
  g0 = jnp.asarray(g_init, y.dtype)
  state = ott_semidiscrete.SemidiscreteState(
      it=jnp.array(0), epsilon=jnp.array(0.0, y.dtype), g=g0, g_ema=g0,
      opt_state=solver.optimizer.init(g0),
      losses=jnp.full((num_iterations,), jnp.inf, y.dtype),
      grad_norms=jnp.full((num_iterations,), jnp.inf, y.dtype),
      errors=jnp.full((1,), jnp.inf, y.dtype))

  @functools.partial(jax.jit, static_argnums=2)
  def chunk(state, start, length):
    def body(s, it):
      return solver.step(jax.random.fold_in(key, it), s, prob), None
    return jax.lax.scan(body, state, start + jnp.arange(length))[0]

  jax.block_until_ready(chunk(state, 0, eval_every))  # compile
  history, seconds, it = [], 0.0, 0
  err = judge(g0)
  while it < num_iterations and not judge.reached(err):
    length = min(eval_every, num_iterations - it)
    if length != eval_every:
      jax.block_until_ready(chunk(state, it, length))  # compile the last, shorter chunk
    start = time.perf_counter()
    state = jax.block_until_ready(chunk(state, it, length))
    seconds += time.perf_counter() - start
    it += length
    err = judge(state.g_ema)  # the potential ott's solver returns
    history.append((it, seconds, err["total_variation"]))
    print(f"  ott        it {it:6d}  {seconds:8.1f} s  TV {err['total_variation']:.4f} "
          f"(target {judge.target_factor * err['floor_total_variation']:.4f})", flush=True)
  return RunResult("ott-jax", it, seconds, judge.reached(err), err["total_variation"],
                   err["max_relative_error"], err["empty_cells"], history,
                   {"batch_size": batch_size, "learning_rate": learning_rate,
                    "samples_per_iteration": batch_size})


# --------------------------------------------------------------------------------------
# The reference algorithm (AE-OT pyOMT_raw.run_gd, as used by DPM-OT), in JAX.


def _reference_cell_counts(key: jax.Array, y: jax.Array, h: jax.Array, num_chunks: jax.Array,
                           chunk: int, block: int) -> jax.Array:
  """Histogram of argmax_j ⟨x, y_j⟩ + h_j over num_chunks × chunk source samples."""
  n, d = y.shape
  num_blocks = -(-n // block)
  pad = num_blocks * block - n
  y_blocks = jnp.pad(y, ((0, pad), (0, 0))).reshape(num_blocks, block, d)
  h_blocks = jnp.pad(h, (0, pad), constant_values=-jnp.inf).reshape(num_blocks, block)

  def one_chunk(c, counts):
    x = jax.random.normal(jax.random.fold_in(key, c), (chunk, d), y.dtype)

    def one_block(b, best):
      val, idx = best
      u = x @ y_blocks[b].T + h_blocks[b][None, :]  # U = P X + H
      bval, bidx = jnp.max(u, axis=1), jnp.argmax(u, axis=1) + b * block
      better = bval > val
      return jnp.where(better, bval, val), jnp.where(better, bidx, idx)

    init = (jnp.full((chunk,), -jnp.inf, y.dtype), jnp.zeros((chunk,), jnp.int32))
    _, idx = jax.lax.fori_loop(0, num_blocks, one_block, init)
    return counts + jnp.bincount(idx, length=n)

  return jax.lax.fori_loop(0, num_chunks, one_chunk, jnp.zeros((n,), jnp.int32))


@functools.partial(jax.jit, static_argnames=("chunk", "block"))
def _reference_step(key, y, h, m, v, lr, num_chunks, chunk: int, block: int):
  n = y.shape[0]
  counts = _reference_cell_counts(key, y, h, num_chunks, chunk, block)
  grad = counts / (num_chunks * chunk) - 1.0 / n  # ∇E = μ(W_j) − ν_j
  m = 0.9 * m + 0.1 * grad
  v = 0.999 * v + 0.001 * grad * grad
  h = h - lr * m / (jnp.sqrt(v) + 1e-8)
  h = h - jnp.mean(h)
  return h, m, v, jnp.linalg.norm(grad), jnp.sum(counts == 0)


def run_reference(targets: np.ndarray, g_init: np.ndarray, judge: Judge, key: jax.Array,
                  max_iterations: int,
                  learning_rate: float, samples_factor: int, chunk: int, block: int,
                  eval_every: int) -> RunResult:
  y = jnp.asarray(targets)
  n = y.shape[0]
  chunk = min(chunk, samples_factor * n)
  num_chunks = max(1, round(samples_factor * n / chunk))
  h = semidiscrete.heights_from_potential(jnp.asarray(g_init, y.dtype), y)
  h = h - jnp.mean(h)
  m = jnp.zeros_like(h)
  v = jnp.zeros_like(h)
  lr = learning_rate
  best_norm, count_bad, doublings = math.inf, 0, 0
  step = lambda it, h, m, v: _reference_step(jax.random.fold_in(key, it), y, h, m, v,
                                             jnp.asarray(lr, y.dtype), jnp.int32(num_chunks),
                                             chunk, block)
  jax.block_until_ready(step(0, h, m, v))  # compile
  history, seconds, it = [], 0.0, 0
  err = judge(semidiscrete.potential_from_heights(h, y))
  while it < max_iterations and not judge.reached(err):
    start = time.perf_counter()
    for _ in range(min(eval_every, max_iterations - it)):
      h, m, v, g_norm, _ = step(it, h, m, v)
      g_norm = float(g_norm)  # the reference reads it every step (plateau rule)
      if g_norm <= best_norm:
        best_norm, count_bad = g_norm, 0
      else:
        count_bad += 1
      if count_bad > 30:
        num_chunks *= 2
        lr *= 0.8
        doublings += 1
        best_norm, count_bad = math.inf, 0
      it += 1
    jax.block_until_ready(h)
    seconds += time.perf_counter() - start
    err = judge(semidiscrete.potential_from_heights(h, y))
    history.append((it, seconds, err["total_variation"]))
    print(f"  reference  it {it:6d}  {seconds:8.1f} s  TV {err['total_variation']:.4f} "
          f"samples/it {num_chunks * chunk}  lr {lr:.3g}", flush=True)
  return RunResult("reference (AE-OT/DPM-OT)", it, seconds, judge.reached(err),
                   err["total_variation"], err["max_relative_error"], err["empty_cells"], history,
                   {"learning_rate": learning_rate, "final_learning_rate": lr,
                    "samples_per_iteration_start": samples_factor * n,
                    "samples_per_iteration_end": num_chunks * chunk, "doublings": doublings})


# --------------------------------------------------------------------------------------


def bench_problem(name: str, targets: np.ndarray, key: jax.Array, ott_iterations: int,
                  reference_iterations: int) -> dict[str, Any]:
  n, d = targets.shape
  k_judge, k_ott, k_ref = jax.random.split(key, 3)
  judge = Judge(targets, k_judge, _EVAL_FACTOR.value * n, _TARGET.value, _BLOCK.value)
  g_init = initial_potential(targets, _INIT.value)
  print(f"{name}: N={n}, d={d}, judge S={judge.num_samples}", flush=True)
  results = []
  if "ott" in _SOLVERS.value:
    results.append(run_ott(targets, g_init, judge, k_ott, ott_iterations, _OTT_BATCH.value,
                           _OTT_LR.value, _EVAL_EVERY.value))
  if "reference" in _SOLVERS.value:
    results.append(run_reference(targets, g_init, judge, k_ref, reference_iterations,
                                 _REF_LR.value,
                                 _REF_FACTOR.value, _REF_CHUNK.value, _BLOCK.value,
                                 _EVAL_EVERY.value))
  runs = {}
  for r in results:
    runs[r.name] = {
        "iterations": r.iterations, "seconds": r.seconds,
        "seconds_per_iteration": r.seconds / max(r.iterations, 1),
        "reached_target": r.reached, "total_variation": r.total_variation,
        "max_relative_error": r.max_relative_error, "empty_cells": r.empty_cells,
        "history": r.history, **r.extra}
  out = {
      "num_targets": n, "dim": d, "judge_samples": judge.num_samples,
      "initial_total_variation": judge(jnp.asarray(g_init))["total_variation"],
      "floor_total_variation": judge.floor_tv,
      "target_total_variation": judge.target_factor * judge.floor_tv,
      "runs": runs,
  }
  if len(results) == 2:
    ott_result, ref_result = results
    # > 1: ott-jax is faster. Only a like-for-like ratio when both reached the target.
    out["time_ratio_reference_over_ott"] = ref_result.seconds / max(ott_result.seconds, 1e-9)
    out["iteration_ratio_reference_over_ott"] = ref_result.iterations / max(ott_result.iterations,
                                                                            1)
    out["ratio_is_at_equal_accuracy"] = ott_result.reached and ref_result.reached
  return out


def main(argv):
  del argv
  key = jax.random.key(_SEED.value)
  small = _SMALL.value
  problems = {}
  for name in _PROBLEMS.value:
    key, k_targets, k_run = jax.random.split(key, 3)
    if name == "digits":
      targets = digits_targets()
      ott_iters = _OTT_ITERS.value
      ref_iters = _REF_ITERS.value
    elif name == "cifar":
      n = min(_CIFAR_N.value, 500) if small else _CIFAR_N.value
      targets = random_image_targets(k_targets, n, _CIFAR_SIDE.value)
      ott_iters = min(_OTT_ITERS.value, 1500) if small else _OTT_ITERS.value
      ref_iters = min(_REF_ITERS.value, 250) if small else _REF_ITERS.value
    else:
      raise app.UsageError(f"Unknown problem {name!r}; choose digits or cifar.")
    problems[name] = bench_problem(name, targets, k_run, ott_iters, ref_iters)

  result = {
      "device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
      "cpu_count": os.cpu_count(), "small": small, "target_factor": _TARGET.value,
      "init": _INIT.value,
      "eval_every": _EVAL_EVERY.value, "problems": problems,
  }
  common.write_json(_OUT.value, result)

  header = (f"{'problem':8s} {'N×d':>12s} {'solver':26s} {'iters':>7s} {'seconds':>9s} "
            f"{'s/iter':>8s} {'TV':>7s} {'target':>7s} {'reached':>7s}")
  print("\n" + header + "\n" + "-" * len(header))
  for name, p in problems.items():
    for solver, r in p["runs"].items():
      print(f"{name:8s} {p['num_targets']:>6d}×{p['dim']:<5d} {solver:26s} {r['iterations']:7d} "
            f"{r['seconds']:9.1f} {r['seconds_per_iteration']:8.4f} {r['total_variation']:7.4f} "
            f"{p['target_total_variation']:7.4f} {str(r['reached_target']):>7s}")
    if "time_ratio_reference_over_ott" not in p:
      continue
    print(f"{name:8s} time ratio reference/ott = {p['time_ratio_reference_over_ott']:.2f}, "
          f"iteration ratio = {p['iteration_ratio_reference_over_ott']:.2f}"
          + ("" if p["ratio_is_at_equal_accuracy"] else "  (not both at the target)"))
  print(f"\nwrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
