"""Figures of the theory lab (matplotlib, Agg backend). Each function returns a Figure.

Functions take plain arrays, so any experiment or notebook can draw them; the caller
saves (experiments/common.save_figure) or shows them.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position


def gaussian_flow_figure(
    grid_x: np.ndarray,
    grid_y: np.ndarray,
    densities: list[np.ndarray],
    times: list[float],
    trajectories: np.ndarray,
    ot_targets: np.ndarray,
):
  """The paper's Fig. 1 for a 2-D Gaussian.

  Top row: the density p_t on a grid at `times` (diffusion snapshots). Bottom left: the
  probability-flow ODE trajectories (n, k, 2), curved. Bottom right: the straight OT
  displacement x ↦ Σ0^{−1/2}(x − a0) for the same starting points.
  """
  k = len(times)
  fig = plt.figure(figsize=(3.0 * k, 7.0))
  grid = fig.add_gridspec(2, 2 * k)
  for i, (t, dens) in enumerate(zip(times, densities)):
    ax = fig.add_subplot(grid[0, 2 * i:2 * i + 2])
    ax.contourf(grid_x, grid_y, dens, levels=20, cmap="viridis")
    ax.set_title(f"p_t, t = {t:g}")
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
  ax = fig.add_subplot(grid[1, :k])
  for path in trajectories:
    ax.plot(path[:, 0], path[:, 1], lw=0.8, alpha=0.8)
  ax.scatter(trajectories[:, 0, 0], trajectories[:, 0, 1], s=8, c="k", label="x(0)")
  ax.scatter(trajectories[:, -1, 0], trajectories[:, -1, 1], s=8, c="r", label="E(x)")
  ax.set_title("probability-flow ODE trajectories")
  ax.legend(loc="best", fontsize=8)
  ax.set_aspect("equal", adjustable="datalim")
  ax = fig.add_subplot(grid[1, k:])
  starts = trajectories[:, 0]
  for a, b in zip(starts, ot_targets):
    ax.plot([a[0], b[0]], [a[1], b[1]], lw=0.8, alpha=0.8)
  ax.scatter(starts[:, 0], starts[:, 1], s=8, c="k", label="x")
  ax.scatter(ot_targets[:, 0], ot_targets[:, 1], s=8, c="r", label="Σ0^{-1/2}(x − a0)")
  ax.set_title("OT displacement (straight lines)")
  ax.legend(loc="best", fontsize=8)
  ax.set_aspect("equal", adjustable="datalim")
  fig.tight_layout()
  return fig


def ot_tests_figure(
    sample_sizes: list[int],
    ot_relative_errors: np.ndarray,
    jacobian_asymmetry: np.ndarray,
    asymmetry_floor: float,
    dims: np.ndarray,
):
  """Left: ε_rel of each mixture against n (the paper's cost test; 0 is plotted at 1e-17).

  Right: the Jacobian asymmetry ‖J − Jᵀ‖_F/‖J‖_F of each mixture's encoder (median over
  its points) against dimension, with the numerical floor measured on Gaussians.
  """
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  errs = np.maximum(np.asarray(ot_relative_errors, float), 1e-17)
  for row in errs:
    axes[0].plot(sample_sizes, row, "o-", lw=0.8, alpha=0.7)
  axes[0].set_xscale("log")
  axes[0].set_yscale("log")
  axes[0].set_xlabel("number of samples n")
  axes[0].set_ylabel("ε_rel = (Cost(E) − Cost(OT)) / Cost(OT)")
  axes[0].set_title("paper's cost test (0 shown at 1e-17)")
  axes[1].scatter(dims, jacobian_asymmetry, c="C1", label="mixtures (median over points)")
  axes[1].axhline(asymmetry_floor, color="k", ls="--", label="floor (Gaussian, same solver)")
  axes[1].set_xscale("log", base=2)
  axes[1].set_yscale("log")
  axes[1].set_xlabel("dimension d")
  axes[1].set_ylabel("‖J − Jᵀ‖_F / ‖J‖_F")
  axes[1].set_title("Brenier's criterion: Jacobian symmetry")
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  return fig
