"""The paper's 2-D family and perturbed Gaussians: normalisation, scores, exact sampling."""
from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_ot_jax import densities

import helpers


class QuarticMixtureTest(helpers.Float64TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # Seed 4 has K = 3 components; the grid is coarser than the default to keep tests fast.
    cls.mixture = densities.random_quartic_mixture(jax.random.PRNGKey(4), grid_size=512)

  def test_components_normalised_on_an_independent_grid(self):
    """Each p_k and the mixture integrate to 1 on a different grid (odd size, other nodes)."""
    nodes, h = densities.quadrature_grid(501, 10.0)
    x1, x2 = np.meshgrid(nodes, nodes, indexing="ij")
    pts = jnp.asarray(np.stack([x1.ravel(), x2.ravel()], -1))
    logs = jax.jit(jax.vmap(densities.component_log_prob, in_axes=(None, 0)))(self.mixture, pts)
    masses = np.exp(np.asarray(logs)).sum(0) * h * h
    np.testing.assert_allclose(masses, 1.0, atol=1e-9)
    log_p = densities.mixture_log_density_grid(self.mixture, 501)
    self.assertAlmostEqual(float(np.exp(log_p).sum() * h * h), 1.0, delta=1e-9)

  def test_density_sits_well_inside_the_domain(self):
    """After scaling, p < e^{-80} max p outside [-8, 8]² (the paper's 'decays well inside')."""
    log_p = densities.mixture_log_density_grid(self.mixture, 512)
    nodes, _ = densities.quadrature_grid(512)
    outside = (np.abs(nodes)[:, None] > 8.0) | (np.abs(nodes)[None, :] > 8.0)
    self.assertLess(log_p[outside].max(), log_p.max() - 80.0)

  def test_score_is_gradient_of_log_density(self):
    """The analytic score equals autodiff of log p at random points."""
    x = 2.0 * jax.random.normal(jax.random.PRNGKey(1), (50, 2))
    expected = jax.jit(jax.vmap(jax.grad(densities.log_prob, argnums=1), in_axes=(None, 0)))(self.mixture, x)
    got = jax.jit(jax.vmap(densities.score, in_axes=(None, 0)))(self.mixture, x)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)

  def test_components_split_the_mixture(self):
    """log p = logsumexp_k log p_k − log K, with p_k the one-component mixtures of `components`."""
    x = jax.random.normal(jax.random.PRNGKey(2), (20, 2))
    log_prob = jax.jit(jax.vmap(densities.log_prob, in_axes=(None, 0)))
    parts = jnp.stack([log_prob(c, x) for c in densities.components(self.mixture)], -1)
    expected = jax.scipy.special.logsumexp(parts, axis=-1) - np.log(self.mixture.num_components)
    np.testing.assert_allclose(log_prob(self.mixture, x), expected, atol=1e-12)

  def test_sample_moments_match_grid_moments(self):
    """Rejection samples have the mean and covariance of the density (quadrature), within 5 s.e."""
    n = 20_000
    x = np.asarray(densities.sample(self.mixture, jax.random.PRNGKey(3), n))
    nodes, _ = densities.quadrature_grid(512)
    mean, cov, _ = densities.grid_moments(densities.mixture_log_density_grid(self.mixture, 512), nodes)
    se_mean = np.sqrt(np.diag(cov) / n)
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * se_mean)
    se_cov = np.sqrt(2.0 / n) * np.sqrt(np.outer(np.diag(cov), np.diag(cov)))
    np.testing.assert_array_less(np.abs(np.cov(x.T) - cov), 5 * se_cov)
    # A statistic the covariance does not fix: the mean of x1³ (quadrature vs samples).
    log_p = densities.mixture_log_density_grid(self.mixture, 512)
    w = np.exp(log_p - log_p.max())
    third = (w * nodes[:, None] ** 3).sum() / w.sum()
    se_third = np.sqrt(((w * nodes[:, None] ** 6).sum() / w.sum() - third**2) / n)
    self.assertLess(abs(np.mean(x[:, 0] ** 3) - third), 5 * se_third)

  def test_sampling_is_deterministic(self):
    """The same key gives the same samples."""
    a = densities.sample(self.mixture, jax.random.PRNGKey(7), 300)
    b = densities.sample(self.mixture, jax.random.PRNGKey(7), 300)
    np.testing.assert_array_equal(a, b)

  def test_rescale_is_a_change_of_variables(self):
    """rescale(c, μ) is the law of c(X − μ): log p'(x') = log p(μ + x'/c) − 2 log c."""
    center, scale = jnp.array([0.3, -0.2]), 1.7
    moved = densities.rescale(self.mixture, center, scale, grid_size=512)
    x = jax.random.normal(jax.random.PRNGKey(5), (10, 2))
    log_prob = jax.jit(jax.vmap(densities.log_prob, in_axes=(None, 0)))
    lhs = log_prob(moved, x)
    rhs = log_prob(self.mixture, center + x / scale) - 2 * np.log(scale)
    np.testing.assert_allclose(lhs, rhs, atol=1e-9)

  def test_draw_reaching_the_boundary_is_measured_on_a_wider_box(self):
    """A raw draw whose e^{−80} level set reaches the boundary of [−10, 10]² (density 143 of the
    default 150-density run) is measured on a doubled box instead of being truncated, so the
    result keeps the scaling's promise: p < e^{−75} max p outside [−8, 8]² (e^{−80} up to one
    grid spacing; measured on the truncated box it was e^{−55}). Without widening it is a
    ValueError, never a silently truncated density."""
    key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(0), 143))[0]
    mixture = densities.random_quartic_mixture(key, grid_size=256)
    log_p = densities.mixture_log_density_grid(mixture, 256)
    nodes, _ = densities.quadrature_grid(256)
    outside = (np.abs(nodes)[:, None] > 8.0) | (np.abs(nodes)[None, :] > 8.0)
    self.assertLess(log_p[outside].max(), log_p.max() - 75.0)
    with self.assertRaisesRegex(ValueError, "max_widenings"):
      densities.random_quartic_mixture(key, grid_size=256, max_widenings=0)

  def test_scaled_density_outside_the_domain_is_a_clear_error(self):
    """fit_radius > domain with the radius binding (target_std huge) would put the density's
    e^{−80} level set past the boundary: a ValueError that names fit_radius."""
    with self.assertRaisesRegex(ValueError, "fit_radius"):
      densities.random_quartic_mixture(jax.random.PRNGKey(4), grid_size=256, target_std=100.0, fit_radius=12.0)



class PerturbedGaussianTest(helpers.Float64TestCase):

  def setUp(self):
    super().setUp()
    self.limit = 1.0 / densities.hessian_bound(densities.default_perturbation(0.0))
    self.gaussian = densities.default_perturbation(0.8 * self.limit)

  def test_u_is_strictly_convex_below_the_limit(self):
    """λ_min(∇²u) > 0 on a grid for ε = 0.8 · limit, and the bound dominates ‖∇²φ‖ there."""
    nodes = np.linspace(-6, 6, 121)
    pts = jnp.asarray(np.stack(np.meshgrid(nodes, nodes, indexing="ij"), -1).reshape(-1, 2))
    hess = jax.jit(jax.vmap(jax.hessian(densities.potential, argnums=1), in_axes=(None, 0)))(self.gaussian, pts)
    self.assertGreater(float(jnp.linalg.eigvalsh(hess)[:, 0].min()), 0.15)
    bump_hess = jax.jit(jax.vmap(jax.hessian(densities.bump, argnums=1), in_axes=(None, 0)))(self.gaussian, pts)
    sup = float(jnp.abs(jnp.linalg.eigvalsh(bump_hess)).max())
    self.assertLessEqual(sup, densities.hessian_bound(self.gaussian) + 1e-12)

  def test_samples_invert_the_ot_map(self):
    """Newton solves ∇u(x) = z to round-off, so ∇u pushes the samples to the N(0, I) draws."""
    x, z = densities.sample_perturbed(self.gaussian, jax.random.PRNGKey(0), 2000)
    pushed = jax.jit(jax.vmap(densities.brenier_map, in_axes=(None, 0)))(self.gaussian, x)
    np.testing.assert_allclose(pushed, z, atol=1e-12)
    np.testing.assert_allclose(np.mean(pushed, 0), 0.0, atol=0.1)
    np.testing.assert_allclose(np.cov(np.asarray(pushed).T), np.eye(2), atol=0.12)

  def test_density_is_normalised_and_matches_the_samples(self):
    """p0 = N(∇u) det ∇²u integrates to 1, and its mean (quadrature) is the samples' mean."""
    nodes, h = densities.quadrature_grid(301, 9.0)
    pts = jnp.asarray(np.stack(np.meshgrid(nodes, nodes, indexing="ij"), -1).reshape(-1, 2))
    log_p = np.asarray(jax.jit(jax.vmap(densities.log_prob_perturbed, in_axes=(None, 0)))(self.gaussian, pts))
    p = np.exp(log_p)
    self.assertAlmostEqual(float(p.sum() * h * h), 1.0, delta=1e-9)
    mean = (p[:, None] * np.asarray(pts)).sum(0) * h * h
    n = 10_000
    x, _ = densities.sample_perturbed(self.gaussian, jax.random.PRNGKey(1), n)
    np.testing.assert_array_less(np.abs(np.asarray(x).mean(0) - mean), 5.0 / np.sqrt(n) * 1.2)
    self.assertGreater(float(np.linalg.norm(mean)), 0.05)  # the bump really moves the mass

  def test_epsilon_zero_is_the_standard_gaussian(self):
    """ε = 0: ∇u = id and p0 = N(0, I) exactly."""
    g0 = densities.default_perturbation(0.0)
    x = jax.random.normal(jax.random.PRNGKey(2), (10, 2))
    np.testing.assert_allclose(jax.jit(jax.vmap(densities.brenier_map, in_axes=(None, 0)))(g0, x), x, atol=0)
    expected = -0.5 * jnp.sum(x**2, 1) - np.log(2 * np.pi)
    log_p = jax.jit(jax.vmap(densities.log_prob_perturbed, in_axes=(None, 0)))(g0, x)
    np.testing.assert_allclose(log_p, expected, atol=1e-14)


if __name__ == "__main__":
  absltest.main()
