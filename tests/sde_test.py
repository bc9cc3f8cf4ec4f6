"""VP-SDE schedules and marginals against autodiff, moment ODEs and Monte Carlo."""
from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import scipy.integrate

from ddpm_ot_jax import sde

import helpers

SCHEDULES = {
    "linear": sde.LinearSchedule(),
    "cosine": sde.CosineSchedule(),
    "constant": sde.ConstantSchedule(),
}


class ScheduleTest(helpers.Float64ParameterizedTestCase):

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

  def test_perturb_matches_euler_maruyama(self):
    """perturb(t) samples the forward SDE dx = −½β x dt + √β dW: for x0 ~ N(1.5, 0.5²) in 2-D,
    the mean, variance and Cov(x0, x_t) of perturb's samples and of an Euler–Maruyama solution
    of the SDE (600 steps) agree with each other and with α μ, α² v + σ², α v (Monte Carlo,
    200k draws per coordinate; tolerances ~5 standard errors); the returned noise is the ε of
    x_t = α x0 + σ ε."""
    sched = SCHEDULES["linear"]
    n, t, steps = 200_000, 0.3, 600
    x0 = 1.5 + 0.5 * jax.random.normal(jax.random.PRNGKey(0), (n, 2))
    xt, noise = sde.perturb(sched, jax.random.PRNGKey(1), x0, jnp.full((n,), t))
    dt = t / steps

    def em_step(i, x):
      beta = sched.beta(i * dt)
      dw = jnp.sqrt(dt) * jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(2), i), x.shape)
      return x - 0.5 * beta * x * dt + jnp.sqrt(beta) * dw

    x_em = jax.lax.fori_loop(0, steps, em_step, x0)
    alpha, sigma = float(sde.marginal_mean_coeff(sched, t)), float(sde.marginal_std(sched, t))
    want = {"mean": alpha * 1.5, "var": alpha**2 * 0.25 + sigma**2, "cov": alpha * 0.25}
    for name, x in (("perturb", xt), ("euler_maruyama", x_em)):
      got = {"mean": x.mean(0), "var": x.var(0), "cov": jnp.mean((x0 - x0.mean(0)) * (x - x.mean(0)), 0)}
      se = {"mean": np.sqrt(want["var"] / n), "var": want["var"] * np.sqrt(2.0 / n), "cov": np.sqrt(want["var"] * 0.25 / n)}
      for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=5 * se[key] + 2e-3 * abs(want[key]), err_msg=f"{name} {key}")
    np.testing.assert_allclose(xt.mean(0), x_em.mean(0), atol=10 * np.sqrt(want["var"] / n))
    np.testing.assert_allclose(xt, alpha * x0 + sigma * noise, rtol=1e-12)

  @parameterized.named_parameters(*[(k, v) for k, v in SCHEDULES.items()])
  def test_time_from_ou_time_inverts_ou_time(self, schedule):
    """s(time_from_ou_time(s)) = s over the schedule's range, the end maps to t_max, a generic
    schedule (bisection) gives the closed form's answer, and an OU time past the end is a
    ValueError that names the range."""
    s_max = float(sde.ou_time(schedule, schedule.t_max))
    for s in (0.0, 1e-4, 0.3, 0.5 * s_max, s_max):
      t = sde.time_from_ou_time(schedule, s)
      self.assertBetween(t, 0.0, schedule.t_max)
      self.assertAlmostEqual(float(sde.ou_time(schedule, t)), s, delta=1e-12 * max(1.0, s))

    class Wrapped:  # not one of the known classes: time_from_ou_time bisects
      t_max = schedule.t_max
      beta, beta_integral = schedule.beta, schedule.beta_integral

    self.assertAlmostEqual(sde.time_from_ou_time(Wrapped(), 0.5 * s_max),
                           sde.time_from_ou_time(schedule, 0.5 * s_max), places=12)
    with self.assertRaisesRegex(ValueError, "outside"):
      sde.time_from_ou_time(schedule, 1.01 * s_max)

  def test_make_schedule_until_ou_time(self):
    """'constant' reaches any OU time with t_end = s; 'linear' and 'cosine' map s onto their own
    clock and refuse an s beyond their end (the garbage the cosine's tan would give past t = 1)."""
    sched, t_end = sde.make_schedule_until_ou_time("constant", 16.0)
    self.assertEqual((sched.t_max, t_end), (16.0, 16.0))
    for name in ("linear", "cosine"):
      sched, t_end = sde.make_schedule_until_ou_time(name, 4.0)
      self.assertLess(t_end, sched.t_max)
      self.assertAlmostEqual(float(sde.ou_time(sched, t_end)), 4.0, places=12)
      with self.assertRaisesRegex(ValueError, "constant"):
        sde.make_schedule_until_ou_time(name, 16.0)

  def test_unknown_schedule_is_a_clear_error(self):
    """make_schedule names the valid choices."""
    with self.assertRaisesRegex(ValueError, "constant"):
      sde.make_schedule("quadratic")


if __name__ == "__main__":
  absltest.main()
