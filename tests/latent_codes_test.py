"""latent_codes: with ε_θ ≡ 0 every encoder is the scaling x ↦ √ᾱ_{N−1} x (closed form) and
every decoder its inverse."""
import dataclasses

from absl.testing import absltest
import jax.numpy as jnp
import numpy as np

from ddpm_ot_jax import flow
from ddpm_ot_jax import latent_codes
from ddpm_ot_jax import model_sources
from ddpm_ot_jax import samplers
from ddpm_ot_jax import sde
from ddpm_ot_jax import train


@dataclasses.dataclass(frozen=True)
class _ScaledIdentity:
  """ε_θ(x, t, y) = params['scale'] · x: a stand-in for the UNet's apply."""

  num_classes: int = 0

  def apply(self, variables, x, t_index, y=None, train=False):
    del t_index, y, train
    return variables["params"]["scale"] * x


class LatentCodesTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    schedule = sde.DiscreteSchedule()
    self.scale = float(np.sqrt(schedule.alphas_cumprod()[-1]))
    self.loaded = model_sources.LoadedModel(
        "zero", _ScaledIdentity(), {"scale": jnp.zeros(())},
        samplers.noise_schedule(schedule, "discrete"), train.make_data_mesh(), "", 0, 0.0, 0)
    self.images = np.random.default_rng(0).uniform(-0.9, 0.9, (5, 4, 4, 1)).astype(np.float32)
    self.options = flow.SolverOptions(rtol=1e-6, atol=1e-6)

  def test_encoders_scale_and_decoders_invert(self):
    """ε̂ = 0: DDIM inversion multiplies by ᾱ-ratios that telescope to √ᾱ_{N−1}, the PF-ODE
    (score 0) by α(t_{N−1}) = √ᾱ_{N−1}; the matching decoders give the images back."""
    for method, rtol in (("ddim", 1e-5), ("ode", 1e-4)):
      out = latent_codes.encode_images(self.loaded, self.images, method, batch_size=2,
                                       ddim_steps=7, options=self.options, round_trip=True)
      np.testing.assert_allclose(out.codes, self.scale * self.images, rtol=rtol, atol=1e-7)
      np.testing.assert_allclose(out.reconstructions, self.images, rtol=rtol, atol=1e-5)
      if method == "ddim":
        self.assertEqual((out.nfe_encode, out.nfe_decode), (7, 7))

  def test_decode_latents_inverts_the_scaling_and_clips(self):
    """decode_latents(z) = z / √ᾱ_{N−1} clipped to [−1, 1], for both decoders."""
    z = self.scale * self.images
    z[0] = 10.0  # decodes far outside [−1, 1]: clipped
    for sampler in ("ddim", "pf_ode"):
      images, _ = latent_codes.decode_latents(self.loaded, z, sampler, 7, self.options, 3)
      np.testing.assert_allclose(images[1:], self.images[1:], rtol=1e-4, atol=1e-5)
      np.testing.assert_array_equal(images[0], np.ones_like(images[0]))
    with self.assertRaisesRegex(ValueError, "Unknown decoder"):
      latent_codes.decode_latents(self.loaded, z, "ddpm", 7, self.options, 3)


if __name__ == "__main__":
  absltest.main()
