"""The DDPM / guided-diffusion UNet ε_θ(x_t, t, y) in Flax linen.

Ho et al. (2020), Appendix B, in the form of their released TF code, which diffusers'
`UNet2DModel` reproduces op for op (so `diffusers_import` can load its checkpoints):

    temb = Dense(SiLU(Dense(γ(t))))  (+ Embed(y) for class-conditional models),
    γ(t)_k = sin(t ω_k), γ(t)_{k+h} = cos(t ω_k),  ω_k = 10000^(−k/(h − s)),  k < h = ch/2
    (s = `freq_shift`: 1 in DDPM, 0 in guided-diffusion; `flip_sin_to_cos` puts cos first).

    h = conv_in(x); skips = [h]
    for each level l (resolution H/2^l, channels ch·ch_mult[l]):
      num_res_blocks × { h = ResBlock(h, temb); h = Attn(h) if H/2^l ∈ attn_resolutions;
                         skips.append(h) }
      unless last level: h = Downsample(h); skips.append(h)
    h = ResBlock(Attn(ResBlock(h)))                      (middle, always with attention)
    for each level l from the last to the first:
      (num_res_blocks + 1) × { h = ResBlock(concat[h, skips.pop()]); h = Attn(h) if ... }
      unless l = 0: h = Upsample(h)
    ε = conv_out(SiLU(GroupNorm(h)))

ResBlock(x) = skip(x) + conv2(dropout(SiLU(GN(conv1(SiLU(GN(x))) + Dense(SiLU(temb)))))),
skip = 1×1 conv when the channel count changes. Attn(x) = x + proj(softmax(q kᵀ/√d) v) on
GN(x) flattened to H·W tokens, with `num_heads` heads (or heads of `head_dim` channels).
Downsample: 3×3 conv with stride 2 (`downsample_padding` 0 pads bottom/right by one, TF's
'SAME' as in DDPM; 1 pads every side) or 2×2 average pooling; Upsample: nearest ×2 then a
3×3 conv. Initialisation as DDPM: variance scaling (1, fan_avg, uniform), and zero for the
last conv of each ResBlock, the attention output projection and conv_out, so every residual
branch starts as the identity and ε_θ starts at 0.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

Array = jax.Array

_default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
_zero_init = nn.initializers.zeros


def timestep_embedding(t: Array, dim: int, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0, max_period: float = 10000.0) -> Array:
  """Sinusoidal embedding γ(t) ∈ R^dim of (possibly fractional) step indices t, shape (B,).

  γ(t) = [sin(t ω_0..h−1), cos(t ω_0..h−1)] with h = dim // 2 and
  ω_k = exp(−log(max_period) k / (h − freq_shift)); cos first when `flip_sin_to_cos`;
  a zero column is appended when dim is odd. DDPM: freq_shift = 1, sin first.
  """
  half = dim // 2
  if half - freq_shift <= 0:
    raise ValueError(f"Time embedding dim {dim} is too small for freq_shift {freq_shift}.")
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def num_norm_groups(channels: int, norm_groups: int) -> int:
  """GroupNorm's group count: gcd(C, norm_groups) — norm_groups when it divides C (DDPM's
  32 at every width of its models), min(norm_groups, C) for power-of-two C, and a valid
  count for the concatenated widths of small models (48 channels → 16 groups)."""
  return math.gcd(channels, norm_groups)


def group_norm(x: Array, norm_groups: int, eps: float, name: str) -> Array:
  """GroupNorm over gcd(C, norm_groups) groups, statistics in float32 (two-pass variance).

  Call inside a compact method: the nn.GroupNorm becomes a child `name` of that module.
  """
  groups = num_norm_groups(x.shape[-1], norm_groups)
  return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=x.dtype,
                      name=name)(x)


class ResBlock(nn.Module):
  """DDPM residual block with the time embedding added between the two convolutions."""

  out_ch: int
  dropout: float
  norm_groups: int
  norm_eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array, train: bool) -> Array:
    conv = lambda features, kernel, init, name: nn.Conv(  # noqa: E731
        features, kernel, padding="SAME" if kernel[0] > 1 else "VALID", kernel_init=init,
        dtype=self.dtype, name=name)
    h = nn.silu(group_norm(x, self.norm_groups, self.norm_eps, "norm1"))
    h = conv(self.out_ch, (3, 3), _default_init, "conv1")(h)
    h = h + nn.Dense(self.out_ch, kernel_init=_default_init, dtype=self.dtype,
                     name="temb_proj")(nn.silu(temb))[:, None, None, :]
    h = nn.silu(group_norm(h, self.norm_groups, self.norm_eps, "norm2"))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(self.out_ch, (3, 3), _zero_init, "conv2")(h)
    if x.shape[-1] != self.out_ch:
      x = conv(self.out_ch, (1, 1), _default_init, "shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """x + MHA(GN(x)) over the H·W positions; `head_dim` (if set) overrides `num_heads`."""

  num_heads: int
  head_dim: int | None
  norm_groups: int
  norm_eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    batch, height, width, channels = x.shape
    heads = channels // self.head_dim if self.head_dim else self.num_heads
    if heads < 1 or channels % heads:
      raise ValueError(f"Attention: {channels} channels cannot be split into {heads} heads "
                       f"(num_heads={self.num_heads}, head_dim={self.head_dim}).")
    h = group_norm(x, self.norm_groups, self.norm_eps, "norm")
    h = h.reshape(batch, height * width, channels)
    h = nn.MultiHeadDotProductAttention(
        num_heads=heads, qkv_features=channels, out_features=channels, dtype=self.dtype,
        kernel_init=_default_init, out_kernel_init=_zero_init, deterministic=True,
        name="attention")(h)
    return x + h.reshape(batch, height, width, channels)


class Downsample(nn.Module):
  """Halves the resolution: stride-2 3×3 conv (`with_conv`) or 2×2 average pooling."""

  with_conv: bool
  padding: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if not self.with_conv:
      return nn.avg_pool(x, (2, 2), strides=(2, 2))
    pad = ((0, 1), (0, 1)) if self.padding == 0 else ((self.padding,) * 2,) * 2
    return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding=pad, kernel_init=_default_init,
                   dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
  """Doubles the resolution: nearest-neighbour ×2, then a 3×3 conv when `with_conv`."""

  with_conv: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if self.with_conv:
      x = nn.Conv(x.shape[-1], (3, 3), padding="SAME", kernel_init=_default_init,
                  dtype=self.dtype, name="conv")(x)
    return x


class UNet(nn.Module):
  """ε_θ(x_t, t, y): the DDPM UNet, sized by its fields (see the module docstring).

  ch: base channel count; level l has ch·ch_mult[l] channels, the time embedding 4·ch.
  num_res_blocks: ResBlocks per level on the way down (one more on the way up).
  attn_resolutions: spatial sizes (height) at which self-attention follows each ResBlock.
  dropout: in every ResBlock, active only with train=True (rng collection 'dropout').
  num_classes: > 0 adds a learned class embedding to the time embedding; y is then required.
  out_ch: output channels (default: the input's).
  resamp_with_conv: conv (True) or pooling / plain nearest (False) resampling.
  norm_groups, norm_eps: GroupNorm uses gcd(C, norm_groups) groups and this ε. Keep
    ≥ 2 channels per group (C ≥ 2·norm_groups; DDPM has ≥ 4): with one channel per group
    GroupNorm removes per-channel constants, which erases the time/class embedding that a
    ResBlock adds just before its second norm. Small models: e.g. ch=32, norm_groups=8.
  num_heads, head_dim: attention heads (head_dim set: C // head_dim heads of head_dim).
  flip_sin_to_cos, freq_shift: the time-embedding convention (`timestep_embedding`).
  downsample_padding: 0 = pad bottom/right (DDPM, TF 'SAME'); 1 = pad every side by one.
  dtype: computation dtype (e.g. jnp.bfloat16 on accelerators); params and output float32.
  """

  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (16,)
  dropout: float = 0.1
  num_classes: int = 0
  out_ch: int | None = None
  resamp_with_conv: bool = True
  norm_groups: int = 32
  norm_eps: float = 1e-6
  num_heads: int = 1
  head_dim: int | None = None
  flip_sin_to_cos: bool = False
  freq_shift: float = 1.0
  downsample_padding: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, t: Array, y: Array | None = None, train: bool = False) -> Array:
    """x: (B, H, W, C); t: (B,) or scalar DDPM step index in [0, N−1]; y: (B,) int labels.

    Returns the ε prediction, shape (B, H, W, out_ch or C), float32.
    """
    batch, height, width, in_ch = x.shape
    num_levels = len(self.ch_mult)
    if height % 2 ** (num_levels - 1) or width % 2 ** (num_levels - 1):
      raise ValueError(f"Image size {height}×{width} must be divisible by 2^{num_levels - 1} "
                       f"for ch_mult={tuple(self.ch_mult)}.")
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
    block = dict(dropout=self.dropout, norm_groups=self.norm_groups, norm_eps=self.norm_eps,
                 dtype=self.dtype)
    attn = dict(num_heads=self.num_heads, head_dim=self.head_dim, norm_groups=self.norm_groups,
                norm_eps=self.norm_eps, dtype=self.dtype)

    # Time (and class) embedding.
    temb_dim = 4 * self.ch
    temb = timestep_embedding(t, self.ch, self.flip_sin_to_cos, self.freq_shift)
    temb = nn.Dense(temb_dim, kernel_init=_default_init, dtype=self.dtype, name="temb_dense0")(temb)
    temb = nn.Dense(temb_dim, kernel_init=_default_init, dtype=self.dtype,
                    name="temb_dense1")(nn.silu(temb))
    if self.num_classes > 0:
      if y is None:
        raise ValueError(f"This UNet is class-conditional (num_classes={self.num_classes}): "
                         "pass labels y.")
      temb = temb + nn.Embed(self.num_classes, temb_dim, name="class_embed")(y).astype(temb.dtype)
    elif y is not None:
      raise ValueError("Labels y were given to an unconditional UNet (num_classes=0).")

    # Downsampling path.
    h = nn.Conv(self.ch, (3, 3), padding="SAME", kernel_init=_default_init, dtype=self.dtype,
                name="conv_in")(x.astype(self.dtype))
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = ResBlock(self.ch * mult, name=f"down_{level}_res_{j}", **block)(h, temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(name=f"down_{level}_attn_{j}", **attn)(h)
        skips.append(h)
      if level != num_levels - 1:
        h = Downsample(self.resamp_with_conv, self.downsample_padding, self.dtype,
                       name=f"down_{level}_downsample")(h)
        skips.append(h)

    # Middle.
    h = ResBlock(h.shape[-1], name="mid_res_0", **block)(h, temb, train)
    h = AttnBlock(name="mid_attn", **attn)(h)
    h = ResBlock(h.shape[-1], name="mid_res_1", **block)(h, temb, train)

    # Upsampling path.
    for level in reversed(range(num_levels)):
      for j in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = ResBlock(self.ch * self.ch_mult[level], name=f"up_{level}_res_{j}",
                     **block)(h, temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(name=f"up_{level}_attn_{j}", **attn)(h)
      if level != 0:
        h = Upsample(self.resamp_with_conv, self.dtype, name=f"up_{level}_upsample")(h)
    assert not skips

    h = nn.silu(group_norm(h, self.norm_groups, self.norm_eps, "norm_out"))
    h = nn.Conv(self.out_ch or in_ch, (3, 3), padding="SAME", kernel_init=_zero_init,
                dtype=self.dtype, name="conv_out")(h)
    return h.astype(jnp.float32)


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def unet_from_config(model_config: ml_collections.ConfigDict) -> UNet:
  """Builds a UNet from a config whose keys are UNet field names (all optional).

  Sequences become tuples; `dtype` may be a string ('float32', 'bfloat16', 'float16').
  An unknown key raises KeyError naming the valid ones.
  """
  fields = [f for f in UNet.__dataclass_fields__ if f not in ("parent", "name")]
  kwargs = {}
  for key, value in dict(model_config).items():
    if key not in fields:
      raise KeyError(f"Unknown model config key {key!r}; valid UNet keys: {', '.join(fields)}.")
    if key in ("ch_mult", "attn_resolutions"):
      value = tuple(int(v) for v in value)
    if key == "dtype" and isinstance(value, str):
      if value not in _DTYPES:
        raise ValueError(f"Unknown model dtype {value!r}; choose one of {sorted(_DTYPES)}.")
      value = _DTYPES[value]
    kwargs[key] = value
  return UNet(**kwargs)


def count_params(params: Any) -> int:
  """Total number of scalars in a parameter pytree (e.g. `variables['params']`)."""
  return int(sum(np.prod(np.shape(leaf), dtype=np.int64) for leaf in jax.tree.leaves(params)))
