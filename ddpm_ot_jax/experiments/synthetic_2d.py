r"""Sec. 3.4 of Khrulkov et al. (2022): is the encoder pairing an optimal assignment?

For each of `num_densities` random densities of the paper's family (`densities`):

1. draw `num_samples` exact samples X0;
2. solve the Fokker–Planck equation (Eq. 8) for p_t on the grid (`fokker_planck.solve`);
3. push X0 through the probability-flow ODE (Eq. 9) over [0, t_max] with the grid score:
   X1 = E(X0) (`fokker_planck.encode`);
4. compare the cost of the encoder pairing x_i ↔ E(x_i) with the exact discrete OT cost
   (POT): ε_rel = (Cost(E) − Cost(OT)) / Cost(OT) (`ot.ot_relative_error`);
5. Brenier's check: the asymmetry ‖J − Jᵀ‖_F/‖J‖_F of the encoder's Jacobian
   (`fokker_planck.encoder_jacobian`) on the first `num_jacobian_samples` samples (its median),
   and the smallest eigenvalue of (J + Jᵀ)/2 there. An OT map has J symmetric positive
   semidefinite. With J's symmetric part positive definite, short cycles never beat the
   identity pairing; the curl shows up only through long cycles, where that part is small.

A `num_samples` sweep on the first `sweep_num_densities` densities shows how ε_rel depends on
n: the pairing (x, T(x)) of a true OT map T is optimal for every n, so a gap that grows with n
is evidence against optimality.

With `convergence_check_worst` > 0 the densities of largest ε_rel are solved again at twice
the table size and time levels with 100× tighter ODE tolerances (`convergence_check`): the
change of their codes is the numerical error of what the run reports.

Writes results.json (via main.py), arrays.npz (parameters, X0, X1 per density) and the
paper's Figures 2–4 (fig2_densities.png, fig3_costs.png, fig4_trajectories.png; drawn by
`plotting.densities_figure`, `costs_figure` and `trajectories_figure`).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_ot_jax import densities
from ddpm_ot_jax import flow
from ddpm_ot_jax import fokker_planck
from ddpm_ot_jax import ot
from ddpm_ot_jax import plotting
from ddpm_ot_jax.experiments import common

# The config fields this experiment reads (scripts/main.py rejects any other field or override).
CONFIG_FIELDS = ("atol", "convergence_check_worst", "grid_size", "max_components",
    "num_densities", "num_figure_densities", "num_jacobian_samples", "num_samples",
    "num_time_steps", "num_trajectory_points", "ot_method", "rtol", "solver",
    "sweep_num_densities", "sweep_num_samples", "t_max", "table_size", "target_std")

STAGES = ("density", "sample", "fokker_planck", "encode", "jacobian", "ot")
FIGURE_RESOLUTION = 512  # grid of the density images in Figs. 2 and 4


def grid_spec(config: ml_collections.ConfigDict) -> fokker_planck.GridSpec:
  """The Fokker–Planck grid of a config (grid_size, num_time_steps, table_size, t_max)."""
  return fokker_planck.GridSpec(grid_size=config.grid_size, num_time_steps=config.num_time_steps,
                     table_size=config.table_size, t_max=config.t_max)


def solver_options(config: ml_collections.ConfigDict) -> flow.SolverOptions:
  """The ODE solver of a config (solver, rtol, atol)."""
  return flow.SolverOptions(solver=config.solver, rtol=config.rtol, atol=config.atol)


def _validate(config: ml_collections.ConfigDict) -> None:
  for name in ("num_densities", "grid_size", "num_time_steps", "num_samples", "table_size"):
    if int(config[name]) < 1:
      raise ValueError(f"config.{name} must be positive, got {config[name]}.")
  if config.num_samples < 2:
    raise ValueError("config.num_samples must be at least 2 (OT needs a pairing).")
  if config.ot_method not in ("pot", "scipy"):
    raise ValueError(f"config.ot_method must be 'pot' or 'scipy', got {config.ot_method!r}.")
  if not 1 <= config.max_components <= 5:
    raise ValueError(f"config.max_components must be in 1..5 (the paper: 5), got {config.max_components}.")


@dataclasses.dataclass
class DensityResult:
  """Everything measured on one density."""

  mixture: densities.QuarticMixture
  x0: np.ndarray
  x1: np.ndarray
  cost_encoder: float
  cost_ot: float
  ot_relative_error: float
  identity_fraction: float
  jacobian_asymmetry_median: float
  jacobian_min_symmetric_eigenvalue: float
  nfe: int
  seconds: dict[str, float]
  cpu_seconds: dict[str, float]
  trajectory: np.ndarray | None = None  # (n, num_saved_times, 2): Eq. 9 trajectories of X0


def process_density(
    key: jax.Array,
    config: ml_collections.ConfigDict,
    spec: fokker_planck.GridSpec,
    encode: fokker_planck.EncodeFn,
    jacobian: fokker_planck.JacobianFn,
) -> tuple[DensityResult, fokker_planck.ScoreTables]:
  """Runs stages 1–5 on the density drawn from `key`; returns the result and its tables."""
  k_density, k_sample = jax.random.split(key)
  seconds, cpu_seconds = {}, {}
  clock, cpu_clock = time.perf_counter(), time.process_time()

  def lap(stage, value=None):
    nonlocal clock, cpu_clock
    if value is not None:
      jax.block_until_ready(value)
    now, cpu_now = time.perf_counter(), time.process_time()
    seconds[stage], cpu_seconds[stage] = now - clock, cpu_now - cpu_clock
    clock, cpu_clock = now, cpu_now

  mixture = densities.random_quartic_mixture(
      k_density, max_components=config.max_components, target_std=config.target_std,
      grid_size=config.grid_size)
  lap("density", mixture.log_norm)
  x0 = densities.sample(mixture, k_sample, config.num_samples)
  lap("sample", x0)
  log_weights = -np.log(mixture.num_components) * np.ones(mixture.num_components)
  tables, info = fokker_planck.solve(densities.log_prob, densities.components(mixture), log_weights, spec)
  if np.any(np.abs(info.mass - 1.0) > 1e-6):
    raise ValueError(f"a component is not contained in the grid domain (masses {info.mass}).")
  lap("fokker_planck", tables.coeffs)
  sol = encode(tables, x0)
  lap("encode", sol.x)
  n_jac = min(config.num_jacobian_samples, config.num_samples)
  asym = min_eig = float("nan")
  if n_jac > 0:
    jac = jacobian(tables, x0[:n_jac])
    asym = float(jnp.median(ot.jacobian_asymmetry(jac)))
    min_eig = float(jnp.min(ot.min_symmetric_eigenvalue(jac)))
  lap("jacobian", jnp.asarray(asym))
  x0_np, x1_np = np.asarray(x0), np.asarray(sol.x)
  test = ot.ot_relative_error(x0_np, x1_np, config.ot_method)
  lap("ot")
  result = DensityResult(
      mixture=mixture, x0=x0_np, x1=x1_np, cost_encoder=test["cost_encoder"], cost_ot=test["cost_ot"],
      ot_relative_error=test["ot_relative_error"], identity_fraction=test["identity_fraction"],
      jacobian_asymmetry_median=asym, jacobian_min_symmetric_eigenvalue=min_eig, nfe=int(sol.nfe[0]),
      seconds=seconds, cpu_seconds=cpu_seconds,
      trajectory=None if sol.trajectory is None else np.asarray(sol.trajectory))
  return result, tables


def sample_size_sweep(
    key: jax.Array,
    mixture: densities.QuarticMixture,
    tables: fokker_planck.ScoreTables,
    sizes: Sequence[int],
    config: ml_collections.ConfigDict,
    encode: fokker_planck.EncodeFn,
) -> list[float]:
  """ε_rel of fresh samples of each size n (same density and tables)."""
  out = []
  for n in sizes:
    x0 = densities.sample(mixture, jax.random.fold_in(key, n), int(n))
    x1 = encode(tables, x0).x
    out.append(ot.ot_relative_error(np.asarray(x0), np.asarray(x1), config.ot_method)["ot_relative_error"])
  return out


def _pad_components(values: list[np.ndarray], k_max: int) -> np.ndarray:
  """Stacks per-density component arrays (K_i, ...) into (N, k_max, ...), zero-padded."""
  out = np.zeros((len(values), k_max) + values[0].shape[1:])
  for i, v in enumerate(values):
    out[i, :len(v)] = v
  return out


def finer_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same experiment at twice the table size and time levels and 100× tighter tolerances."""
  fine = copy.deepcopy(config)
  fine.table_size = 2 * config.table_size
  fine.num_time_steps = 2 * config.num_time_steps
  fine.rtol, fine.atol = 1e-2 * config.rtol, 1e-2 * config.atol
  return fine


def convergence_check(config: ml_collections.ConfigDict, key: jax.Array, eps: np.ndarray,
                      results: list[DensityResult]) -> dict[str, Any]:
  """Re-solves the `config.convergence_check_worst` densities of largest ε_rel with
  `finer_config`: same density and samples, so any change is numerical error.

  Keys: convergence_indices, convergence_code_relative_change ‖X1_fine − X1‖ / ‖X1_fine‖,
  convergence_ot_relative_error_fine, convergence_jacobian_asymmetry_fine (lists).
  """
  fine = finer_config(config)
  encode, jacobian = fokker_planck.jitted(solver_options(fine), fokker_planck.NUM_SAVED_TIMES)
  indices = [int(i) for i in np.argsort(-eps, kind="stable")[:config.convergence_check_worst]]
  change, eps_fine, asym_fine = [], [], []
  for i in indices:
    result, _ = process_density(jax.random.fold_in(key, i), fine, grid_spec(fine), encode, jacobian)
    change.append(float(np.linalg.norm(result.x1 - results[i].x1) / np.linalg.norm(result.x1)))
    eps_fine.append(result.ot_relative_error)
    asym_fine.append(result.jacobian_asymmetry_median)
    logging.info("convergence check, density %d: codes change by %.2g (relative); eps_rel %.6g → %.6g",
                 i, change[-1], results[i].ot_relative_error, result.ot_relative_error)
  return {"convergence_indices": indices, "convergence_code_relative_change": change,
          "convergence_ot_relative_error_fine": eps_fine,
          "convergence_jacobian_asymmetry_fine": asym_fine}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The 150-density experiment; returns the flat results dict (see module docstring)."""
  _validate(config)
  common.set_precision(config.x64)
  spec = grid_spec(config)
  options = solver_options(config)
  # Every encode saves its trajectories (cheap), so Fig. 4 needs no solve of its own.
  encode, jacobian = fokker_planck.jitted(options, fokker_planck.NUM_SAVED_TIMES)
  key = jax.random.PRNGKey(config.seed)
  sweep_sizes = [int(n) for n in config.sweep_num_samples]
  num_sweep = min(config.sweep_num_densities, config.num_densities) if sweep_sizes else 0
  num_fig = min(config.num_figure_densities, config.num_densities)

  results: list[DensityResult] = []
  sweep_rows = []
  start = time.perf_counter()
  for i in range(config.num_densities):
    key_i = jax.random.fold_in(key, i)
    result, tables = process_density(key_i, config, spec, encode, jacobian)
    results.append(result)
    if i < num_sweep:
      sweep_rows.append(sample_size_sweep(jax.random.fold_in(key_i, 1), result.mixture, tables, sweep_sizes,
                                          config, encode))
    if i >= min(2, num_fig):
      result.trajectory = None  # keep trajectories for Fig. 4 only
    elapsed = time.perf_counter() - start
    eta = elapsed / (i + 1) * (config.num_densities - i - 1)
    stage_text = " ".join(f"{s}={result.seconds[s]:.2f}" for s in STAGES)
    logging.info("%s %d/%d K=%d eps_rel=%.3g identity=%.3f asym=%.2g nfe=%d | %s | %.1fs elapsed, ETA %s",
                 common.progress_bar(i + 1, config.num_densities), i + 1, config.num_densities,
                 result.mixture.num_components,
                 result.ot_relative_error,
                 result.identity_fraction, result.jacobian_asymmetry_median, result.nfe, stage_text, elapsed,
                 common.format_seconds(eta))
  seconds_total = time.perf_counter() - start

  per_density = np.array([sum(r.seconds.values()) for r in results])
  per_density_cpu = np.array([sum(r.cpu_seconds.values()) for r in results])
  stage_table = {s: np.array([r.seconds[s] for r in results]) for s in STAGES}
  cpu_table = {s: np.array([r.cpu_seconds[s] for r in results]) for s in STAGES}
  logging.info("Stage timing, seconds per density (wall | process CPU); the first density of each K "
               "includes compilation:")
  logging.info("  %-14s %8s %8s %8s %8s | %8s %8s", "stage", "median", "mean", "max", "total", "cpu med", "cpu tot")
  for s in STAGES + ("all",):
    v = per_density if s == "all" else stage_table[s]
    c = per_density_cpu if s == "all" else cpu_table[s]
    logging.info("  %-14s %8.3f %8.3f %8.3f %8.1f | %8.3f %8.1f", s, np.median(v), v.mean(), v.max(), v.sum(),
                 np.median(c), c.sum())

  eps = np.array([r.ot_relative_error for r in results])
  out: dict[str, Any] = {
      "num_densities": config.num_densities,
      "grid_size": config.grid_size,
      "num_time_steps": config.num_time_steps,
      "num_samples": config.num_samples,
      "table_size": config.table_size,
      "ot_relative_error": eps.tolist(),
      "ot_relative_error_median": float(np.median(eps)),
      "ot_relative_error_max": float(eps.max()),
      "ot_relative_error_num_zero": int(np.sum(eps <= 0.0)),
      "identity_fraction": [r.identity_fraction for r in results],
      "jacobian_asymmetry_median": [r.jacobian_asymmetry_median for r in results],
      "jacobian_min_symmetric_eigenvalue": [r.jacobian_min_symmetric_eigenvalue for r in results],
      "cost_encoder": [r.cost_encoder for r in results],
      "cost_ot": [r.cost_ot for r in results],
      "num_components": [r.mixture.num_components for r in results],
      "nfe": [r.nfe for r in results],
      "seconds_per_density": float(np.median(per_density[1:] if len(per_density) > 1 else per_density)),
      "cpu_seconds_per_density": float(np.median(per_density_cpu[1:] if len(results) > 1 else per_density_cpu)),
      "seconds_total": seconds_total,
  }
  for s in STAGES:
    v = stage_table[s][1:] if len(results) > 1 else stage_table[s]
    out[f"seconds_{s}_median"] = float(np.median(v))
  if sweep_rows:
    sweep = np.array(sweep_rows)  # (num_sweep, len(sizes))
    out["sweep_num_samples"] = sweep_sizes
    out["sweep_ot_relative_error_median"] = np.median(sweep, axis=0).tolist()
    out["sweep_ot_relative_error_max"] = sweep.max(axis=0).tolist()
    for j, n in enumerate(sweep_sizes):
      out[f"ot_relative_error_n{n}"] = sweep[:, j].tolist()

  if config.convergence_check_worst > 0:
    out.update(convergence_check(config, key, eps, results))

  k_max = config.max_components
  common.save_npz(
      os.path.join(workdir, "arrays.npz"),
      a1=_pad_components([np.asarray(r.mixture.a1) for r in results], k_max),
      q1=_pad_components([np.asarray(r.mixture.q1) for r in results], k_max),
      a2=_pad_components([np.asarray(r.mixture.a2) for r in results], k_max),
      q2=_pad_components([np.asarray(r.mixture.q2) for r in results], k_max),
      log_norm=_pad_components([np.asarray(r.mixture.log_norm) for r in results], k_max),
      num_components=np.array([r.mixture.num_components for r in results]),
      x0=np.stack([r.x0 for r in results]),
      x1=np.stack([r.x1 for r in results]),
      cost_encoder=np.array(out["cost_encoder"]),
      cost_ot=np.array(out["cost_ot"]),
      ot_relative_error=eps,
  )
  grids = [densities.mixture_log_density_grid(r.mixture, FIGURE_RESOLUTION) for r in results[:num_fig]]
  common.save_figure(plotting.densities_figure(grids, [r.mixture.num_components for r in results[:num_fig]]),
                     os.path.join(workdir, "fig2_densities.png"))
  common.save_figure(plotting.costs_figure(np.array(out["cost_ot"]), np.array(out["cost_encoder"]), eps),
                     os.path.join(workdir, "fig3_costs.png"))
  shown = results[:min(2, num_fig)]
  if shown:
    common.save_figure(
        plotting.trajectories_figure(grids[:len(shown)], [r.trajectory for r in shown], config.t_max,
                                     config.num_trajectory_points),
        os.path.join(workdir, "fig4_trajectories.png"))
  return out
