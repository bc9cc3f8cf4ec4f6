"""Theorem 3.1 checked numerically: the PF-ODE encoder of N(a0, Σ0) vs its closed forms.

results.json keys:
  max_abs_err_vs_closed_form  max |E_ode(x) − E(s, x)| with E(s, ·) Theorem 3.1's flow at the
                              same (OU) end time s (Eqs. 16, 17, 19): the solver error
  max_abs_err_vs_limit        max |E_ode(x) − Σ0^{−1/2}(x − a0)|: solver + finite-time error
  finite_time_gap             max |E(s, x) − Σ0^{−1/2}(x − a0)| (≈ e^{−s}|a0|)
  ot_relative_error           the paper's ε_rel for the pairing x_i ↔ E_ode(x_i)
  identity_fraction           share of points the exact OT assignment leaves in place
  jacobian_asymmetry_max      max over points of ‖J − Jᵀ‖_F / ‖J‖_F (0 in theory)
  jacobian_max_abs_err        max |J − V diag f(λ, s) Vᵀ| (the exact Jacobian)
  min_symmetric_eigenvalue    smallest eigenvalue of (J + Jᵀ)/2 over points (> 0 in theory)
  nfe_mean, nfe_max           vector-field evaluations per point
  seconds                     wall time of encoding + tests (compilation included)

config.t_end is the end time in OU time s (Eq. 8; s = ½ B(t), `sde.ou_time`), mapped onto the
clock of config.schedule by `sde.make_schedule_until_ou_time` (a ValueError if the schedule
ends before it: 'linear' reaches s = 5.025, 'cosine' s = 4.778). Runs in float64 when
config.x64 (set here, so run() is self-contained outside scripts/main.py).
"""
from __future__ import annotations

import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_ot_jax import flow
from ddpm_ot_jax import gaussian
from ddpm_ot_jax import ot
from ddpm_ot_jax import plotting
from ddpm_ot_jax import sde
from ddpm_ot_jax.experiments import common

# The config fields this experiment reads (scripts/main.py rejects any other field or override).
CONFIG_FIELDS = ("dims", "eig_min", "eig_max", "num_samples", "num_jacobian_points", "schedule",
    "t_end", "solver", "figure")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Theorem 3.1 checked for one random Gaussian; returns the results dict (module docstring)."""
  if config.dims < 1 or config.num_samples < 2:
    raise ValueError(f"dims ≥ 1 and num_samples ≥ 2 needed, got {config.dims}, {config.num_samples}.")
  common.set_precision(config.x64)
  watch = common.Stopwatch()
  schedule, t_end = common.schedule_and_end(config)
  options = flow.SolverOptions(**config.solver)
  key_gauss, key_x = jax.random.split(jax.random.PRNGKey(config.seed))
  mean0, cov0 = gaussian.random_gaussian(key_gauss, config.dims, config.eig_min, config.eig_max)
  x0 = mean0 + jax.random.normal(key_x, (config.num_samples, config.dims)) @ gaussian.sqrtm_spd(cov0)
  score = gaussian.score_fn(schedule, mean0, cov0)
  s_end = float(sde.ou_time(schedule, t_end))  # = config.t_end up to round-off

  logging.info("Encoding %d points in d=%d to OU time %.3g", config.num_samples, config.dims, s_end)
  encoded = jax.jit(lambda x: flow.encode(schedule, score, x, t_end, options))(x0)
  codes = np.asarray(encoded.x)
  closed = np.asarray(gaussian.encoder_at(x0, mean0, cov0, s_end))
  limit = np.asarray(gaussian.encoder_limit(x0, mean0, cov0))

  logging.info("Exact OT between %d points and their codes", config.num_samples)
  ot_test = ot.ot_relative_error(np.asarray(x0), codes)

  num_jac = min(config.num_jacobian_points, config.num_samples)
  logging.info("Jacobians through the solve at %d points (d=%d)", num_jac, config.dims)
  jac_fn = jax.jit(lambda x: flow.encoder_jacobian(schedule, score, x, t_end, options))
  jacs = jac_fn(x0[:num_jac])
  lam, vecs = jnp.linalg.eigh(cov0)
  exact_jac = (vecs * gaussian.flow_f(lam, s_end)) @ vecs.T

  results = {
      "dims": config.dims,
      "num_samples": config.num_samples,
      "ou_time_end": s_end,
      "schedule_time_end": t_end,
      "max_abs_err_vs_closed_form": float(np.max(np.abs(codes - closed))),
      "max_abs_err_vs_limit": float(np.max(np.abs(codes - limit))),
      "finite_time_gap": float(np.max(np.abs(closed - limit))),
      "ot_relative_error": ot_test["ot_relative_error"],
      "identity_fraction": ot_test["identity_fraction"],
      "jacobian_asymmetry_max": float(jnp.max(ot.jacobian_asymmetry(jacs))),
      "jacobian_max_abs_err": float(jnp.max(jnp.abs(jacs - exact_jac))),
      "min_symmetric_eigenvalue": float(jnp.min(ot.min_symmetric_eigenvalue(jacs))),
      "nfe_mean": float(np.mean(encoded.nfe)),
      "nfe_max": int(np.max(encoded.nfe)),
      "solver_rtol": options.rtol,
      "solver_atol": options.atol,
  }
  results["seconds"] = watch.seconds()
  if config.figure:
    common.save_figure(_figure_1(config, options), os.path.join(workdir, "fig1_gaussian_flow.png"))
  return results


def _figure_1(config: ml_collections.ConfigDict, options: flow.SolverOptions):
  """Fig. 1: a 2-D Gaussian diffusing, its curved ODE trajectories and the straight OT map."""
  schedule = sde.ConstantSchedule(t_max=4.0)
  mean0 = jnp.array([2.0, 1.0])
  cov0 = jnp.array([[0.5, 0.35], [0.35, 0.4]])
  times = [0.0, 0.25, 0.5, 1.0, 4.0]
  lim = 4.0
  gx, gy = np.meshgrid(np.linspace(-lim, lim, 120), np.linspace(-lim, lim, 120))
  pts = jnp.stack([gx.ravel(), gy.ravel()], axis=-1)
  densities = []
  for t in times:
    mean_t, cov_t = gaussian.marginal(schedule, t, mean0, cov0)
    dens = jnp.exp(jax.vmap(lambda p: gaussian.log_prob(p, mean_t, cov_t))(pts))
    densities.append(np.asarray(dens).reshape(gx.shape))
  x0 = mean0 + jax.random.normal(jax.random.PRNGKey(config.seed + 1), (24, 2)) @ gaussian.sqrtm_spd(cov0)
  save_ts = jnp.linspace(0.0, 4.0, 80)
  sol = flow.encode(schedule, gaussian.score_fn(schedule, mean0, cov0), x0, 4.0, options, save_ts)
  targets = gaussian.encoder_limit(x0, mean0, cov0)
  return plotting.gaussian_flow_figure(gx, gy, densities, times, np.asarray(sol.trajectory), np.asarray(targets))
