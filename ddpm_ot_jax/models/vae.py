"""The non-diffusion control of shared_latents: a small MLP VAE (hand-written: ~40 lines; no
maintained JAX package ships one).

Kingma & Welling (2014): encoder q(z|x) = N(μ(x), diag e^{ℓ(x)}), decoder x̂(z), prior
p(z) = N(0, I). Trained on the negative ELBO with a Gaussian likelihood of fixed std σ,

    L(x) = |x − x̂(z)|² / (2σ²) + KL(q(z|x) ‖ N(0, I)),   z = μ(x) + e^{ℓ(x)/2} ⊙ ξ, ξ ~ N(0, I),
    KL = ½ Σ_k (μ_k² + e^{ℓ_k} − 1 − ℓ_k).

Khrulkov et al. (2022), Sec. 3.5 contrast DDPM latents with a GAN's: nothing ties a VAE's
latent axes to pixels, so the same z decoded by two VAEs trained on different data should
share no pixel structure.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class MLPVAE(nn.Module):
  """x ∈ R^d ↦ q(z|x) = N(μ(x), diag e^{ℓ(x)}), z ∈ R^latent_dim; decoder x̂(z) = tanh(MLP(z)).

  Trained on the negative ELBO with a Gaussian likelihood of fixed std `sigma`:
  |x − x̂(z)|²/(2σ²) + KL(q(z|x) ‖ N(0, I)).
  """

  num_pixels: int
  latent_dim: int
  hidden: int = 256

  def setup(self) -> None:
    self.enc = [nn.Dense(self.hidden), nn.Dense(self.hidden)]
    self.enc_out = nn.Dense(2 * self.latent_dim)
    self.dec = [nn.Dense(self.hidden), nn.Dense(self.hidden)]
    self.dec_out = nn.Dense(self.num_pixels)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = x
    for layer in self.enc:
      h = nn.silu(layer(h))
    mean, log_var = jnp.split(self.enc_out(h), 2, axis=-1)
    return mean, log_var

  def decode(self, z: jax.Array) -> jax.Array:
    h = z
    for layer in self.dec:
      h = nn.silu(layer(h))
    return jnp.tanh(self.dec_out(h))

  def __call__(self, x: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    mean, log_var = self.encode(x)
    z = mean + jnp.exp(0.5 * log_var) * jax.random.normal(key, mean.shape)
    return self.decode(z), mean, log_var


def negative_elbo(model: MLPVAE, params: Any, x: jax.Array, key: jax.Array,
                  sigma: float) -> jax.Array:
  """Mean over the rows of x (n, d) of L(x) = |x − x̂(z)|²/(2σ²) + KL(q(z|x) ‖ N(0, I)), one
  reparameterized z per row drawn with `key` (the module docstring's loss)."""
  recon, mean, log_var = model.apply(params, x, key)
  nll = jnp.sum((x - recon) ** 2, axis=-1) / (2 * sigma**2)
  kl = 0.5 * jnp.sum(mean**2 + jnp.exp(log_var) - 1.0 - log_var, axis=-1)
  return jnp.mean(nll + kl)


def train_vae(key: jax.Array, images: np.ndarray, num_steps: int = 3000, batch_size: int = 128,
              lr: float = 1e-3, sigma: float = 0.25, hidden: int = 256) -> tuple[MLPVAE, Any]:
  """An MLPVAE with latent_dim = pixels, trained from a random init drawn with `key` by
  `num_steps` Adam steps (learning rate `lr`) on `negative_elbo` of uniformly drawn batches.
  Returns (model, params)."""
  flat = jnp.asarray(images.reshape(len(images), -1))
  dim = flat.shape[1]
  model = MLPVAE(num_pixels=dim, latent_dim=dim, hidden=hidden)
  init_key, data_key = jax.random.split(key)
  params = model.init(init_key, flat[:1], init_key)
  tx = optax.adam(lr)
  opt_state = tx.init(params)

  def loss_fn(params, x, key):
    return negative_elbo(model, params, x, key, sigma)

  @jax.jit
  def run_steps(params, opt_state, flat):
    def step(carry, k):
      params, opt_state = carry
      batch_key, noise_key = jax.random.split(jax.random.fold_in(data_key, k))
      idx = jax.random.randint(batch_key, (batch_size,), 0, flat.shape[0])
      loss, grads = jax.value_and_grad(loss_fn)(params, flat[idx], noise_key)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), jnp.arange(num_steps))
    return params, losses

  params, _ = run_steps(params, opt_state, flat)
  return model, params


def vae_decode(model: MLPVAE, params: Any, latents: np.ndarray) -> np.ndarray:
  """x̂(z) for latents of any shape (N, ...) flattened to (N, latent_dim); output in the
  latents' shape."""
  z = jnp.asarray(latents.reshape(len(latents), -1))
  return np.asarray(model.apply(params, z, method=MLPVAE.decode)).reshape(latents.shape)
