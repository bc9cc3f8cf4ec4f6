"""Probability-flow encoder and decoder, solved with diffrax.

The encoder E maps a data point x(0) to x(T) along the probability-flow ODE (Eq. 6)

    dx/dt = −½ β(t) [x + ∇_x log p_t(x)],

and the decoder runs the same ODE from T back to 0. As T → ∞ (in OU time, `sde.ou_time`)
the encoder pushes μ0 to N(0, I); Khrulkov et al. (2022) conjecture that this limit map is
the Monge OT map.

Every solve is per point (vmapped), so each point gets its own adaptive steps and its own
number of function evaluations (NFE).

`log_likelihood` integrates the divergence of the same flow alongside it (the instantaneous
change of variables) for log p(x), exactly or with Hutchinson's estimator; `dequantize` and
`bits_per_dim` turn it into bits/dim of discrete images as score_sde reports them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from ddpm_ot_jax import sde

Array = jax.Array
VectorField = Callable[[Array, Array], Array]  # (t, x) -> dx/dt for one point x

# Vector-field evaluations per step of each solver; all but Heun are FSAL, so one extra
# evaluation starts the solve. Checked by counting calls in tests/flow_test.py.
_SOLVERS = {
    "tsit5": (diffrax.Tsit5, 6, 1),
    "dopri5": (diffrax.Dopri5, 6, 1),
    "dopri8": (diffrax.Dopri8, 12, 1),
    "heun": (diffrax.Heun, 2, 0),
}


@dataclasses.dataclass(frozen=True)
class SolverOptions:
  """How to solve the ODE: a diffrax Runge–Kutta solver with a PID step-size controller."""

  solver: str = "tsit5"
  rtol: float = 1e-6
  atol: float = 1e-6
  max_steps: int = 16384

  def __post_init__(self):
    if self.solver not in _SOLVERS:
      raise ValueError(f"Unknown ODE solver {self.solver!r}; choose one of {sorted(_SOLVERS)}.")
    if not (self.rtol > 0 and self.atol > 0):
      raise ValueError(f"rtol and atol must be positive, got {self.rtol}, {self.atol}.")


class FlowSolution(NamedTuple):
  """End points, NFE per point, and (optionally) the trajectory at `ts`."""

  x: Array  # (n, *event_shape)
  nfe: Array  # (n,) int
  ts: Array | None = None  # (k,)
  trajectory: Array | None = None  # (n, k, *event_shape)


def solver_class(solver: str) -> type[diffrax.AbstractSolver]:
  """The diffrax solver class of a solver name ('tsit5', 'dopri5', 'dopri8', 'heun')."""
  return _SOLVERS[solver][0]


def nfe_from_steps(solver: str, num_steps: Array) -> Array:
  """Number of vector-field evaluations of `num_steps` steps (accepted and rejected)."""
  _, per_step, start = _SOLVERS[solver]
  return per_step * num_steps + start


def solve_ode(vector_field: VectorField, x: Array, t0: float, t1: float, options: SolverOptions,
              save_ts: Array | None = None, adjoint: diffrax.AbstractAdjoint | None = None,
              norm: Callable[[Array], Array] | None = None, throw: bool = True
              ) -> diffrax.Solution:
  """One adaptive diffrax solve of dx/dt = v(t, x) from t0 to t1 with `options`' solver and
  tolerances. sol.ys: the values at save_ts (if any), then the value at t1. adjoint: diffrax's
  RecursiveCheckpointAdjoint by default (ForwardMode for jacfwd). norm: the step controller's
  error norm (diffrax's RMS by default; a max norm when x is a whole batch solved as one state,
  so that no point's error is averaged away). throw=False: a solve that fails (max_steps
  exhausted) returns with sol.result unsuccessful instead of raising."""
  solver_cls = solver_class(options.solver)
  if save_ts is None:
    saveat = diffrax.SaveAt(t1=True)
  else:
    saveat = diffrax.SaveAt(ts=save_ts, t1=True)
  controller = (diffrax.PIDController(rtol=options.rtol, atol=options.atol) if norm is None else
                diffrax.PIDController(rtol=options.rtol, atol=options.atol, norm=norm))
  return diffrax.diffeqsolve(
      diffrax.ODETerm(lambda t, y, args: vector_field(t, y)),
      solver_cls(),
      t0=t0,
      t1=t1,
      dt0=None,
      y0=x,
      stepsize_controller=controller,
      saveat=saveat,
      max_steps=options.max_steps,
      adjoint=adjoint if adjoint is not None else diffrax.RecursiveCheckpointAdjoint(),
      throw=throw,
  )


def solve(
    vector_field: VectorField,
    x: Array,
    t0: float,
    t1: float,
    options: SolverOptions = SolverOptions(),
    save_ts: Array | None = None,
) -> FlowSolution:
  """Solves dx/dt = vector_field(t, x) from t0 to t1 for each row of `x` (vmapped).

  `vector_field(t, x)` takes one point. t1 < t0 integrates backwards in time.
  """

  def one(xi):
    sol = solve_ode(vector_field, xi, t0, t1, options, save_ts)
    return sol.ys, sol.stats["num_steps"]

  ys, steps = jax.vmap(one)(x)
  nfe = nfe_from_steps(options.solver, steps)
  if save_ts is None:
    return FlowSolution(x=ys[:, -1], nfe=nfe)
  return FlowSolution(x=ys[:, -1], nfe=nfe, ts=jnp.asarray(save_ts), trajectory=ys[:, :-1])


def encode(
    schedule: sde.Schedule,
    score_fn: sde.ScoreFn,
    x0: Array,
    t_end: float | None = None,
    options: SolverOptions = SolverOptions(),
    save_ts: Array | None = None,
) -> FlowSolution:
  """The encoder: x(0) ↦ x(t_end) along the probability-flow ODE (Eq. 6); t_end = t_max."""
  t_end = schedule.t_max if t_end is None else t_end
  drift = sde.probability_flow_drift(schedule, score_fn)
  return solve(drift, x0, 0.0, t_end, options, save_ts)


def decode(
    schedule: sde.Schedule,
    score_fn: sde.ScoreFn,
    x_end: Array,
    t_end: float | None = None,
    t_start: float = 0.0,
    options: SolverOptions = SolverOptions(),
    save_ts: Array | None = None,
) -> FlowSolution:
  """The decoder: x(t_end) ↦ x(t_start) by the same ODE run backwards in time."""
  t_end = schedule.t_max if t_end is None else t_end
  drift = sde.probability_flow_drift(schedule, score_fn)
  return solve(drift, x_end, t_end, t_start, options, save_ts)


def encoder_jacobian(
    schedule: sde.Schedule,
    score_fn: sde.ScoreFn,
    x0: Array,
    t_end: float | None = None,
    options: SolverOptions = SolverOptions(),
) -> Array:
  """J(x) = ∂E(x)/∂x for each row of `x0`: forward-mode autodiff through the ODE solve.

  Returns shape (n, d, d). Uses `diffrax.ForwardMode` (jax.jacfwd needs it); the step
  sizes are not differentiated, so J is the Jacobian of the discretised map, accurate to
  the solver tolerance.
  """
  t_end = schedule.t_max if t_end is None else t_end
  drift = sde.probability_flow_drift(schedule, score_fn)

  def end_point(xi):
    sol = solve_ode(drift, xi, 0.0, t_end, options, adjoint=diffrax.ForwardMode())
    return sol.ys[-1]

  return jax.vmap(jax.jacfwd(end_point))(x0)


# ----------------------------------------------------------------------------------------
# Log-likelihood by the instantaneous change of variables, and bits/dim.
# ----------------------------------------------------------------------------------------

DIVERGENCES = ("exact", "hutchinson")  # ∇·f̃: D forward-mode JVPs, or Hutchinson's estimator
PROBES = ("rademacher", "gaussian")  # Hutchinson probe distributions (E[z zᵀ] = I)


class Likelihood(NamedTuple):
  """Per point (n,): log p_{t_start}(x) = prior_log_prob + delta_log_prob; the code z = x(t_end)
  (n, *event_shape); NFE; ok = the solve finished within max_steps (if not, NaN values)."""

  log_prob: Array
  prior_log_prob: Array  # log N(z; 0, I)
  delta_log_prob: Array  # ∫ ∇·f̃(x(t), t) dt from t_start to t_end
  z: Array
  nfe: Array
  ok: Array


def _check_likelihood_args(schedule: sde.LogAlphaSchedule, t_start: float, t_end: float,
                           divergence: str, keys: Array | None, num_probes: int,
                           probe: str) -> None:
  if not (hasattr(schedule, "log_alpha") and hasattr(schedule, "time_of_log_alpha")):
    raise TypeError(
        f"log_likelihood solves in λ = log(α/σ) and needs a schedule with log_alpha and "
        f"time_of_log_alpha, got {type(schedule).__name__}; pass samplers.noise_schedule(...) "
        "for a network, or samplers.ContinuousTimeSchedule(schedule) for any sde.Schedule.")
  if not 0.0 < float(t_start) < float(t_end) <= float(schedule.t_max):
    raise ValueError(f"need 0 < t_start < t_end ≤ t_max = {schedule.t_max}, got t_start="
                     f"{t_start}, t_end={t_end} (λ = log(α/σ) is infinite at t = 0).")
  if divergence not in DIVERGENCES:
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}.")
  if divergence == "hutchinson":
    if keys is None:
      raise ValueError("the Hutchinson divergence draws probes: pass keys (one PRNG key per "
                       "point, e.g. jax.random.split(key, n)).")
    if probe not in PROBES:
      raise ValueError(f"probe must be one of {PROBES}, got {probe!r}.")
    if not (isinstance(num_probes, int) and num_probes >= 1):
      raise ValueError(f"num_probes must be a positive int, got {num_probes!r}.")


def _probes(key: Array, probe: str, num_probes: int, dims: int, dtype: DTypeLike) -> Array:
  """(num_probes, dims) Hutchinson probes: ±1 with probability ½ each, or N(0, 1) entries."""
  if probe == "rademacher":
    return jax.random.rademacher(key, (num_probes, dims), dtype)
  return jax.random.normal(key, (num_probes, dims), dtype)


def log_likelihood(
    schedule: sde.LogAlphaSchedule,
    score_fn: sde.ScoreFn,
    x: Array,
    t_start: float,
    t_end: float | None = None,
    options: SolverOptions = SolverOptions(),
    divergence: str = "exact",
    keys: Array | None = None,
    num_probes: int = 1,
    probe: str = "rademacher",
) -> Likelihood:
  r"""log p_{t_start}(x) for each row of x through the probability-flow ODE.

  The probability-flow ODE of the VP-SDE (Song et al. 2021, Eq. 13; Eq. 6 here),

      dx/dt = f̃(x, t) = f(x, t) − ½ g(t)² ∇_x log p_t(x) = −½ β(t) [x + ∇_x log p_t(x)],

  carries p_t along its trajectories, and the instantaneous change of variables (Chen et al.
  2018, Theorem 1: d log p_t(x(t))/dt = −∇·f̃(x(t), t)) gives (Song et al. 2021, Eq. 39)

      log p_0(x(0)) = log p_T(x(T)) + ∫_0^T ∇·f̃(x(t), t) dt,

  here from T_0 = t_start (the data are taken as the state there, as score_sde's ε = 1e-5 and
  DDPM's first step t = 1/N) to T = t_end, with the prior p_T ≈ N(0, I). The gap to the true
  p_T is the caller's to bound: log N(x; α a, α² Σ + σ² I) − log N(x; 0, I) = O(α(T)).

  Solved in λ = log(α/σ) (`sde.half_log_snr`), where the VP flow is smooth even for the
  piecewise-constant β of a DDPM's discrete schedule (as `samplers.pf_ode`):

      dx/dλ = σ² [x + ∇_x log p_t(x)],   σ² = 1/(1 + e^{2λ}),   t = t(λ),

  and ∫ ∇·f̃ dt = ∫_{λ(T_0)}^{λ(T)} ∇_x·(dx/dλ) dλ (a change of the integration variable), so
  the solve carries (x, Δ) with dΔ/dλ = ∇_x·(dx/dλ), per point (vmapped; each point has its
  own adaptive steps and NFE; the RMS error norm covers x and Δ).

  divergence: 'exact' computes tr J, J = ∂(dx/dλ)/∂x, from D forward-mode JVPs (one
  `jax.linearize`, D tangents: for small D = x[0].size); 'hutchinson' (Hutchinson 1989;
  Skilling 1989; FFJORD, score_sde) uses (1/K) Σ_k z_kᵀ J z_k with K = num_probes probes
  z_k ('rademacher' ±1 or 'gaussian' N(0, I); E[z zᵀ] = I), drawn once per point from its
  key (`keys`: one PRNG key per row) and held along the trajectory. The path x(λ) does not
  depend on z, so E_z[z_kᵀ (∫ J dλ) z_k] = tr ∫ J dλ: Δ is unbiased (up to the solver error,
  whose step control also sees Δ). Each NFE is one evaluation of dx/dλ and of the divergence
  (1 + D or 1 + K network passes).

  schedule: a schedule with log_alpha / time_of_log_alpha (`sde.LogAlphaSchedule`: a
  network's view `samplers.noise_schedule(...)`, or `samplers.ContinuousTimeSchedule(s)` for
  any `sde.Schedule` s); score_fn(x, t): ∇_x log p_t at one point in that schedule's time
  (`samplers.score_fn_from_eps` for an ε-predictor). t_end defaults to t_max.
  """
  t_end = schedule.t_max if t_end is None else t_end
  _check_likelihood_args(schedule, t_start, t_end, divergence, keys, num_probes, probe)
  dtype = x.dtype
  shape = x.shape[1:]
  dims = math.prod(shape)
  # λ in x's precision (diffrax would promote a float32 state to a float64 time's dtype).
  lam_start = sde.half_log_snr(schedule, t_start).astype(dtype)
  lam_end = sde.half_log_snr(schedule, t_end).astype(dtype)

  def field(lam, state, probes):
    t = sde.time_of_half_log_snr(schedule, lam)
    sigma2 = jax.nn.sigmoid(-2.0 * lam)

    def velocity(v):  # dx/dλ on the flattened point
      return sigma2 * (v + score_fn(v.reshape(shape), t).reshape(-1))

    dx, jvp = jax.linearize(velocity, state[0])
    if probes is None:  # tr J = Σ_i (J e_i)_i
      div = jnp.trace(jax.vmap(jvp)(jnp.eye(dims, dtype=dtype)))
    else:
      div = jnp.mean(jax.vmap(lambda z: jvp(z) @ z)(probes))
    return dx, div

  def one(xi, key):
    probes = None if key is None else _probes(key, probe, num_probes, dims, dtype)
    sol = solve_ode(lambda lam, state: field(lam, state, probes),
                    (xi.reshape(-1), jnp.zeros((), dtype)), lam_start, lam_end, options,
                    throw=False)
    ok = sol.result == diffrax.RESULTS.successful
    return sol.ys[0][-1], sol.ys[1][-1], sol.stats["num_steps"], ok

  if divergence == "exact":
    z, delta, steps, ok = jax.vmap(lambda xi: one(xi, None))(x)
  else:
    z, delta, steps, ok = jax.vmap(one)(x, keys)
  z = jnp.where(ok[:, None], z, jnp.nan).reshape(x.shape)
  delta = jnp.where(ok, delta, jnp.nan)
  prior = jax.vmap(sde.prior_log_prob)(z)
  return Likelihood(log_prob=prior + delta, prior_log_prob=prior, delta_log_prob=delta, z=z,
                    nfe=nfe_from_steps(options.solver, steps), ok=ok)


def dequantize(key: Array, levels: Array, num_levels: int, dtype: DTypeLike = jnp.float32
               ) -> Array:
  r"""Uniform dequantization as score_sde evaluates bits/dim: pixel values k ∈ {0, …, L − 1}
  (`data.pixel_levels`) ↦ y = 2 (k + u)/L − 1 ∈ [−1, 1), u ~ U[0, 1)^D from `key`.

  (score_sde: v = (k + u)/256 on [0, 1), then the data scaler 2v − 1; L = 256 for 8-bit
  images, L = 17 for the digits' values 0..16.) Each training value 2k/(L − 1) − 1 lies in
  its bin [2k/L − 1, 2(k + 1)/L − 1) (at its closed end for k = 0, its open end for k = L − 1).
  """
  u = jax.random.uniform(key, levels.shape, dtype)
  return 2.0 * (levels.astype(dtype) + u) / num_levels - 1.0


def bits_per_dim(log_prob: Array, num_dims: int, num_levels: int) -> Array:
  r"""Bits per dimension of the discrete data from log p_Y(y) of dequantized points y.

  With w = k + u ∈ [0, L)^D the dequantized pixels and y = 2w/L − 1 (`dequantize`), the
  model's density of w is p_W(w) = p_Y(y) |det ∂y/∂w| = p_Y(y) (2/L)^D, and by Jensen
  P(k) = ∫_{[0,1)^D} p_W(k + u) du ≥ exp E_u[log p_W(k + u)]. So

      bpd = (−log p_Y(y) + D log(L/2)) / (D log 2)  ≥  −log₂ P(k) / D  in expectation over u:

  an upper bound on the discrete model's code length. L = 256: + log₂ 128 = 7 bits/dim, the
  offset of score_sde's `likelihood.py` for data on [−1, 1] (the scaling x/127.5 − 1 of
  undequantized pixels would give log₂ 127.5 instead; the bins (k + u)/128 − 1 have width 1/128).
  L = 17 (digits): + log₂ 8.5 = 3.087.
  """
  return (-log_prob + num_dims * math.log(num_levels / 2.0)) / (num_dims * math.log(2.0))
