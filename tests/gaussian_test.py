"""Theorem 3.1's closed forms against numerical integration, autodiff and ott-jax."""
from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
from ott.tools.gaussian_mixture import gaussian as ott_gaussian
import scipy.integrate

from ddpm_ot_jax import gaussian
from ddpm_ot_jax import sde

import helpers


class GaussianTest(helpers.Float64TestCase):

  def setUp(self):
    super().setUp()
    self.mean, self.cov = gaussian.random_gaussian(jax.random.PRNGKey(3), 3, 0.2, 5.0)

  def test_g_closed_form_matches_eq19_quadrature(self):
    """g(λ, s) = e^{−s} − f(λ, s) equals −√λ f ∫_0^s e^{−τ}(e^{−2τ}(λ−1)+1)^{−3/2} dτ (Eq. 19)."""
    for lam in (0.1, 1.0, 7.0):
      for s in (0.3, 2.0, 9.0):
        integral, _ = scipy.integrate.quad(
            lambda tau: np.exp(-tau) * (np.exp(-2 * tau) * (lam - 1) + 1) ** -1.5, 0, s,
            epsabs=1e-13, epsrel=1e-13)
        eq19 = -np.sqrt(lam) * float(gaussian.flow_f(lam, s)) * integral
        self.assertAlmostEqual(float(gaussian.flow_g(lam, s)), eq19, places=10)

  def test_finite_time_flow_solves_eq18(self):
    """E(s, x) equals scipy's solution of dx/ds = −(I − Σ_s⁻¹)x − Σ_s⁻¹ a_s (Eq. 18)."""
    mean, cov = np.asarray(self.mean), np.asarray(self.cov)
    x0 = np.array([0.4, -1.0, 2.0])

    def rhs(s, x):
      cov_s = np.eye(3) + np.exp(-2 * s) * (cov - np.eye(3))
      inv = np.linalg.inv(cov_s)
      return -(np.eye(3) - inv) @ x - inv @ (np.exp(-s) * mean)

    sol = scipy.integrate.solve_ivp(rhs, (0, 3.0), x0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gaussian.encoder_at(x0, self.mean, self.cov, 3.0), sol.y[:, -1], atol=1e-9)

  def test_limit_is_whitening_and_ot_map(self):
    """E(s → ∞, x) = Σ0^{−1/2}(x − a0) = the ott-jax Gaussian OT map to N(0, I)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
    limit = gaussian.encoder_limit(x, self.mean, self.cov)
    np.testing.assert_allclose(gaussian.encoder_at(x, self.mean, self.cov, 40.0), limit, atol=1e-12)
    src = ott_gaussian.Gaussian.from_mean_and_cov(self.mean, self.cov)
    dst = ott_gaussian.Gaussian.from_mean_and_cov(jnp.zeros(3), jnp.eye(3))
    np.testing.assert_allclose(limit, src.transport(dst, x), atol=1e-9)

  def test_ot_map_and_w2_against_ott(self):
    """ot_map and W2² between two random Gaussians agree with ott-jax; A is symmetric, A Σ0 A = Σ1."""
    mean1, cov1 = gaussian.random_gaussian(jax.random.PRNGKey(8), 3)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    src = ott_gaussian.Gaussian.from_mean_and_cov(self.mean, self.cov)
    dst = ott_gaussian.Gaussian.from_mean_and_cov(mean1, cov1)
    np.testing.assert_allclose(gaussian.ot_map(x, self.mean, self.cov, mean1, cov1), src.transport(dst, x), atol=1e-8)
    np.testing.assert_allclose(gaussian.w2_squared(self.mean, self.cov, mean1, cov1), src.w2_dist(dst), rtol=1e-8)
    a = jax.jacfwd(lambda y: gaussian.ot_map(y, self.mean, self.cov, mean1, cov1))(x[0])
    np.testing.assert_allclose(a, a.T, atol=1e-10)
    np.testing.assert_allclose(a @ self.cov @ a, cov1, atol=1e-9)

  def test_score_is_gradient_of_log_density(self):
    """score_fn(x, t) = ∇ log N(x; α a0, α² Σ0 + σ² I) by autodiff, for the linear schedule."""
    sched = sde.LinearSchedule()
    score = gaussian.score_fn(sched, self.mean, self.cov)
    x = jnp.array([0.1, 0.5, -0.7])
    for t in (0.05, 0.5, 1.0):
      m_t, c_t = gaussian.marginal(sched, t, self.mean, self.cov)
      np.testing.assert_allclose(score(x, t), jax.grad(gaussian.log_prob)(x, m_t, c_t), atol=1e-10)


if __name__ == "__main__":
  absltest.main()
