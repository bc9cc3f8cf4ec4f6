"""Gaussian mixtures: the exact score against autodiff, sampling against moments."""
from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_ot_jax import gaussian
from ddpm_ot_jax import gmm
from ddpm_ot_jax import sde

import helpers


def _moments(mixture):
  mean = mixture.weights @ mixture.means
  second = jnp.einsum("k,kij->ij", mixture.weights, mixture.covs + jnp.einsum("ki,kj->kij", mixture.means, mixture.means))
  return mean, second - jnp.outer(mean, mean)


class GMMTest(helpers.Float64TestCase):

  def setUp(self):
    super().setUp()
    self.mixture = gmm.random_mixture(jax.random.PRNGKey(0), dims=5, num_components=4)

  def test_score_is_gradient_of_log_marginal(self):
    """score_fn(x, t) = ∇_x log p_t(x) (autodiff of the marginal mixture's log density)."""
    sched = sde.LinearSchedule()
    score = gmm.score_fn(self.mixture, sched)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 5)) * 2
    for t in (0.0, 0.02, 0.3, 1.0):
      marg = gmm.marginal(self.mixture, sched, t)
      expected = jax.vmap(jax.grad(lambda y: gmm.log_prob(marg, y)))(x)
      np.testing.assert_allclose(jax.vmap(lambda y: score(y, t))(x), expected, rtol=1e-9, atol=1e-11)

  def test_single_component_matches_gaussian(self):
    """A one-component mixture's score equals the Gaussian closed form."""
    one = gmm.random_mixture(jax.random.PRNGKey(2), dims=3, num_components=1)
    sched = sde.ConstantSchedule()
    x = jnp.array([0.3, -0.2, 1.1])
    np.testing.assert_allclose(
        gmm.score_fn(one, sched)(x, 0.4), gaussian.score_fn(sched, one.means[0], one.covs[0])(x, 0.4), atol=1e-12)

  def test_component_log_densities_match_the_mixture(self):
    """The grid solver's component densities: a Gaussian component and an equal pair of them
    give the log density of the corresponding one- and two-component mixtures."""
    pair = gmm.random_mixture(jax.random.PRNGKey(3), dims=2, num_components=2)
    pair = gmm.GaussianMixture(jnp.full((2,), 0.5), pair.means, pair.covs)
    one = gmm.GaussianMixture(jnp.ones((1,)), pair.means[:1], pair.covs[:1])
    for y in jax.random.normal(jax.random.PRNGKey(4), (5, 2)) * 2:
      self.assertAlmostEqual(float(gmm.gaussian_log_density((pair.means[0], pair.covs[0]), y)),
                             float(gmm.log_prob(one, y)), delta=1e-12)
      self.assertAlmostEqual(float(gmm.gaussian_pair_log_density((pair.means, pair.covs), y)),
                             float(gmm.log_prob(pair, y)), delta=1e-12)

  def test_sampling_and_diffusion_moments(self):
    """Samples match the mixture's mean/covariance, and perturbed samples match μ_t's (MC)."""
    x = gmm.sample(self.mixture, jax.random.PRNGKey(3), 200_000)
    mean, cov = _moments(self.mixture)
    np.testing.assert_allclose(x.mean(0), mean, atol=0.03)
    np.testing.assert_allclose(jnp.cov(x.T), cov, atol=0.08)
    sched = sde.LinearSchedule()
    xt, _ = sde.perturb(sched, jax.random.PRNGKey(4), x, jnp.full((len(x),), 0.3))
    mean_t, cov_t = _moments(gmm.marginal(self.mixture, sched, 0.3))
    np.testing.assert_allclose(xt.mean(0), mean_t, atol=0.03)
    np.testing.assert_allclose(jnp.cov(xt.T), cov_t, atol=0.08)


if __name__ == "__main__":
  absltest.main()
