"""Gaussian mixtures: data whose score is exact at every time, in any dimension.

For μ0 = Σ_k w_k N(m_k, S_k), the VP-SDE marginal is again a mixture with the same weights,

    μ_t = Σ_k w_k N(α m_k, α² S_k + σ² I),

so ∇ log p_t(x) = Σ_k r_k(x) [−(α² S_k + σ² I)^{−1}(x − α m_k)], with responsibilities
r_k(x) = w_k N_k(x) / Σ_j w_j N_j(x) computed by log-sum-exp. Each component is
diagonalised once (S_k = V_k diag(λ_k) V_kᵀ), so a score call costs O(K d²).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from ddpm_ot_jax import gaussian
from ddpm_ot_jax import sde

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GaussianMixture:
  """Σ_k w_k N(m_k, S_k): weights (K,), means (K, d), covs (K, d, d)."""

  weights: Array
  means: Array
  covs: Array

  @property
  def dims(self) -> int:
    return self.means.shape[-1]


def _component_log_probs(mixture: GaussianMixture, eig, x: Array, alpha, sigma2):
  """log w_k + log N(x; α m_k, α² S_k + σ² I) and the per-component scores at one x.

  eig = (λ (K, d), V (K, d, d)): the eigendecompositions S_k = V_k diag(λ_k) V_kᵀ.
  """
  lam, vecs = eig
  var = alpha**2 * lam + sigma2  # (K, d)
  diff = x - alpha * mixture.means  # (K, d)
  proj = jnp.einsum("kdi,kd->ki", vecs, diff)  # V_kᵀ (x − α m_k)
  maha = jnp.sum(proj**2 / var, axis=-1)
  log_det = jnp.sum(jnp.log(var), axis=-1)
  log_n = -0.5 * (maha + log_det + mixture.dims * jnp.log(2.0 * jnp.pi))
  scores = -jnp.einsum("kdi,ki->kd", vecs, proj / var)
  return jnp.log(mixture.weights) + log_n, scores


def log_prob(mixture: GaussianMixture, x: Array) -> Array:
  """log p0(x) for one point x of shape (d,)."""
  logs, _ = _component_log_probs(mixture, jnp.linalg.eigh(mixture.covs), x, 1.0, 0.0)
  return jax.scipy.special.logsumexp(logs)


def marginal(mixture: GaussianMixture, schedule: sde.Schedule, t: Array) -> GaussianMixture:
  """The mixture μ_t = Σ_k w_k N(α m_k, α² S_k + σ² I)."""
  alpha = sde.marginal_mean_coeff(schedule, t)
  sigma2 = sde.marginal_std(schedule, t) ** 2
  eye = jnp.eye(mixture.dims, dtype=mixture.covs.dtype)
  return GaussianMixture(mixture.weights, alpha * mixture.means, alpha**2 * mixture.covs + sigma2 * eye)


def score_fn(mixture: GaussianMixture, schedule: sde.Schedule) -> sde.ScoreFn:
  """(x, t) ↦ ∇_x log p_t(x) for one point x, exact at every t (S_k diagonalised once)."""
  eig = jnp.linalg.eigh(mixture.covs)

  def score(x: Array, t: Array) -> Array:
    alpha = sde.marginal_mean_coeff(schedule, t)
    sigma2 = sde.marginal_std(schedule, t) ** 2
    logs, scores = _component_log_probs(mixture, eig, x, alpha, sigma2)
    resp = jax.nn.softmax(logs)
    return resp @ scores

  return score


def sample(mixture: GaussianMixture, key: Array, n: int) -> Array:
  """n exact samples: a component by its weight, then m_k + S_k^{1/2} ε."""
  k_comp, k_noise = jax.random.split(key)
  comp = jax.random.categorical(k_comp, jnp.log(mixture.weights), shape=(n,))
  lam, vecs = jnp.linalg.eigh(mixture.covs)
  roots = jnp.einsum("kij,kj,klj->kil", vecs, jnp.sqrt(lam), vecs)  # S_k^{1/2}
  eps = jax.random.normal(k_noise, (n, mixture.dims), mixture.means.dtype)
  return mixture.means[comp] + jnp.einsum("nij,nj->ni", roots[comp], eps)


def random_mixture(
    key: Array,
    dims: int,
    num_components: int,
    mean_scale: float = 2.0,
    eig_min: float = 0.05,
    eig_max: float = 1.0,
    dtype: DTypeLike = jnp.float64,
) -> GaussianMixture:
  """A random mixture: weights ~ Dirichlet(1), means ~ N(0, mean_scale² I),

  covariances Q diag(λ) Qᵀ with Haar Q and λ log-uniform in [eig_min, eig_max].
  """
  k_w, k_m, k_q, k_l = jax.random.split(key, 4)
  weights = jax.random.dirichlet(k_w, jnp.ones(num_components, dtype))
  means = mean_scale * jax.random.normal(k_m, (num_components, dims), dtype)
  q, r = jnp.linalg.qr(jax.random.normal(k_q, (num_components, dims, dims), dtype))
  q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
  lam = jnp.exp(jax.random.uniform(k_l, (num_components, dims), dtype, jnp.log(eig_min), jnp.log(eig_max)))
  covs = jnp.einsum("kij,kj,klj->kil", q, lam, q)
  return GaussianMixture(weights, means, 0.5 * (covs + jnp.swapaxes(covs, -1, -2)))


# Component log densities in the (params, y) -> log p_k(y) form of `fokker_planck.LogDensity`,
# so a mixture can be handed to the grid solver with its exact score as the reference.


def gaussian_log_density(params: tuple[Array, Array], y: Array) -> Array:
  """log N(y; m, S) for params = (m, S): one Gaussian component."""
  return gaussian.log_prob(y, *params)


def gaussian_pair_log_density(params: tuple[Array, Array], y: Array) -> Array:
  """log (½ N(y; m_1, S_1) + ½ N(y; m_2, S_2)) for params = (means (2, d), covs (2, d, d)):
  a smooth non-Gaussian component (its grid residual R is not zero)."""
  means, covs = params
  logs = jax.vmap(lambda m, c: gaussian.log_prob(y, m, c))(means, covs)
  return jax.scipy.special.logsumexp(logs) - jnp.log(2.0)
