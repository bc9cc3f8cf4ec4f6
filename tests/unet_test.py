"""Tests of the Flax UNet ε_θ(x, t, y) on tiny shapes."""
from __future__ import annotations


from absl.testing import absltest
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_ot_jax.models import unet as unet_lib

# norm_groups=8: groups of ≥ 2 channels. With one channel per group GroupNorm would erase
# the per-channel time/class shift that each ResBlock adds before its second norm.
TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1,
            norm_groups=8)


def _shapes(model: unet_lib.UNet, shape=(2, 8, 8, 3), labels=None):
  """The parameter shapes, traced without running the (slow to compile) initialisers."""
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros(shape), jnp.zeros(shape[:1]), labels))["params"]


def _random_params(model: unet_lib.UNet, seed: int, labels=None, scale=0.3):
  """Every parameter scale·N(0, 1): DDPM's zero-initialised output layers would otherwise
  make ε_θ ≡ 0 and hide the dependence on x, t and y."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32),
                      _shapes(model, labels=labels))


def _expected_param_count(ch, ch_mult, num_res_blocks, attn_resolutions, resolution,
                          in_ch, out_ch, num_classes=0):
  """Counts the DDPM UNet's parameters layer by layer from the architecture description."""
  conv = lambda k, cin, cout: k * k * cin * cout + cout  # noqa: E731
  dense = lambda cin, cout: cin * cout + cout  # noqa: E731
  norm = lambda c: 2 * c  # noqa: E731
  temb = 4 * ch

  def resblock(cin, cout):
    shortcut = conv(1, cin, cout) if cin != cout else 0
    return norm(cin) + conv(3, cin, cout) + dense(temb, cout) + norm(cout) + conv(3, cout, cout) + shortcut

  attn = lambda c: norm(c) + 4 * dense(c, c)  # noqa: E731
  total = dense(ch, temb) + dense(temb, temb) + num_classes * temb + conv(3, in_ch, ch)
  skips, cur, res = [ch], ch, resolution
  for level, mult in enumerate(ch_mult):
    for _ in range(num_res_blocks):
      total += resblock(cur, ch * mult) + (attn(ch * mult) if res in attn_resolutions else 0)
      cur = ch * mult
      skips.append(cur)
    if level != len(ch_mult) - 1:
      total += conv(3, cur, cur)
      skips.append(cur)
      res //= 2
  total += 2 * resblock(cur, cur) + attn(cur)
  for level in reversed(range(len(ch_mult))):
    for _ in range(num_res_blocks + 1):
      total += resblock(cur + skips.pop(), ch * ch_mult[level])
      cur = ch * ch_mult[level]
      total += attn(cur) if res in attn_resolutions else 0
    if level != 0:
      total += conv(3, cur, cur)
      res *= 2
  return total + norm(cur) + conv(3, cur, out_ch)


# One class-conditional tiny model and one compiled forward pass serve most tests:
# compiling is the slow part of these tests on CPU.
MODEL = unet_lib.UNet(**TINY, num_classes=3)


@jax.jit
def _forward(params, x, t, y):
  return MODEL.apply({"params": params}, x, t, y)


@jax.jit
def _forward_train(params, x, t, y, key):
  return MODEL.apply({"params": params}, x, t, y, train=True, rngs={"dropout": key})


class UNetTest(absltest.TestCase):

  def test_output_shape_and_zero_init(self):
    """ε_θ has the input's shape (or out_ch channels) and is exactly 0 at DDPM's init."""
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    y = jnp.array([0, 2, 1, 1])
    params = jax.jit(MODEL.init)(jax.random.key(0), x, jnp.zeros(4), y)["params"]
    out = _forward(params, x, jnp.array([0.0, 999.0, 3.0, 4.0]), y)
    self.assertEqual((out.shape, out.dtype), ((4, 8, 8, 3), jnp.float32))
    np.testing.assert_array_equal(out, 0.0)
    self.assertGreater(float(jnp.abs(params["conv_in"]["kernel"]).max()), 0.0)
    wide = unet_lib.UNet(**TINY, out_ch=5)
    out = jax.eval_shape(lambda p: wide.apply({"params": p}, x, jnp.ones(4)), _shapes(wide))
    self.assertEqual(out.shape, (4, 8, 8, 5))

  def test_time_embedding_closed_form(self):
    """γ(t) = [sin(t ω_k), cos(t ω_k)], ω_k = 10000^(−k/(h−1)) (DDPM); cos first when flipped."""
    t = np.array([0.0, 1.0, 17.5, 999.0])
    dim, half = 10, 5
    omega = 10000.0 ** (-np.arange(half) / (half - 1))
    expected = np.concatenate([np.sin(t[:, None] * omega), np.cos(t[:, None] * omega)], 1)
    np.testing.assert_allclose(unet_lib.timestep_embedding(jnp.asarray(t), dim), expected,
                               atol=2e-4)  # float32 sin/cos at arguments up to 999
    omega0 = 10000.0 ** (-np.arange(half) / half)  # guided-diffusion: shift 0, cos first
    flipped = np.concatenate([np.cos(t[:, None] * omega0), np.sin(t[:, None] * omega0)], 1)
    np.testing.assert_allclose(
        unet_lib.timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=True, freq_shift=0),
        flipped, atol=2e-4)
    odd = unet_lib.timestep_embedding(jnp.asarray(t), 11)
    np.testing.assert_array_equal(odd[:, -1], 0.0)

  def test_depends_on_time_and_class(self):
    """With random weights, changing t or y changes ε_θ; equal inputs give equal outputs."""
    params = _random_params(MODEL, 2, labels=jnp.zeros((2,), jnp.int32))
    x = jnp.broadcast_to(jax.random.normal(jax.random.key(3), (1, 8, 8, 3)), (4, 8, 8, 3))
    # rows: (t, y) = (5, 1), (5, 1), (5, 2), (600, 1)
    out = _forward(params, x, jnp.array([5.0, 5.0, 5.0, 600.0]), jnp.array([1, 1, 2, 1]))
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)
    self.assertGreater(float(jnp.abs(out[0] - out[2]).max()), 1e-3)
    self.assertGreater(float(jnp.abs(out[0] - out[3]).max()), 1e-3)
    with self.assertRaisesRegex(ValueError, "pass labels"):
      jax.eval_shape(lambda p: MODEL.apply({"params": p}, x, jnp.zeros(4)), params)
    with self.assertRaisesRegex(ValueError, "unconditional"):
      _shapes(unet_lib.UNet(**TINY), labels=jnp.zeros(2, jnp.int32))

  def test_param_count_formula(self):
    """count_params equals a layer-by-layer count; the DDPM CIFAR-10 UNet has 35,746,307."""
    model = unet_lib.UNet(**TINY, num_classes=3, out_ch=4)
    params = _shapes(model, shape=(1, 8, 8, 3), labels=jnp.zeros((1,), jnp.int32))
    self.assertEqual(unet_lib.count_params(params),
                     _expected_param_count(16, (1, 2), 1, (4,), 8, 3, 4, num_classes=3))
    cifar = unet_lib.UNet()  # the DDPM paper's CIFAR-10 model (35.7M)
    self.assertEqual(unet_lib.count_params(_shapes(cifar, shape=(1, 32, 32, 3))), 35_746_307)
    self.assertEqual(_expected_param_count(128, (1, 2, 2, 2), 2, (16,), 32, 3, 3), 35_746_307)

  def test_jit_batch_independence_and_dropout(self):
    """Under jit each row depends only on its own inputs (permuting the batch permutes ε_θ);
    dropout acts only with train=True and follows its rng."""
    params = _random_params(MODEL, 4, labels=jnp.zeros((2,), jnp.int32))
    x = jax.random.normal(jax.random.key(5), (4, 8, 8, 3))
    t, y = jnp.array([10.0, 500.5, 0.0, 999.0]), jnp.array([0, 1, 2, 1])
    out = _forward(params, x, t, y)
    perm = jnp.array([2, 0, 3, 1])
    np.testing.assert_allclose(_forward(params, x[perm], t[perm], y[perm]), out[perm], atol=1e-5)
    key0, key1 = jax.random.key(0), jax.random.key(1)
    np.testing.assert_array_equal(_forward_train(params, x, t, y, key0),
                                  _forward_train(params, x, t, y, key0))
    self.assertGreater(float(jnp.abs(_forward_train(params, x, t, y, key0)
                                     - _forward_train(params, x, t, y, key1)).max()), 1e-3)
    self.assertGreater(float(jnp.abs(_forward_train(params, x, t, y, key0) - out).max()), 1e-3)

  def test_from_config(self):
    """unet_from_config turns lists into tuples, reads dtype names and rejects unknown keys."""
    config = ml_collections.ConfigDict(dict(TINY, ch_mult=[1, 2], attn_resolutions=[4],
                                            num_classes=3, dtype="bfloat16"))
    model = unet_lib.unet_from_config(config)
    self.assertEqual(model, MODEL.clone(dtype=jnp.bfloat16))
    out = jax.eval_shape(lambda p: model.apply({"params": p}, jnp.ones((2, 8, 8, 3)), jnp.ones(2),
                                               jnp.ones(2, jnp.int32)),
                         _shapes(model, labels=jnp.zeros(2, jnp.int32)))
    self.assertEqual(out.dtype, jnp.float32)
    config.ch_mul = (1, 2)
    with self.assertRaisesRegex(KeyError, "ch_mult"):
      unet_lib.unet_from_config(config)

  def test_group_count(self):
    """GroupNorm uses gcd(C, 32) groups: 32 for DDPM's widths, C below 32, 16 for 48."""
    self.assertEqual(unet_lib.num_norm_groups(16, 32), 16)
    self.assertEqual(unet_lib.num_norm_groups(384, 32), 32)
    self.assertEqual(unet_lib.num_norm_groups(48, 32), 16)


if __name__ == "__main__":
  absltest.main()
