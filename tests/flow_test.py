"""The diffrax probability-flow encoder against Theorem 3.1, finite differences and counts."""
from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_ot_jax import flow
from ddpm_ot_jax import gaussian
from ddpm_ot_jax import gmm
from ddpm_ot_jax import ot
from ddpm_ot_jax import sde

import helpers

TIGHT = flow.SolverOptions(rtol=1e-9, atol=1e-9)


class FlowTest(helpers.Float64ParameterizedTestCase):

  def setUp(self):
    super().setUp()
    self.mean, self.cov = gaussian.random_gaussian(jax.random.PRNGKey(0), 4, 0.2, 5.0)
    self.x = self.mean + jax.random.normal(jax.random.PRNGKey(1), (6, 4)) @ gaussian.sqrtm_spd(self.cov)

  @parameterized.parameters("constant", "linear", "cosine")
  def test_encoder_matches_theorem_31(self, schedule_name):
    """encode == E(s, x) of Theorem 3.1 at the OU time s = ½B(T), for every schedule."""
    sched = sde.make_schedule(schedule_name)
    sol = flow.encode(sched, gaussian.score_fn(sched, self.mean, self.cov), self.x, options=TIGHT)
    expected = gaussian.encoder_at(self.x, self.mean, self.cov, sde.ou_time(sched, sched.t_max))
    np.testing.assert_allclose(sol.x, expected, atol=1e-7)

  def test_decoder_inverts_encoder_and_trajectory_is_saved(self):
    """decode(encode(x)) = x; the trajectory starts at x and passes the closed form at ts."""
    sched = sde.ConstantSchedule(t_max=6.0)
    score = gaussian.score_fn(sched, self.mean, self.cov)
    ts = jnp.array([0.0, 1.0, 3.0])
    enc = flow.encode(sched, score, self.x, options=TIGHT, save_ts=ts)
    np.testing.assert_allclose(enc.trajectory[:, 0], self.x, atol=1e-12)
    np.testing.assert_allclose(enc.trajectory[:, 2], gaussian.encoder_at(self.x, self.mean, self.cov, 3.0), atol=1e-7)
    dec = flow.decode(sched, score, enc.x, options=TIGHT)
    np.testing.assert_allclose(dec.x, self.x, atol=1e-6)

  @parameterized.parameters("tsit5", "dopri5", "heun")
  def test_nfe_counts_every_vector_field_call(self, solver):
    """The reported NFE equals the number of vector-field calls counted by a host callback."""
    calls = []

    def field(t, x):
      jax.debug.callback(lambda: calls.append(1))
      return -x * (1.0 + t)

    sol = flow.solve(field, jnp.ones((1, 3)), 0.0, 2.0, flow.SolverOptions(solver, 1e-6, 1e-6))
    jax.effects_barrier()
    self.assertEqual(int(sol.nfe[0]), len(calls))

  def test_jacobian_matches_exact_and_finite_differences(self):
    """J of the Gaussian encoder = V diag f Vᵀ (symmetric); J of a GMM encoder = central FD."""
    sched = sde.ConstantSchedule(t_max=8.0)
    jac = flow.encoder_jacobian(sched, gaussian.score_fn(sched, self.mean, self.cov), self.x[:2], options=TIGHT)
    lam, vecs = jnp.linalg.eigh(self.cov)
    np.testing.assert_allclose(jac[0], (vecs * gaussian.flow_f(lam, 8.0)) @ vecs.T, atol=1e-7)
    self.assertLess(float(ot.jacobian_asymmetry(jac).max()), 1e-10)

    mixture = gmm.random_mixture(jax.random.PRNGKey(5), dims=2, num_components=3)
    score = gmm.score_fn(mixture, sched)
    x = gmm.sample(mixture, jax.random.PRNGKey(6), 2)
    jac = flow.encoder_jacobian(sched, score, x, options=TIGHT)
    h = 1e-5
    for j in range(2):
      e = jnp.zeros(2).at[j].set(h)
      fd = (flow.encode(sched, score, x + e, options=TIGHT).x - flow.encode(sched, score, x - e, options=TIGHT).x) / (2 * h)
      np.testing.assert_allclose(jac[:, :, j], fd, atol=1e-5)

  def test_mixture_encoder_reaches_standard_normal(self):
    """The GMM encoder pushes μ0 to N(0, I): codes have mean 0 and covariance I (MC, n=4000)."""
    sched = sde.ConstantSchedule(t_max=12.0)
    mixture = gmm.random_mixture(jax.random.PRNGKey(7), dims=2, num_components=3)
    x = gmm.sample(mixture, jax.random.PRNGKey(8), 4000)
    codes = flow.encode(sched, gmm.score_fn(mixture, sched), x, options=flow.SolverOptions(rtol=1e-6, atol=1e-6)).x
    np.testing.assert_allclose(codes.mean(0), 0.0, atol=0.07)
    np.testing.assert_allclose(jnp.cov(codes.T), jnp.eye(2), atol=0.1)

  def test_bad_solver_options_are_clear_errors(self):
    """Unknown solver names and non-positive tolerances raise ValueError naming the problem."""
    with self.assertRaisesRegex(ValueError, "tsit5"):
      flow.SolverOptions(solver="euler")
    with self.assertRaisesRegex(ValueError, "positive"):
      flow.SolverOptions(rtol=0.0)


if __name__ == "__main__":
  absltest.main()
