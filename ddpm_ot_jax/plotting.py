"""Figures: Fig. 1 (Gaussian flow), the mixture OT tests, Figs. 2–4 of Sec. 3.4, the
perturbed-Gaussian sweep, image grids and rows (Figs. 5–6), the transport plans of Fig. 7 and
the DPM-OT curves. Each function takes plain arrays and returns a Figure.

Figures are `matplotlib.figure.Figure` objects, made without pyplot: importing this module
neither selects nor changes a backend (a notebook keeps its own), and nothing is registered
with pyplot's global figure list. The caller saves them (experiments/common.save_figure; PNG
rendering needs no backend) or shows them (`IPython.display.display(fig)` in a notebook).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import math

import matplotlib.colors
from matplotlib import ticker
from matplotlib.figure import Figure
import numpy as np


def gaussian_flow_figure(
    grid_x: np.ndarray,
    grid_y: np.ndarray,
    densities: list[np.ndarray],
    times: list[float],
    trajectories: np.ndarray,
    ot_targets: np.ndarray,
) -> Figure:
  """The paper's Fig. 1 for a 2-D Gaussian.

  Top row: the density p_t on a grid at `times` (diffusion snapshots). Bottom left: the
  probability-flow ODE trajectories (n, k, 2), curved. Bottom right: the straight OT
  displacement x ↦ Σ0^{−1/2}(x − a0) for the same starting points.
  """
  k = len(times)
  fig = Figure(figsize=(3.0 * k, 7.0))
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
    gaussian_roundoff: float | None = None,
) -> Figure:
  """Left: ε_rel of each mixture against n (the paper's cost test; 0 is plotted at 1e-17).

  Right: the Jacobian asymmetry ‖J − Jᵀ‖_F/‖J‖_F of each mixture's encoder (median over
  its points) against dimension, with the solver floor (how far the asymmetry moves at 100×
  tighter tolerances) and, if given, the round-off level of the same pipeline on Gaussians.
  """
  fig = Figure(figsize=(10, 4))
  axes = fig.subplots(1, 2)
  errs = np.maximum(np.asarray(ot_relative_errors, float), 1e-17)
  for row in errs:
    axes[0].plot(sample_sizes, row, "o-", lw=0.8, alpha=0.7)
  axes[0].set_xscale("log")
  axes[0].set_yscale("log")
  axes[0].set_xlabel("number of samples n")
  axes[0].set_ylabel("ε_rel = (Cost(E) − Cost(OT)) / Cost(OT)")
  axes[0].set_title("paper's cost test (0 shown at 1e-17)")
  axes[1].scatter(dims, jacobian_asymmetry, c="C1", label="mixtures (median over points)")
  axes[1].axhline(asymmetry_floor, color="k", ls="--", label="solver floor (shift at 100× tighter tol)")
  if gaussian_roundoff is not None:
    axes[1].axhline(gaussian_roundoff, color="0.5", ls=":", label="Gaussian (round-off)")
  axes[1].set_xscale("log", base=2)
  axes[1].set_yscale("log")
  axes[1].set_xlabel("dimension d")
  axes[1].set_ylabel("‖J − Jᵀ‖_F / ‖J‖_F")
  axes[1].set_title("Brenier's criterion: Jacobian symmetry")
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  return fig


# ----------------------------------------------------------------------------------------
# Sec. 3.4: Figures 2–4 (experiments/synthetic_2d.py) and the perturbed Gaussians
# ----------------------------------------------------------------------------------------


def densities_figure(
    log_densities: Sequence[np.ndarray],
    num_components: Sequence[int],
    domain: float = 10.0,
    extent: float = 6.0,
) -> Figure:
  """Fig. 2: a panel of example densities (1/K) Σ_k exp(−q1_k − q2_k)/Z_k.

  log_densities[i]: log p on the tensor grid of [−domain, domain]² (axis 0 = x1), e.g.
  `densities.mixture_log_density_grid`; num_components[i]: its K. Shown on [−extent, extent]².
  """
  n = len(log_densities)
  cols = max(1, min(n, 4))
  rows = max(1, math.ceil(n / cols))
  fig = Figure(figsize=(3 * cols, 3 * rows))
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax in axes.ravel():
    ax.set_axis_off()
  for ax, log_p, k in zip(axes.ravel(), log_densities, num_components):
    ax.imshow(np.exp(np.asarray(log_p)).T, origin="lower", extent=(-domain, domain, -domain, domain),
              cmap="viridis")
    ax.set_xlim(-extent, extent)
    ax.set_ylim(-extent, extent)
    ax.set_title(f"K = {k}", fontsize=9)
  fig.suptitle("Fig. 2: example densities (1/K) Σ exp(−q1 − q2)/Z")
  fig.tight_layout()
  return fig


def costs_figure(cost_ot: np.ndarray, cost_encoder: np.ndarray, eps: np.ndarray) -> Figure:
  """Fig. 3: Cost(E) against Cost(OT) per density, and the histogram of log10 ε_rel, where
  ε_rel = (Cost(E) − Cost(OT)) / Cost(OT) (Sec. 3.4); densities with ε_rel = 0 are counted apart."""
  cost_ot, cost_encoder, eps = (np.asarray(v, np.float64) for v in (cost_ot, cost_encoder, eps))
  fig = Figure(figsize=(10, 4))
  ax1, ax2 = fig.subplots(1, 2)
  ax1.scatter(cost_ot, cost_encoder, s=10)
  lo, hi = min(cost_ot.min(), cost_encoder.min()), max(cost_ot.max(), cost_encoder.max())
  ax1.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="Cost(E) = Cost(OT)")
  ax1.set_xlabel("Cost(OT)")
  ax1.set_ylabel("Cost(E)")
  ax1.legend()
  positive = eps[eps > 0]
  zeros = int(np.sum(eps <= 0))
  if positive.size:
    ax2.hist(np.log10(positive), bins=30)
  ax2.set_xlabel("log10 ε_rel  (ε_rel > 0 only)")
  ax2.set_ylabel("densities")
  ax2.set_title(f"{zeros} of {len(eps)} densities: ε_rel = 0 (identity pairing is optimal)", fontsize=9)
  fig.suptitle("Fig. 3: encoder pairing vs exact OT")
  fig.tight_layout()
  return fig


def trajectories_figure(
    log_densities: Sequence[np.ndarray],
    trajectories: Sequence[np.ndarray],
    t_max: float,
    num_points: int | None = None,
    domain: float = 10.0,
    extent: float = 5.0,
) -> Figure:
  """Fig. 4: probability-flow trajectories (Eq. 9) and the limiting map, one row per density.

  log_densities[i]: log p0 on the grid of [−domain, domain]² (axis 0 = x1); trajectories[i]:
  (n, k, 2) positions at k saved times from t = 0 (X0) to t_max (the last: X1 = E(X0)); the
  first `num_points` (all if None) are drawn. Left: trajectories over the density. Middle: X0
  coloured by the angle of E(x) (hue) and its radius (brightness). Right: X1 = E(X0) with the
  same colours (≈ N(0, I)).
  """
  rows = max(1, len(log_densities))
  fig = Figure(figsize=(12, 4 * rows))
  axes = fig.subplots(rows, 3, squeeze=False)
  for row, (log_p, traj) in enumerate(zip(log_densities, trajectories)):
    traj = np.asarray(traj)[:num_points]
    x0, x1 = traj[:, 0], traj[:, -1]
    ax = axes[row, 0]
    ax.imshow(np.exp(np.asarray(log_p)).T, origin="lower", extent=(-domain, domain, -domain, domain),
              cmap="Greys")
    for tr in traj:
      ax.plot(tr[:, 0], tr[:, 1], lw=0.5, alpha=0.7)
    ax.scatter(x0[:, 0], x0[:, 1], s=3, c="k", label="X0")
    ax.set_title("trajectories of Eq. 9, t ∈ [0, %g]" % t_max, fontsize=9)
    angle = (np.arctan2(x1[:, 1], x1[:, 0]) + np.pi) / (2 * np.pi)
    radius = np.clip(np.linalg.norm(x1, axis=1) / 3.0, 0, 1)
    colors = matplotlib.colors.hsv_to_rgb(np.stack([angle, np.ones_like(angle), 0.35 + 0.65 * radius], -1))
    axes[row, 1].scatter(x0[:, 0], x0[:, 1], s=6, c=colors)
    axes[row, 1].set_title("X0, coloured by E(x)", fontsize=9)
    axes[row, 2].scatter(x1[:, 0], x1[:, 1], s=6, c=colors)
    axes[row, 2].set_title("X1 = E(X0)", fontsize=9)
    for ax in axes[row]:
      ax.set_xlim(-extent, extent)
      ax.set_ylim(-extent, extent)
      ax.set_aspect("equal")
  fig.suptitle("Fig. 4: probability-flow trajectories and the limiting encoder map")
  fig.tight_layout()
  return fig


def perturbed_gaussian_figure(
    epsilons: np.ndarray,
    encoder_vs_ot_map_err: np.ndarray,
    encoder_error_floor: float,
    encoder_numerical_err: np.ndarray,
    encoder_vs_ot_map_slope: float,
    jacobian_asymmetry_median: np.ndarray,
    ot_relative_error: np.ndarray,
    num_samples: int,
    sweep: Mapping[int, np.ndarray] | None = None,
) -> Figure:
  """ε against ‖E − ∇u‖/‖∇u‖ (with the ε = 0 floor and the numerical error beside it), the
  median Jacobian asymmetry ‖J − Jᵀ‖_F/‖J‖_F (∇²u is symmetric: 0 for the OT map), and the
  paper's ε_rel at `num_samples` and at each n of `sweep` (n ↦ ε_rel per ε), log-log.

  Arrays are one value per ε (the keys of experiments/perturbed_gaussian.py's results).
  """
  eps = np.asarray(epsilons, np.float64)
  pos = eps > 0
  fig = Figure(figsize=(14, 4))
  axes = fig.subplots(1, 3)
  err = np.asarray(encoder_vs_ot_map_err, np.float64)
  axes[0].loglog(eps[pos], err[pos], "o-", label="‖E − ∇u‖ / ‖∇u‖")
  if np.isfinite(encoder_error_floor):
    axes[0].axhline(max(encoder_error_floor, 1e-17), color="gray", ls="--", label="floor (ε = 0)")
  numerical = np.asarray(encoder_numerical_err, np.float64)
  if np.isfinite(numerical[pos]).any():
    axes[0].loglog(eps[pos], numerical[pos], "x:", color="gray", label="numerical error (vs finer grid)")
  axes[0].set_title(f"encoder vs the OT map; slope {encoder_vs_ot_map_slope:.2f}", fontsize=10)
  asym = np.asarray(jacobian_asymmetry_median, np.float64)
  axes[1].loglog(eps[pos], np.maximum(asym[pos], 1e-17), "o-", label="median ‖J − Jᵀ‖/‖J‖")
  if (~pos).any():
    axes[1].axhline(max(asym[~pos].max(), 1e-17), color="gray", ls="--", label="ε = 0")
  axes[1].set_title("Brenier's criterion (OT map: 0)", fontsize=10)
  rel = np.asarray(ot_relative_error, np.float64)
  axes[2].semilogx(eps[pos], rel[pos], "o-", label=f"n = {num_samples}")
  for n, values in (sweep or {}).items():
    axes[2].semilogx(eps[pos], np.asarray(values, np.float64)[pos], ".--", label=f"n = {n}")
  axes[2].set_title("the paper's test: ε_rel", fontsize=10)
  for ax in axes:
    ax.set_xlabel("ε")
    ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


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


def image_grid_figure(images: np.ndarray, title: str = "", columns: int | None = None) -> Figure:
  """`image_grid(images)` as a figure (grey colormap for one channel), with an optional title."""
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
  return fig


def image_rows_figure(rows: Sequence[tuple[str, np.ndarray]], title: str = "") -> Figure:
  """One labelled row of images per entry of `rows` ((label, (n, H, W, C) images on [−1, 1]),
  all rows n images of one shape), e.g. the same latents decoded by several models (Figs.
  5–6) or images beside their codes and reconstructions."""
  columns = len(rows[0][1])
  height = rows[0][1].shape[1] / rows[0][1].shape[2]
  fig = Figure(figsize=(9, 9 / columns * height * len(rows) * 1.1 + (0.4 if title else 0.2)))
  axes = fig.subplots(len(rows), 1, squeeze=False)
  fig.subplots_adjust(hspace=0.08)
  for ax, (label, images) in zip(axes[:, 0], rows):
    grid = image_grid(np.clip(images, -1.0, 1.0), columns=columns)
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_axis_off()
    ax.text(-0.01, 0.5, label, transform=ax.transAxes, ha="right", va="center", fontsize=8)
  if title:
    fig.suptitle(title, fontsize=9)
  return fig


def transport_plans_figure(panels: Sequence[tuple[str, np.ndarray, float, float]]) -> Figure:
  """Fig. 7: the K × K optimal transport plans between K images x_i and codes y_j, one panel
  per (title, π, identity fraction, ε_rel): black where π moves the mass of image i to code j
  (π = id is the diagonal)."""
  fig = Figure(figsize=(3.2 * len(panels), 3.6))
  axes = fig.subplots(1, len(panels), squeeze=False)
  k = len(panels[0][1])
  for ax, (title, perm, identity, relative_error) in zip(axes[0], panels):
    plan = np.zeros((len(perm), len(perm)), np.float32)
    plan[np.arange(len(perm)), perm] = 1.0
    ax.imshow(plan, cmap="gray_r", interpolation="nearest")
    ax.set_title(f"{title}\nidentity {identity:.3f}, ε_rel {relative_error:.2g}", fontsize=8)
    ax.set_xlabel("code j")
    ax.set_ylabel("image i")
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(f"Optimal transport plans between {k} held-out images and their codes "
               "(black: mass moved from image i to code j)", fontsize=9)
  return fig


def fid_vs_nfe_figure(curves: Mapping[str, Sequence[tuple[int, float, float, float]]],
                      dpm_ot: Sequence[tuple[int, int, float, float, float, float]],
                      controls: Mapping[str, tuple[float, float]], feature_name: str) -> Figure:
  """Left: FID (mean ± std over draws) against NFE, one line per sampler family (`curves`:
  label → [(nfe, fid, fid_std, nn_ratio)]), DPM-OT as points labelled by switch step M
  (`dpm_ot`: [(M, nfe, fid, fid_std, nn_ratio, copy_fraction)]) and the controls as bands
  (label → (fid, std)). Right: memorization, the NN-distance ratio of the same rows (1: as
  novel as held-out data; → 0: copies of the targets)."""
  fig = Figure(figsize=(11, 4.2))
  ax_fid, ax_mem = fig.subplots(1, 2)
  for label, points in curves.items():
    points = sorted(points)
    nfe, fid, std, ratio = (np.array(v) for v in zip(*points))
    ax_fid.errorbar(nfe, fid, yerr=std, marker="o", ms=4, capsize=2, label=label)
    ax_mem.plot(nfe, ratio, marker="o", ms=4, label=label)
  # DPM-OT rows share one NFE: labels fanned out to the right, lowest FID lowest.
  by_fid = sorted(dpm_ot, key=lambda row: row[2])
  for i, (m, nfe, fid, std, ratio, copies) in enumerate(by_fid):
    ax_fid.errorbar([nfe], [fid], yerr=[std], marker="*", ms=11, color="k", capsize=2)
    ax_fid.annotate(f"DPM-OT M={m}", (nfe, fid), textcoords="offset points", fontsize=7,
                    xytext=(18, 11 * (i - (len(by_fid) - 1) / 2)), va="center",
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="0.4"))
    ax_mem.plot([nfe], [ratio], marker="*", ms=11, color="k")
    ax_mem.annotate(f"M={m} ({copies:.0%} copies)", (nfe, ratio), textcoords="offset points",
                    xytext=(5, 3), fontsize=7)
  for (label, (value, std)), color in zip(controls.items(), ("tab:red", "tab:gray")):
    ax_fid.axhspan(value - (std if np.isfinite(std) else 0), value + (std if np.isfinite(std) else 0),
                   color=color, alpha=0.2)
    ax_fid.axhline(value, color=color, ls="--", lw=0.8, label=label)
  ax_mem.axhline(1.0, color="tab:gray", ls="--", lw=0.8, label="held-out data (1)")
  nfes = sorted({p[0] for points in curves.values() for p in points} | {r[1] for r in dpm_ot})
  for ax in (ax_fid, ax_mem):
    ax.set_xscale("log")
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("network evaluations (NFE)")
  ax_fid.set_ylabel(f"FID ({feature_name} features), mean ± std")
  ax_fid.set_yscale("log")
  ax_fid.yaxis.set_major_formatter(ticker.ScalarFormatter())
  ax_fid.yaxis.set_minor_formatter(ticker.ScalarFormatter())
  ax_mem.set_ylabel("median nearest-target distance / held-out's")
  ax_fid.legend(fontsize=7)
  ax_mem.legend(fontsize=7)
  ax_fid.set_title("sample quality")
  ax_mem.set_title("memorization (→ 0: copies)")
  fig.tight_layout()
  return fig


def fid_vs_memorization_figure(dpm_ot: Sequence[tuple[int, int, float, float, float, float]],
                               controls: Mapping[str, tuple[float, float]],
                               feature_name: str) -> Figure:
  """DPM-OT at each switch step M (`dpm_ot`: [(M, nfe, fid, fid_std, nn_ratio, copies)]):
  FID (mean ± std) against the NN-distance ratio, with the controls as bands."""
  fig = Figure(figsize=(5.5, 4))
  ax = fig.subplots()
  points = sorted(dpm_ot)
  ratio = [p[4] for p in points]
  fid = [p[2] for p in points]
  ax.errorbar(ratio, fid, yerr=[p[3] for p in points], marker="o", capsize=2)
  for m, nfe, f, _, r, _ in points:
    ax.annotate(f"M={m}", (r, f), textcoords="offset points", xytext=(4, 4), fontsize=8)
  ax.axvline(1.0, color="k", ls=":", lw=0.8)
  for (label, (value, std)), color in zip(controls.items(), ("tab:red", "tab:gray")):
    ax.axhspan(value - (std if np.isfinite(std) else 0), value + (std if np.isfinite(std) else 0),
               color=color, alpha=0.2)
    ax.axhline(value, color=color, ls="--", lw=0.8, label=label)
  ax.legend(loc="upper left", fontsize=8)
  ax.set_xlabel("median nearest-target distance / held-out's (→ 0: copies)")
  ax.set_ylabel(f"FID ({feature_name} features)")
  ax.set_title(f"DPM-OT at {points[0][1]} NFE: switch step M" if points else "DPM-OT")
  return fig
