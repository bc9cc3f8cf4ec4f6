"""Samplers for ε-prediction diffusion models: DDPM, DDIM, DPM-Solver(++), UniPC, the PF-ODE,
DPM-OT.

Algorithms on an ε-predictor (`eps_fn`, below): `ddpm_ancestral` (Ho et al. 2020, Alg. 2),
`ddim` and `ddim_invert` (Song et al. 2021, Eq. 12), `dpm_solver` (Lu et al. 2022a/b,
multistep orders 1–3, noise or data prediction), `unipc` (Zhao et al. 2023, multistep UniP
predictor + UniC corrector, orders 1–3, data prediction, B(h) 'bh1'/'bh2'), `pf_ode` /
`ode_encode` (the probability-flow ODE, Eq. 6 of Khrulkov et al., with diffrax), dispatched by
name through `sample`. The few-step samplers (ddim, dpm_solver, unipc) take their time grid
from `step_indices`: `spacing` 'logSNR' (uniform in λ = log α/σ), 'time_uniform' or
'time_quadratic' (uniform in √t).
Many images from a trained network (`Network`), in chunks split over devices:
`sample_images` (from x_T ~ N(0, I)) and `dpm_ot` (Li et al. 2023, Sec. 3.2: z ~ μ,
x_M = T_g(z) = x_M^{j(z)} with j(z) = argmax_j g_j − ‖z − x_M^j‖², then M reverse steps).
On several processes (hosts) every process calls them with the same arguments: each draws
the same start noise (and DPM-OT the same map j(z), replicated), feeds its rows of each chunk
to its devices and receives every sample (`gather_rows`), bitwise as one process would.

Conventions
-----------
The network is an ε-predictor on a batch, `eps_fn(x, t_index) -> ε̂`, where x has shape
(B, ...) and `t_index` (B,) is a float on DDPM's step scale [0, N − 1] (fractional values
allowed). Step i has continuous time t_i = (i + 1)/N (`sde.DiscreteSchedule.continuous_time`),
and x_i = α_i x_0 + σ_i ε with α_i = √ᾱ_i, σ_i = √(1 − ᾱ_i). The clean level x_0 of the
data sits at t = 0 (index −1, ᾱ = 1).

Between the steps the samplers use one continuous-time view of the discrete schedule: log α(t)
is piecewise linear in t through the knots (k/N, ½ log ᾱ_{k−1}), k = 0..N, with ᾱ_{−1} = 1
(`DiscreteTimeSchedule`; this is Lu et al. 2022's NoiseScheduleVP('discrete') with the extra
knot at t = 0). At integer indices it reproduces ᾱ_i exactly, so DDPM and DDIM on integer
steps are the textbook algorithms; DPM-Solver and the PF-ODE evaluate the network at the
fractional indices t·N − 1 of that view. A network trained in continuous time on an
`sde.Schedule` is served by `ContinuousTimeSchedule(schedule, num_steps)` instead; for the
two losses of `train` (loss_type 'discrete' / 'continuous') `noise_schedule(ds, loss_type)`
returns the matching view, and every sampler takes it in place of the DiscreteSchedule. Both views
implement the `sde.Schedule` protocol (beta, beta_integral, t_max), so the closed forms of
`gaussian` and `gmm` built on a view are the exact answers of these samplers.

Every sampler returns `SampleResult(x, nfe)`; nfe is counted by the code (a counter carried
through the sampling loop, incremented at each network call, or diffrax's step statistics for
the adaptive ODE solve). The loops run inside `jax.jit` (`lax.scan`, `diffrax.diffeqsolve`),
batched over the leading axis: shard that axis across devices before calling and the
computation follows the sharding. `eps_fn` is passed to the jitted loop as a pytree
(`jax.tree_util.Partial`), so network parameters are arguments, not baked-in constants.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple, Union

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_ot_jax import distributed
from ddpm_ot_jax import flow
from ddpm_ot_jax import sde
from ddpm_ot_jax import semidiscrete
from ddpm_ot_jax import train

Array = jax.Array
EpsFn = Callable[[Array, Array], Array]  # (x (B, ...), t_index (B,)) -> ε̂ (B, ...)


class SampleResult(NamedTuple):
  """The sampler's output x and its number of network evaluations.

  `nfe` is a Python int, or a traced int32 scalar when the sampler runs inside an outer jit.
  """

  x: Array
  nfe: Any


# ----------------------------------------------------------------------------------------
# Continuous-time views of a discrete schedule.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DiscreteTimeSchedule:
  """Lu et al. (2022)'s 'discrete' VP schedule: log α(t) piecewise linear in t.

  Knots (k/N, ½ log ᾱ_{k−1}) for k = 0..N with ᾱ_{−1} = 1, so α(t_i) = √ᾱ_i exactly at
  t_i = (i + 1)/N. As an `sde.Schedule`: B(t) = −2 log α(t) and β(t) = B'(t), which is
  −N log(1 − β_k) on the k-th interval ((k/N, (k + 1)/N]).
  """

  discrete: sde.DiscreteSchedule = sde.DiscreteSchedule()

  @property
  def num_steps(self) -> int:
    return self.discrete.num_steps

  @property
  def t_max(self) -> float:
    return 1.0

  def _knots(self) -> tuple[np.ndarray, np.ndarray]:
    # In numpy (float64) at trace time: the tables enter jitted code as constants.
    n = self.num_steps
    ts = np.arange(n + 1) / n
    betas = np.linspace(self.discrete.beta_start, self.discrete.beta_end, n)
    log_alpha = np.concatenate([[0.0], 0.5 * np.cumsum(np.log1p(-betas))])
    return ts, log_alpha

  def log_alpha(self, t: Array) -> Array:
    """log α(t) by linear interpolation between the knots (clamped outside [0, 1])."""
    ts, log_alpha = self._knots()
    return jnp.interp(t, ts, log_alpha)

  def time_of_log_alpha(self, log_alpha: Array) -> Array:
    """The inverse of `log_alpha` (log α decreases strictly in t)."""
    ts, knots = self._knots()
    return jnp.interp(log_alpha, knots[::-1].copy(), ts[::-1].copy())

  def beta_integral(self, t: Array) -> Array:
    return -2.0 * self.log_alpha(t)

  def beta(self, t: Array) -> Array:
    n = self.num_steps
    k = jnp.clip(jnp.ceil(jnp.asarray(t) * n).astype(jnp.int32) - 1, 0, n - 1)
    betas = np.linspace(self.discrete.beta_start, self.discrete.beta_end, n)
    return jnp.asarray(-n * np.log1p(-betas))[k]


@dataclasses.dataclass(frozen=True)
class ContinuousTimeSchedule:
  """A continuous `sde.Schedule` indexed like a DDPM: step i ↔ t = (i + 1)/N · t_max.

  For networks trained in continuous time with the model input t·N/t_max − 1.
  """

  schedule: Any = sde.LinearSchedule()
  num_steps: int = 1000

  @property
  def t_max(self) -> float:
    return self.schedule.t_max

  def log_alpha(self, t: Array) -> Array:
    return -0.5 * self.schedule.beta_integral(t)

  def time_of_log_alpha(self, log_alpha: Array) -> Array:
    """B⁻¹(−2 log α) by 64 bisection steps on [0, t_max] (B increases strictly)."""
    target = -2.0 * jnp.asarray(log_alpha)
    lo = jnp.zeros_like(target)
    hi = jnp.full_like(target, self.t_max)

    def body(_, bounds):
      lo, hi = bounds
      mid = 0.5 * (lo + hi)
      below = self.schedule.beta_integral(mid) < target
      return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, 64, body, (lo, hi))
    return 0.5 * (lo + hi)

  def beta_integral(self, t: Array) -> Array:
    return self.schedule.beta_integral(t)

  def beta(self, t: Array) -> Array:
    return self.schedule.beta(t)


NoiseSchedule = Union[DiscreteTimeSchedule, ContinuousTimeSchedule]


def noise_schedule(schedule: sde.DiscreteSchedule | NoiseSchedule,
                   loss_type: str = "discrete") -> NoiseSchedule:
  """The continuous-time view the samplers use for a network trained with `loss_type`.

  For a DiscreteSchedule with N steps: 'discrete' (ε_θ trained on the chain's ᾱ_i,
  `train.noise_and_time`) gives `DiscreteTimeSchedule(schedule)`; 'continuous' (trained on
  the VP-SDE x_t = α(t) x_0 + σ(t) ε with β(t) = N β_{tN}, network index tN − 1) gives
  `ContinuousTimeSchedule(schedule.continuous_schedule(), N)`, whose α(t_i) are the SDE's.
  A view is returned as it is (loss_type is then ignored).
  """
  if loss_type not in sde.LOSS_TYPES:
    raise ValueError(f"loss_type {loss_type!r} is not one of {sde.LOSS_TYPES}.")
  if isinstance(schedule, sde.DiscreteSchedule):
    if loss_type == "continuous":
      return ContinuousTimeSchedule(schedule.continuous_schedule(), schedule.num_steps)
    return DiscreteTimeSchedule(schedule)
  if isinstance(schedule, (DiscreteTimeSchedule, ContinuousTimeSchedule)):
    return schedule
  raise TypeError(
      f"Samplers take an sde.DiscreteSchedule (or a DiscreteTimeSchedule/ContinuousTimeSchedule"
      f" view of one), got {type(schedule).__name__}.")


def time_of_index(view: NoiseSchedule, index: Array) -> Array:
  """t = (i + 1)/N · t_max."""
  return (jnp.asarray(index) + 1.0) / view.num_steps * view.t_max


def index_of_time(view: NoiseSchedule, t: Array) -> Array:
  """i = t N / t_max − 1, the network's step index of time t."""
  return jnp.asarray(t) * view.num_steps / view.t_max - 1.0


# ----------------------------------------------------------------------------------------
# ε-predictors.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ModelEps:
  """Calls a flax apply: apply({'params': params}, x, t_index, y, train=False)."""

  apply_fn: Callable

  def __call__(self, params, y, x, t_index):
    return self.apply_fn({"params": params}, x, t_index, y, train=False)


def model_eps_fn(apply_fn: Callable, params: Any, y: Array | None = None) -> EpsFn:
  """Wraps a flax UNet's apply into `eps_fn(x, t_index)`.

  Returns a `jax.tree_util.Partial` whose leaves are `params` (and the class labels `y`), so
  the samplers' jitted loops take them as arguments; `apply_fn` is static (reuse the same
  module object and the compiled loop is reused).
  """
  return jax.tree_util.Partial(_ModelEps(apply_fn), params, y)


@dataclasses.dataclass(frozen=True)
class _ScoreEps:
  score_fn: Callable
  score_schedule: Any
  num_steps: int

  def __call__(self, x, t_index):
    t = (jnp.asarray(t_index, x.dtype) + 1.0) / self.num_steps * self.score_schedule.t_max
    sigma = sde.marginal_std(self.score_schedule, t)
    score = jax.vmap(self.score_fn)(x, t)
    return -sigma.reshape((-1,) + (1,) * (x.ndim - 1)) * score


def eps_fn_from_score(
    score_fn: sde.ScoreFn,
    schedule: sde.DiscreteSchedule | NoiseSchedule,
    score_schedule: sde.Schedule | None = None,
) -> EpsFn:
  """ε̂(x, i) = −σ(t) ∇ log p_t(x) at t = (i + 1)/N, for an exact per-point `score_fn(x, t)`.

  `score_schedule` is the schedule the score was built on (its σ is used). Default: the
  view itself when `schedule` is a view; `schedule.continuous_schedule()` (the linear
  β 0.1..20 SDE) for a DiscreteSchedule. The samplers run on `noise_schedule(schedule)`;
  for answers that are exact up to each sampler's own discretisation error, build the score
  on that view (e.g. `gaussian.score_fn(noise_schedule(ds), mean, cov)`) and pass it here as
  `score_schedule`. (The linear SDE and DDPM's ᾱ_i differ by up to 0.7% in log ᾱ_i, and
  by 5% in σ at step 0.)
  """
  if score_schedule is None:
    if isinstance(schedule, sde.DiscreteSchedule):
      score_schedule = schedule.continuous_schedule()
    else:
      score_schedule = schedule
  num_steps = noise_schedule(schedule).num_steps
  return jax.tree_util.Partial(_ScoreEps(score_fn, score_schedule, num_steps))


@dataclasses.dataclass(frozen=True)
class _EpsScore:
  view: Any

  def __call__(self, eps_fn, x, t):
    t = jnp.asarray(t, x.dtype)
    _, sigma = sde.log_alpha_std(self.view, t)
    eps = eps_fn(x[None], jnp.reshape(index_of_time(self.view, t), (1,)))
    return -eps[0] / sigma


def score_fn_from_eps(eps_fn: EpsFn, schedule: sde.DiscreteSchedule | NoiseSchedule
                      ) -> sde.ScoreFn:
  """∇ log p_t(x) = −ε̂(x, i(t))/σ(t) for one point x, i(t) = tN/t_max − 1: the inverse of
  `eps_fn_from_score`, so a network can be handed to `flow` (e.g. `flow.log_likelihood`).

  σ and i(t) come from `noise_schedule(schedule)` (pass the view that matches how ε_θ was
  trained). Returns a `jax.tree_util.Partial` whose leaves are eps_fn's (its parameters).
  The network must be unconditional (its labels, if any, are a batch, not one point's).
  """
  return jax.tree_util.Partial(_EpsScore(noise_schedule(schedule)), _as_pytree(eps_fn))


def _as_pytree(eps_fn: EpsFn) -> jax.tree_util.Partial:
  if isinstance(eps_fn, jax.tree_util.Partial):
    return eps_fn
  return jax.tree_util.Partial(eps_fn)


def _call_eps(eps_fn, x: Array, index: Array) -> Array:
  t_index = jnp.full((x.shape[0],), index, dtype=x.dtype)
  return eps_fn(x, t_index)


def _bcast(value: Array, x: Array) -> Array:
  """A scalar coefficient in x's dtype."""
  return jnp.asarray(value, x.dtype)


def _finish(x: Array, nfe: Array) -> SampleResult:
  if isinstance(nfe, jax.core.Tracer):
    return SampleResult(x, nfe)
  return SampleResult(x, int(nfe))


def _default_start(view: NoiseSchedule, start_index):
  return view.num_steps - 1 if start_index is None else start_index


def _check_steps(num_steps: int):
  if not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"num_steps must be a positive int, got {num_steps!r}.")


# ----------------------------------------------------------------------------------------
# DDPM ancestral sampling (Ho et al. 2020, Algorithm 2).
# ----------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("view", "start_index", "variance"))
def _ddpm_loop(eps_fn, x, key, view, start_index, variance):
  index = jnp.arange(start_index, -1, -1)
  log_alpha = view.log_alpha(time_of_index(view, index))
  log_alpha_prev = view.log_alpha(time_of_index(view, index - 1))  # log α at index −1 is 0
  beta = -jnp.expm1(2.0 * (log_alpha - log_alpha_prev))  # β_i = 1 − ᾱ_i/ᾱ_{i−1}
  one_minus_abar = -jnp.expm1(2.0 * log_alpha)
  if variance == "beta":
    var = beta
  else:  # β̃_i = β_i (1 − ᾱ_{i−1})/(1 − ᾱ_i)
    var = beta * -jnp.expm1(2.0 * log_alpha_prev) / one_minus_abar
  std = jnp.where(index > 0, jnp.sqrt(var), 0.0)
  eps_coeff = beta / jnp.sqrt(one_minus_abar)
  inv_sqrt_alpha = jnp.exp(log_alpha_prev - log_alpha)  # 1/√(1 − β_i)
  keys = jax.random.split(key, index.shape[0])

  def step(carry, inputs):
    x, nfe = carry
    i, c_eps, c_scale, s, k = inputs
    eps = _call_eps(eps_fn, x, i)
    mean = _bcast(c_scale, x) * (x - _bcast(c_eps, x) * eps)
    x = mean + _bcast(s, x) * jax.random.normal(k, x.shape, x.dtype)
    return (x, nfe + 1), None

  (x, nfe), _ = jax.lax.scan(
      step, (x, jnp.zeros((), jnp.int32)), (index, eps_coeff, inv_sqrt_alpha, std, keys))
  return x, nfe


def ddpm_ancestral(
    eps_fn: EpsFn,
    schedule: sde.DiscreteSchedule | NoiseSchedule,
    x_T: Array,
    key: Array,
    start_index: int | None = None,
    variance: str = "beta",
) -> SampleResult:
  """DDPM's ancestral sampler from step `start_index` (default N − 1) down to the data.

  For i = start_index, …, 0 (Ho et al. 2020, Algorithm 2, with Ho's x_t = our x at index t−1):

      x_{i−1} = (x_i − β_i/√(1 − ᾱ_i) ε̂(x_i, i)) / √(1 − β_i) + s_i z,   z ~ N(0, I),

  with s_i² = β_i ('beta', Ho's CIFAR-10 choice) or β̃_i = β_i (1 − ᾱ_{i−1})/(1 − ᾱ_i)
  ('beta_tilde'), and no noise at i = 0, whose output is the sample x_0. `x_T` is the state
  at step `start_index` (N(0, I) for a full run; x_M for DPM-OT). NFE = start_index + 1.
  Step i draws its noise from `jax.random.split(key, start_index + 1)[start_index − i]`.
  """
  view = noise_schedule(schedule)
  start_index = int(_default_start(view, start_index))
  if not 0 <= start_index < view.num_steps:
    raise ValueError(f"start_index must lie in [0, {view.num_steps - 1}], got {start_index}.")
  if variance not in ("beta", "beta_tilde"):
    raise ValueError(f"variance must be 'beta' or 'beta_tilde', got {variance!r}.")
  x, nfe = _ddpm_loop(_as_pytree(eps_fn), x_T, key, view, start_index, variance)
  return _finish(x, nfe)


# ----------------------------------------------------------------------------------------
# Time grids of the few-step samplers (DDIM, DPM-Solver, UniPC).
# ----------------------------------------------------------------------------------------


SPACINGS = ("logSNR", "time_uniform", "time_quadratic")  # time grids of the few-step samplers


def _check_spacing(spacing: str):
  if spacing not in SPACINGS:
    raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}.")


def step_indices(view: NoiseSchedule, num_points: int, start_index: Array, end_index: Array,
                 spacing: str) -> Array:
  """`num_points` step indices from start_index to end_index (both included): the time grid of
  `ddim` (its network calls), `dpm_solver` and `unipc` (their times t = (i + 1)/N · t_max).

  Spaced uniformly in
    'logSNR':         λ = log(α/σ) (Lu et al.'s 'logSNR'; the default of dpm_solver and unipc);
    'time_uniform':   t, i.e. in i (t is affine in i): jnp.linspace(start_index, end_index,
                      num_points), the DDIM paper's 'linear' τ (the default of ddim);
    'time_quadratic': √t: t_k = (√t_start + k (√t_end − √t_start)/(num_points − 1))², Lu et al.'s
                      'time_quadratic' (t_order = 2; dense near the data, like the DDIM paper's
                      'quadratic' τ_k ∝ k²).
  The endpoints are exactly start_index and end_index (num_points = 1 gives [start_index]).
  Indices are fractional in general: the network is then called at fractional steps and ᾱ is
  read from the view.
  """
  _check_spacing(spacing)
  if num_points == 1:
    return jnp.reshape(jnp.asarray(start_index, jnp.result_type(float)), (1,))
  if spacing == "time_uniform":
    return jnp.linspace(start_index, end_index, num_points)
  t_start, t_end = time_of_index(view, start_index), time_of_index(view, end_index)
  if spacing == "logSNR":
    lam = jnp.linspace(sde.half_log_snr(view, t_start), sde.half_log_snr(view, t_end), num_points)
    t = sde.time_of_half_log_snr(view, lam)
  else:  # time_quadratic
    t = jnp.linspace(jnp.sqrt(t_start), jnp.sqrt(t_end), num_points) ** 2
  return index_of_time(view, t).at[0].set(start_index).at[-1].set(end_index)



# ----------------------------------------------------------------------------------------
# DDIM (Song, Meng & Ermon 2021) and DDIM inversion.
# ----------------------------------------------------------------------------------------


def _ddim_step(x: Array, eps: Array, log_alpha: Array, sigma: Array, log_alpha_next: Array,
               dir_coeff: Array) -> Array:
  """x_next = α_next x̂_0 + c ε̂ with x̂_0 = (x − σ ε̂)/α: the deterministic part of one DDIM
  step (Song et al. 2021, Eq. 12), forward (c = √(1 − ᾱ_next − s²)) and inverted (c = σ_next)."""
  x0 = (x - _bcast(sigma, x) * eps) * _bcast(jnp.exp(-log_alpha), x)
  return _bcast(jnp.exp(log_alpha_next), x) * x0 + _bcast(dir_coeff, x) * eps


def _ddim_scan(eps_fn, x: Array, eval_index: Array, log_alpha: Array, sigma: Array,
               log_alpha_next: Array, dir_coeff: Array,
               noise: tuple[Array, Array] | None = None) -> tuple[Array, Array]:
  """The DDIM steps of `ddim` and `ddim_invert` (one per entry of the per-step arrays): step k
  calls ε̂ = ε_θ(x, eval_index[k]) and moves x by `_ddim_step` from level (log_alpha[k],
  sigma[k]) to log_alpha_next[k] with direction coefficient dir_coeff[k]; with
  noise = (s, keys) it adds s[k] z, z ~ N(0, I) drawn with keys[k]. Returns (x, NFE)."""

  def step(carry, inputs):
    x, nfe = carry
    i, la, s, la_next, c_dir = inputs[:5]
    eps = _call_eps(eps_fn, x, i)
    x = _ddim_step(x, eps, la, s, la_next, c_dir)
    if noise is not None:
      c_noise, k = inputs[5:]
      x = x + _bcast(c_noise, x) * jax.random.normal(k, x.shape, x.dtype)
    return (x, nfe + 1), None

  inputs = (eval_index, log_alpha, sigma, log_alpha_next, dir_coeff) + (noise or ())
  (x, nfe), _ = jax.lax.scan(step, (x, jnp.zeros((), jnp.int32)), inputs)
  return x, nfe


@functools.partial(jax.jit, static_argnames=("view", "num_steps", "eta", "spacing"))
def _ddim_loop(eps_fn, x, key, view, num_steps, eta, spacing, start_index, end_index):
  index = step_indices(view, num_steps, start_index, end_index, spacing)
  log_alpha = view.log_alpha(time_of_index(view, index))
  # The level after each step: the next grid point, and the data (ᾱ = 1) after the last.
  log_alpha_next = jnp.concatenate([log_alpha[1:], jnp.zeros(1, log_alpha.dtype)])
  sigma = jnp.sqrt(-jnp.expm1(2.0 * log_alpha))
  one_minus_abar_next = -jnp.expm1(2.0 * log_alpha_next)
  # σ_τ(η) = η √((1 − ᾱ_next)/(1 − ᾱ)) √(1 − ᾱ/ᾱ_next)    (Eq. 16 of the DDIM paper)
  noise_std = eta * jnp.sqrt(
      one_minus_abar_next / (sigma**2) * -jnp.expm1(2.0 * (log_alpha - log_alpha_next)))
  dir_coeff = jnp.sqrt(jnp.maximum(one_minus_abar_next - noise_std**2, 0.0))
  noise = (noise_std, jax.random.split(key, num_steps)) if eta != 0.0 else None
  return _ddim_scan(eps_fn, x, index, log_alpha, sigma, log_alpha_next, dir_coeff, noise)


def ddim(
    eps_fn: EpsFn,
    schedule: sde.DiscreteSchedule | NoiseSchedule,
    x_start: Array,
    num_steps: int,
    eta: float = 0.0,
    key: Array | None = None,
    start_index: float | None = None,
    end_index: float = 0.0,
    spacing: str = "time_uniform",
) -> SampleResult:
  """DDIM with `num_steps` network calls from x at step `start_index` (default N − 1).

  The network is called at τ_1 > … > τ_S from start_index to end_index (both included), spaced
  by `spacing` (`step_indices`; default 'time_uniform', the DDIM paper's 'linear' τ). Each step
  (Eq. 12 of Song et al. 2021)

      x̂_0 = (x_τ − σ_τ ε̂)/α_τ,
      x_next = α_next x̂_0 + √(1 − ᾱ_next − s²) ε̂ + s z,   s = σ_τ(η) of Eq. 16,

  goes to the next grid point; the last step goes to the data level (ᾱ_next = 1, s = 0), i.e.
  the output is the x_0 prediction x̂_0 at τ_S = end_index. η = 0 is deterministic (the
  PF-ODE's first-order solver in (σ/α, x/α)); η = 1 with all integer steps is DDPM ancestral
  with β̃ variance. NFE = num_steps. Stochastic steps need `key`; step k (k = 0 first) draws
  its noise from `jax.random.split(key, num_steps)[k]`.
  """
  _check_steps(num_steps)
  _check_spacing(spacing)
  view = noise_schedule(schedule)
  start_index = _default_start(view, start_index)
  eta = float(eta)
  if eta < 0.0:
    raise ValueError(f"eta must be ≥ 0, got {eta}.")
  if eta != 0.0 and key is None:
    raise ValueError("ddim with eta > 0 draws noise: pass key=jax.random.key(...).")
  if key is None:
    key = jax.random.key(0)  # unused when eta == 0
  x, nfe = _ddim_loop(
      _as_pytree(eps_fn), x_start, key, view, num_steps, eta, spacing, start_index, end_index)
  return _finish(x, nfe)


@functools.partial(jax.jit, static_argnames=("view", "num_steps"))
def _ddim_invert_loop(eps_fn, x, view, num_steps, start_index, end_index):
  # The decoder's grid (ddim from end_index to start_index), reversed: increasing.
  index = step_indices(view, num_steps, end_index, start_index, "time_uniform")[::-1]
  log_alpha = view.log_alpha(time_of_index(view, index))
  # Step k goes from level k−1 (the data for k = 0) to grid point k, calling the network
  # at level k−1 (at grid point 0 with the data as input for k = 0).
  log_alpha_src = jnp.concatenate([jnp.zeros(1, log_alpha.dtype), log_alpha[:-1]])
  eval_index = jnp.concatenate([index[:1], index[:-1]])
  sigma_src = jnp.sqrt(-jnp.expm1(2.0 * log_alpha_src))
  sigma_dst = jnp.sqrt(-jnp.expm1(2.0 * log_alpha))
  return _ddim_scan(eps_fn, x, eval_index, log_alpha_src, sigma_src, log_alpha, sigma_dst)


def ddim_invert(
    eps_fn: EpsFn,
    schedule: sde.DiscreteSchedule | NoiseSchedule,
    x0: Array,
    num_steps: int,
    start_index: float = 0.0,
    end_index: float | None = None,
) -> SampleResult:
  """DDIM inversion: data x_0 ↦ latent at step `end_index` (default N − 1), η = 0.

  The mirror of `ddim(…, num_steps, start_index=end_index, end_index=start_index)` on the
  same grid τ_1 < … < τ_S: x goes data → τ_1 → … → τ_S by

      x_next = α_next x̂_0 + σ_next ε̂,   x̂_0 = (x − σ ε̂)/α,

  with ε̂ from the network at the current level (at τ_1 with the data as input for the first
  step, where no network level exists). Decoding with `ddim` from the latent inverts it up to
  the O(1/S) mismatch of evaluating ε̂ at opposite ends of each step. NFE = num_steps.
  """
  _check_steps(num_steps)
  view = noise_schedule(schedule)
  end_index = view.num_steps - 1 if end_index is None else end_index
  x, nfe = _ddim_invert_loop(_as_pytree(eps_fn), x0, view, num_steps, start_index, end_index)
  return _finish(x, nfe)


# ----------------------------------------------------------------------------------------
# Multistep DPM-Solver and DPM-Solver++ (Lu et al. 2022a, 2022b).
# ----------------------------------------------------------------------------------------

DPM_SOLVER_ORDERS = (1, 2, 3)  # multistep orders of `dpm_solver` (and of `unipc`)
DPM_SOLVER_VARIANTS = ("dpmsolver++", "dpmsolver")  # data (x̂_0) or noise (ε) prediction
UNIPC_VARIANTS = ("bh2", "bh1")  # UniPC's B(h) = e^h − 1 or h (data prediction, h → −h)


def dpm_solver_orders(num_steps: int, order: int, lower_order_final: bool = True,
                      lower_final_below: int | None = 10) -> list[int]:
  """The order of each of the num_steps multistep updates (Lu et al.'s reference code).

  Warm-up: step k (1-based) uses order min(order, k), as only k model values exist. With
  `lower_order_final` and num_steps < lower_final_below the last steps drop to
  min(order, num_steps + 1 − k); lower_final_below=None drops them at every num_steps (UniPC:
  Zhao et al.'s reference code and diffusers' UniPCMultistepScheduler).
  """
  orders = []
  for k in range(1, num_steps + 1):
    o = min(order, k)
    if lower_order_final and (lower_final_below is None or num_steps < lower_final_below):
      o = min(o, num_steps + 1 - k)
    orders.append(o)
  return orders


def _multistep_update(variant, solver_type, order, x, models, lams, lam_t, log_alpha_t,
                      sigma_t, log_alpha_s, sigma_s):
  """One multistep update of order 1, 2 or 3 (`order` may be traced) to λ_t.

  `models` (m_2, m_1, m_0) and `lams` (λ_2, λ_1, λ_0) hold the last three model values and
  their λ, newest last; s is the time of m_0. With h = λ_t − λ_0, r_0 = (λ_0 − λ_1)/h,
  r_1 = (λ_1 − λ_2)/h, D1_0 = (m_0 − m_1)/r_0, D1_1 = (m_1 − m_2)/r_1,
  D1 = D1_0 + r_0/(r_0 + r_1)(D1_0 − D1_1) ≈ h m', D2 = (D1_0 − D1_1)/(r_0 + r_1) ≈ h² m''/2.

  dpmsolver++ (m = x̂_0; Lu et al. 2022b, Eq. 9 and Alg. 2), φ_1 = e^{−h} − 1,
  φ_2 = φ_1/h + 1, φ_3 = φ_2/h − ½:
    order 1: x_t = (σ_t/σ_s) x − α_t φ_1 m_0                (DDIM)
    order 2: x_t = (σ_t/σ_s) x − α_t φ_1 m_0 − ½ α_t φ_1 D1_0   ('taylor': + α_t φ_2 D1_0)
    order 3: x_t = (σ_t/σ_s) x − α_t φ_1 m_0 + α_t φ_2 D1 − c α_t φ_3 D2
  dpmsolver (m = ε̂; Lu et al. 2022a, Eq. 3.7), φ_1 = e^{h} − 1, φ_2 = φ_1/h − 1,
  φ_3 = φ_2/h − ½:
    order 1: x_t = (α_t/α_s) x − σ_t φ_1 m_0
    order 2: x_t = (α_t/α_s) x − σ_t φ_1 m_0 − ½ σ_t φ_1 D1_0   ('taylor': − σ_t φ_2 D1_0)
    order 3: x_t = (α_t/α_s) x − σ_t φ_1 m_0 − σ_t φ_2 D1 − c σ_t φ_3 D2

  c = 1 for solver_type 'dpmsolver' (Lu et al.'s reference code, also diffusers' 3M) and
  c = 2 for 'taylor'. The exponential integral of the quadratic Taylor polynomial of m in λ
  gives −α_t φ_3 h² m'' = −2 α_t φ_3 D2, so only c = 2 makes the order-3 update exact for a
  quadratic m and third-order consistent; c = 1 leaves an O(h³) local error
  (tests/samplers_test.py checks both). Computed as base + a D1_0 + b D1_1 with scalars a, b
  chosen by `order`, one code path for all orders inside the scan.
  """
  m2, m1, m0 = models[0], models[1], models[2]
  lam2, lam1, lam0 = lams[0], lams[1], lams[2]
  h = lam_t - lam0
  if variant == "dpmsolver++":
    scale, sign = jnp.exp(log_alpha_t), 1.0
    phi_1 = jnp.expm1(-h)
    phi_2 = phi_1 / h + 1.0
    base = _bcast(sigma_t / sigma_s, x) * x - _bcast(scale * phi_1, x) * m0
  else:
    scale, sign = sigma_t, -1.0
    phi_1 = jnp.expm1(h)
    phi_2 = phi_1 / h - 1.0
    base = _bcast(jnp.exp(log_alpha_t - log_alpha_s), x) * x - _bcast(scale * phi_1, x) * m0
  phi_3 = phi_2 / h - 0.5
  c = 2.0 if solver_type == "taylor" else 1.0
  r0 = jnp.where(order >= 2, (lam0 - lam1) / h, 1.0)  # unused slots get a harmless 1
  r1 = jnp.where(order >= 3, (lam1 - lam2) / h, 1.0)
  w = r0 / (r0 + r1)
  a2 = sign * scale * phi_2 if solver_type == "taylor" else -0.5 * scale * phi_1
  a3 = sign * scale * phi_2 * (1.0 + w) - c * scale * phi_3 / (r0 + r1)
  b3 = -sign * scale * phi_2 * w + c * scale * phi_3 / (r0 + r1)
  a = jnp.where(order == 1, 0.0, jnp.where(order == 2, a2, a3))
  b = jnp.where(order == 3, b3, 0.0)
  return base + _bcast(a / r0, x) * (m0 - m1) + _bcast(b / r1, x) * (m1 - m2)


def _multistep_solve(eps_fn, x, view, num_steps, orders, spacing, start_index, end_index,
                     data_prediction, update, correct=None):
  """The multistep loop of `dpm_solver` and `unipc` (traced inside their jitted loops).

  On the grid t_0 = t(start_index) > … > t_S = t(end_index) (`step_indices` with `spacing`),
  with the model value m = x̂_0 = (x − σ ε̂)/α (`data_prediction`) or ε̂, step k = 1..S runs

      x̃_k = update(p_k, x_{k−1}, models, lams, λ_k, log α_k, σ_k, log α_{k−1}, σ_{k−1}),
      m_k = m(x̃_k, t_k),    x_k = correct(…the same arguments…, m_k)  (x̃_k without `correct`),

  where p_k = orders[k − 1] (an int32 array: the plan is traced, so one compiled loop serves
  every order) and `models`/`lams` hold the last three model values and their λ (newest, at
  t_{k−1}, last). The network is called at the grid's step indices: once at t_0 and once per
  step but the last, whose update is not corrected and whose model value is never needed:
  NFE = S. Returns (x_S, nfe, index, log α, σ) with the grid's arrays.
  """
  index = step_indices(view, num_steps + 1, start_index, end_index, spacing)
  log_alpha, sigma = sde.log_alpha_std(view, time_of_index(view, index))
  lam = log_alpha - jnp.log(sigma)

  def model(x, k):
    eps = _call_eps(eps_fn, x, index[k])
    if data_prediction:
      return (x - _bcast(sigma[k], x) * eps) * _bcast(jnp.exp(-log_alpha[k]), x)
    return eps

  def levels(k):  # the arguments of step k after (order, x, models, lams)
    return lam[k], log_alpha[k], sigma[k], log_alpha[k - 1], sigma[k - 1]

  m = model(x, 0)
  models = jnp.stack([m, m, m])  # newest last; unused slots are never read
  lams = jnp.stack([lam[0], lam[0], lam[0]])
  nfe = jnp.ones((), jnp.int32)

  def step(carry, k):
    x, models, lams, nfe = carry
    order = orders[k - 1]
    x_next = update(order, x, models, lams, *levels(k))
    m = model(x_next, k)
    if correct is not None:  # reuses m, the model value at the predicted point
      x_next = correct(order, x, models, lams, *levels(k), m)
    models = jnp.concatenate([models[1:], m[None]])
    lams = jnp.concatenate([lams[1:], lam[k][None]])
    return (x_next, models, lams, nfe + 1), None

  if num_steps > 1:
    (x, models, lams, nfe), _ = jax.lax.scan(
        step, (x, models, lams, nfe), jnp.arange(1, num_steps))
  x = update(orders[-1], x, models, lams, *levels(num_steps))  # no model call after it
  return x, nfe, index, log_alpha, sigma


def _multistep_setup(name, schedule, num_steps, order, spacing, start_index, lower_order_final,
                     lower_final_below):
  """The checks and set-up shared by `dpm_solver` and `unipc`: (view, start_index, the order
  plan of `dpm_solver_orders` as the int32 array the loop takes)."""
  _check_steps(num_steps)
  if order not in DPM_SOLVER_ORDERS:
    raise ValueError(f"{name} order must be 1, 2 or 3, got {order!r}.")
  _check_spacing(spacing)
  view = noise_schedule(schedule)
  orders = dpm_solver_orders(num_steps, order, lower_order_final, lower_final_below)
  return view, _default_start(view, start_index), jnp.asarray(orders, jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("view", "num_steps", "variant", "solver_type", "spacing",
                              "denoise_to_zero"))
def _dpm_solver_loop(eps_fn, x, view, num_steps, orders, variant, solver_type, spacing,
                     denoise_to_zero, start_index, end_index):
  update = functools.partial(_multistep_update, variant, solver_type)
  x, nfe, index, log_alpha, sigma = _multistep_solve(
      eps_fn, x, view, num_steps, orders, spacing, start_index, end_index,
      variant == "dpmsolver++", update)
  if denoise_to_zero:  # x̂_0 = (x − σ ε̂)/α at the end time
    eps = _call_eps(eps_fn, x, index[-1])
    x = (x - _bcast(sigma[-1], x) * eps) * _bcast(jnp.exp(-log_alpha[-1]), x)
    nfe = nfe + 1
  return x, nfe


def dpm_solver(
    eps_fn: EpsFn,
    schedule: sde.DiscreteSchedule | NoiseSchedule,
    x_start: Array,
    num_steps: int,
    order: int = 3,
    variant: str = "dpmsolver++",
    start_index: float | None = None,
    end_index: float = 0.0,
    spacing: str = "logSNR",
    lower_order_final: bool = True,
    denoise_to_zero: bool = False,
    solver_type: str = "dpmsolver",
) -> SampleResult:
  """Multistep DPM-Solver(++) of order 1–3 from step `start_index` to `end_index`.

  Solves the PF-ODE written in λ = log(α/σ) (Lu et al. 2022a, Eq. 3.4; 2022b, Eq. 9),
  e.g. for data prediction x_t = (σ_t/σ_s) x_s + σ_t ∫ e^{λ} x̂_0(x_λ, λ) dλ, with the
  integrand replaced by its Taylor/divided-difference expansion through the last `order`
  model values (`_multistep_update`). Times t_0 = t(start_index) > … > t_S = t(end_index)
  are spaced by `spacing` (`step_indices`: uniform in λ, 'logSNR', default; in t; or in √t);
  the view interpolates log α of the discrete schedule (NoiseScheduleVP 'discrete'), and the
  network is called at index t·N − 1.
  Warm-up with lower orders and lower-order final steps as in `dpm_solver_orders`.
  `solver_type` 'dpmsolver' (default) is Lu et al.'s reference code; 'taylor' uses the
  exact Taylor coefficients, which makes order 3 third-order consistent (see
  `_multistep_update`: the reference 3M update halves the D2 term).
  The output is x at `end_index` (t = 1/N by default, Lu et al.'s t_ε for discrete models);
  `denoise_to_zero` adds one network call for x̂_0 there. NFE = num_steps (+1).
  """
  if variant not in DPM_SOLVER_VARIANTS:
    raise ValueError(f"variant must be 'dpmsolver++' or 'dpmsolver', got {variant!r}.")
  if solver_type not in ("dpmsolver", "taylor"):
    raise ValueError(f"solver_type must be 'dpmsolver' or 'taylor', got {solver_type!r}.")
  view, start_index, orders = _multistep_setup(
      "DPM-Solver", schedule, num_steps, order, spacing, start_index, lower_order_final, 10)
  x, nfe = _dpm_solver_loop(_as_pytree(eps_fn), x_start, view, num_steps, orders, variant,
                            solver_type, spacing, bool(denoise_to_zero), start_index,
                            end_index)
  return _finish(x, nfe)


# ----------------------------------------------------------------------------------------
# Multistep UniPC (Zhao et al. 2023). Written here: no JAX library implements UniPC.
# ----------------------------------------------------------------------------------------


def _vandermonde_solve(nodes, rhs) -> list:
  """ρ with Σ_i ρ_i c_i^j = rhs_j (j = 0..n − 1) for the n nodes c (distinct), by Lagrange:
  ρ_i = Σ_j a_ij rhs_j / Π_{m≠i} (c_i − c_m), a_ij the coefficient of c^j in Π_{m≠i} (c − c_m).
  """
  rho = []
  for i, c_i in enumerate(nodes):
    coeffs, denominator = [1.0], 1.0  # Π_{m≠i} (c − c_m), lowest power first
    for m, c_m in enumerate(nodes):
      if m != i:
        coeffs = [a - c_m * b for a, b in zip([0.0] + coeffs, coeffs + [0.0])]
        denominator = denominator * (c_i - c_m)
    rho.append(sum(a * r for a, r in zip(coeffs, rhs)) / denominator)
  return rho


def _unipc_update(variant, order, x, models, lams, lam_t, log_alpha_t, sigma_t, log_alpha_s,
                  sigma_s, model_t=None):
  """UniP-p from s to t (model_t None) or UniC-p at t (model_t: x̂_0 at the predicted point),
  p = `order` in 1–3 (may be traced); the equations are in `unipc`'s docstring.

  `models` (m_2, m_1, m_0) and `lams` (λ_2, λ_1, λ_0) hold the last three x̂_0 values and their
  λ, newest (at s) last. One code path for all orders inside the scan: the weights of every
  order are computed and `order` selects; unused nodes r_i get the harmless value −i.
  """
  del log_alpha_s  # data prediction needs σ_s only
  m2, m1, m0 = models[0], models[1], models[2]
  h = lam_t - lams[2]
  z = -h
  b_h = z if variant == "bh1" else jnp.expm1(z)
  hphi = jnp.expm1(z)  # z φ_1(z) = e^z − 1
  g = []
  for factorial in (1.0, 2.0, 6.0):  # k! for k = 1, 2, 3
    hphi = hphi / z - 1.0 / factorial  # z φ_{k+1}(z) = z φ_k(z)/z − 1/k!
    g.append(factorial * hphi / b_h)  # g_k = k! z φ_{k+1}(z)/B(h)
  r1 = jnp.where(order >= 2, (lams[1] - lams[2]) / h, -1.0)
  r2 = jnp.where(order >= 3, (lams[0] - lams[2]) / h, -2.0)
  # ρ_1, ρ_2 weigh D_1/r_1, D_2/r_2; ρ_t weighs the corrector's m_t − m_0 (node 1).
  if model_t is None:  # UniP-p: nodes r_1..r_{p−1}; ρ = (½) for p = 2
    p3 = _vandermonde_solve((r1, r2), g[:2])
    rho_1 = jnp.where(order == 3, p3[0], jnp.where(order == 2, 0.5, 0.0))
    rho_2 = jnp.where(order == 3, p3[1], 0.0)
  else:  # UniC-p: nodes 1 (the new point t), r_1..r_{p−1}; ρ = (½) for p = 1
    c2, c3 = _vandermonde_solve((1.0, r1), g[:2]), _vandermonde_solve((1.0, r1, r2), g)
    rho_t = jnp.where(order == 1, 0.5, jnp.where(order == 2, c2[0], c3[0]))
    rho_1 = jnp.where(order == 2, c2[1], jnp.where(order == 3, c3[1], 0.0))
    rho_2 = jnp.where(order == 3, c3[2], 0.0)
  scale = jnp.exp(log_alpha_t) * b_h
  x_t = (_bcast(sigma_t / sigma_s, x) * x - _bcast(jnp.exp(log_alpha_t) * jnp.expm1(z), x) * m0
         - _bcast(scale * rho_1 / r1, x) * (m1 - m0) - _bcast(scale * rho_2 / r2, x) * (m2 - m0))
  if model_t is not None:
    x_t = x_t - _bcast(scale * rho_t, x) * (model_t - m0)
  return x_t


@functools.partial(jax.jit, static_argnames=("view", "num_steps", "variant", "spacing"))
def _unipc_loop(eps_fn, x, view, num_steps, orders, variant, spacing, start_index, end_index):
  update = functools.partial(_unipc_update, variant)
  x, nfe, *_ = _multistep_solve(eps_fn, x, view, num_steps, orders, spacing, start_index,
                                end_index, True, update, correct=update)
  return x, nfe


def unipc(
    eps_fn: EpsFn,
    schedule: sde.DiscreteSchedule | NoiseSchedule,
    x_start: Array,
    num_steps: int,
    order: int = 3,
    variant: str = "bh2",
    start_index: float | None = None,
    end_index: float = 0.0,
    spacing: str = "logSNR",
    lower_order_final: bool = True,
) -> SampleResult:
  """Multistep UniPC (Zhao et al. 2023): UniP-p predictor and UniC-p corrector, order p in 1–3.

  Data prediction, m(x, t) = x̂_0 = (x − σ_t ε̂(x, t))/α_t (UniPC's default), on the times
  t_0 = t(start_index) > … > t_S = t(end_index) spaced by `spacing` (`step_indices`),
  λ = log(α/σ). Step k goes from s = t_{k−1} (state x_s, model value m_0 at s) to t = t_k with
  h = λ_t − λ_s and order p = p_k, using the earlier model values m_i at λ_{s_i} (i = 1..p − 1,
  the i-th before s) through r_i = (λ_{s_i} − λ_s)/h and D_i = m_i − m_0:

      UniP-p:  x̃_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) m_0 − α_t B(h) Σ_{i<p} ρ^p_i D_i/r_i,
      network: m_t = m(x̃_t, t),
      UniC-p:  x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) m_0
                     − α_t B(h) [Σ_{i<p} ρ^c_i D_i/r_i + ρ^c_p (m_t − m_0)],

  the data-prediction form of the paper's UniP-p (Sec. 3.2, order p by Corollary 3.2) and
  UniC-p (Sec. 3.1, which raises the order to p + 1, Theorem 3.1; its node r_p = 1 is the new
  point). With z = −h, φ_1(z) = (e^z − 1)/z, φ_{k+1}(z) = (φ_k(z) − 1/k!)/z, B(h) = z ('bh1',
  B_1) or e^z − 1 ('bh2', B_2) and g_k = k! z φ_{k+1}(z)/B(h), the weights solve the
  Vandermonde systems (the paper's a_p = R_p(h)⁻¹ g_p(h)/B(h) with the powers of h divided out)

      Σ_{i<p} ρ^p_i r_i^{j−1} = g_j  (j = 1..p − 1),    Σ_{i≤p} ρ^c_i r_i^{j−1} = g_j  (j = 1..p),

  except that, as in Zhao et al.'s code and diffusers, ρ^p = (½) for p = 2 and ρ^c = (½) for
  p = 1: g_1 = ½ + O(h), and the orders are kept. The corrected x_t goes on, with the model
  value m_t of the predicted point x̃_t, so the corrector costs no network call; the last step
  is UniP only (no model value after it, so no corrector): NFE = num_steps. Warm-up: step k uses
  order ≤ k; with `lower_order_final` the last steps use min(order, S + 1 − k) at every S (as
  UniPC's code and diffusers do; dpm_solver only below 10 steps): `dpm_solver_orders` with
  lower_final_below=None. The output is x at end_index (t = 1/N by default), not denoised.
  """
  if variant not in UNIPC_VARIANTS:
    raise ValueError(f"UniPC variant must be one of {UNIPC_VARIANTS}, got {variant!r}.")
  view, start_index, orders = _multistep_setup(
      "UniPC", schedule, num_steps, order, spacing, start_index, lower_order_final, None)
  x, nfe = _unipc_loop(_as_pytree(eps_fn), x_start, view, num_steps, orders, variant, spacing,
                       start_index, end_index)
  return _finish(x, nfe)


# ----------------------------------------------------------------------------------------
# The probability-flow ODE with diffrax (adaptive steps on the whole batch).
# ----------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("view", "options", "denoise_to_zero"))
def _pf_ode_solve(eps_fn, x, view, options, denoise_to_zero, start_index, end_index):
  # Solve in x's precision (diffrax would promote float32 states to a float64 time's dtype).
  lam_start = sde.half_log_snr(view, time_of_index(view, start_index)).astype(x.dtype)
  lam_end = sde.half_log_snr(view, time_of_index(view, end_index)).astype(x.dtype)

  def vector_field(lam, x, args):
    del args
    t = sde.time_of_half_log_snr(view, lam)
    sigma2 = jax.nn.sigmoid(-2.0 * lam)  # σ² = 1/(1 + e^{2λ})
    eps = _call_eps(eps_fn, x, index_of_time(view, t))
    return _bcast(sigma2, x) * x - _bcast(jnp.sqrt(sigma2), x) * eps

  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field),
      flow.solver_class(options.solver)(),
      t0=lam_start,
      t1=lam_end,
      dt0=None,
      y0=x,
      stepsize_controller=diffrax.PIDController(rtol=options.rtol, atol=options.atol),
      saveat=diffrax.SaveAt(t1=True),
      max_steps=options.max_steps,
      throw=False,
  )
  x = sol.ys[-1].astype(x.dtype)
  nfe = flow.nfe_from_steps(options.solver, sol.stats["num_steps"]).astype(jnp.int32)
  ok = sol.result == diffrax.RESULTS.successful
  if denoise_to_zero:
    t_end = time_of_index(view, end_index)
    log_alpha, sigma = sde.log_alpha_std(view, t_end)
    eps = _call_eps(eps_fn, x, end_index)
    x = (x - _bcast(sigma, x) * eps) * _bcast(jnp.exp(-log_alpha), x)
    nfe = nfe + 1
  return x, nfe, ok


def pf_ode(
    eps_fn: EpsFn,
    schedule: sde.DiscreteSchedule | NoiseSchedule,
    x_start: Array,
    options: flow.SolverOptions = flow.SolverOptions(rtol=1e-5, atol=1e-5),
    start_index: float | None = None,
    end_index: float = 0.0,
    denoise_to_zero: bool = False,
) -> SampleResult:
  """The probability-flow ODE (Eq. 6) from step `start_index` (default N − 1) to `end_index`.

  Written in λ = log(α/σ), where it is smooth for a smooth ε̂ (no kinks from the piecewise
  constant β of the discrete view):

      dx/dλ = σ² x − σ ε̂(x, t(λ)),   σ² = 1/(1 + e^{2λ}),

  which is −½β(t)[x + ∇ log p_t(x)] dt/dλ with ε̂ = −σ ∇ log p_t. One diffrax solve for the
  whole batch (one shared adaptive step sequence, error in diffrax's RMS norm over all
  entries); start_index > end_index decodes, start_index < end_index encodes. NFE from
  diffrax's step count (accepted + rejected, `flow.nfe_from_steps`); `denoise_to_zero` adds
  one call for x̂_0 at end_index. A solve that exhausts `options.max_steps` raises ValueError
  (or gives NaN under an outer jit).
  """
  view = noise_schedule(schedule)
  start_index = _default_start(view, start_index)
  x, nfe, ok = _pf_ode_solve(_as_pytree(eps_fn), x_start, view, options, bool(denoise_to_zero),
                             start_index, end_index)
  if isinstance(ok, jax.core.Tracer):
    return SampleResult(jnp.where(ok, x, jnp.nan), nfe)
  if not bool(ok):
    raise ValueError(
        f"The PF-ODE solve did not finish within max_steps={options.max_steps} steps "
        f"(rtol={options.rtol}, atol={options.atol}); raise max_steps or loosen the tolerances.")
  return _finish(x, nfe)


def ode_encode(
    eps_fn: EpsFn,
    schedule: sde.DiscreteSchedule | NoiseSchedule,
    x0: Array,
    options: flow.SolverOptions = flow.SolverOptions(rtol=1e-5, atol=1e-5),
    start_index: float = 0.0,
    end_index: float | None = None,
) -> SampleResult:
  """The ODE encoder: image ↦ latent along the PF-ODE from step 0 (t = 1/N) to N − 1 (t = 1).

  The image is taken as the state at `start_index` (the network is not defined below step 0,
  and ε̂/σ is 0/0 at t = 0); `pf_ode(latent, start_index=end_index, end_index=start_index)`
  is the matching decoder.
  """
  view = noise_schedule(schedule)
  end_index = view.num_steps - 1 if end_index is None else end_index
  return pf_ode(eps_fn, view, x0, options, start_index=start_index, end_index=end_index)


# ----------------------------------------------------------------------------------------
# Round trips and a dispatcher.
# ----------------------------------------------------------------------------------------


def round_trip_error(x: Array, x_reconstructed: Array) -> Array:
  """Per-sample RMS error √(mean over non-batch axes of (x − x_rec)²), shape (B,)."""
  diff = (x - x_reconstructed).reshape(x.shape[0], -1)
  return jnp.sqrt(jnp.mean(diff**2, axis=-1))


class RoundTrip(NamedTuple):
  """latent = encode(x), reconstruction = decode(latent), per-sample RMS error, NFE of both."""

  latent: Array
  reconstruction: Array
  error: Array
  nfe: Any


def round_trip(
    eps_fn: EpsFn,
    schedule: sde.DiscreteSchedule | NoiseSchedule,
    x0: Array,
    method: str = "ddim",
    num_steps: int = 100,
    options: flow.SolverOptions = flow.SolverOptions(rtol=1e-5, atol=1e-5),
) -> RoundTrip:
  """Encodes and decodes x0: 'ddim' (ddim_invert then ddim, `num_steps` each, the decoder's
  last step predicting x_0) or 'ode' (ode_encode then pf_ode back to step 0)."""
  view = noise_schedule(schedule)
  if method == "ddim":
    enc = ddim_invert(eps_fn, view, x0, num_steps)
    dec = ddim(eps_fn, view, enc.x, num_steps)
  elif method == "ode":
    enc = ode_encode(eps_fn, view, x0, options)
    dec = pf_ode(eps_fn, view, enc.x, options, end_index=0.0)
  else:
    raise ValueError(f"round_trip method must be 'ddim' or 'ode', got {method!r}.")
  return RoundTrip(enc.x, dec.x, round_trip_error(x0, dec.x), enc.nfe + dec.nfe)


SAMPLERS = ("ddpm", "ddim", "dpm_solver", "unipc", "pf_ode")


def sample(
    method: str,
    eps_fn: EpsFn,
    schedule: sde.DiscreteSchedule | NoiseSchedule,
    x_start: Array,
    *,
    key: Array | None = None,
    num_steps: int | None = None,
    start_index: float | None = None,
    options: flow.SolverOptions | None = None,
    **kwargs: Any,
) -> SampleResult:
  """Runs the sampler named `method` (one of SAMPLERS) from x at step `start_index`.

  'ddpm' runs every step from start_index (num_steps must be None or start_index + 1);
  'ddim', 'dpm_solver' and 'unipc' use num_steps network calls; 'pf_ode' is adaptive
  (options). Extra keyword arguments go to the sampler (ddpm: variance; ddim: eta, end_index,
  spacing; dpm_solver: order, variant, spacing, denoise_to_zero, ...; unipc: order, variant,
  spacing, ...; pf_ode: end_index, ...).
  """
  view = noise_schedule(schedule)
  start = _default_start(view, start_index)
  if method == "ddpm":
    if key is None:
      raise ValueError("The 'ddpm' sampler draws noise: pass key=jax.random.key(...).")
    if num_steps is not None and num_steps != int(start) + 1:
      raise ValueError(
          f"'ddpm' runs all {int(start) + 1} steps from start_index={start}; got num_steps="
          f"{num_steps}. Use 'ddim', 'dpm_solver' or 'unipc' for fewer steps.")
    return ddpm_ancestral(eps_fn, view, x_start, key, int(start), **kwargs)
  if method in ("ddim", "dpm_solver", "unipc"):
    if num_steps is None:
      raise ValueError(f"The {method!r} sampler needs num_steps.")
    if method == "ddim":
      return ddim(eps_fn, view, x_start, num_steps, key=key, start_index=start, **kwargs)
    solver = dpm_solver if method == "dpm_solver" else unipc
    return solver(eps_fn, view, x_start, num_steps, start_index=start, **kwargs)
  if method == "pf_ode":
    options = flow.SolverOptions(rtol=1e-5, atol=1e-5) if options is None else options
    return pf_ode(eps_fn, view, x_start, options, start_index=start, **kwargs)
  raise ValueError(f"Unknown sampler {method!r}; choose one of {SAMPLERS}.")


# ----------------------------------------------------------------------------------------
# Many images from a network: chunks, devices, class labels; DPM-OT.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Network:
  """A trained ε_θ ready to sample.

  model: the flax module (`model.apply({'params': p}, x, t_index, y, train=False)`);
  params: its parameters (the EMA ones of a trained model), replicated over `mesh`;
  view: the continuous-time view matching how ε_θ was trained (`noise_schedule(schedule,
  loss_type)`); mesh: the 1-D 'data' mesh chunks are split over (None: one device, unsplit).
  """

  model: Any
  params: Any
  view: NoiseSchedule
  mesh: Any = None

  @property
  def num_params(self) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(self.params)))


class Samples(NamedTuple):
  """images (n, H, W, C) clipped to [−1, 1]; nfe: network evaluations per image; seconds:
  total wall time; images_per_second: throughput over the chunks after the first (which
  compiles), or over all when there is one chunk; target_index: DPM-OT's target j(z) of each
  sample (None for samplers that start from x_T ~ N(0, I))."""

  images: np.ndarray
  nfe: int
  seconds: float
  images_per_second: float
  target_index: np.ndarray | None = None


def class_labels(model: Any, count: int) -> Array | None:
  """Labels 0, 1, …, K−1, 0, 1, … for a class-conditional model; None otherwise."""
  num_classes = getattr(model, "num_classes", 0)
  return jnp.arange(count, dtype=jnp.int32) % num_classes if num_classes > 0 else None


def shard_rows(x: np.ndarray | Array, mesh: Any) -> Array:
  """x (n, ...) as one array split along the 'data' axis of `mesh` (as is without a mesh).

  When n is not a multiple of the D devices, rows are appended by wrapping around (row
  n + j is a copy of row j mod n) up to the next multiple of D, so the batch always runs
  sharded; `gather_rows(result, n)` drops them again. On several hosts every process must
  pass the same x (each contributes its own rows, `train.global_batch`).
  """
  if mesh is None:
    return jnp.asarray(x)
  x = np.asarray(x)
  n, d = x.shape[0], int(mesh.devices.size)
  padded = -(-n // d) * d
  if padded != n:
    x = np.take(x, np.arange(padded) % n, axis=0)
  return train.global_batch(mesh, x)


def gather_rows(x: Array, count: int) -> np.ndarray:
  """The first `count` rows of a (possibly sharded, possibly multi-host) array, on the host
  of every process: the inverse of `shard_rows` (a collective on several hosts)."""
  return distributed.allgather_to_host(x)[:count]


def _draw_chunks(network: Network, key: Array, num_images: int, batch_size: int | None,
                 start: Callable[[Array, int], tuple[Array, Any]],
                 run: Callable[[EpsFn, Array, Array], SampleResult]) -> Samples:
  """The chunk loop of `sample_images` and `dpm_ot`: chunk k of `batch_size` images draws
  (key_start, key_run) = split(fold_in(key, k)), starts from `start(key_start, count)` →
  (x_start, extra), runs `run(eps_fn, x_start sharded over network.mesh, key_run)` and
  gathers the clipped output; `extra` (DPM-OT's target indices) is concatenated."""
  batch_size = min(batch_size or num_images, num_images)
  labels = class_labels(network.model, num_images)
  chunks, extras, nfe = [], [], 0
  start_time = time.perf_counter()
  steady_start, steady_images = None, 0
  for k, lo in enumerate(range(0, num_images, batch_size)):
    count = min(batch_size, num_images - lo)
    key_start, key_run = jax.random.split(jax.random.fold_in(key, k))
    x_start, extra = start(key_start, count)
    y = None if labels is None else shard_rows(labels[lo:lo + count], network.mesh)
    eps_fn = model_eps_fn(network.model.apply, network.params, y)
    result = run(eps_fn, shard_rows(x_start, network.mesh), key_run)
    chunks.append(gather_rows(jnp.clip(result.x, -1.0, 1.0), count))
    extras.append(extra)
    nfe = int(result.nfe)
    if k == 0:
      steady_start = time.perf_counter()
    elif count == batch_size:
      steady_images += count
  end_time = time.perf_counter()
  seconds = end_time - start_time
  throughput = (steady_images / max(end_time - steady_start, 1e-9) if steady_images
                else num_images / max(seconds, 1e-9))
  extra = None if extras[0] is None else np.concatenate(extras)
  return Samples(np.concatenate(chunks), nfe, seconds, throughput, extra)


def sample_images(network: Network, key: Array, num_images: int, image_shape: tuple[int, ...],
                  sampler: str = "ddim", num_steps: int | None = 50,
                  batch_size: int | None = None, **kwargs: Any) -> Samples:
  """`num_images` images from x_T ~ N(0, I) by the sampler named `sampler` (`sample`).

  Chunk k of `batch_size` draws x_T with fold_in(key, k) and runs split along the 'data' axis
  of network.mesh (padded to a multiple of the device count, `shard_rows`); class-conditional
  models get labels 0, 1, …, K−1, 0, … in order. 'ddpm' takes every step (num_steps is not
  used); kwargs go to the sampler (ddim: eta, spacing; dpm_solver / unipc: order, variant,
  spacing, ...).
  """
  if sampler == "ddpm":
    num_steps = None  # ancestral sampling takes all N steps
  shape = tuple(image_shape)

  def start(key_start, count):
    return jax.random.normal(key_start, (count,) + shape, jnp.float32), None

  def run(eps_fn, x_start, key_run):
    return sample(sampler, eps_fn, network.view, x_start, key=key_run, num_steps=num_steps,
                  **kwargs)

  return _draw_chunks(network, key, num_images, batch_size, start, run)


def dpm_ot(network: Network, monge_map: Callable[[Array], tuple[np.ndarray, np.ndarray]],
           key: Array, num_samples: int, image_shape: tuple[int, ...], switch_index: int,
           num_steps: int | None, sampler: str = "ddim", source: str = "gaussian",
           batch_size: int | None = None, **kwargs: Any) -> Samples:
  r"""DPM-OT (Li et al., ICCV 2023, Sec. 3.2 and Algorithm 1): noise → OT map → M reverse steps.

  The targets y_j are diffused to the switch step M (`switch_index`),
  x_M^j = √ᾱ_M y_j + √(1 − ᾱ_M) ε_j, and a semi-discrete OT potential g between the source μ
  and (1/N) Σ_j δ_{x_M^j} gives the Monge map (Brenier; `semidiscrete`)

      T_g(z) = x_M^{j(z)},   j(z) = argmax_j g_j − ‖z − x_M^j‖²,   z ~ μ,

  the "expressway" that replaces the reverse chain from T down to M. Each sample then takes
  the reverse steps from x_M to x_0 with `sampler`: 'ddim' / 'dpm_solver' / 'unipc' (num_steps
  network calls from index M) or 'ddpm' (all M + 1 ancestral steps; num_steps None or M + 1).

  monge_map: z (B, d) ↦ (x_M^{j(z)} (B, ...), j(z)) (`semidiscrete.monge_map`, targets placed
  once, split across devices when there are several); source: 'gaussian' N(0, I) or
  'uniform' U[0, 1]^d (the reference code's); chunks as in `sample_images`, chunk k drawing
  z with fold_in(key, k). NFE = the reverse steps' network calls (the map costs none).
  Returns `Samples` with target_index = j(z) of every sample.
  """
  shape = tuple(image_shape)
  dim = int(np.prod(shape))

  def start(key_start, count):
    z = semidiscrete.sample_source(key_start, (count, dim), source)
    x_start, index = monge_map(z)
    return x_start.reshape((count,) + shape), index

  def run(eps_fn, x_start, key_run):
    return sample(sampler, eps_fn, network.view, x_start, key=key_run, num_steps=num_steps,
                  start_index=switch_index, **kwargs)

  return _draw_chunks(network, key, num_samples, batch_size, start, run)
