"""VP-SDE schedules and marginals against autodiff, moment ODEs and Monte Carlo."""
from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import scipy.integrate

from ddpm_ot_jax import sde

jax.config.update("jax_enable_x64", True)

SCHEDULES = {
    "linear": sde.LinearSchedule(),
    "cosine": sde.CosineSchedule(),
    "constant": sde.ConstantSchedule(),
}


class ScheduleTest(parameterized.TestCase):

  @parameterized.named_parameters(*[(k, v) for k, v in SCHEDULES.items()])
  def test_beta_is_derivative_of_integral(self, schedule):
    """β(t) equals dB/dt computed by autodiff of beta_integral."""
    ts = jnp.linspace(0.01, schedule.t_max * 0.99, 7)
    grads = jax.vmap(jax.grad(schedule.beta_integral))(ts)
    np.testing.assert_allclose(schedule.beta(ts), grads, rtol=1e-10)
    self.assertAlmostEqual(float(schedule.beta_integral(0.0)), 0.0, places=12)

  @parameterized.named_parameters(*[(k, v) for k, v in SCHEDULES.items()])
  def test_marginals_solve_moment_odes(self, schedule):
    """α(t), σ(t)² solve the moment ODEs of dx = −½β x dt + √β dW from (1, 0) (scipy)."""

    def rhs(t, y):
      beta = float(schedule.beta(t))
      return [-0.5 * beta * y[0], beta * (1.0 - y[1])]

    t_end = 0.9 * schedule.t_max
    sol = scipy.integrate.solve_ivp(rhs, (0.0, t_end), [1.0, 0.0], rtol=1e-11, atol=1e-12)
    self.assertAlmostEqual(float(sde.marginal_mean_coeff(schedule, t_end)), sol.y[0, -1], places=8)
    self.assertAlmostEqual(float(sde.marginal_std(schedule, t_end)) ** 2, sol.y[1, -1], places=8)

  def test_constant_schedule_is_papers_ou(self):
    """β = 2: mean e^{−t}, variance 1 − e^{−2t}, OU time = t and drift −(x + score) (Eq. 9)."""
    sched = SCHEDULES["constant"]
    t = 0.7
    self.assertAlmostEqual(float(sde.marginal_mean_coeff(sched, t)), np.exp(-t), places=14)
    self.assertAlmostEqual(float(sde.marginal_std(sched, t)) ** 2, 1 - np.exp(-2 * t), places=14)
    self.assertAlmostEqual(float(sde.ou_time(sched, t)), t, places=14)
    x = jnp.array([0.3, -1.2])
    drift = sde.probability_flow_drift(sched, lambda x, t: -2.0 * x)
    np.testing.assert_allclose(drift(t, x), -(x - 2.0 * x))

  def test_cosine_matches_nichol_dhariwal(self):
    """ᾱ(t) = exp(−B(t)) equals cos²(π/2 (t+s)/(1+s)) / cos²(π/2 s/(1+s))."""
    sched = SCHEDULES["cosine"]
    t = np.linspace(0.0, 0.99, 9)
    f = lambda u: np.cos(0.5 * np.pi * (u + 0.008) / 1.008) ** 2
    np.testing.assert_allclose(np.exp(-np.asarray(sched.beta_integral(t))), f(t) / f(0.0), rtol=1e-12)

  def test_ddpm_discretization_links_to_continuous_time(self):
    """DDPM's 1000-step −log ᾱ_i = B(t_i) + Σ_{j≤i} β_j²/2 + O(N⁻¹) at t_i = (i+1)/N.

    (−log(1 − β) = β + β²/2 + …; the β² term makes ᾱ_999 about 7% below exp(−B(1)).)
    """
    disc = sde.DiscreteSchedule()
    self.assertAlmostEqual(float(disc.betas()[0]), 1e-4)
    self.assertAlmostEqual(float(disc.betas()[-1]), 0.02)
    cont = disc.continuous_schedule()
    self.assertEqual((cont.beta_min, cont.beta_max), (0.1, 20.0))
    i = jnp.arange(disc.num_steps)
    gap = -jnp.log(disc.alphas_cumprod()) - cont.beta_integral(disc.continuous_time(i))
    second_order = jnp.cumsum(disc.betas() ** 2) / 2
    np.testing.assert_allclose(gap, second_order, atol=3e-3)  # O(1/N) grid offset

  def test_perturb_moments(self):
    """x_t = α x0 + σ ε has mean α x0 and variance σ² (Monte Carlo, 200k draws)."""
    sched = SCHEDULES["linear"]
    x0 = jnp.full((200_000, 1), 1.5)
    xt, noise = sde.perturb(sched, jax.random.PRNGKey(0), x0, jnp.full((200_000,), 0.3))
    alpha, sigma = sde.marginal_mean_coeff(sched, 0.3), sde.marginal_std(sched, 0.3)
    self.assertAlmostEqual(float(xt.mean()), float(alpha * 1.5), delta=4 * float(sigma) / 447)
    self.assertAlmostEqual(float(xt.std()), float(sigma), delta=0.01)
    np.testing.assert_allclose(xt, alpha * x0 + sigma * noise, rtol=1e-12)

  def test_unknown_schedule_is_a_clear_error(self):
    """make_schedule names the valid choices."""
    with self.assertRaisesRegex(ValueError, "constant"):
      sde.make_schedule("quadratic")


if __name__ == "__main__":
  absltest.main()
