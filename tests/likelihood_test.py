"""flow.log_likelihood against closed-form densities; Hutchinson's estimator is unbiased;
dequantization and bits/dim; samplers.score_fn_from_eps; data.pixel_levels.

float64 is switched on for each class and restored after it (never at import).
"""
import functools
import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_ot_jax import data
from ddpm_ot_jax import flow
from ddpm_ot_jax import gaussian
from ddpm_ot_jax import gmm
from ddpm_ot_jax import samplers
from ddpm_ot_jax import sde

import helpers

T_END = 16.0  # OU time: the prior N(0, I) is off by O(e^{-16}) ≈ 1e-7
T_START = 1e-10  # the data are the state at t_start: log p moves by O(t_start)
TIGHT = flow.SolverOptions(rtol=1e-8, atol=1e-8)


def _ou_view(t_end: float = T_END) -> samplers.ContinuousTimeSchedule:
  """The paper's OU process (β = 2) up to t_end, as a schedule that inverts log α."""
  return samplers.ContinuousTimeSchedule(sde.ConstantSchedule(2.0, t_end))


def _gaussian_points(key, dims: int, n: int):
  mean, cov = gaussian.random_gaussian(key, dims, 0.1, 10.0)
  x = mean + jax.random.normal(jax.random.fold_in(key, 1), (n, dims)) @ gaussian.sqrtm_spd(cov)
  return mean, cov, x


class ExactDensityTest(helpers.Float64ParameterizedTestCase):

  @parameterized.parameters(2, 40)
  def test_gaussian_closed_form(self, dims):
    """Gaussian data N(a0, Σ0) with its exact score, d = 2 and 40: the PF-ODE log-likelihood
    (Tsit5, rtol = atol = 1e-8, prior N(0, I) at OU time 16) equals log N(x; a0, Σ0) to 1e-5
    nats at every point."""
    mean, cov, x = _gaussian_points(jax.random.PRNGKey(dims), dims, 6)
    view = _ou_view()
    result = flow.log_likelihood(view, gaussian.score_fn(view, mean, cov), x, T_START,
                                 options=TIGHT)
    exact = jax.vmap(lambda xi: gaussian.log_prob(xi, mean, cov))(x)
    self.assertTrue(bool(result.ok.all()))
    np.testing.assert_allclose(result.log_prob, exact, rtol=0, atol=1e-5)
    np.testing.assert_allclose(result.log_prob, result.prior_log_prob + result.delta_log_prob)

  def test_short_flow_with_the_exact_prior(self):
    """Ending at OU time 2 (α = e^{-2}: N(0, I) would be off by ~0.1 nats), the exact p_T
    (gaussian.marginal) plus the divergence integral Δ gives the exact log p_{t_start} to
    1e-6: the integral itself, not a large end time, carries the accuracy."""
    mean, cov, x = _gaussian_points(jax.random.PRNGKey(7), 3, 6)
    view = _ou_view(2.0)
    result = flow.log_likelihood(view, gaussian.score_fn(view, mean, cov), x, 1e-3,
                                 options=TIGHT)
    mean_t, cov_t = gaussian.marginal(view, 2.0, mean, cov)
    mean_s, cov_s = gaussian.marginal(view, 1e-3, mean, cov)
    at_end = jax.vmap(lambda z: gaussian.log_prob(z, mean_t, cov_t))(result.z)
    at_start = jax.vmap(lambda xi: gaussian.log_prob(xi, mean_s, cov_s))(x)
    np.testing.assert_allclose(at_end + result.delta_log_prob, at_start, rtol=0, atol=1e-6)
    self.assertGreater(float(jnp.max(jnp.abs(result.log_prob - at_start))), 1e-2)

  def test_gaussian_mixture(self):
    """A 4-component mixture in d = 3 with gmm's exact score: the PF-ODE log-likelihood
    equals gmm.log_prob to 1e-5 nats."""
    mixture = gmm.random_mixture(jax.random.PRNGKey(3), dims=3, num_components=4)
    x = gmm.sample(mixture, jax.random.PRNGKey(4), 8)
    view = _ou_view()
    result = jax.jit(lambda x: flow.log_likelihood(view, gmm.score_fn(mixture, view), x,
                                                   T_START, options=TIGHT))(x)
    exact = jax.vmap(functools.partial(gmm.log_prob, mixture))(x)
    np.testing.assert_allclose(result.log_prob, exact, rtol=0, atol=1e-5)

  def test_network_path_on_the_discrete_view(self):
    """The DDPM path: an ε-predictor (here the exact Gaussian one, `eps_fn_from_score`) read
    back by `score_fn_from_eps` on DDPM's discrete view (β piecewise constant), from step 0
    (t = 1/N) to t = 1. score_fn_from_eps inverts eps_fn_from_score, and the log-likelihood
    plus the exact prior gap equals log p_{1/N}(x) of the view's marginal to 1e-5."""
    view = samplers.noise_schedule(sde.DiscreteSchedule())
    mean, cov, x = _gaussian_points(jax.random.PRNGKey(11), 4, 4)
    score = gaussian.score_fn(view, mean, cov)
    eps_fn = samplers.eps_fn_from_score(score, view, view)
    back = samplers.score_fn_from_eps(eps_fn, view)
    t = jnp.array([0.001, 0.3, 0.97])
    np.testing.assert_allclose(jax.vmap(back)(x[:3], t), jax.vmap(score)(x[:3], t), rtol=1e-9)
    t_start = float(samplers.time_of_index(view, 0))
    result = flow.log_likelihood(view, back, x, t_start, options=TIGHT)
    mean_1, cov_1 = gaussian.marginal(view, 1.0, mean, cov)
    gap = jax.vmap(lambda z: gaussian.log_prob(z, mean_1, cov_1) - sde.prior_log_prob(z))(result.z)
    mean_s, cov_s = gaussian.marginal(view, t_start, mean, cov)
    exact = jax.vmap(lambda xi: gaussian.log_prob(xi, mean_s, cov_s))(x)
    np.testing.assert_allclose(result.log_prob + gap, exact, rtol=0, atol=1e-5)


class HutchinsonTest(helpers.Float64ParameterizedTestCase):

  @parameterized.parameters(("rademacher", 1), ("gaussian", 2))
  def test_unbiased(self, probe, num_probes):
    """400 independent Hutchinson estimates of log p(x) at one point (anisotropic Gaussian in
    d = 6, so zᵀJz varies with z; 1 Rademacher or 2 Gaussian probes each): their mean lies
    within 4 standard errors of the exact-divergence value, and they do vary (std > 0.01)."""
    mean, cov, x = _gaussian_points(jax.random.PRNGKey(5), 6, 1)
    view = _ou_view(10.0)
    score = gaussian.score_fn(view, mean, cov)
    options = flow.SolverOptions(rtol=1e-7, atol=1e-7)
    exact = flow.log_likelihood(view, score, x, 1e-6, options=options).log_prob[0]
    n = 400
    keys = jax.random.split(jax.random.PRNGKey(6), n)
    estimates = flow.log_likelihood(view, score, jnp.repeat(x, n, axis=0), 1e-6,
                                    options=options, divergence="hutchinson", keys=keys,
                                    num_probes=num_probes, probe=probe).log_prob
    stderr = float(jnp.std(estimates) / math.sqrt(n))
    self.assertGreater(float(jnp.std(estimates)), 1e-2)
    self.assertLess(abs(float(jnp.mean(estimates) - exact)), 4.0 * stderr)

  def test_argument_errors(self):
    """Probes need keys; t_start = 0 (λ infinite) and unknown names are ValueErrors; a schedule
    that cannot invert log α is a TypeError naming the fix."""
    view = _ou_view()
    score = lambda x, t: -x  # noqa: E731
    x = jnp.zeros((2, 3))
    with self.assertRaisesRegex(ValueError, "keys"):
      flow.log_likelihood(view, score, x, 1e-3, divergence="hutchinson")
    with self.assertRaisesRegex(ValueError, "t_start"):
      flow.log_likelihood(view, score, x, 0.0)
    with self.assertRaisesRegex(ValueError, "divergence"):
      flow.log_likelihood(view, score, x, 1e-3, divergence="trace")
    with self.assertRaisesRegex(TypeError, "ContinuousTimeSchedule"):
      flow.log_likelihood(sde.ConstantSchedule(), score, x, 1e-3)


class BitsPerDimTest(absltest.TestCase):

  def test_uniform_model_gives_log2_levels(self):
    """The uniform density on [−1, 1]^D (log p = −D log 2) costs exactly log₂ L bits/dim, and
    L = 256 adds score_sde's 7 bits to −log₂ p / D."""
    for dims, levels in ((64, 17), (3072, 256), (5, 2)):
      bpd = flow.bits_per_dim(jnp.asarray(-dims * math.log(2.0)), dims, levels)
      self.assertAlmostEqual(float(bpd), math.log2(levels), places=5)
    log_prob = jnp.asarray(-1234.5)
    self.assertAlmostEqual(
        float(flow.bits_per_dim(log_prob, 3072, 256) + log_prob / (3072 * math.log(2.0))), 7.0,
        places=5)

  def test_dequantized_pixels_stay_in_their_bins(self):
    """y = 2(k + u)/L − 1 lies in [2k/L − 1, 2(k + 1)/L − 1), u is uniform (mean ½), and the
    digits' values k/8 − 1 and data.pixel_levels round-trip."""
    heldout = data.load_digits("heldout")
    levels = data.pixel_levels(heldout.images, data.NUM_LEVELS["digits"])
    self.assertEqual((levels.min(), levels.max()), (0, 16))
    np.testing.assert_array_equal(levels / 8.0 - 1.0, heldout.images)
    y = np.asarray(flow.dequantize(jax.random.PRNGKey(0), jnp.asarray(levels), 17))
    u = (y + 1.0) * 17 / 2 - levels
    self.assertTrue(((u >= -1e-6) & (u < 1 + 1e-6)).all())
    self.assertAlmostEqual(float(u.mean()), 0.5, delta=0.01)
    with self.assertRaisesRegex(ValueError, "17-level grid|256-level grid"):
      data.pixel_levels(heldout.images, 256)


if __name__ == "__main__":
  absltest.main()
