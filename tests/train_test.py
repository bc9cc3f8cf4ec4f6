"""Tests for ddpm_ot_jax.train: the ε-prediction loss, optimizer, EMA and the jitted step."""
import functools
import types
from unittest import mock

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_ot_jax import data
from ddpm_ot_jax import samplers
from ddpm_ot_jax import sde
from ddpm_ot_jax import train

import helpers

SCHEDULE = sde.DiscreteSchedule()


def _oracle_apply(x0_point, loss_type):
  """A flax-apply stand-in that returns the exact noise when all data equal `x0_point`:
  ε = (x_t − α x0)/σ, with (α, σ) read off the network time the loss passes in."""

  def apply(variables, x_t, net_time, labels, train, rngs):
    del variables, labels, train, rngs
    if loss_type == "discrete":
      alpha_bar = SCHEDULE.alphas_cumprod()[net_time.astype(jnp.int32)]
      alpha, sigma = jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)
    else:
      t = (net_time + 1.0) / SCHEDULE.num_steps
      continuous = SCHEDULE.continuous_schedule()
      alpha, sigma = sde.marginal_mean_coeff(continuous, t), sde.marginal_std(continuous, t)
    return (x_t - alpha[:, None, None, None] * x0_point) / sigma[:, None, None, None]

  return apply


class LossTest(absltest.TestCase):

  def test_discrete_noising_matches_closed_form(self):
    """x_i = √ᾱ_i x0 + √(1−ᾱ_i) ε with integer i ∈ [0, N−1] and ε the returned noise."""
    x0 = jax.random.uniform(jax.random.PRNGKey(0), (256, 4, 4, 1), minval=-1, maxval=1)
    x_t, noise, net_time = train.noise_and_time(SCHEDULE, jax.random.PRNGKey(1), x0)
    index = np.asarray(net_time)
    np.testing.assert_array_equal(index, np.round(index))
    self.assertTrue(np.all((index >= 0) & (index <= 999)))
    self.assertGreater(len(np.unique(index)), 150)  # spread over the chain
    alpha_bar = np.asarray(SCHEDULE.alphas_cumprod())[index.astype(int)][:, None, None, None]
    expected = np.sqrt(alpha_bar) * np.asarray(x0) + np.sqrt(1 - alpha_bar) * np.asarray(noise)
    np.testing.assert_allclose(np.asarray(x_t), expected, rtol=1e-5, atol=1e-6)

  def test_continuous_noising_uses_vp_marginals_and_index_time(self):
    """Continuous option: network time N t − 1 ∈ [0, N−1], x_t = α(t) x0 + σ(t) ε of the VP-SDE
    that the discretization approximates."""
    x0 = jnp.ones((512, 2, 2, 1))
    x_t, noise, net_time = train.noise_and_time(SCHEDULE, jax.random.PRNGKey(2), x0,
                                                "continuous")
    t = (np.asarray(net_time) + 1.0) / 1000.0
    self.assertTrue(np.all((t >= 1e-3) & (t <= 1.0)))
    self.assertGreater(np.std(net_time - np.round(net_time)), 0.1)  # not snapped to integers
    continuous = SCHEDULE.continuous_schedule()
    alpha = np.asarray(sde.marginal_mean_coeff(continuous, t))[:, None, None, None]
    sigma = np.asarray(sde.marginal_std(continuous, t))[:, None, None, None]
    np.testing.assert_allclose(np.asarray(x_t), alpha + sigma * np.asarray(noise), rtol=1e-5,
                               atol=1e-6)

  def test_loss_is_zero_for_the_exact_noise_predictor(self):
    """With data concentrated on one image the true ε is a function of (x_t, time): a network
    returning it has loss 0, for both losses (the time conventions agree with the noising)."""
    x0_point = jax.random.uniform(jax.random.PRNGKey(3), (1, 8, 8, 1), minval=-1, maxval=1)
    x0 = jnp.repeat(x0_point, 64, axis=0)
    for loss_type in ("discrete", "continuous"):
      loss = train.diffusion_loss({}, _oracle_apply(x0_point, loss_type), SCHEDULE,
                                  jax.random.PRNGKey(4), x0, None, loss_type)
      self.assertLess(float(loss), 1e-6, loss_type)

  def test_sampling_view_reproduces_training_noise_levels(self):
    """For both losses, the samplers' view `noise_schedule(schedule, loss_type)` gives at the
    network index i the (α, σ) the loss noised with: α = x_t(x0=1) − x_t(x0=0) and
    σ = x_t(x0=0)/ε with the same key (1e-5). The other loss's view is off by > 1e-3 in α or σ
    somewhere, so the sampler must follow loss_type."""
    zeros, ones = jnp.zeros((512, 1, 1, 1)), jnp.ones((512, 1, 1, 1))
    levels = {}
    for loss_type in sde.LOSS_TYPES:
      key = jax.random.PRNGKey(7)
      x_zero, noise, net_time = train.noise_and_time(SCHEDULE, key, zeros, loss_type)
      x_one, _, _ = train.noise_and_time(SCHEDULE, key, ones, loss_type)
      alpha = np.asarray(x_one - x_zero).ravel()
      sigma = np.asarray(x_zero / noise).ravel()
      levels[loss_type] = (net_time, alpha, sigma)
    for loss_type, (net_time, alpha, sigma) in levels.items():
      for view_type in sde.LOSS_TYPES:
        view = samplers.noise_schedule(SCHEDULE, view_type)
        log_alpha, view_sigma = sde.log_alpha_std(view, samplers.time_of_index(view, net_time))
        gap = max(np.max(np.abs(np.exp(np.asarray(log_alpha)) - alpha)),
                  np.max(np.abs(np.asarray(view_sigma) - sigma)))
        if view_type == loss_type:
          self.assertLess(gap, 1e-5, loss_type)
        else:
          self.assertGreater(gap, 1e-3, (loss_type, view_type))
    self.assertIsInstance(samplers.noise_schedule(SCHEDULE, "continuous"),
                          samplers.ContinuousTimeSchedule)

  def test_ema_update_closed_form(self):
    """θ_ema ← ρ θ_ema + (1 − ρ) θ, leaf by leaf; ρ = 0 copies θ."""
    ema, params = {"a": jnp.array([1.0, 2.0])}, {"a": jnp.array([3.0, -2.0])}
    np.testing.assert_allclose(train.ema_update(ema, params, 0.75)["a"], [1.5, 1.0])
    np.testing.assert_array_equal(train.ema_update(ema, params, 0.0)["a"], params["a"])


class OptimizerTest(absltest.TestCase):

  def test_warmup_schedule(self):
    """η_k = lr · min(1, (k+1)/warmup): lr/W at the first update, lr from update W−1 on."""
    schedule = train.learning_rate_schedule(2e-4, 5000)
    self.assertAlmostEqual(float(schedule(0)), 2e-4 / 5000, places=12)
    self.assertAlmostEqual(float(schedule(2499)), 1e-4, places=10)
    self.assertAlmostEqual(float(schedule(4999)), 2e-4, places=10)
    self.assertAlmostEqual(float(schedule(10**6)), 2e-4, places=10)
    self.assertAlmostEqual(float(train.learning_rate_schedule(1e-3, 0)(7)), 1e-3, places=10)

  def test_gradient_clipping_bounds_the_step(self):
    """Clipping at c rescales a gradient of norm ‖g‖ > c to norm c before Adam; with Adam's
    first-step update ≈ −η g/|g| per coordinate, the second step then differs from the
    unclipped optimizer, and matches Adam fed the clipped gradients."""
    hp = train.TrainHparams(lr=0.1, warmup_steps=0, grad_clip=1.0)
    tx = train.make_optimizer(hp)
    reference = train.make_optimizer(train.TrainHparams(lr=0.1, warmup_steps=0, grad_clip=0.0))
    params = {"w": jnp.zeros(3)}
    grads = [{"w": jnp.array([30.0, -40.0, 0.0])}, {"w": jnp.array([0.3, 0.4, 1.2])}]
    state, ref_state = tx.init(params), reference.init(params)
    for g in grads:
      update, state = tx.update(g, state, params)
      norm = float(jnp.linalg.norm(g["w"]))
      clipped = jax.tree.map(lambda x, n=norm: x * min(1.0, 1.0 / n), g)
      ref_update, ref_state = reference.update(clipped, ref_state, params)
      np.testing.assert_allclose(update["w"], ref_update["w"], rtol=1e-6)

  def test_bad_hparams_raise(self):
    """Unknown loss type, lr ≤ 0 and ema_decay outside [0, 1) are ValueErrors."""
    for kwargs in (dict(loss_type="l1"), dict(lr=0.0), dict(ema_decay=1.0)):
      with self.assertRaises(ValueError):
        train.TrainHparams(**kwargs)


class BatchSizeTest(absltest.TestCase):

  def test_message_names_the_failing_split(self):
    """A batch that does not split over the mesh's devices names the devices; one that splits
    over the devices but not over the processes (hosts) names the processes; both give the
    least common multiple to use; a batch that splits both ways passes."""
    four_devices = types.SimpleNamespace(devices=np.empty(4, object))
    with self.assertRaisesRegex(ValueError, r"across the 4 devices.*multiple of 4\."):
      train.check_batch_size(6, four_devices)
    with mock.patch.object(jax, "process_count", return_value=3):
      with self.assertRaisesRegex(ValueError, r"across the 3 processes \(hosts\).*multiple of "
                                  r"12\.") as caught:
        train.check_batch_size(8, four_devices)
      self.assertNotIn("devices", str(caught.exception))
      train.check_batch_size(24, four_devices)
    train.check_batch_size(8, four_devices)


class TrainStepTest(absltest.TestCase):
  """The jitted step of the real (tiny) UNet; one compilation shared by the tests."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = helpers.tiny_unet()
    cls.mesh = train.make_data_mesh(jax.devices()[:1])
    cls.hparams = train.TrainHparams(lr=3e-3, warmup_steps=5, ema_decay=0.9)
    tx = train.make_optimizer(cls.hparams)
    cls.state0 = train.make_init_fn(cls.model, tx, (8, 8, 1), cls.mesh)(
        jax.random.PRNGKey(0), jax.random.PRNGKey(1))
    cls.step = staticmethod(train.make_train_step(cls.model, tx, SCHEDULE, cls.hparams,
                                                  cls.mesh, donate=False))
    cls.train_set = data.load_digits("train")
    cls.images = jnp.asarray(cls.train_set.images[:64])
    cls.labels = jnp.asarray(cls.train_set.labels[:64])

  def test_one_step_updates_params_ema_and_step(self):
    """After one step: step = 1; θ changed; θ_ema = ρ θ_0 + (1 − ρ) θ_1 (θ_ema starts at θ_0);
    the reported lr is the warmup's first value lr/W."""
    state1, metrics = self.step(self.state0, self.images, self.labels)
    self.assertEqual(int(state1.step), 1)
    self.assertAlmostEqual(float(metrics["lr"]), 3e-3 / 5, places=9)
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(state1.params), jax.tree.leaves(self.state0.params))]
    self.assertGreater(max(moved), 0.0)
    expected = jax.tree.map(lambda a, b: 0.9 * a + 0.1 * b, self.state0.params, state1.params)
    for got, want in zip(jax.tree.leaves(state1.ema_params), jax.tree.leaves(expected)):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)

  def test_step_noise_depends_on_step_not_history(self):
    """The step key is fold_in(rng, step): the same state and batch give the same update, and
    the same batch at a different step count gives a different loss (fresh noise)."""
    _, m1 = self.step(self.state0, self.images, self.labels)
    _, m2 = self.step(self.state0, self.images, self.labels)
    self.assertEqual(float(m1["loss"]), float(m2["loss"]))
    _, m3 = self.step(self.state0.replace(step=self.state0.step + 7), self.images, self.labels)
    self.assertNotEqual(float(m1["loss"]), float(m3["loss"]))

  def test_loss_decreases_on_digits(self):
    """On a fixed held-out batch and noise draw (evaluation mode, no dropout) the loss starts at
    E‖ε‖²/d = 1 (the UNet's last conv is zero-initialised, so ε_θ ≡ 0) and 40 Adam steps on
    digits batches of 64 lower it by at least 30%."""
    heldout = data.load_digits("heldout")
    evaluate = jax.jit(functools.partial(
        train.diffusion_loss, apply_fn=self.model.apply, schedule=SCHEDULE,
        key=jax.random.PRNGKey(42), x0=jnp.asarray(heldout.images[:128]), train=False))
    state = self.state0
    before = float(evaluate(state.params))
    batches = data.batch_iterator(self.train_set, 64, seed=0)
    for _ in range(40):
      images, labels = next(batches)
      state, metrics = self.step(state, images, labels)
      self.assertTrue(np.isfinite(float(metrics["loss"])))
    after = float(evaluate(state.params))
    self.assertAlmostEqual(before, 1.0, delta=3 * np.sqrt(2.0 / (128 * 64)))
    self.assertLess(after, 0.7 * before)


if __name__ == "__main__":
  absltest.main()
