"""The variance-preserving SDE (DDPM's forward process) and its marginals.

Forward SDE (Song et al. 2021, Eq. 5 in Khrulkov et al. 2022):

    dx = -½ β(t) x dt + √β(t) dW.

Its marginals are Gaussian given x0:  x_t | x0 ~ N(α(t) x0, σ(t)² I) with

    α(t) = exp(-½ B(t)),   σ(t)² = 1 - α(t)²,   B(t) = ∫_0^t β(s) ds.

The probability-flow ODE (Eq. 6) shares these marginals:

    dx/dt = -½ β(t) [x + ∇_x log p_t(x)].

With β ≡ 2 this is the paper's Ornstein–Uhlenbeck form (Eq. 8: dx = -x dt + √2 dW, and
Eq. 9: dx/dt = -[x + ∇ log p_t(x)]). Every VP-SDE is that OU process run on the clock
s(t) = ½ B(t) (`ou_time`), which is how the closed forms in `gaussian` and `gmm` serve all
schedules.

Schedules are frozen dataclasses (hashable, so they can be static arguments of `jax.jit`)
exposing `beta(t)`, `beta_integral(t)` = B(t) and the end time `t_max`. `time_from_ou_time`
inverts s(t) on [0, t_max], and `make_schedule_until_ou_time` builds a schedule that reaches a
given OU time s (the way the theory experiments state their end time for every schedule).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]  # (x, t) -> ∇_x log p_t(x)


class Schedule(Protocol):
  """A noise schedule β(t) on [0, t_max]."""

  t_max: float

  def beta(self, t: Array) -> Array:
    ...

  def beta_integral(self, t: Array) -> Array:
    ...


@dataclasses.dataclass(frozen=True)
class LinearSchedule:
  """β(t) = β_min + t (β_max − β_min) on [0, 1]: DDPM's schedule in continuous time."""

  beta_min: float = 0.1
  beta_max: float = 20.0
  t_max: float = 1.0

  def beta(self, t: Array) -> Array:
    return self.beta_min + t * (self.beta_max - self.beta_min)

  def beta_integral(self, t: Array) -> Array:
    return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2


@dataclasses.dataclass(frozen=True)
class CosineSchedule:
  """Nichol & Dhariwal's cosine schedule: ᾱ(t) = cos²(π/2 (t+s)/(1+s)) / cos²(π/2 s/(1+s)).

  B(t) = −log ᾱ(t) and β(t) = B'(t). ᾱ(1) = 0, so t_max stops short of 1
  (0.9946, as in DPM-Solver) where B stays finite.
  """

  s: float = 0.008
  t_max: float = 0.9946

  def _angle(self, t: Array) -> Array:
    return 0.5 * math.pi * (t + self.s) / (1.0 + self.s)

  def beta_integral(self, t: Array) -> Array:
    c0 = math.cos(0.5 * math.pi * self.s / (1.0 + self.s))
    return -2.0 * (jnp.log(jnp.cos(self._angle(t))) - math.log(c0))

  def beta(self, t: Array) -> Array:
    return math.pi / (1.0 + self.s) * jnp.tan(self._angle(t))


@dataclasses.dataclass(frozen=True)
class ConstantSchedule:
  """β(t) ≡ β. With β = 2 (the default) this is the paper's OU process, Eq. 8."""

  beta_value: float = 2.0
  t_max: float = 8.0

  def beta(self, t: Array) -> Array:
    return jnp.full_like(jnp.asarray(t, dtype=jnp.result_type(float)), self.beta_value)

  def beta_integral(self, t: Array) -> Array:
    return self.beta_value * t


def make_schedule(name: str, **kwargs) -> Schedule:
  """Builds a schedule by name: 'linear', 'cosine' or 'constant' (the paper's OU)."""
  schedules = {"linear": LinearSchedule, "cosine": CosineSchedule, "constant": ConstantSchedule}
  if name not in schedules:
    raise ValueError(f"Unknown schedule {name!r}; choose one of {sorted(schedules)}.")
  return schedules[name](**kwargs)


def marginal_mean_coeff(schedule: Schedule, t: Array) -> Array:
  """α(t) = exp(−½ B(t)): E[x_t | x_0] = α(t) x_0."""
  return jnp.exp(-0.5 * schedule.beta_integral(t))


def marginal_std(schedule: Schedule, t: Array) -> Array:
  """σ(t) = √(1 − exp(−B(t))): the standard deviation of x_t | x_0."""
  return jnp.sqrt(-jnp.expm1(-schedule.beta_integral(t)))


def ou_time(schedule: Schedule, t: Array) -> Array:
  """s(t) = ½ B(t): the time of the β ≡ 2 OU process (Eq. 8) with the same marginals."""
  return 0.5 * schedule.beta_integral(t)


def time_from_ou_time(schedule: Schedule, s: float) -> float:
  """The schedule time t ∈ [0, t_max] with s(t) = ½ B(t) = s: the inverse of `ou_time`.

  Closed forms: constant β, t = 2s/β; linear, ½(β_min t + ½(β_max − β_min) t²) = s, so
  t = 4s / (β_min + √(β_min² + 4(β_max − β_min) s)); cosine, cos(π/2 (t+ς)/(1+ς)) =
  cos(π/2 ς/(1+ς)) e^{−s}. Any other schedule: bisection on B, which increases (β > 0).

  Raises ValueError if s < 0 or s > s(t_max): beyond its end a schedule is not a VP-SDE
  (the cosine β = B' passes the pole of tan at t = 1; the linear β would be extrapolated).
  """
  s = float(s)
  s_max = float(ou_time(schedule, schedule.t_max))
  if not 0.0 <= s <= s_max * (1.0 + 1e-12):
    raise ValueError(
        f"OU time {s:g} is outside [0, {s_max:.4g}], the range of the {type(schedule).__name__} "
        f"(OU time {s_max:.4g} at its end t_max = {schedule.t_max:g}); choose an OU time ≤ {s_max:.4g} "
        "or the 'constant' schedule (the paper's OU process, any end time).")
  if isinstance(schedule, ConstantSchedule):
    t = 2.0 * s / schedule.beta_value
  elif isinstance(schedule, LinearSchedule):
    t = 4.0 * s / (schedule.beta_min + math.sqrt(schedule.beta_min**2 + 4.0 * (schedule.beta_max - schedule.beta_min) * s))
  elif isinstance(schedule, CosineSchedule):
    c0 = math.cos(0.5 * math.pi * schedule.s / (1.0 + schedule.s))
    t = math.acos(c0 * math.exp(-s)) * 2.0 * (1.0 + schedule.s) / math.pi - schedule.s
  else:
    lo, hi = 0.0, float(schedule.t_max)
    for _ in range(200):
      mid = 0.5 * (lo + hi)
      lo, hi = (mid, hi) if float(ou_time(schedule, mid)) < s else (lo, mid)
    t = 0.5 * (lo + hi)
  return min(max(t, 0.0), float(schedule.t_max))


def make_schedule_until_ou_time(name: str, ou_time_end: float) -> tuple[Schedule, float]:
  """(schedule, t_end): the schedule `name` and its time t_end at which s(t_end) = ou_time_end.

  'constant' (the paper's OU, β = 2, Eq. 8) is built with t_max = ou_time_end, so t_end =
  ou_time_end and any end time works; 'linear' and 'cosine' keep their own range [0, t_max]
  (OU time ≤ 5.025 and ≤ 4.778 with the defaults) and a larger ou_time_end is a ValueError
  (`time_from_ou_time`). Stating the end as an OU time makes the closed forms of Theorem 3.1
  (which depend on s only) and the distance e^{−s} to the limit map the same for every schedule.
  """
  if name == "constant":
    if not ou_time_end > 0:
      raise ValueError(f"The OU end time must be positive, got {ou_time_end}.")
    schedule = make_schedule(name, t_max=float(ou_time_end))
  else:
    schedule = make_schedule(name)
  return schedule, time_from_ou_time(schedule, ou_time_end)


def perturb(schedule: Schedule, key: Array, x0: Array, t: Array) -> tuple[Array, Array]:
  """Samples x_t = α(t) x_0 + σ(t) ε, ε ~ N(0, I). Returns (x_t, ε).

  `t` broadcasts against the leading (batch) axis of `x0`.
  """
  noise = jax.random.normal(key, x0.shape, x0.dtype)
  t = jnp.reshape(t, jnp.shape(t) + (1,) * (x0.ndim - jnp.ndim(t)))
  return marginal_mean_coeff(schedule, t) * x0 + marginal_std(schedule, t) * noise, noise


def prior_sample(key: Array, shape: tuple[int, ...], dtype: DTypeLike = jnp.float32) -> Array:
  """x_T ~ N(0, I), the VP-SDE's prior."""
  return jax.random.normal(key, shape, dtype)


def prior_log_prob(z: Array) -> Array:
  """log N(z; 0, I) of one point z of any shape (D = z.size): −½|z|² − (D/2) log 2π."""
  return -0.5 * jnp.sum(z**2) - 0.5 * z.size * math.log(2.0 * math.pi)


def probability_flow_drift(schedule: Schedule, score_fn: ScoreFn) -> Callable[[Array, Array], Array]:
  """The probability-flow ODE vector field v(t, x) = −½ β(t) [x + ∇_x log p_t(x)] (Eq. 6)."""

  def drift(t: Array, x: Array) -> Array:
    return -0.5 * schedule.beta(t) * (x + score_fn(x, t))

  return drift


# ----------------------------------------------------------------------------------------
# The half log-SNR clock λ = log(α/σ) of a schedule that can invert log α.
# ----------------------------------------------------------------------------------------


class LogAlphaSchedule(Schedule, Protocol):
  """A schedule that also gives log α(t) and its inverse t(log α): the samplers'
  continuous-time views (`samplers.DiscreteTimeSchedule`, `samplers.ContinuousTimeSchedule`,
  which wraps any `Schedule`)."""

  def log_alpha(self, t: Array) -> Array:
    ...

  def time_of_log_alpha(self, log_alpha: Array) -> Array:
    ...


def log_alpha_std(view: LogAlphaSchedule, t: Array) -> tuple[Array, Array]:
  """(log α(t), σ(t)) with σ = √(1 − α²) computed as √(−expm1(2 log α))."""
  log_alpha = view.log_alpha(t)
  return log_alpha, jnp.sqrt(-jnp.expm1(2.0 * log_alpha))


def half_log_snr(view: LogAlphaSchedule, t: Array) -> Array:
  """λ(t) = log α(t) − log σ(t) (DPM-Solver's half log-SNR)."""
  log_alpha = view.log_alpha(t)
  return log_alpha - 0.5 * jnp.log(-jnp.expm1(2.0 * log_alpha))


def time_of_half_log_snr(view: LogAlphaSchedule, lam: Array) -> Array:
  """λ⁻¹: log α = −½ log(1 + e^{−2λ}), then t from the view's inverse of log α."""
  return view.time_of_log_alpha(-0.5 * jnp.logaddexp(0.0, -2.0 * jnp.asarray(lam)))


# ----------------------------------------------------------------------------------------
# DDPM's discretization (Ho et al. 2020): β_i for i = 0..N−1, ᾱ_i = Π_{j≤i} (1 − β_j).
# ----------------------------------------------------------------------------------------


# How a network sees time (train.noise_and_time, samplers.noise_schedule): the DDPM chain's
# steps i with ᾱ_i ('discrete') or VP-SDE time t with α(t) of the continuous limit.
LOSS_TYPES = ("discrete", "continuous")


@dataclasses.dataclass(frozen=True)
class DiscreteSchedule:
  """DDPM's N-step linear schedule β_i = β_1 + i (β_N − β_1)/(N − 1), i = 0..N−1.

  With N = 1000, β_1 = 1e-4, β_N = 0.02 it is the discretization of `LinearSchedule`
  (β_min = 0.1, β_max = 20) at t_i = (i + 1)/N: β_i ≈ β(t_i)/N and
  −log ᾱ_i = B(t_i) + Σ_{j≤i} β_j²/2 + O(1/N), since −log(1 − β) = β + β²/2 + …; so the
  discrete ᾱ_999 is about 7% below exp(−B(1)). Samplers of a network trained on the discrete
  chain use ᾱ_i itself, not its continuous approximation.
  """

  num_steps: int = 1000
  beta_start: float = 1e-4
  beta_end: float = 0.02

  def betas(self) -> Array:
    return jnp.linspace(self.beta_start, self.beta_end, self.num_steps)

  def alphas_cumprod(self) -> Array:
    """ᾱ_i = Π_{j ≤ i} (1 − β_j)."""
    return jnp.cumprod(1.0 - self.betas())

  def continuous_time(self, i: Array) -> Array:
    """t_i = (i + 1)/N, the continuous time of discrete step i."""
    return (jnp.asarray(i) + 1.0) / self.num_steps

  def continuous_schedule(self) -> LinearSchedule:
    """The continuous LinearSchedule this discretization approximates."""
    n = self.num_steps
    return LinearSchedule(beta_min=self.beta_start * n, beta_max=self.beta_end * n)
