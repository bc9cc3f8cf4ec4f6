"""Is the PF-ODE encoder of a Gaussian mixture an OT map? Two tests with the exact score.

For each random mixture μ0 (dimension and component count varying), the encoder
E(x) = x(T) of the probability-flow ODE (Eq. 9, OU time) is computed with the exact score
(gmm.score_fn), so its error is the ODE solver's alone. Then:

* the paper's cost test (Sec. 3.4): ε_rel = (Cost(E) − Cost(OT)) / Cost(OT) for the pairing
  x_i ↔ E(x_i), at several n (a true OT map gives 0 at every n);
* Brenier's criterion: J = ∂E/∂x must be symmetric (it is the Hessian of a convex potential);
  ‖J − Jᵀ‖_F / ‖J‖_F is measured by forward-mode autodiff through the solve.

The floor: how far the asymmetry moves when the solver's tolerances are tightened 100×
(the Jacobian points of every mixture re-solved at rtol/100, atol/100). That is the solver's
error on the nonlinear field, so any asymmetry well above it is a property of the map. The
same pipeline on one Gaussian per dimension is reported beside it as round-off only: there
the drift is linear in x, every discrete step is a symmetric matrix function of the same
symmetric matrix, and J is symmetric to round-off at any tolerance (Theorem 3.1).

results.json keys: num_mixtures, ot_relative_error_median / _max (at n = 2500 or the size
nearest to it), ot_relative_error_median_n{n} / _max_n{n} and identity_fraction_min_n{n} for
every n; jacobian_asymmetry_median / _max over all Jacobian points of all mixtures (pooled);
jacobian_asymmetry_per_mixture_median and _per_mixture_max (lists, one per mixture, over its
points); jacobian_asymmetry_tolerance_shift_median / _max (|asymmetry at rtol − at rtol/100|
over all Jacobian points) and jacobian_asymmetry_floor (= the max shift);
jacobian_asymmetry_gaussian_roundoff (max over the Gaussian runs); mixtures_above_floor_fraction
(share of mixtures whose median is > 10x the floor); min_symmetric_eigenvalue, solver_rtol,
nfe_mean, seconds. arrays.npz holds every mixture, its samples, codes and Jacobians.

config.t_end is the end time in OU time s (Eq. 8), mapped onto the clock of config.schedule
(`common.schedule_and_end`: a ValueError if the schedule ends before it). Runs in float64
when config.x64 (set here, so run() is self-contained outside scripts/main.py).
"""
from __future__ import annotations

import dataclasses
import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_ot_jax import flow
from ddpm_ot_jax import gmm
from ddpm_ot_jax import ot
from ddpm_ot_jax import plotting
from ddpm_ot_jax.experiments import common

# The config fields this experiment reads (scripts/main.py rejects any other field or override).
CONFIG_FIELDS = ("dims", "eig_min", "eig_max", "max_components", "mean_scale", "num_mixtures",
    "sample_sizes", "num_jacobian_points", "schedule", "t_end", "solver")


def _validate(config: ml_collections.ConfigDict) -> None:
  if config.num_mixtures < 1:
    raise ValueError(f"num_mixtures must be ≥ 1, got {config.num_mixtures}.")
  if min(config.sample_sizes) < 2 or not config.dims or min(config.dims) < 1:
    raise ValueError("sample_sizes must be ≥ 2 and dims non-empty and ≥ 1.")
  if config.max_components < 1:
    raise ValueError(f"max_components must be ≥ 1, got {config.max_components}.")


def _encode_and_jacobian(mixture, schedule, x, num_jac, t_end, options):
  score = gmm.score_fn(mixture, schedule)
  encoded = flow.encode(schedule, score, x, t_end, options)
  jacs = flow.encoder_jacobian(schedule, score, x[:num_jac], t_end, options)
  return encoded.x, encoded.nfe, jacs


_encode_and_jacobian_jit = jax.jit(_encode_and_jacobian, static_argnums=(1, 3, 4, 5))


def _jacobian(mixture, schedule, x, t_end, options):
  return flow.encoder_jacobian(schedule, gmm.score_fn(mixture, schedule), x, t_end, options)


_jacobian_jit = jax.jit(_jacobian, static_argnums=(1, 3, 4))


def _tighter(options: flow.SolverOptions, factor: float = 100.0) -> flow.SolverOptions:
  """The same solver at rtol/factor, atol/factor (with room for the extra steps)."""
  return dataclasses.replace(options, rtol=options.rtol / factor, atol=options.atol / factor,
                             max_steps=4 * options.max_steps)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The cost test and Brenier's criterion on random mixtures; returns the results dict."""
  _validate(config)
  common.set_precision(config.x64)
  watch = common.Stopwatch()
  schedule, t_end = common.schedule_and_end(config)
  options = flow.SolverOptions(**config.solver)
  sizes = sorted(config.sample_sizes)
  n_max = sizes[-1]
  n_paper = min(sizes, key=lambda n: abs(n - 2500))
  num_jac = min(config.num_jacobian_points, n_max)
  key = jax.random.PRNGKey(config.seed)

  tight_options = _tighter(options)
  per_mixture = []
  all_asym, all_shift = [], []
  arrays = {}
  for i in range(config.num_mixtures):
    dims = config.dims[i % len(config.dims)]
    key, k_k, k_mix, k_x = jax.random.split(key, 4)
    num_comp = int(jax.random.randint(k_k, (), min(2, config.max_components), config.max_components + 1))
    mixture = gmm.random_mixture(k_mix, dims, num_comp, config.mean_scale, config.eig_min, config.eig_max)
    x = gmm.sample(mixture, k_x, n_max)
    codes, nfe, jacs = _encode_and_jacobian_jit(mixture, schedule, x, num_jac, t_end, options)
    x, codes = np.asarray(x), np.asarray(codes)
    asym = np.asarray(ot.jacobian_asymmetry(jacs))
    all_asym.append(asym)
    tight = np.asarray(ot.jacobian_asymmetry(
        _jacobian_jit(mixture, schedule, jnp.asarray(x)[:num_jac], t_end, tight_options)))
    all_shift.append(np.abs(asym - tight))
    entry = {
        "dims": dims,
        "num_components": num_comp,
        "nfe_mean": float(np.mean(nfe)),
        "jacobian_asymmetry_median": float(np.median(asym)),
        "jacobian_asymmetry_max": float(np.max(asym)),
        "jacobian_asymmetry_tolerance_shift_max": float(np.max(all_shift[-1])),
        "min_symmetric_eigenvalue": float(jnp.min(ot.min_symmetric_eigenvalue(jacs))),
    }
    for n in sizes:
      test = ot.ot_relative_error(x[:n], codes[:n])
      entry[f"ot_relative_error_n{n}"] = test["ot_relative_error"]
      entry[f"identity_fraction_n{n}"] = test["identity_fraction"]
    per_mixture.append(entry)
    arrays.update({
        f"m{i}_weights": mixture.weights, f"m{i}_means": mixture.means, f"m{i}_covs": mixture.covs,
        f"m{i}_x": x, f"m{i}_codes": codes, f"m{i}_jacobians": jacs,
    })
    eta = watch.seconds() / (i + 1) * (config.num_mixtures - i - 1)
    logging.info(
        "mixture %d/%d d=%d K=%d: eps_rel(n=%d)=%.2e asym=%.2e nfe=%.0f (ETA %.0f s)", i + 1,
        config.num_mixtures, dims, num_comp, n_paper, entry[f"ot_relative_error_n{n_paper}"],
        entry["jacobian_asymmetry_median"], entry["nfe_mean"], eta)

  roundoff = []
  for dims in sorted(set(config.dims)):
    key, k_mix, k_x = jax.random.split(key, 3)
    gauss = gmm.random_mixture(k_mix, dims, 1, config.mean_scale, config.eig_min, config.eig_max)
    x = gmm.sample(gauss, k_x, num_jac)
    _, _, jacs = _encode_and_jacobian_jit(gauss, schedule, x, num_jac, t_end, options)
    roundoff.append(float(jnp.max(ot.jacobian_asymmetry(jacs))))

  asyms = np.array([m["jacobian_asymmetry_median"] for m in per_mixture])
  pooled = np.concatenate(all_asym)
  shifts = np.concatenate(all_shift)
  floor = float(np.max(shifts))
  paper_errs = np.array([m[f"ot_relative_error_n{n_paper}"] for m in per_mixture])
  results = {
      "num_mixtures": config.num_mixtures,
      "ot_relative_error_median": float(np.median(paper_errs)),
      "ot_relative_error_max": float(np.max(paper_errs)),
      "ot_test_sample_size": n_paper,
      "jacobian_asymmetry_median": float(np.median(pooled)),
      "jacobian_asymmetry_max": float(np.max(pooled)),
      "jacobian_asymmetry_floor": floor,
      "jacobian_asymmetry_tolerance_shift_median": float(np.median(shifts)),
      "jacobian_asymmetry_tolerance_shift_max": floor,
      "jacobian_asymmetry_gaussian_roundoff": float(np.max(roundoff)),
      "tight_solver_rtol": tight_options.rtol,
      "min_symmetric_eigenvalue": float(min(m["min_symmetric_eigenvalue"] for m in per_mixture)),
      "mixtures_above_floor_fraction": float(np.mean(asyms > 10 * floor)),
      "solver_rtol": options.rtol,
      "solver_atol": options.atol,
      "nfe_mean": float(np.mean([m["nfe_mean"] for m in per_mixture])),
      "dims": [m["dims"] for m in per_mixture],
      "jacobian_asymmetry_per_mixture_median": asyms.tolist(),
      "jacobian_asymmetry_per_mixture_max": [m["jacobian_asymmetry_max"] for m in per_mixture],
  }
  for n in sizes:
    errs = np.array([m[f"ot_relative_error_n{n}"] for m in per_mixture])
    results[f"ot_relative_error_median_n{n}"] = float(np.median(errs))
    results[f"ot_relative_error_max_n{n}"] = float(np.max(errs))
    results[f"identity_fraction_min_n{n}"] = float(min(m[f"identity_fraction_n{n}"] for m in per_mixture))
    results[f"ot_relative_error_n{n}"] = errs.tolist()
  results["seconds"] = watch.seconds()

  common.save_npz(os.path.join(workdir, "arrays.npz"), **arrays)
  fig = plotting.ot_tests_figure(
      sizes, np.array([[m[f"ot_relative_error_n{n}"] for n in sizes] for m in per_mixture]),
      asyms, floor, np.array(results["dims"]), float(np.max(roundoff)))
  common.save_figure(fig, os.path.join(workdir, "gmm_ot_tests.png"))
  return results
