"""Probability-flow encoder and decoder, solved with diffrax.

The encoder E maps a data point x(0) to x(T) along the probability-flow ODE (Eq. 6)

    dx/dt = −½ β(t) [x + ∇_x log p_t(x)],

and the decoder runs the same ODE from T back to 0. As T → ∞ (in OU time, `sde.ou_time`)
the encoder pushes μ0 to N(0, I); Khrulkov et al. (2022) conjecture that this limit map is
the Monge OT map.

Every solve is per point (vmapped), so each point gets its own adaptive steps and its own
number of function evaluations (NFE).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import diffrax
import jax
import jax.numpy as jnp

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
              norm: Callable[[Array], Array] | None = None) -> diffrax.Solution:
  """One adaptive diffrax solve of dx/dt = v(t, x) from t0 to t1 with `options`' solver and
  tolerances. sol.ys: the values at save_ts (if any), then the value at t1. adjoint: diffrax's
  RecursiveCheckpointAdjoint by default (ForwardMode for jacfwd). norm: the step controller's
  error norm (diffrax's RMS by default; a max norm when x is a whole batch solved as one state,
  so that no point's error is averaged away)."""
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
