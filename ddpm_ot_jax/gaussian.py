"""Closed forms for Gaussian data: marginals, score, Theorem 3.1's flow, OT map and W2.

For μ0 = N(a0, Σ0) and the VP-SDE, every marginal is Gaussian:

    μ_t = N(α a0, α² Σ0 + σ² I),   α = α(t), σ² = 1 − α²        (sde.marginal_mean_coeff)

and in the OU time s of Eq. 8 (s = ½ B(t), `sde.ou_time`) the probability-flow ODE is solved
by Theorem 3.1 (Khrulkov et al. 2022): with Σ0 = Uᵀ Λ U,

    E(s, x) = Uᵀ diag(f(λ_i, s)) U x + Uᵀ diag(g(λ_i, s)) U a0,                 (16), (19)
    f(λ, s) = √((e^{−2s}(λ − 1) + 1)/λ),                                            (17)
    g(λ, s) = −√λ f(λ, s) ∫_0^s e^{−τ} (e^{−2τ}(λ − 1) + 1)^{−3/2} dτ = e^{−s} − f(λ, s).

(The integral in Eq. 19 is [u/√((λ−1)u² + 1)] between u = e^{−s} and 1, which gives the
last form.) As s → ∞, f → λ^{−1/2} and g → −λ^{−1/2}, so E(x) = Σ0^{−1/2}(x − a0): the Monge
map from N(a0, Σ0) to N(0, I).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from ddpm_ot_jax import sde

Array = jax.Array


def _eigh(cov: Array) -> tuple[Array, Array]:
  """Σ = V diag(λ) Vᵀ (V = Uᵀ in the paper's notation)."""
  lam, vecs = jnp.linalg.eigh(cov)
  return lam, vecs


def sqrtm_spd(cov: Array, power: float = 0.5) -> Array:
  """Σ^p for a symmetric positive definite Σ, via its eigendecomposition."""
  lam, vecs = _eigh(cov)
  return (vecs * lam**power) @ vecs.T


def marginal(schedule: sde.Schedule, t: Array, mean0: Array, cov0: Array) -> tuple[Array, Array]:
  """(a_t, Σ_t) = (α a0, α² Σ0 + σ² I) of the VP-SDE started at N(a0, Σ0)."""
  alpha = sde.marginal_mean_coeff(schedule, t)
  sigma = sde.marginal_std(schedule, t)
  return alpha * mean0, alpha**2 * cov0 + sigma**2 * jnp.eye(cov0.shape[-1], dtype=cov0.dtype)


def log_prob(x: Array, mean: Array, cov: Array) -> Array:
  """log N(x; mean, cov) for one point x."""
  return jax.scipy.stats.multivariate_normal.logpdf(x, mean, cov)


def score_fn(schedule: sde.Schedule, mean0: Array, cov0: Array) -> sde.ScoreFn:
  """(x, t) ↦ ∇ log p_t(x) = −Σ_t^{−1}(x − a_t) with Σ_t = V diag(α²λ + σ²) Vᵀ.

  Costs O(d²) per call: Σ0 is diagonalised once, outside the ODE solve.
  """
  lam, vecs = _eigh(cov0)

  def score(x: Array, t: Array) -> Array:
    alpha = sde.marginal_mean_coeff(schedule, t)
    var = alpha**2 * lam + sde.marginal_std(schedule, t) ** 2
    return -vecs @ ((vecs.T @ (x - alpha * mean0)) / var)

  return score


def flow_f(lam: Array, s: Array) -> Array:
  """f(λ, s) = √((e^{−2s}(λ − 1) + 1)/λ), Eq. 17 (s in OU time)."""
  return jnp.sqrt((jnp.exp(-2.0 * s) * (lam - 1.0) + 1.0) / lam)


def flow_g(lam: Array, s: Array) -> Array:
  """g(λ, s) of Eq. 19 in closed form: e^{−s} − f(λ, s)."""
  return jnp.exp(-s) - flow_f(lam, s)


def encoder_at(x: Array, mean0: Array, cov0: Array, s: Array) -> Array:
  """Theorem 3.1's finite-time flow E(s, x) = V diag(f) Vᵀ x + V diag(g) Vᵀ a0 (Eqs. 16, 19).

  `x` has shape (..., d); `s` is OU time (use `sde.ou_time` for other schedules).
  """
  lam, vecs = _eigh(cov0)
  z = (x @ vecs) * flow_f(lam, s) + (mean0 @ vecs) * flow_g(lam, s)
  return z @ vecs.T


def encoder_limit(x: Array, mean0: Array, cov0: Array) -> Array:
  """E(x) = Σ0^{−1/2}(x − a0), the s → ∞ limit of Theorem 3.1."""
  return (x - mean0) @ sqrtm_spd(cov0, -0.5)


def ot_map(x: Array, mean0: Array, cov0: Array, mean1: Array, cov1: Array) -> Array:
  """Monge map N(m0, Σ0) → N(m1, Σ1): T(x) = m1 + A(x − m0),

  A = Σ0^{−1/2} (Σ0^{1/2} Σ1 Σ0^{1/2})^{1/2} Σ0^{−1/2}  (Givens & Shortt 1984), symmetric.
  """
  r = sqrtm_spd(cov0)
  r_inv = sqrtm_spd(cov0, -0.5)
  a = r_inv @ sqrtm_spd(r @ cov1 @ r) @ r_inv
  return mean1 + (x - mean0) @ a.T


def w2_squared(mean0: Array, cov0: Array, mean1: Array, cov1: Array) -> Array:
  """W2² = |m0 − m1|² + tr(Σ0 + Σ1 − 2 (Σ0^{1/2} Σ1 Σ0^{1/2})^{1/2})."""
  r = sqrtm_spd(cov0)
  cross = sqrtm_spd(r @ cov1 @ r)
  return jnp.sum((mean0 - mean1) ** 2) + jnp.trace(cov0 + cov1 - 2.0 * cross)


def random_gaussian(
    key: Array, dims: int, eig_min: float = 0.1, eig_max: float = 10.0, dtype: DTypeLike = jnp.float64
) -> tuple[Array, Array]:
  """A random N(a0, Σ0): a0 ~ N(0, I); Σ0 = Q diag(λ) Qᵀ, λ log-uniform in [eig_min, eig_max],

  Q Haar-random orthogonal (QR of a Gaussian matrix with the sign fix).
  """
  k_mean, k_q, k_lam = jax.random.split(key, 3)
  mean = jax.random.normal(k_mean, (dims,), dtype)
  q, r = jnp.linalg.qr(jax.random.normal(k_q, (dims, dims), dtype))
  q = q * jnp.sign(jnp.diag(r))
  lam = jnp.exp(jax.random.uniform(k_lam, (dims,), dtype, jnp.log(eig_min), jnp.log(eig_max)))
  cov = (q * lam) @ q.T
  return mean, 0.5 * (cov + cov.T)
