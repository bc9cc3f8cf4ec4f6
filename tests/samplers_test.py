"""Samplers against exact answers: exact Gaussian / Gaussian-mixture scores in place of a network.

The scores are built on the samplers' own continuous-time view of the DDPM schedule
(`samplers.noise_schedule`), so the closed forms are the exact answers and what remains is
each sampler's discretisation error and Monte-Carlo error.
"""
import functools
import textwrap

from absl.testing import absltest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_ot_jax import flow
from ddpm_ot_jax import gaussian
from ddpm_ot_jax import gmm
from ddpm_ot_jax import samplers
from ddpm_ot_jax import sde

import helpers

DS = sde.DiscreteSchedule()
VIEW = samplers.noise_schedule(DS)
TIGHT = flow.SolverOptions(rtol=1e-10, atol=1e-10)


class CountingEps:
  """An eps_fn that counts its executions with a host callback (one per network call).

  One object per problem, so the samplers' compiled loops are shared between tests.
  """

  def __init__(self, eps_fn):
    self.eps_fn = eps_fn
    self.calls = 0

  def _increment(self):
    self.calls += 1

  def __call__(self, x, t_index):
    jax.debug.callback(self._increment)
    return self.eps_fn(x, t_index)

  def calls_since(self, start: int) -> int:
    jax.effects_barrier()
    return self.calls - start


@functools.cache
def gaussian_problem(dims: int = 4):
  mean, cov = gaussian.random_gaussian(jax.random.key(0), dims)
  eps_fn = samplers.eps_fn_from_score(gaussian.score_fn(VIEW, mean, cov), DS, VIEW)
  return mean, cov, CountingEps(eps_fn)


@functools.cache
def mixture_problem():
  mixture = gmm.random_mixture(jax.random.key(5), 3, 3, mean_scale=1.5, eig_min=0.05, eig_max=0.5)
  eps_fn = samplers.eps_fn_from_score(gmm.score_fn(mixture, VIEW), DS, VIEW)
  return mixture, CountingEps(eps_fn)


@functools.cache
def mixture_reference():
  """64 prior points and their PF-ODE images at step 0 denoised to t = 0 (x̂_0 at step 0)."""
  _, eps_fn = mixture_problem()
  x_T = jax.random.normal(jax.random.key(1), (64, 3))
  return x_T, samplers.pf_ode(eps_fn, DS, x_T, TIGHT, denoise_to_zero=True).x


def rms(a, b):
  return float(jnp.sqrt(jnp.mean((a - b) ** 2)))


def mixture_moments(mixture):
  w = mixture.weights
  mean = w @ mixture.means
  outer = jnp.einsum("ki,kj->kij", mixture.means, mixture.means)
  return mean, jnp.einsum("k,kij->ij", w, mixture.covs + outer) - jnp.outer(mean, mean)


def z_scores(x, mean, cov):
  """max |sample moment − exact| / standard error, for the mean and the covariance entries."""
  n = x.shape[0]
  centred = x - x.mean(0)
  se_mean = centred.std(0) / np.sqrt(n)
  se_cov = (centred[:, :, None] * centred[:, None, :]).std(0) / np.sqrt(n)
  z_mean = jnp.abs(x.mean(0) - mean) / se_mean
  z_cov = jnp.abs(jnp.cov(x.T) - cov) / se_cov
  return float(jnp.max(z_mean)), float(jnp.max(z_cov))


class SamplerTestCase(helpers.Float64TestCase):

  def counted(self, eps_fn: CountingEps, run, expected_nfe=None) -> samplers.SampleResult:
    """Runs `run()`; checks its reported NFE against eps_fn's executions (and expected_nfe)."""
    start = eps_fn.calls
    result = run()
    jax.block_until_ready(result.x)
    self.assertIsInstance(result.nfe, int)
    self.assertEqual(result.nfe, eps_fn.calls_since(start))
    if expected_nfe is not None:
      self.assertEqual(result.nfe, expected_nfe)
    return result


class ScheduleViewTest(SamplerTestCase):

  def test_discrete_view_interpolates_alphas_cumprod(self):
    """log α(t_i) = ½ log ᾱ_i at t_i = (i+1)/N; β = dB/dt inside the intervals; λ⁻¹∘λ = id."""
    i = jnp.arange(DS.num_steps)
    np.testing.assert_allclose(
        VIEW.log_alpha(DS.continuous_time(i)), 0.5 * jnp.log(DS.alphas_cumprod()), rtol=1e-12)
    self.assertEqual(float(VIEW.log_alpha(0.0)), 0.0)
    t_mid = (jnp.arange(0, 1000, 37) + 0.5) / DS.num_steps
    np.testing.assert_allclose(VIEW.beta(t_mid), jax.vmap(jax.grad(VIEW.beta_integral))(t_mid),
                               rtol=1e-9)
    t = jnp.linspace(1e-3, 1.0, 50)
    np.testing.assert_allclose(
        sde.time_of_half_log_snr(VIEW, sde.half_log_snr(VIEW, t)), t, rtol=1e-9)

  def test_continuous_view_encoder_matches_theorem_3_1(self):
    """On the linear-SDE view, with the score built on DS.continuous_schedule() and
    eps_fn_from_score's default σ, the ODE encoder is Theorem 3.1's flow (1e-6)."""
    linear = DS.continuous_schedule()
    view = samplers.ContinuousTimeSchedule(linear, DS.num_steps)
    t = jnp.linspace(0.01, 0.99, 9)
    np.testing.assert_allclose(
        sde.time_of_half_log_snr(view, sde.half_log_snr(view, t)), t, rtol=1e-10)
    mean, cov = gaussian.random_gaussian(jax.random.key(2), 3)
    eps_fn = samplers.eps_fn_from_score(gaussian.score_fn(linear, mean, cov), DS)
    data = mean + jax.random.normal(jax.random.key(4), (64, 3))
    s = lambda i: sde.ou_time(linear, samplers.time_of_index(view, i))
    x_start = gaussian.encoder_at(data, mean, cov, s(0.0))
    latent = samplers.ode_encode(eps_fn, view, x_start, flow.SolverOptions(rtol=1e-9, atol=1e-9))
    np.testing.assert_allclose(latent.x, gaussian.encoder_at(data, mean, cov, s(999.0)),
                               atol=1e-6)


class ExactScoreTest(SamplerTestCase):

  def test_ddpm_ancestral_matches_mixture_moments(self):
    """4000 DDPM samples (all 1000 steps) of a 3-component mixture in 3-D: mean and
    covariance within 5 standard errors of the exact ones; NFE 1000."""
    mixture, eps_fn = mixture_problem()
    x_T = jax.random.normal(jax.random.key(12), (4000, 3))
    result = self.counted(
        eps_fn, lambda: samplers.ddpm_ancestral(eps_fn, DS, x_T, jax.random.key(13)), 1000)
    z_mean, z_cov = z_scores(result.x, *mixture_moments(mixture))
    self.assertLess(z_mean, 5.0)
    self.assertLess(z_cov, 5.0)

  def test_start_from_intermediate_step(self):
    """x_M from the exact marginal at step M = 200, then DDPM (201 steps), DDIM (50 steps) and
    DPM-Solver++-3 (19 steps + denoising) to the data: mixture moments within 5 s.e.; NFE
    201, 50, 20."""
    mixture, eps_fn = mixture_problem()
    m = 200
    marginal = gmm.marginal(mixture, VIEW, samplers.time_of_index(VIEW, m))
    x_m = gmm.sample(marginal, jax.random.key(14), 4000)
    moments = mixture_moments(mixture)
    runs = {
        "ddpm": (lambda: samplers.ddpm_ancestral(eps_fn, DS, x_m, jax.random.key(15),
                                                 start_index=m), m + 1),
        "ddim": (lambda: samplers.ddim(eps_fn, DS, x_m, 50, start_index=m), 50),
        "dpm_solver": (lambda: samplers.dpm_solver(eps_fn, DS, x_m, 19, order=3, start_index=m,
                                                   denoise_to_zero=True), 20),
    }
    for name, (run, nfe) in runs.items():
      result = self.counted(eps_fn, run, nfe)
      z_mean, z_cov = z_scores(result.x, *moments)
      self.assertLess(z_mean, 5.0, name)
      self.assertLess(z_cov, 5.0, name)

  def test_pf_ode_encoder_matches_theorem_3_1(self):
    """ode_encode from step 0 to N−1 equals Theorem 3.1's flow E(s_{N−1}) ∘ E(s_0)⁻¹ in 8-D
    (1e-6 at rtol = atol = 1e-9), and the ODE round trip (decode with pf_ode) is within 1e-6."""
    mean, cov, eps_fn = gaussian_problem(8)
    data = mean + jax.random.normal(jax.random.key(20), (64, 8)) @ gaussian.sqrtm_spd(cov)
    s = lambda i: sde.ou_time(VIEW, samplers.time_of_index(VIEW, i))
    x_start = gaussian.encoder_at(data, mean, cov, s(0.0))
    start = eps_fn.calls
    trip = samplers.round_trip(eps_fn, DS, x_start, "ode",
                               options=flow.SolverOptions(rtol=1e-9, atol=1e-9))
    self.assertEqual(trip.nfe, eps_fn.calls_since(start))
    np.testing.assert_allclose(trip.latent, gaussian.encoder_at(data, mean, cov, s(999.0)),
                               atol=1e-6)
    np.testing.assert_allclose(trip.reconstruction, x_start, atol=1e-6)
    self.assertLess(float(jnp.max(trip.error)), 1e-6)

  def test_ddim_converges_to_pf_ode(self):
    """DDIM (η = 0) with 100, 300, 1000 steps → the PF-ODE solution (denoised at step 0, as
    DDIM's last step predicts x_0): the error falls monotonically, at first order."""
    _, eps_fn = mixture_problem()
    x_T, reference = mixture_reference()
    errors = []
    for n in (100, 300, 1000):
      result = self.counted(eps_fn, lambda: samplers.ddim(eps_fn, DS, x_T, n), n)
      errors.append(rms(result.x, reference))
    self.assertGreater(errors[0], errors[1])
    self.assertGreater(errors[1], errors[2])
    self.assertLess(errors[2], errors[0] / 5.0)
    self.assertLess(errors[2], 5e-3)

  def test_dpm_solver_beats_ddim_at_equal_nfe(self):
    """At 10 and 20 NFE, DPM-Solver++-3 (NFE − 1 steps, then denoising) is ≥ 1.5× closer to
    the denoised PF-ODE solution than DDIM; at 20 NFE the noise-prediction DPM-Solver-3 too."""
    _, eps_fn = mixture_problem()
    x_T, reference = mixture_reference()
    ddim_error = {}
    for nfe in (10, 20):
      ddim = self.counted(eps_fn, lambda: samplers.ddim(eps_fn, DS, x_T, nfe), nfe)
      ddim_error[nfe] = rms(ddim.x, reference)
      dpm = self.counted(eps_fn, lambda: samplers.dpm_solver(
          eps_fn, DS, x_T, nfe - 1, order=3, denoise_to_zero=True), nfe)
      self.assertLess(1.5 * rms(dpm.x, reference), ddim_error[nfe], nfe)
    dpm_noise = self.counted(eps_fn, lambda: samplers.dpm_solver(
        eps_fn, DS, x_T, 19, order=3, variant="dpmsolver", denoise_to_zero=True), 20)
    self.assertLess(1.5 * rms(dpm_noise.x, reference), ddim_error[20])

  def test_dpm_solver_order_two_converges_at_second_order(self):
    """Multistep DPM-Solver-2 (2M), both variants, through `samplers.sample` (order and
    variant passed through), S = 19 and 39 steps plus denoising (NFE 20, 40): the error to the
    exact PF-ODE solution (the tight diffrax solve, denoised) falls by ≈ (39/19)² ≈ 4
    (between 3 and 5) when the steps double, against DDIM's first-order ≈ 2 (1.7–2.3), and is
    ≥ 4× below DDIM's at equal NFE."""
    _, eps_fn = mixture_problem()
    x_T, reference = mixture_reference()
    ddim = {nfe: rms(self.counted(eps_fn, lambda: samplers.ddim(eps_fn, DS, x_T, nfe), nfe).x,
                     reference) for nfe in (20, 40)}
    self.assertBetween(ddim[20] / ddim[40], 1.7, 2.3)
    for variant in ("dpmsolver++", "dpmsolver"):
      errors = {}
      for nfe in (20, 40):
        result = self.counted(eps_fn, lambda: samplers.sample(
            "dpm_solver", eps_fn, DS, x_T, num_steps=nfe - 1, order=2, variant=variant,
            denoise_to_zero=True), nfe)
        errors[nfe] = rms(result.x, reference)
        self.assertLess(4.0 * errors[nfe], ddim[nfe], (variant, nfe))
      self.assertBetween(errors[20] / errors[40], 3.0, 5.0, variant)

  def test_ddim_inversion_round_trips(self):
    """ddim_invert then ddim on mixture samples: mean RMS error < 0.03 at 300 steps and 2.5×
    smaller than at 100 (first order); NFE 2 × 300 counted."""
    mixture, eps_fn = mixture_problem()
    x0 = gmm.sample(mixture, jax.random.key(30), 64)
    coarse = samplers.round_trip(eps_fn, DS, x0, "ddim", num_steps=100)
    start = eps_fn.calls
    fine = samplers.round_trip(eps_fn, DS, x0, "ddim", num_steps=300)
    self.assertEqual(fine.nfe, eps_fn.calls_since(start))
    self.assertEqual(fine.nfe, 600)
    self.assertLess(float(jnp.mean(fine.error)), 0.03)
    self.assertLess(2.5 * float(jnp.mean(fine.error)), float(jnp.mean(coarse.error)))


class IdentityTest(SamplerTestCase):

  def test_ddim_eta_one_is_ddpm_with_beta_tilde(self):
    """DDIM with η = 1 on every integer step from 99 equals DDPM ancestral with β̃ variance and
    the same noise keys (DDIM paper, §4.1), to 1e-10; NFE 100 each."""
    _, _, eps_fn = gaussian_problem()
    x = jax.random.normal(jax.random.key(40), (32, 4))
    key = jax.random.key(41)
    ddpm = self.counted(eps_fn, lambda: samplers.ddpm_ancestral(
        eps_fn, DS, x, key, start_index=99, variance="beta_tilde"), 100)
    ddim = self.counted(eps_fn, lambda: samplers.ddim(
        eps_fn, DS, x, 100, eta=1.0, key=key, start_index=99), 100)
    np.testing.assert_allclose(ddim.x, ddpm.x, atol=1e-10)

  def test_dpm_solver_order_one_is_ddim(self):
    """DPM-Solver-1 on a time-uniform grid plus denoising equals DDIM on the same grid
    (Lu et al. 2022, §4.1), to 1e-10, for both parameterisations; NFE 12 each."""
    _, _, eps_fn = gaussian_problem()
    x = jax.random.normal(jax.random.key(42), (32, 4))
    ddim = self.counted(eps_fn, lambda: samplers.ddim(eps_fn, DS, x, 12), 12)
    for variant in ("dpmsolver++", "dpmsolver"):
      dpm = self.counted(eps_fn, lambda: samplers.dpm_solver(
          eps_fn, DS, x, 11, order=1, variant=variant, spacing="time_uniform",
          denoise_to_zero=True), 12)
      np.testing.assert_allclose(dpm.x, ddim.x, atol=1e-10)

  def test_multistep_update_exact_for_polynomials(self):
    """One multistep update against the exact exponential integral (closed form) when the
    model output is a polynomial in λ on a non-uniform λ grid: with solver_type 'taylor',
    order k is exact (1e-12) for degree < k, both parameterisations; Lu et al.'s reference
    ('dpmsolver') order 3 is exact for degree ≤ 1 but not for a quadratic."""
    lams = np.array([-1.0, -0.6, -0.3])
    lam_t = 0.1
    log_alpha = lambda lam: -0.5 * np.logaddexp(0.0, -2.0 * lam)
    sigma = lambda lam: np.sqrt(-np.expm1(2.0 * log_alpha(lam)))
    x = jnp.full((1, 1), 0.5)

    def exact(variant, c):
      if variant == "dpmsolver++":  # x_t = σ_t/σ_s x_s + σ_t ∫ e^λ m(λ) dλ
        prim = lambda l: np.exp(l) * (c[0] + c[1] * (l - 1) + c[2] * (l * l - 2 * l + 2))
        return sigma(lam_t) / sigma(lams[2]) * 0.5 + sigma(lam_t) * (prim(lam_t) - prim(lams[2]))
      # dpmsolver: x_t = α_t/α_s x_s − α_t ∫ e^{−λ} m(λ) dλ
      prim = lambda l: -np.exp(-l) * (c[0] + c[1] * (l + 1) + c[2] * (l * l + 2 * l + 2))
      return (np.exp(log_alpha(lam_t) - log_alpha(lams[2])) * 0.5
              - np.exp(log_alpha(lam_t)) * (prim(lam_t) - prim(lams[2])))

    def error(variant, solver_type, order, c):
      models = jnp.asarray([c[0] + c[1] * l + c[2] * l * l for l in lams]).reshape(3, 1, 1)
      got = samplers._multistep_update(
          variant, solver_type, order, x, models, jnp.asarray(lams), lam_t,
          log_alpha(lam_t), sigma(lam_t), log_alpha(lams[2]), sigma(lams[2]))
      return abs(float(got[0, 0]) - exact(variant, c))

    polys = {0: (0.3, 0.0, 0.0), 1: (0.3, -0.7, 0.0), 2: (0.3, -0.7, 0.25)}
    for variant in ("dpmsolver++", "dpmsolver"):
      for order in (1, 2, 3):
        for degree in range(order):
          self.assertLess(error(variant, "taylor", order, polys[degree]), 1e-12,
                          (variant, order, degree))
      self.assertLess(error(variant, "dpmsolver", 3, polys[1]), 1e-12)
      self.assertGreater(error(variant, "dpmsolver", 3, polys[2]), 1e-4)

  def test_dpm_solver_nfe_and_orders(self):
    """NFE = requested steps for multistep DPM-Solver-3 with warm-up and lower-order final
    steps from a fractional start index, counted against eps_fn executions; the order plan."""
    _, _, eps_fn = gaussian_problem()
    x = jax.random.normal(jax.random.key(43), (32, 4))
    self.counted(eps_fn, lambda: samplers.dpm_solver(eps_fn, DS, x, 7, order=3,
                                                     start_index=300.5), 7)
    self.assertEqual(samplers.dpm_solver_orders(7, 3), [1, 2, 3, 3, 3, 2, 1])
    self.assertEqual(samplers.dpm_solver_orders(12, 3), [1, 2] + [3] * 10)

  def test_runs_under_outer_jit(self):
    """Samplers trace inside an outer jax.jit: same x, NFE as a traced int."""
    _, _, eps_fn = gaussian_problem()
    x = jax.random.normal(jax.random.key(44), (32, 4))
    eager = samplers.ddim(eps_fn, DS, x, 12)
    jitted = jax.jit(lambda x: samplers.ddim(eps_fn, DS, x, 12))(x)
    np.testing.assert_allclose(jitted.x, eager.x, atol=1e-12)
    self.assertEqual(int(jitted.nfe), 12)

  def test_model_eps_fn_passes_params_as_arguments(self):
    """model_eps_fn calls apply({'params': p}, x, t, y, train=False); new params reuse the
    compiled loop (no recompilation) and change the result."""

    class TinyEps(nn.Module):

      @nn.compact
      def __call__(self, x, t_index, y=None, train=False):
        h = jnp.concatenate([x, t_index[:, None] / 1000.0], axis=-1)
        return nn.Dense(x.shape[-1])(jnp.tanh(nn.Dense(16)(h)))

    model = TinyEps()
    x = jax.random.normal(jax.random.key(45), (8, 3))
    params_a = model.init(jax.random.key(46), x, jnp.zeros(8))["params"]
    params_b = model.init(jax.random.key(47), x, jnp.zeros(8))["params"]
    eps_a = samplers.model_eps_fn(model.apply, params_a)
    np.testing.assert_allclose(
        eps_a(x, jnp.full(8, 3.0)), model.apply({"params": params_a}, x, jnp.full(8, 3.0)))
    result_a = samplers.ddim(eps_a, DS, x, 4)
    cache_size = samplers._ddim_loop._cache_size()
    result_b = samplers.ddim(samplers.model_eps_fn(model.apply, params_b), DS, x, 4)
    self.assertEqual(samplers._ddim_loop._cache_size(), cache_size)
    self.assertGreater(float(jnp.max(jnp.abs(result_a.x - result_b.x))), 1e-6)

  def test_bad_arguments_raise_value_error(self):
    """User errors stop with a ValueError naming the fix."""
    _, _, eps_fn = gaussian_problem()
    x = jnp.zeros((2, 4))
    with self.assertRaisesRegex(ValueError, "key"):
      samplers.ddim(eps_fn, DS, x, 5, eta=1.0)
    with self.assertRaisesRegex(ValueError, "order"):
      samplers.dpm_solver(eps_fn, DS, x, 5, order=4)
    with self.assertRaisesRegex(ValueError, "choose one of"):
      samplers.sample("euler", eps_fn, DS, x, num_steps=5)
    with self.assertRaisesRegex(ValueError, "start_index"):
      samplers.ddpm_ancestral(eps_fn, DS, x, jax.random.key(0), start_index=1000)
    with self.assertRaisesRegex(ValueError, "max_steps"):
      samplers.pf_ode(eps_fn, DS, x + 1.0, flow.SolverOptions(rtol=1e-9, atol=1e-9, max_steps=4))


class SpacingTest(SamplerTestCase):

  def test_spacings_have_exact_endpoints_and_equal_increments(self):
    """step_indices for every spacing, on the discrete view and the linear-SDE view, from an
    integer and a fractional start: exact endpoints, strictly decreasing, and equal increments
    of the spaced variable (λ for 'logSNR', √t for 'time_quadratic', i for 'time_uniform') to
    1e-9 of a step; 'time_quadratic' is Lu et al.'s (√t_start + k (√t_end − √t_start)/S)²."""
    views = (VIEW, samplers.ContinuousTimeSchedule(DS.continuous_schedule(), DS.num_steps))
    spaced = {
        "logSNR": sde.half_log_snr,
        "time_uniform": lambda view, t: samplers.index_of_time(view, t),
        "time_quadratic": lambda view, t: jnp.sqrt(t),
    }
    self.assertEqual(set(spaced), set(samplers.SPACINGS))
    for view in views:
      for start, end, points in ((999, 0, 11), (600.5, 3.0, 6)):
        for spacing, variable in spaced.items():
          index = samplers.step_indices(view, points, start, end, spacing)
          self.assertEqual(index.shape, (points,))
          self.assertEqual(float(index[0]), start)
          self.assertEqual(float(index[-1]), end)
          self.assertTrue(bool(jnp.all(jnp.diff(index) < 0)), (spacing, start))
          increments = jnp.diff(variable(view, samplers.time_of_index(view, index)))
          np.testing.assert_allclose(increments, increments[0], rtol=1e-9,
                                     err_msg=f"{spacing} {start}")
        t0, t1 = samplers.time_of_index(view, start), samplers.time_of_index(view, end)
        quadratic = (jnp.sqrt(t0) + jnp.arange(points) / (points - 1)
                     * (jnp.sqrt(t1) - jnp.sqrt(t0))) ** 2
        np.testing.assert_allclose(
            samplers.time_of_index(view, samplers.step_indices(
                view, points, start, end, "time_quadratic")), quadratic, rtol=1e-12)
    self.assertEqual(samplers.step_indices(VIEW, 1, 500, 0, "logSNR").tolist(), [500.0])
    with self.assertRaisesRegex(ValueError, "spacing"):
      samplers.step_indices(VIEW, 5, 999, 0, "quadratic")

  def test_ddim_spacing(self):
    """DDIM's default grid, spacing='time_uniform', is jnp.linspace(start, end, S) to the bit
    (the grid DDIM used before spacings existed: its results are unchanged) and gives the
    default's samples to the bit; 'logSNR' and 'time_quadratic' call the network S times at
    their own grids and give other samples."""
    _, _, eps_fn = gaussian_problem()
    x = jax.random.normal(jax.random.key(50), (32, 4))
    for start, end, steps in ((999, 0, 10), (600.5, 3, 7), (999, 0, 1)):
      np.testing.assert_array_equal(
          samplers.step_indices(VIEW, steps, start, end, "time_uniform"),
          jnp.linspace(start, end, steps))
    default = samplers.ddim(eps_fn, DS, x, 10)
    uniform = self.counted(eps_fn, lambda: samplers.ddim(eps_fn, DS, x, 10,
                                                        spacing="time_uniform"), 10)
    np.testing.assert_array_equal(uniform.x, default.x)
    for spacing in ("logSNR", "time_quadratic"):
      other = self.counted(eps_fn, lambda: samplers.sample(
          "ddim", eps_fn, DS, x, num_steps=10, spacing=spacing), 10)
      self.assertGreater(rms(other.x, default.x), 1e-3, spacing)


class RecordingEps(CountingEps):
  """A CountingEps that also keeps (x, t_index) of every call, in call order."""

  def __init__(self, eps_fn):
    super().__init__(eps_fn)
    self.inputs = []

  def _record(self, x, t_index):
    self.calls += 1
    self.inputs.append((np.asarray(x), np.asarray(t_index)))

  def __call__(self, x, t_index):
    jax.debug.callback(self._record, x, t_index, ordered=True)
    return self.eps_fn(x, t_index)


def diffusers_unipc(eps_fn, x, index, order, variant, lower_order_final):
  """diffusers' UniPCMultistepScheduler (data prediction, ε-model) on our grid `index`.

  Its own grid rounds the timesteps to integers, interpolates σ/α between them and ends at
  σ = 0 ('zero') or at timestep 0 ('sigma_min'); here its sigmas (σ/α = e^{−λ}) are set to
  those of our grid, ending at index[-1], so both solve the same problem. Returns the inputs
  x of its S network calls (stacked) and its output, in float64.
  """
  import diffusers  # pylint: disable=g-import-not-at-top  (the test-only reference)
  import torch  # pylint: disable=g-import-not-at-top
  lam = np.asarray(sde.half_log_snr(VIEW, samplers.time_of_index(VIEW, index)))
  scheduler = diffusers.UniPCMultistepScheduler(
      solver_order=order, solver_type=variant, predict_x0=True, prediction_type="epsilon",
      lower_order_final=lower_order_final)
  scheduler.set_timesteps(len(index) - 1)
  scheduler.sigmas = torch.from_numpy(np.exp(-lam))
  scheduler.set_begin_index(0)
  x = torch.from_numpy(np.array(x))
  inputs = []
  for k in range(len(index) - 1):
    inputs.append(x.numpy().copy())
    eps = eps_fn(jnp.asarray(x.numpy()), jnp.full((x.shape[0],), index[k]))
    x = scheduler.step(torch.from_numpy(np.array(eps)), scheduler.timesteps[k], x).prev_sample
  return np.stack(inputs), x.numpy()


class UniPCTest(SamplerTestCase):

  def test_unipc_matches_diffusers_step_for_step(self):
    """UniPC against diffusers' UniPCMultistepScheduler (an independent PyTorch
    implementation) on exact ε of 4-D Gaussian data in float64, both on our grid (diffusers'
    sigmas set to it: see diffusers_unipc): orders 2 and 3 × bh1 and bh2 with 16 logSNR steps
    from step 999 (warm-up, lower-order final steps at S ≥ 15), and order 3 bh2 without
    lower-order final steps on 7 time_quadratic steps from 600.5. The input of every network
    call (x_start, then each predicted point x̃_k, which follows each corrected x_{k−1}) and the
    output agree to 1e-10 (measured ~1e-14), the calls are at our grid's step indices; NFE = S."""
    _, _, counting = gaussian_problem()
    eps_fn = RecordingEps(counting.eps_fn)
    x = jax.random.normal(jax.random.key(60), (16, 4))
    cases = [(order, variant, 16, 999, "logSNR", True)
             for order in (2, 3) for variant in ("bh1", "bh2")]
    cases.append((3, "bh2", 7, 600.5, "time_quadratic", False))
    for order, variant, steps, start, spacing, lower_final in cases:
      case = (order, variant, spacing)
      eps_fn.inputs = []
      ours = self.counted(eps_fn, lambda: samplers.unipc(
          eps_fn, DS, x, steps, order=order, variant=variant, start_index=start,
          spacing=spacing, lower_order_final=lower_final), steps)
      index = np.asarray(samplers.step_indices(VIEW, steps + 1, start, 0.0, spacing))
      ref_inputs, ref_out = diffusers_unipc(counting.eps_fn, x, index, order, variant,
                                            lower_final)
      np.testing.assert_allclose(np.stack([t for _, t in eps_fn.inputs]),
                                 np.repeat(index[:-1, None], 16, axis=1), rtol=1e-13,
                                 err_msg=str(case))  # jitted vs eager grid: an ulp apart
      np.testing.assert_allclose(np.stack([x for x, _ in eps_fn.inputs]), ref_inputs,
                                 rtol=1e-10, atol=1e-10, err_msg=str(case))
      np.testing.assert_allclose(ours.x, ref_out, rtol=1e-10, atol=1e-10, err_msg=str(case))

  def test_unipc_convergence_order(self):
    """On exact scores of 4-D Gaussian data, x_T = Theorem 3.1's flow of 64 data points to step
    999, the error of x at step 0 to the closed form (gaussian.encoder_at on the view), logSNR
    steps. UniPC-p (UniP-p + UniC-p) is of order p + 1 where the corrector acts (Theorem 3.1):
    from S = 40 to 80 the error falls ≈ 2³ for p = 2 (6–11, measured 7.8 bh2, 8.4 bh1) and ≥ 2³
    for p = 3 (measured 9.4 both); p = 3 without lower-order final steps reaches order ≈ 4
    from 80 to 160 (ratio ≥ 2^3.5, measured 2^3.75). (With lower_order_final the last step is
    UniP-1, a DDIM step of local error O(h²) times dx̂_0/dλ ≈ 1e-4 there, so far out, beyond
    S ≈ 300 here, p = 3 tends to order 2.) At NFE 20 and 40 UniPC-p is ≥ 1.5× closer than
    DPM-Solver++ of the same order, default solver_type (measured p = 2: 1.6×, 3.1×; p = 3:
    25×, 21×); at NFE 5–10 on this problem it is not (UniPC-3 bh2 0.30/0.064 vs 0.22/0.071)."""
    mean, cov, eps_fn = gaussian_problem()
    data = mean + jax.random.normal(jax.random.key(61), (64, 4)) @ gaussian.sqrtm_spd(cov)
    s = lambda i: sde.ou_time(VIEW, samplers.time_of_index(VIEW, i))
    x_T = gaussian.encoder_at(data, mean, cov, s(999.0))
    exact = gaussian.encoder_at(data, mean, cov, s(0.0))

    def error(method, steps, **kwargs):
      result = self.counted(eps_fn, lambda: samplers.sample(
          method, eps_fn, DS, x_T, num_steps=steps, **kwargs), steps)
      return rms(result.x, exact)

    for order, low, high in ((2, 6.0, 11.0), (3, 8.0, 20.0)):
      for variant in samplers.UNIPC_VARIANTS:
        ratio = error("unipc", 40, order=order, variant=variant) / error(
            "unipc", 80, order=order, variant=variant)
        self.assertBetween(ratio, low, high, (order, variant))
      for nfe in (20, 40):
        self.assertLess(1.5 * error("unipc", nfe, order=order),
                        error("dpm_solver", nfe, order=order), (order, nfe))
    ratio = error("unipc", 80, order=3, lower_order_final=False) / error(
        "unipc", 160, order=3, lower_order_final=False)
    self.assertGreater(ratio, 2.0**3.5)

  def test_unipc_nfe_and_orders(self):
    """NFE = num_steps (counted executions) for UniPC-3 with 1 and 2 steps from a fractional
    start and 20 from step 999; its order plan lowers the final steps at every S (UniPC's code
    and diffusers), unlike DPM-Solver's below 10 steps only; bad order/variant raise
    ValueError."""
    _, _, eps_fn = gaussian_problem()
    x = jax.random.normal(jax.random.key(62), (64, 4))  # shaped as in the convergence test
    for steps, start in ((1, 300.5), (2, 300.5), (20, None)):
      self.counted(eps_fn, lambda: samplers.unipc(eps_fn, DS, x, steps, start_index=start),
                   steps)
    self.assertEqual(samplers.dpm_solver_orders(12, 3, lower_final_below=None),
                     [1, 2] + [3] * 8 + [2, 1])
    self.assertEqual(samplers.dpm_solver_orders(12, 3), [1, 2] + [3] * 10)
    self.assertIn("unipc", samplers.SAMPLERS)
    with self.assertRaisesRegex(ValueError, "order"):
      samplers.unipc(eps_fn, DS, x, 5, order=4)
    with self.assertRaisesRegex(ValueError, "variant"):
      samplers.unipc(eps_fn, DS, x, 5, variant="bh3")
    with self.assertRaisesRegex(ValueError, "num_steps"):
      samplers.sample("unipc", eps_fn, DS, x)


_SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from jax.sharding import NamedSharding, PartitionSpec as P
    from ddpm_ot_jax import gaussian, samplers, sde
    assert jax.device_count() == 4
    ds = sde.DiscreteSchedule(); view = samplers.noise_schedule(ds)
    mean, cov = gaussian.random_gaussian(jax.random.key(0), 4)
    eps_fn = samplers.eps_fn_from_score(gaussian.score_fn(view, mean, cov), ds, view)
    x = jax.random.normal(jax.random.key(1), (16, 4))
    mesh = jax.make_mesh((4,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    xs = jax.device_put(x, NamedSharding(mesh, P("batch")))
    for run in (lambda x: samplers.ddim(eps_fn, ds, x, 6),
                lambda x: samplers.ddpm_ancestral(eps_fn, ds, x, jax.random.key(2), 20)):
      single, sharded = run(x), run(xs)
      np.testing.assert_allclose(sharded.x, single.x, atol=1e-12)
      assert len(sharded.x.sharding.device_set) == 4, sharded.x.sharding
    print("OK")
""")


class ShardedTest(absltest.TestCase):

  def test_sharded_batch_matches_single_device(self):
    """On 4 virtual CPU devices a batch sharded along its axis gives the same DDIM and DDPM
    samples (same noise) as on one device, and stays sharded."""
    proc = helpers.run_on_cpu_devices("-c", _SHARDED_SCRIPT)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("OK", proc.stdout)


if __name__ == "__main__":
  absltest.main()
