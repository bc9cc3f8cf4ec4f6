r"""The OU Fokker–Planck equation (Eq. 8) solved by its exact semigroup, and its score.

For the paper's OU process dx = −x dt + √2 dW (Eq. 8, β ≡ 2) the Fokker–Planck equation has
the closed-form solution (a = e^{−t}, s² = 1 − e^{−2t})

    p_t(x) = ∫ p0(y) N(x; a y, s² I) dy,                                           (FP)

p0 rescaled by a and convolved with N(0, s² I). We evaluate (FP) by quadrature instead of
time-stepping the PDE: no time-discretisation error, nothing accumulates over the steps. (The
paper solved the PDE with tensor trains on a 1024² grid, then used finite differences and
linear interpolation for the score, Sec. 3.4.)

Method, and why:

* **Mixture structure.** (FP) is linear, so for p0 = Σ_k w_k p_k each component is evolved on
  its own and log p_t = logsumexp_k(log w_k + log p_{k,t}). One field for the whole mixture
  would have sharp score transitions between separated modes (width ~σ²/|Δm|), which no
  polynomial interpolant on a fixed grid resolves; a single component is smooth.
* **Comoving tables.** Component k has mean m_k and covariance C_k = V diag(λ) Vᵀ. The OU
  semigroup maps N(m_k, C_k) to N(a m_k, a² C_k + s² I) exactly and is isotropic, so in k's
  principal frame ξ = Vᵀ(x − a m_k) kernel and grids are separable. We tabulate only the
  non-Gaussian residual

      R_k(t, ζ) = log p_{k,t}(x) − log N(x; a m_k, a² C_k + s² I),   ξ = b_k(t) ⊙ ζ, ζ ∈ [−1, 1]²,

  on a fixed ζ-grid (`table_size`²). The half-widths b_k(t) = √(a² b_k(0)² + 2Λ s²) follow
  the component (b_k(0): where log p_k has dropped by Λ = `box_log_drop` along each principal
  axis), so a table always covers the component down to e^{−Λ}. R ≡ 0 for a Gaussian and
  decays like e^{−3t} (standardised cumulants of order n scale as aⁿ).
* **Quadrature.** On the ζ-grid, (FP) is P_t = A₁ P0 A₂ᵀ with 1-D kernel matrices
  A_i[o, j] = h N(ξ_{o,i}; a u_j, s²) and P0 the analytic p_k on a principal-frame input grid
  u of spacing h. The trapezoid rule is spectrally accurate: its error is the integrand's
  Fourier transform at 2π/h, and the integrand's band is within Ω_k + c a/s (Ω_k: where p_k's
  transform falls below `spectral_tol`, measured by FFT on the base grid; s/a the kernel
  width; c = `kernel_sigmas`). Each level uses the coarsest spacing base·2^m with
  2π/h ≥ Ω_k + c a/s, where base = 2·`domain`/(`grid_size` − 1) is the spacing of the
  paper's grid. For small t the kernel is narrower than the base grid and the input grid is
  *refined* (m < 0), evaluating the analytic p0 on it: that is the t → 0 treatment, and level
  t = 0 is the analytic log p0 itself. All terms are positive, so p_t keeps its relative
  precision far into the tails (an FFT only gives ~1e−16 max p_t absolute); BLAS products
  (one thread: many small products) make this cheap. Exponents are managed so that no
  product is subnormal (`_quadrature_level`).
* **Time.** Levels are uniform in θ = log(τ² + c) − ¾·2t, τ² = e^{2t} − 1, c = `time_warp`:
  uniform in the heat time τ² ≈ 2t near t = 0, where the score of p0 changes on the time
  scale ℓ² of its finest feature ℓ, and uniform in t (4x sparser) for t ≳ 1, where R decays
  like e^{−3t}. (The paper's levels, uniform in t, are far too coarse near t = 0.)
* **Interpolation.** Tensor-product cardinal B-splines, cubic in θ and of degree
  `space_degree` (5 by default) in ζ, with coefficients from the local quasi-interpolants
  that reproduce polynomials of those degrees (no global solve, the approximation order of
  interpolation; at t = 0, where R is a polynomial of degree ≤ 4 for the paper's family, the
  quintic one is exact). log p_t is thus C² in t and C⁴ in x, so the probability-flow vector
  field is smooth, as adaptive Runge–Kutta step control needs. The score is the exact gradient
  of the spline plus the exact reference-Gaussian score. Points outside a component's table
  use the table's edge value of R (that component's weight there is < e^{−Λ}).

Two evaluators: `score(tables, x, t)` for one point (the `sde.ScoreFn` of `flow.encode`), and
`batch_score(tables, x, t)` for a batch at a shared time, which interpolates the tables in time
once per call and is 4–7x faster; `encode`/`encoder_jacobian` solve the probability-flow ODE
for a whole batch as one system with shared steps (max-norm error control) and use it.

Times are OU times in [0, `t_max`]; for another VP schedule use `sde.ou_time`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix
import scipy.fft
import threadpoolctl

from ddpm_ot_jax import flow
from ddpm_ot_jax import sde

Array = jax.Array
Params = Any
# (params_k, y) -> log p_k(y): one normalised component log density at one point y of shape (2,).
LogDensity = Callable[[Params, Array], Array]

_EVAL_CHUNK = 1 << 16
# Exponent ranges of the quadrature products (see `_quadrature_level`): every product of
# nonzero factors stays a normal double (> e^{-708}); subnormals make BLAS ~100x slower.
_KERNEL_CUT = 250.0
_DENSITY_CUT = 450.0
# Below this many e-folds under a level's largest value a table node is not trusted; it is
# filled with the transported analytic density p0(x/a)/a² (such nodes only occur in the far
# corners of a table at small t, hundreds of e-folds below where the component has weight).
_TRUSTED_DROP = 600.0
_LATE_SLOWDOWN = 0.75  # θ grows like (1 − this)·2t at large t (see `time_to_theta`)

# Cardinal B-spline weights of c[i − (k−1)/2 + j], j = 0..k, at x = i + u: polynomials in u
# (highest power first), times 6 (cubic) and 120 (quintic).
_CUBIC = np.array([[-1, 3, -3, 1], [3, -6, 0, 4], [-3, 3, 3, 1], [1, 0, 0, 0]], np.float64) / 6.0
_QUINTIC = np.array([[-1, 5, -10, 10, -5, 1], [5, -20, 20, 20, -50, 26], [-10, 30, 0, -60, 0, 66],
                     [10, -20, -20, 20, 50, 26], [-5, 5, 10, 10, 5, 1], [1, 0, 0, 0, 0, 0]], np.float64) / 120.0
# Quasi-interpolation stencils: c = a * f reproduces polynomials of degree k (â β̂_k = 1 + O(ω^{k+1})),
# e.g. â = 1 + D/4 + 13 D²/240 with D = 2 − 2 cos ω for the quintic.
_STENCILS = {3: np.array([-1.0, 8.0, -1.0]) / 6.0,
             5: np.array([13.0 / 240, -7.0 / 15, 73.0 / 40, -7.0 / 15, 13.0 / 240])}


@dataclasses.dataclass(frozen=True)
class GridSpec:
  """How to solve and tabulate the Fokker–Planck equation.

  grid_size: points per dimension of the base grid on [−domain, domain]² (the paper: 1024 on
    [−10, 10]²): normalisation and moments of each component, its band Ω_k, and the base
    quadrature spacing.
  num_time_steps: time intervals on [0, t_max] (num_time_steps + 1 levels; the paper: 256).
  table_size: points per dimension of each component's comoving spline table.
  box_log_drop: Λ: a table covers where log p_{k,t} ≥ max − Λ along each principal axis.
  time_warp: c in θ = log(e^{2t} − 1 + c) − ¾·2t (levels are uniform in θ).
  kernel_sigmas: c in the quadrature condition 2π/h ≥ Ω_k + c a/s.
  spectral_tol: relative size below which p_k's Fourier transform counts as zero.
  max_refine: the finest input spacing is base / 2^max_refine (small t).
  space_degree: B-spline degree in space, 3 or 5 (time is cubic).
  """

  grid_size: int = 1024
  domain: float = 10.0
  num_time_steps: int = 256
  t_max: float = 8.0
  table_size: int = 128
  box_log_drop: float = 40.0
  time_warp: float = 0.01
  kernel_sigmas: float = 9.0
  spectral_tol: float = 1e-14
  max_refine: int = 4
  space_degree: int = 5

  def __post_init__(self):
    if self.grid_size < 16:
      raise ValueError(f"grid_size must be ≥ 16, got {self.grid_size}.")
    if self.num_time_steps < 4:
      raise ValueError(f"num_time_steps must be ≥ 4, got {self.num_time_steps}.")
    if self.table_size < 16:
      raise ValueError(f"table_size must be ≥ 16, got {self.table_size}.")
    if self.space_degree not in (3, 5):
      raise ValueError(f"space_degree must be 3 or 5, got {self.space_degree}.")
    if not (self.t_max > 0 and self.domain > 0 and self.time_warp > 0):
      raise ValueError("t_max, domain and time_warp must be positive.")

  @property
  def base_spacing(self) -> float:
    return 2.0 * self.domain / (self.grid_size - 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScoreTables:
  """Spline coefficients of R_k(θ, ζ) and each component's frame (module docstring).

  log_weights (K,), means (K, 2), eigvecs (K, 2, 2) (columns), eigvals (K, 2), box0 (K, 2)
  = b_k(0); coeffs (K, n_t + 2, n_z + k − 1, n_z + k − 1): coefficient of level/node index j
  at position j + 1 in time and j + (k − 1)/2 in space.
  """

  log_weights: Array
  means: Array
  eigvecs: Array
  eigvals: Array
  box0: Array
  coeffs: Array
  t_max: float = dataclasses.field(metadata=dict(static=True), default=8.0)
  time_warp: float = dataclasses.field(metadata=dict(static=True), default=0.01)
  theta_start: float = dataclasses.field(metadata=dict(static=True), default=0.0)
  theta_step: float = dataclasses.field(metadata=dict(static=True), default=1.0)
  num_levels: int = dataclasses.field(metadata=dict(static=True), default=2)
  box_log_drop: float = dataclasses.field(metadata=dict(static=True), default=40.0)
  space_degree: int = dataclasses.field(metadata=dict(static=True), default=5)

  @property
  def num_components(self) -> int:
    return self.log_weights.shape[0]

  @property
  def table_size(self) -> int:
    return self.coeffs.shape[-1] - self.space_degree + 1


@dataclasses.dataclass(frozen=True)
class SolveInfo:
  """Diagnostics of `solve`."""

  times: np.ndarray  # (n_t,) the levels in [0, t_max]
  input_spacing: np.ndarray  # (K, n_t) quadrature spacing per level (0: analytic, t = 0)
  bandwidth: np.ndarray  # (K, 2) Ω_k per principal axis
  mass: np.ndarray  # (K,) ∫ p_k on the base grid (1 if the domain holds the component)
  num_filled: int  # untrusted table nodes (module constants); 0 in practice


# ----------------------------------------------------------------------------------------
# Time warp
# ----------------------------------------------------------------------------------------


def time_to_theta(t: float | np.ndarray | Array, time_warp: float) -> float | np.ndarray | Array:
  """θ(t) = log(τ² + c) − ¾ log(1 + τ²), τ² = e^{2t} − 1: the clock the levels are uniform in.

  dθ/dt = 2(1 + τ²)/(τ² + c) − 3/2 decreases from 2/c to 1/2: levels are uniform in the heat
  time τ² ≈ 2t near t = 0, and uniform in t (4x sparser than there) for t ≳ 1, where R
  decays like e^{−3t} and changes slowly. NumPy in, NumPy out; a jax.Array in, jax.Array out.
  """
  xp = jnp if isinstance(t, jax.Array) else np
  tau2 = xp.expm1(2.0 * t)
  return xp.log(tau2 + time_warp) - _LATE_SLOWDOWN * 2.0 * t


def theta_to_time(theta: float | np.ndarray, time_warp: float) -> np.ndarray:
  """Inverse of `time_to_theta` (θ is strictly increasing): bisection, then Newton."""
  theta = np.asarray(theta, np.float64)
  lo = np.zeros_like(theta)
  hi = np.full_like(theta, 1.0)
  while np.any(time_to_theta(hi, time_warp) < theta):
    hi = np.where(time_to_theta(hi, time_warp) < theta, 2 * hi, hi)
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    below = time_to_theta(mid, time_warp) < theta
    lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
  return 0.5 * (lo + hi)


def time_levels(spec: GridSpec) -> np.ndarray:
  """The num_time_steps + 1 levels in [0, t_max], uniform in θ."""
  n = spec.num_time_steps
  theta0, theta1 = time_to_theta(0.0, spec.time_warp), time_to_theta(spec.t_max, spec.time_warp)
  t = theta_to_time(theta0 + (theta1 - theta0) * np.arange(n + 1) / n, spec.time_warp)
  t[0], t[n] = 0.0, spec.t_max
  return t


# ----------------------------------------------------------------------------------------
# Building the tables
# ----------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _log_density_chunk(log_density, params, points):
  return jax.vmap(lambda y: log_density(params, y))(points)


def evaluate(log_density: LogDensity, params: Params, points: np.ndarray | Array) -> np.ndarray:
  """log p(y) at many points (..., 2) -> (...), in fixed-size chunks (one compilation)."""
  points = np.asarray(points, np.float64)
  shape = points.shape[:-1]
  points = points.reshape(-1, 2)
  n = len(points)
  padded = -(-n // _EVAL_CHUNK) * _EVAL_CHUNK
  points = np.concatenate([points, np.zeros((padded - n, 2))]) if padded > n else points
  out = [np.asarray(_log_density_chunk(log_density, params, jnp.asarray(points[i:i + _EVAL_CHUNK])))
         for i in range(0, padded, _EVAL_CHUNK)]
  return np.concatenate(out)[:n].reshape(shape)


def _log_gauss_kernel(out_nodes, in_nodes, a, s, h):
  """log A[o, j] = log(h N(out_o; a in_j, s²)) (1-D)."""
  return (math.log(h / (math.sqrt(2.0 * math.pi) * s))
          - 0.5 * ((out_nodes[:, None] - a * in_nodes[None, :]) / s) ** 2)


def _cut_exp(log_values, cut):
  """(exp(log_values − max) where > e^{−cut}, else exactly 0 (never subnormal); max)."""
  top = log_values.max()
  rel = log_values - top
  return np.where(rel > -cut, np.exp(np.maximum(rel, -cut)), 0.0), top


def _quadrature_level(xi, axes, p_in, top_p, a, s, h):
  """log p_t on the output grid xi[0] × xi[1]: log(A₁ P A₂ᵀ) with exponent bookkeeping.

  P = exp(log p0 − top_p) is cut e^{-450} below its maximum (`_cut_exp`), A₁ e^{-250} below
  its maximum, and A₂ is cut likewise and scaled up by e^{250}, so every product in both BLAS
  calls is either exactly 0 or a normal double. Outputs whose dominant terms survive the cuts
  (all nodes down to ~e^{-600} below the maximum) keep full relative precision, since all
  terms are positive.
  """
  k1, top1 = _cut_exp(_log_gauss_kernel(xi[0], axes[0], a, s, h), _KERNEL_CUT)
  k2, top2 = _cut_exp(_log_gauss_kernel(xi[1], axes[1], a, s, h), _KERNEL_CUT)
  k2 *= math.exp(_KERNEL_CUT)
  if p_in.shape[0] <= p_in.shape[1]:
    p_out = (k1 @ p_in) @ k2.T
  else:
    p_out = k1 @ (p_in @ k2.T)
  with np.errstate(divide="ignore"):
    return np.log(p_out) + (top1 + top2 + top_p - _KERNEL_CUT)


def _bandwidth(log_p: np.ndarray, h: float, tol: float) -> np.ndarray:
  """Ω per axis: the largest |ω| with |p̂(ω)| > tol |p̂(0)| (FFT of p on a grid of spacing h)."""
  p = np.exp(log_p - log_p.max())
  spec = np.abs(scipy.fft.fft2(p, workers=-1))
  spec /= spec[0, 0]
  omegas = []
  for axis in (0, 1):
    freq = np.abs(scipy.fft.fftfreq(p.shape[axis], d=h)) * 2.0 * np.pi
    profile = spec.max(axis=1 - axis)
    above = freq[profile > tol]
    omegas.append(above.max() if above.size else 0.0)
  return np.array(omegas)


def _solve_component(log_density, params, base_logp, nodes, times, zeta, spec: GridSpec, out: np.ndarray):
  """Spline coefficients in ζ of R_k(t_j, ·) on every level into out (n_t, n_c, n_c)."""
  h = spec.base_spacing
  lam_ = spec.box_log_drop
  lmax_base = base_logp.max()
  w = np.exp(base_logp - lmax_base)
  mass_rel = w.sum()
  mass = mass_rel * h * h * math.exp(lmax_base)
  x1, x2 = nodes[:, None], nodes[None, :]
  mean = np.array([(w * x1).sum(), (w * x2).sum()]) / mass_rel
  d1, d2 = x1 - mean[0], x2 - mean[1]
  c12 = (w * d1 * d2).sum()
  cov = np.array([[(w * d1 * d1).sum(), c12], [c12, (w * d2 * d2).sum()]]) / mass_rel
  lam, vec = np.linalg.eigh(cov)
  # Inputs: where log p_k ≥ max − 3Λ, in the principal frame u = Vᵀ(y − m) (far below what
  # any table node, ≥ e^{−2Λ}-ish, can feel).
  near = base_logp >= lmax_base - 3.0 * lam_
  d1b, d2b = np.broadcast_to(d1, near.shape)[near], np.broadcast_to(d2, near.shape)[near]
  su = np.stack([d1b, d2b], -1) @ vec
  lo, hi = su.min(0) - 3 * h, su.max(0) + 3 * h

  def principal_grid(step, box_lo, box_hi):
    axes = [np.arange(math.floor(box_lo[i] / step), math.ceil(box_hi[i] / step) + 1) * step for i in (0, 1)]
    u1, u2 = np.meshgrid(axes[0], axes[1], indexing="ij")
    y = mean + np.stack([u1, u2], -1) @ vec.T
    return axes, evaluate(log_density, params, y)

  axes0, logp0 = principal_grid(h, lo, hi)
  band = _bandwidth(logp0, h, spec.spectral_tol)
  # b_k(0): extent of {log p_k ≥ max − Λ} along each principal axis (+ one node).
  keep = logp0 >= logp0.max() - lam_
  u1, u2 = np.meshgrid(axes0[0], axes0[1], indexing="ij")
  box0 = np.array([np.abs(u1[keep]).max(), np.abs(u2[keep]).max()]) + h

  # Per level: output half-widths, quadrature spacing, and the input box the kernel reaches.
  levels = []
  for t in times:
    a, s2 = math.exp(-t), -math.expm1(-2.0 * t)
    s = math.sqrt(s2)
    half = np.sqrt(a * a * box0**2 + 2.0 * lam_ * s2)
    if t == 0.0:
      levels.append((a, s, half, None, None, None))
      continue
    need = 2.0 * np.pi / (band.max() + spec.kernel_sigmas * a / s)
    m = max(math.floor(math.log2(need / h)), -spec.max_refine)
    step = h * 2.0**m
    reach = (half + 1.5 * spec.kernel_sigmas * s) / a
    levels.append((a, s, half, step, np.maximum(lo, -reach), np.minimum(hi, reach)))
  grids = {}
  for a, s, half, step, box_lo, box_hi in levels:
    if step is not None:
      old = grids.get(step, (box_lo, box_hi))
      grids[step] = (np.minimum(old[0], box_lo), np.maximum(old[1], box_hi))
  grids = {step: principal_grid(step, *box) for step, box in grids.items()}
  grids = {step: (axes, *_cut_exp(logp, _DENSITY_CUT)) for step, (axes, logp) in grids.items()}

  spacing = np.zeros(len(times))
  num_filled = 0
  for j, (a, s, half, step, box_lo, box_hi) in enumerate(levels):
    xi = [half[i] * zeta for i in (0, 1)]
    var_ref = a * a * lam + s * s
    log_ref = (-0.5 * (xi[0][:, None] ** 2 / var_ref[0] + xi[1][None, :] ** 2 / var_ref[1])
               - 0.5 * np.log((2 * np.pi) ** 2 * var_ref[0] * var_ref[1]))
    if step is None:  # t = 0: the analytic log p0
      y = mean + np.stack(np.meshgrid(xi[0], xi[1], indexing="ij"), -1) @ vec.T
      log_pt = evaluate(log_density, params, y)
    else:
      axes, p_all, top_p = grids[step]
      sel = [np.nonzero((axes[i] >= box_lo[i] - 0.5 * step) & (axes[i] <= box_hi[i] + 0.5 * step))[0] for i in (0, 1)]
      p_in = p_all[sel[0][0]:sel[0][-1] + 1, sel[1][0]:sel[1][-1] + 1]
      log_pt = _quadrature_level(xi, [axes[0][sel[0]], axes[1][sel[1]]], p_in, top_p, a, s, step)
      untrusted = ~(log_pt > log_pt.max() - _TRUSTED_DROP)
      if untrusted.any():
        y = (mean + np.stack(np.meshgrid(xi[0], xi[1], indexing="ij"), -1)[untrusted] @ vec.T) / a
        log_pt[untrusted] = evaluate(log_density, params, y) - 2.0 * math.log(a)
        num_filled += int(untrusted.sum())
      spacing[j] = step
    out[j] = _space_coefficients(log_pt - log_ref, spec.space_degree)
  return dict(spacing=spacing, num_filled=num_filled, mean=mean, vec=vec, lam=lam,
              box0=box0, band=band, mass=mass)


def _space_coefficients(values: np.ndarray, space_degree: int) -> np.ndarray:
  """Quasi-interpolation coefficients (n_z + k − 1)² of one level's values (n_z, n_z).

  c = a * f with the stencil a of `_STENCILS`, which reproduces polynomials of the spline's
  degree k: the error is O(h^{k+1}) as for interpolation, with no global solve (at t = 0,
  where R is a polynomial of degree ≤ 4 for the paper's family, it is exact). Mirror padding:
  the table edges sit e^{−Λ} deep in the tails, where nothing depends on it.
  """
  stencil = _STENCILS[space_degree]
  r = len(stencil) // 2
  pad = (space_degree - 1) // 2 + r
  f = np.pad(values, pad, mode="reflect")
  n = f.shape[0] - 2 * r
  f = sum(w * f[m:m + n] for m, w in enumerate(stencil))
  return sum(w * f[:, m:m + n] for m, w in enumerate(stencil))


@jax.jit
def _time_coefficients(values: Array) -> Array:
  """Cubic quasi-interpolation along axis 1 of (K, n_t, ...): coefficients of levels −1 .. n_t.

  Two ghost levels beyond each end come from the cubic through the 4 end levels
  (f_{−1} = 4f_0 − 6f_1 + 4f_2 − f_3), exact for cubics.
  """
  f = values
  lo, hi = [f[:, 0], f[:, 1], f[:, 2], f[:, 3]], [f[:, -1], f[:, -2], f[:, -3], f[:, -4]]
  for _ in range(2):
    lo.insert(0, 4 * lo[0] - 6 * lo[1] + 4 * lo[2] - lo[3])
    hi.insert(0, 4 * hi[0] - 6 * hi[1] + 4 * hi[2] - hi[3])
  f = jnp.concatenate([jnp.stack(lo[:2], 1), f, jnp.stack(hi[:2][::-1], 1)], axis=1)
  n_c = f.shape[1] - 2
  return sum(w * jax.lax.slice_in_dim(f, m, m + n_c, axis=1) for m, w in enumerate(_STENCILS[3]))


def solve(
    log_density: LogDensity,
    component_params: Sequence[Params],
    log_weights: np.ndarray | Sequence[float],
    spec: GridSpec = GridSpec(),
) -> tuple[ScoreTables, SolveInfo]:
  """Solves (FP) for p0 = Σ_k w_k p_k and returns the score tables (module docstring).

  p_k(y) = exp(log_density(component_params[k], y)), normalised; log_density must be
  hashable (a module-level function: it is jit-compiled once per parameter structure). The
  base grid [−domain, domain]² must hold each component's mass (`SolveInfo.mass`).
  """
  log_weights = np.asarray(log_weights, np.float64)
  num_comp = len(component_params)
  if log_weights.shape != (num_comp,):
    raise ValueError(f"log_weights has shape {log_weights.shape}, expected ({num_comp},).")
  nodes = np.linspace(-spec.domain, spec.domain, spec.grid_size)
  grid = np.stack(np.meshgrid(nodes, nodes, indexing="ij"), -1)
  times = time_levels(spec)
  n_z = spec.table_size
  zeta = np.linspace(-1.0, 1.0, n_z)
  n_c = n_z + spec.space_degree - 1
  residuals = np.empty((num_comp, len(times), n_c, n_c))
  comps = []
  # Many small products: one BLAS thread is fastest and immune to oversubscribed cores.
  with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
    for k, params in enumerate(component_params):
      base_logp = evaluate(log_density, params, grid)
      if np.isnan(base_logp).any() or (base_logp == np.inf).any():
        raise ValueError(f"log_density of component {k} is NaN or +inf on the base grid.")
      comp = _solve_component(log_density, params, base_logp, nodes, times, zeta, spec, residuals[k])
      comps.append(comp)
  coeffs = _time_coefficients(jnp.asarray(residuals))
  theta = time_to_theta(times, spec.time_warp)

  tables = ScoreTables(
      log_weights=jnp.asarray(log_weights),
      means=jnp.asarray(np.stack([c["mean"] for c in comps])),
      eigvecs=jnp.asarray(np.stack([c["vec"] for c in comps])),
      eigvals=jnp.asarray(np.stack([c["lam"] for c in comps])),
      box0=jnp.asarray(np.stack([c["box0"] for c in comps])),
      coeffs=coeffs,
      t_max=float(spec.t_max),
      time_warp=float(spec.time_warp),
      theta_start=float(theta[0]),
      theta_step=float(theta[1] - theta[0]),
      num_levels=spec.num_time_steps + 1,
      box_log_drop=float(spec.box_log_drop),
      space_degree=spec.space_degree,
  )
  info = SolveInfo(times=times, input_spacing=np.stack([c["spacing"] for c in comps]),
                   bandwidth=np.stack([c["band"] for c in comps]), mass=np.array([c["mass"] for c in comps]),
                   num_filled=sum(c["num_filled"] for c in comps))
  return tables, info


# ----------------------------------------------------------------------------------------
# Evaluating the tables
# ----------------------------------------------------------------------------------------


def _horner(poly: np.ndarray, u: Array) -> Array:
  """Rows of `poly` (highest power first) evaluated at u: shape (rows,) + u.shape."""
  u = jnp.asarray(u)
  out = jnp.full((poly.shape[0],) + u.shape, poly[:, 0].reshape((-1,) + (1,) * u.ndim), u.dtype)
  for c in range(1, poly.shape[1]):
    out = out * u + poly[:, c].reshape((-1,) + (1,) * u.ndim)
  return out


def _space_polys(degree: int) -> tuple[np.ndarray, np.ndarray]:
  poly = _QUINTIC if degree == 5 else _CUBIC
  return poly, poly[:, :-1] * np.arange(degree, 0, -1)


def _time_weights(tables: ScoreTables, t: Array):
  """(first coefficient index, the 4 cubic weights) for time t (clamped to [0, t_max])."""
  t = jnp.clip(t, 0.0, tables.t_max)
  pos = (time_to_theta(t, tables.time_warp) - tables.theta_start) / tables.theta_step
  start = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, tables.num_levels - 2)
  return t, start, _horner(_CUBIC, pos - start)


def _frame(tables: ScoreTables, x: Array, t: Array):
  """Per component at one point: ξ, reference variances, half-widths, ζ and whether inside."""
  a = jnp.exp(-t)
  s2 = -jnp.expm1(-2.0 * t)
  xi = jnp.einsum("kji,kj->ki", tables.eigvecs, x - a * tables.means)  # Vᵀ (x − a m)
  var_ref = a * a * tables.eigvals + s2
  half = jnp.sqrt(a * a * tables.box0**2 + 2.0 * tables.box_log_drop * s2)
  zeta = xi / half
  return xi, var_ref, half, zeta


def _space_weights(tables: ScoreTables, zeta: Array):
  """Node index, B-spline weights and their ζ-derivatives for ζ of shape (..., 2)."""
  n_z = tables.table_size
  poly, dpoly = _space_polys(tables.space_degree)
  pos = (jnp.clip(zeta, -1.0, 1.0) + 1.0) * (0.5 * (n_z - 1))
  start = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, n_z - 2)
  u = pos - start
  scale = 0.5 * (n_z - 1)  # dpos/dζ
  weights = jnp.moveaxis(_horner(poly, u), 0, -1)  # (..., 2, k + 1)
  derivs = jnp.moveaxis(_horner(dpoly, u), 0, -1) * scale * (jnp.abs(zeta) < 1.0)[..., None]
  return start, weights, derivs


def _combine(tables: ScoreTables, xi, var_ref, half, resid, grad_zeta):
  """log p_{k,t} and ∇_x log p_{k,t} from R and ∂R/∂ζ (last axis k or (..., k))."""
  log_ref = -0.5 * jnp.sum(xi**2 / var_ref, -1) - 0.5 * jnp.sum(jnp.log(2 * jnp.pi * var_ref), -1)
  grad_xi = -xi / var_ref + grad_zeta / half
  grad_x = jnp.einsum("...kij,...kj->...ki", tables.eigvecs, grad_xi)  # V ∇_ξ
  return log_ref + resid, grad_x


def _components_one(tables: ScoreTables, x: Array, t: Array):
  """(log p_{k,t}(x), ∇ log p_{k,t}(x)) for every k at one point."""
  t, t_start, t_w = _time_weights(tables, t)
  xi, var_ref, half, zeta = _frame(tables, x, t)
  start, w, dw = _space_weights(tables, zeta)  # (K, 2), (K, 2, k+1)
  size = tables.space_degree + 1

  def one(coeffs, st, wk, dwk):
    block = jax.lax.dynamic_slice(coeffs, (t_start, st[0], st[1]), (4, size, size))
    plane = jnp.tensordot(t_w, block, axes=1)
    v2 = plane @ wk[1]
    return jnp.stack([wk[0] @ v2, dwk[0] @ v2, wk[0] @ (plane @ dwk[1])])

  r = jax.vmap(one)(tables.coeffs, start, w, dw)  # (K, 3)
  return _combine(tables, xi, var_ref, half, r[:, 0], r[:, 1:])


def log_prob(tables: ScoreTables, x: Array, t: Array) -> Array:
  """log p_t(x) from the tables, one point x of shape (2,)."""
  logs, _ = _components_one(tables, x, t)
  return jax.scipy.special.logsumexp(tables.log_weights + logs)


def score(tables: ScoreTables, x: Array, t: Array) -> Array:
  """∇_x log p_t(x) = Σ_k r_k ∇ log p_{k,t}(x), r = softmax(log w_k + log p_{k,t}), one point."""
  logs, grads = _components_one(tables, x, t)
  return jax.nn.softmax(tables.log_weights + logs) @ grads


def score_fn(tables: ScoreTables) -> sde.ScoreFn:
  """(x, t) ↦ ∇_x log p_t(x) for one point: the `sde.ScoreFn` that `flow.encode` takes."""
  return lambda x, t: score(tables, x, t)


def batch_score(tables: ScoreTables, x: Array, t: Array) -> Array:
  """∇_x log p_t at a batch x (n, 2) sharing one time t: the tables are contracted in time
  once (K planes), then each point reads a (k+1)² block per component."""
  t, t_start, t_w = _time_weights(tables, t)
  planes = jnp.tensordot(t_w, jax.lax.dynamic_slice_in_dim(tables.coeffs, t_start, 4, axis=1), axes=((0,), (1,)))
  xi, var_ref, half, zeta = jax.vmap(lambda xx: _frame(tables, xx, t))(x)  # (n, K, 2)
  start, w, dw = _space_weights(tables, zeta)  # (n, K, 2), (n, K, 2, k+1)
  size = tables.space_degree + 1

  def one(plane, st, wk, dwk):
    block = jax.lax.dynamic_slice(plane, (st[0], st[1]), (size, size))
    v2 = block @ wk[1]
    return jnp.stack([wk[0] @ v2, dwk[0] @ v2, wk[0] @ (block @ dwk[1])])

  r = jax.vmap(jax.vmap(one), in_axes=(None, 0, 0, 0))(planes, start, w, dw)  # (n, K, 3)
  logs, grads = _combine(tables, xi, var_ref, half, r[..., 0], r[..., 1:])
  resp = jax.nn.softmax(tables.log_weights + logs, axis=-1)
  return jnp.einsum("nk,nki->ni", resp, grads)


# ----------------------------------------------------------------------------------------
# The probability-flow encoder for a whole batch
# ----------------------------------------------------------------------------------------


def _solve_batch(tables: ScoreTables, x0: Array, t_end: float, options: flow.SolverOptions, save_ts, adjoint):
  """Eq. 9 for the whole batch as one state (max-norm error control: every point's error is
  held to the tolerances)."""
  drift = sde.probability_flow_drift(sde.ConstantSchedule(2.0, tables.t_max), lambda x, t: batch_score(tables, x, t))
  return flow.solve_ode(drift, x0, 0.0, t_end, options, save_ts, adjoint, norm=optimistix.max_norm)


def saved_times(t_max: float, num: int) -> np.ndarray:
  """`num` times in [0, t_max] on the levels' clock (dense near 0), for trajectories."""
  return time_levels(GridSpec(num_time_steps=num - 1, t_max=t_max))


# `jitted`'s pair: encode(tables, x0 (n, 2)) -> FlowSolution, encoder_jacobian(tables, x0) -> (n, 2, 2).
EncodeFn = Callable[["ScoreTables", Array], flow.FlowSolution]
JacobianFn = Callable[["ScoreTables", Array], Array]

# Trajectory times the 2-D experiments save (Fig. 4): one value, so that their `jitted` solves
# share one compilation within a process.
NUM_SAVED_TIMES = 65


@functools.lru_cache(maxsize=None)
def jitted(
    options: flow.SolverOptions = flow.SolverOptions(), num_saved_times: int = 0
) -> tuple[EncodeFn, JacobianFn]:
  """(encode, encoder_jacobian) jit-compiled for these options, shared by all callers (each
  compiles once per table shape and batch size). With num_saved_times > 0 encode also returns
  the trajectories at `saved_times(t_max, num_saved_times)`."""

  def encode_fn(tables, x0):
    save_ts = jnp.asarray(saved_times(tables.t_max, num_saved_times)) if num_saved_times else None
    return encode(tables, x0, options=options, save_ts=save_ts)

  return (jax.jit(encode_fn), jax.jit(lambda tables, x0: encoder_jacobian(tables, x0, options=options)))


def encode(
    tables: ScoreTables,
    x0: Array,
    t_end: float | None = None,
    options: flow.SolverOptions = flow.SolverOptions(),
    save_ts: Array | None = None,
) -> flow.FlowSolution:
  """E(x) = x(t_end) along the probability-flow ODE (Eq. 9) for a batch x0 (n, 2).

  The batch is one ODE system with shared steps; the error of every point is controlled (max
  norm), so each point is as accurate as its own `flow.encode` solve, and each stage reads
  the tables at a single time (`batch_score`). nfe is the same for every point.
  """
  t_end = tables.t_max if t_end is None else t_end
  sol = _solve_batch(tables, x0, t_end, options, save_ts, diffrax.RecursiveCheckpointAdjoint())
  nfe = jnp.full((x0.shape[0],), flow.nfe_from_steps(options.solver, sol.stats["num_steps"]))
  if save_ts is None:
    return flow.FlowSolution(x=sol.ys[-1], nfe=nfe)
  return flow.FlowSolution(x=sol.ys[-1], nfe=nfe, ts=jnp.asarray(save_ts), trajectory=jnp.swapaxes(sol.ys[:-1], 0, 1))


def encoder_jacobian(
    tables: ScoreTables,
    x0: Array,
    t_end: float | None = None,
    options: flow.SolverOptions = flow.SolverOptions(),
) -> Array:
  """J(x) = ∂E(x)/∂x (n, 2, 2) for a batch: forward mode through the batched solve.

  The points do not interact, so one JVP with the tangent e_j at every point gives column j
  of every J; the step sizes are not differentiated (`diffrax.ForwardMode`), as in
  `flow.encoder_jacobian`.
  """
  t_end = tables.t_max if t_end is None else t_end

  def end_point(x):
    return _solve_batch(tables, x, t_end, options, None, diffrax.ForwardMode()).ys[-1]

  seeds = jnp.broadcast_to(jnp.eye(2, dtype=x0.dtype)[:, None, :], (2,) + x0.shape)
  cols = jax.vmap(lambda v: jax.jvp(end_point, (x0,), (v,))[1])(seeds)  # (2, n, 2): J e_j
  return jnp.moveaxis(cols, 0, -1)
