r"""Speed and accuracy of the grid Fokker–Planck score, for grids 256, 512 and 1024.

  python scripts/bench_fokker_planck.py [--config=configs/bench/fokker_planck.py] [--config.grids=256,512]

Reads configs/bench/fokker_planck.py (ml_collections, `--config.KEY=VALUE` overrides, as
scripts/main.py): config.grids, config.num_samples, config.seed, config.out.

Accuracy (Gaussian mixtures, whose score `gmm.score_fn` is exact at every t), over the region
that holds 1 − 1e−6 of the mass of p_t (the points of a 300² grid on [−7, 7]² above the density
level enclosing that mass):
  * score_err_pointwise_t{t}: max_x |s_grid(x) − s_exact(x)| / |s_exact(x)|, the max pointwise
    relative error that issue 3 asks for (it is largest near the modes and saddles of p_t, where
    |s_exact| passes through 0, so it bounds the error relative to the local score);
  * score_err_over_rms_t{t}: max_x |s_grid(x) − s_exact(x)| / RMS_{p_t}|s_exact| (the absolute
    error in units of the typical score);
  * encoder_err: ‖E_grid(X0) − E_exact(X0)‖ / ‖E_exact(X0)‖ over samples (same ODE solver,
    E_exact by `flow.encode` with the exact score);
  for two decompositions: 'gaussian' (each Gaussian is a component, the solver's intended
  use) and 'pairs' (each component is a pair of overlapping Gaussians: a non-Gaussian R that
  the splines must interpolate).
Speed (one density of the paper's family, K components, config.num_samples samples): seconds
of the grid solve, the ODE (encode), the Jacobians and exact OT, after a warm-up.
Prints a table and writes JSON (config.out).
"""
from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)
from ddpm_ot_jax import densities  # pylint: disable=g-import-not-at-top
from ddpm_ot_jax import flow
from ddpm_ot_jax import fokker_planck
from ddpm_ot_jax import gmm
from ddpm_ot_jax import ot
from ddpm_ot_jax import sde
from ddpm_ot_jax.experiments import common

DEFAULT_CONFIG = os.path.join(_REPO, "configs", "bench", "fokker_planck.py")
_TIMES = (0.0, 1e-3, 0.01, 0.1, 1.0, 4.0)
_SCHEDULE = sde.ConstantSchedule(2.0, 8.0)
_OPTIONS = flow.SolverOptions(solver="dopri8", rtol=1e-8, atol=1e-8)


def validation_mixture():
  """Six Gaussians in three overlapping pairs (the family's scale: std 0.3–0.7, spread ~2)."""
  base = gmm.random_mixture(jax.random.PRNGKey(0), 2, 3, mean_scale=1.5, eig_min=0.08, eig_max=0.5)
  offsets = jnp.array([[0.35, 0.1], [-0.2, 0.3], [0.1, -0.3]])
  means = jnp.stack([base.means + offsets, base.means - offsets], 1)
  covs = jnp.stack([base.covs, base.covs[::-1]], 1)
  full = gmm.GaussianMixture(jnp.repeat(base.weights, 2) / 2, means.reshape(6, 2), covs.reshape(6, 2, 2))
  return full, means, covs, base.weights


def mass_region_error(tables, mixture, t, resolution=300, extent=7.0, mass=1.0 - 1e-6) -> dict[str, float]:
  """Over the grid points of the smallest region holding `mass` of p_t: max |Δs(x)| / |s(x)|
  ('pointwise') and max |Δs(x)| / RMS_{p_t}|s| ('over_rms'), with Δs = s_grid − s_exact."""
  nodes = np.linspace(-extent, extent, resolution)
  pts = jnp.asarray(np.stack(np.meshgrid(nodes, nodes, indexing="ij"), -1).reshape(-1, 2))
  marginal = gmm.marginal(mixture, _SCHEDULE, t)
  p = np.exp(np.asarray(jax.jit(jax.vmap(gmm.log_prob, in_axes=(None, 0)))(marginal, pts)))
  order = np.argsort(p)[::-1]
  cum = np.cumsum(p[order]) / p.sum()
  region = order[:np.searchsorted(cum, mass) + 1]
  exact = np.asarray(jax.vmap(gmm.score_fn(mixture, _SCHEDULE), in_axes=(0, None))(pts[region], t))
  grid = np.asarray(fokker_planck.batch_score(tables, pts[region], t))
  rms = np.sqrt(np.sum(p[region, None] * exact**2) / p[region].sum())
  err = np.linalg.norm(grid - exact, axis=1)
  return {"pointwise": float(np.max(err / np.linalg.norm(exact, axis=1))), "over_rms": float(err.max() / rms)}


def accuracy(grid_size: int) -> dict:
  full, means, covs, weights = validation_mixture()
  x0 = gmm.sample(full, jax.random.PRNGKey(1), 1000)
  exact_x1 = flow.encode(_SCHEDULE, gmm.score_fn(full, _SCHEDULE), x0, options=_OPTIONS).x
  spec = fokker_planck.GridSpec(grid_size=grid_size)
  out = {}
  for name, log_density, params, log_w in (
      ("gaussian", gmm.gaussian_log_density, [(full.means[k], full.covs[k]) for k in range(6)], np.log(full.weights)),
      ("pairs", gmm.gaussian_pair_log_density, [(means[k], covs[k]) for k in range(3)], np.log(weights))):
    tables, _ = fokker_planck.solve(log_density, params, log_w, spec)
    for t in _TIMES:
      errors = mass_region_error(tables, full, t)
      out[f"{name}_score_err_pointwise_t{t:g}"] = errors["pointwise"]
      out[f"{name}_score_err_over_rms_t{t:g}"] = errors["over_rms"]
    out[f"{name}_score_err_pointwise_max"] = max(out[f"{name}_score_err_pointwise_t{t:g}"] for t in _TIMES)
    x1 = fokker_planck.encode(tables, x0, options=_OPTIONS).x
    out[f"{name}_encoder_err"] = float(jnp.linalg.norm(x1 - exact_x1) / jnp.linalg.norm(exact_x1))
  return out


def timed(fn, *args):
  start = time.perf_counter()
  cpu = time.process_time()
  value = jax.block_until_ready(fn(*args))
  return value, time.perf_counter() - start, time.process_time() - cpu


def speed(grid_size: int, num_samples: int, seed: int) -> dict:
  mixture = densities.random_quartic_mixture(jax.random.PRNGKey(seed), grid_size=grid_size)
  x0 = densities.sample(mixture, jax.random.PRNGKey(seed + 1), num_samples)
  log_w = -np.log(mixture.num_components) * np.ones(mixture.num_components)
  spec = fokker_planck.GridSpec(grid_size=grid_size)
  solve = lambda: fokker_planck.solve(densities.log_prob, densities.components(mixture), log_w, spec)[0]
  encode = jax.jit(lambda tables, x: fokker_planck.encode(tables, x, options=_OPTIONS))
  jacobian = jax.jit(lambda tables, x: fokker_planck.encoder_jacobian(tables, x, options=_OPTIONS))
  tables = solve()  # warm-up: compilation
  sol = encode(tables, x0)
  jacobian(tables, x0[:256])
  out = {"num_components": mixture.num_components, "nfe": int(sol.nfe[0])}
  tables, out["solve_s"], out["solve_cpu_s"] = timed(solve)
  sol, out["ode_s"], out["ode_cpu_s"] = timed(encode, tables, x0)
  _, out["jacobian_s"], out["jacobian_cpu_s"] = timed(jacobian, tables, x0[:256])
  _, out["ot_s"], out["ot_cpu_s"] = timed(lambda: ot.ot_relative_error(np.asarray(x0), np.asarray(sol.x)))
  return out


def grid_names(config) -> list[str]:
  """config.grids as a list of the sizes' strings ('256,512' → ['256', '512'])."""
  names = [g.strip() for g in str(config.grids).split(",") if g.strip()]
  if not names or not all(g.isdigit() and int(g) > 0 for g in names):
    raise ValueError(f"config.grids must be comma-separated positive sizes, got {config.grids!r}.")
  return names


def main(argv) -> None:
  del argv  # only the program name: `cli.flags_parser` refuses any other argument
  import cli  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  try:
    grids = grid_names(config)
  except ValueError as e:
    cli.fail(str(e))
  jax.config.update("jax_enable_x64", True)
  report = {"num_samples": config.num_samples, "solver": _OPTIONS.solver, "tolerance": _OPTIONS.rtol}
  for grid in (int(g) for g in grids):
    row = speed(grid, config.num_samples, config.seed)
    row.update(accuracy(grid))
    report[f"grid_{grid}"] = row
  common.write_json(config.out, report)
  keys = sorted({k for g in grids for k in report[f"grid_{g}"]})
  print(f"{'':34s}" + "".join(f"{'grid ' + g:>14s}" for g in grids))
  for k in keys:
    print(f"{k:34s}" + "".join(f"{report[f'grid_{g}'][k]:14.3g}" for g in grids))
  print(f"Wrote {config.out}")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  import cli  # pylint: disable=g-import-not-at-top  # scripts/ is first on sys.path
  _CONFIG = cli.define_config_flag(DEFAULT_CONFIG, "Path to a config file in configs/bench/.")
  app.run(main, flags_parser=cli.flags_parser(DEFAULT_CONFIG))
