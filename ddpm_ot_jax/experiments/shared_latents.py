"""Experiment `shared_latents`: one latent, several DDPMs — do the images share pixels? (Figs. 5–6)

Khrulkov et al. (2022), Sec. 3.5: if every DDPM encoder is the OT map from its data
distribution to N(0, I), then the images D_A(z) and D_B(z) that two DDPMs (trained on
different data A and B) decode from the same latent z are both L2-close to z "on average",
hence to each other: they should share pixel-level structure (pose, texture, stroke). The
paper shows grids (AFHQ cat/dog/wild, FFHQ/MetFaces; a class-conditional ImageNet model
with the label swapped) and reports that a conditional BigGAN shows no such sharing. Here
the claim is measured. For N latents z_1..z_N ~ N(0, I) and two decoders A, B,

    d(a, b) = √(mean over pixels of (a − b)²)          (RMS distance on the [−1, 1] scale)
    same      = (1/N) Σ_i d(A(z_i), B(z_i))
    different = (1/(N(N−1))) Σ_{i≠j} d(A(z_i), B(z_j))
    ratio     = same / different                       (1: no sharing; → 0: identical images)
    nn_match  = (1/N) #{i : argmin_j d(A(z_i), B(z_j)) = i}   (chance level 1/N)

Decoders are grouped, and each group's keys are the means over its pairs:

* `different_data`: unconditional DDPMs trained on different data (digits 0–4 vs 5–9);
* `same_data`: DDPMs trained on the same data with different seeds (a reference: the OT map
  is unique, so if both encoders were it, the ratio would be ≈ 0);
* `conditional`: one class-conditional DDPM decoding the same latent with two labels (the
  ImageNet analogue, Fig. 6), over all label pairs;
* `vae_control`: the non-diffusion control: two MLP VAEs, independently initialised and
  trained on the same two datasets as the `different_data` DDPMs, decoding the same z
  (the analogue of the paper's BigGAN check). Nothing ties a VAE's latent axes to pixels,
  so its ratio should be ≈ 1.

Keys: `distance_same_latent_<group>`, `distance_different_latent_<group>`,
`distance_ratio_<group>`, `nn_match_fraction_<group>`, and the same four per pair
(`..._<A>__<B>`; for the conditional group the ratios per label pair are the matrix
`distance_ratio_matrix_<model>` in decoded.npz); `num_latents`, `decode_nfe`, `train_seconds_<model>`, `seconds`.
Figures: shared_latents.png (rows: the unconditional decoders and the VAE control, columns:
the same latents) and, for each class-conditional model <name>,
shared_latents_conditional_<name>.png (rows: labels). Arrays: decoded.npz (latents and every
decoder's images). Every model's data, checkpoint or weights (and the VAE control's data) is
checked before the first model is trained (`latent_ot.check_sources`).
"""
from __future__ import annotations

import itertools
import os
import time
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddpm_ot_jax import flow
from ddpm_ot_jax import ot
from ddpm_ot_jax import plotting
from ddpm_ot_jax import samplers
from ddpm_ot_jax.experiments import common
from ddpm_ot_jax.experiments import latent_ot

# The config fields this experiment reads (scripts/main.py rejects any other field or override).
CONFIG_FIELDS = ("data", "model", "diffusion", "training", "models", "models_dir",
    "shared_latents", "control")

# Streams derived from config.seed (trainer 0–2, train_ddpm 3, dpmot 10–13, latent_ot 20–22).
LATENT_STREAM, VAE_STREAM = 30, 31
DECODERS = ("ddim", "pf_ode")
GROUPS = ("different_data", "same_data", "conditional", "vae_control")


# ----------------------------------------------------------------------------------------
# Distances between decoded image sets.
# ----------------------------------------------------------------------------------------


def rms_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """D_ij = √(mean over pixels of (a_i − b_j)²), shape (len(a), len(b))."""
  num_pixels = int(np.prod(a.shape[1:]))
  return np.sqrt(np.maximum(ot.squared_distances(a, b), 0.0) / num_pixels)


def pair_statistics(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
  """same-latent vs different-latent distances of decoders A, B on the same latents (the
  module docstring's `same`, `different`, `ratio`, `nn_match`)."""
  if len(a) != len(b) or len(a) < 2:
    raise ValueError(f"Need two equally long sets of ≥ 2 images, got {len(a)} and {len(b)}.")
  dist = rms_distances(a, b)
  n = len(a)
  same = float(np.mean(np.diag(dist)))
  different = float((dist.sum() - np.trace(dist)) / (n * (n - 1)))
  return {"distance_same_latent": same, "distance_different_latent": different,
          "distance_ratio": same / different,
          "nn_match_fraction": float(np.mean(np.argmin(dist, axis=1) == np.arange(n)))}


# ----------------------------------------------------------------------------------------
# The non-diffusion control: a small VAE (hand-written: ~40 lines; no maintained JAX package
# ships one).
# ----------------------------------------------------------------------------------------


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


def train_vae(key: jax.Array, images: np.ndarray, num_steps: int = 3000, batch_size: int = 128,
              lr: float = 1e-3, sigma: float = 0.25, hidden: int = 256) -> tuple[MLPVAE, Any]:
  """An MLPVAE with latent_dim = pixels, trained from a random init drawn with `key`."""
  flat = jnp.asarray(images.reshape(len(images), -1))
  dim = flat.shape[1]
  model = MLPVAE(num_pixels=dim, latent_dim=dim, hidden=hidden)
  init_key, data_key = jax.random.split(key)
  params = model.init(init_key, flat[:1], init_key)
  tx = optax.adam(lr)
  opt_state = tx.init(params)

  def loss_fn(params, x, key):
    recon, mean, log_var = model.apply(params, x, key)
    nll = jnp.sum((x - recon) ** 2, axis=-1) / (2 * sigma**2)
    kl = 0.5 * jnp.sum(mean**2 + jnp.exp(log_var) - 1.0 - log_var, axis=-1)
    return jnp.mean(nll + kl)

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


# ----------------------------------------------------------------------------------------
# Decoding latents with a DDPM.
# ----------------------------------------------------------------------------------------


def decode_latents(loaded: latent_ot.LoadedModel, latents: np.ndarray,
                   sc: ml_collections.ConfigDict, label: int | None = None) -> tuple[np.ndarray, int]:
  """Images D(z) (clipped to [−1, 1]) from x_T = z with the deterministic sampler
  `sc.sampler` ('ddim' with sc.num_steps steps and η = 0, or the adaptive 'pf_ode') on the
  model's own schedule view; a class-conditional model decodes every latent with `label`.
  Chunks of sc.batch_size run split across the devices (`samplers.shard_rows`).
  Returns (images, NFE)."""
  options = flow.SolverOptions(rtol=sc.ode_rtol, atol=sc.ode_atol)
  chunks, nfe = [], 0
  for lo in range(0, len(latents), sc.batch_size):
    count = len(latents[lo:lo + sc.batch_size])
    z = samplers.shard_rows(latents[lo:lo + sc.batch_size], loaded.mesh)
    y = None
    if label is not None:
      y = samplers.shard_rows(np.full((count,), label, np.int32), loaded.mesh)
    eps_fn = loaded.eps_fn(y)
    if sc.sampler == "ddim":
      result = samplers.sample("ddim", eps_fn, loaded.schedule, z, num_steps=sc.num_steps, eta=0.0)
    else:
      result = samplers.sample("pf_ode", eps_fn, loaded.schedule, z, options=options)
    chunks.append(samplers.gather_rows(jnp.clip(result.x, -1.0, 1.0), count))
    nfe = int(result.nfe)
  return np.concatenate(chunks), nfe


def _rows_figure(rows: list[tuple[str, np.ndarray]], path: str, title: str) -> None:
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  columns = len(rows[0][1])
  height = rows[0][1].shape[1] / rows[0][1].shape[2]
  fig = Figure(figsize=(9, 9 / columns * height * len(rows) * 1.1 + 0.4))
  axes = fig.subplots(len(rows), 1, squeeze=False)
  fig.subplots_adjust(hspace=0.08)
  for ax, (label, images) in zip(axes[:, 0], rows):
    grid = plotting.image_grid(images, columns=columns)
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_axis_off()
    ax.text(-0.01, 0.5, label, transform=ax.transAxes, ha="right", va="center", fontsize=8)
  fig.suptitle(title, fontsize=9)
  common.save_figure(fig, path)


# ----------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------


def _data_identity(spec: ml_collections.ConfigDict) -> tuple:
  return (tuple(spec.classes), spec.subfolder, spec.transform)


def _validate(config: ml_collections.ConfigDict) -> None:
  """Config checks (ValueError naming the key) that need no file."""
  sc = config.shared_latents
  if sc.num_latents < 2:
    raise ValueError(f"shared_latents.num_latents must be ≥ 2, got {sc.num_latents}.")
  if sc.sampler not in DECODERS:
    raise ValueError(f"shared_latents.sampler must be one of {DECODERS}, got {sc.sampler!r}.")
  if sc.batch_size < 1 or sc.num_steps < 1:
    raise ValueError("shared_latents.batch_size and num_steps must be ≥ 1.")
  if not config.models:
    raise ValueError("config.models is empty: list the DDPMs to decode with.")
  for name, spec in config.models.items():
    latent_ot.check_spec(name, spec)
    if spec.num_classes and len(spec.labels) < 2:
      raise ValueError(f"models.{name} is class-conditional: give ≥ 2 labels to decode with "
                       f"(models.{name}.labels).")
    if not spec.num_classes and spec.labels:
      raise ValueError(f"models.{name}.labels is set but the model is unconditional "
                       "(num_classes=0).")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Decodes the same latents with every model and measures the pixel-level sharing."""
  _validate(config)
  watch = common.Stopwatch()
  sc = config.shared_latents
  image_shape = latent_ot.image_shape_from_config(config)
  # Every input up front: a missing folder or checkpoint of the last model (or of the VAE
  # control's data) must not surface after hours of training the first ones.
  latent_ot.check_sources(config, list(config.models.keys()), image_shape)
  if config.control.vae:
    latent_ot.check_split(config, "train")
  base_key = jax.random.PRNGKey(config.seed)
  latents = np.asarray(jax.random.normal(jax.random.fold_in(base_key, LATENT_STREAM),
                                         (sc.num_latents,) + tuple(image_shape), jnp.float32))
  results: dict[str, Any] = {"num_latents": int(sc.num_latents)}
  decoded: dict[str, np.ndarray] = {}
  unconditional: list[tuple[str, tuple]] = []  # (row, data identity)
  conditional: dict[str, list[str]] = {}
  for name, spec in config.models.items():
    loaded = latent_ot.load_model(config, name, spec, workdir, image_shape)
    results[f"train_steps_{name}"] = loaded.steps
    results[f"train_seconds_{name}"] = loaded.train_seconds
    start = time.perf_counter()
    if loaded.num_classes:
      conditional[name] = []
      for label in spec.labels:
        row = f"{name}_y{label}"
        decoded[row], nfe = decode_latents(loaded, latents, sc, int(label))
        conditional[name].append(row)
    else:
      decoded[name], nfe = decode_latents(loaded, latents, sc)
      unconditional.append((name, _data_identity(spec)))
    results["decode_nfe"] = nfe
    results[f"decode_seconds_{name}"] = time.perf_counter() - start
    logging.info("Model '%s' decoded %d latents (%d NFE) in %.1f s.", name, sc.num_latents, nfe,
                 results[f"decode_seconds_{name}"])

  vae_rows = []
  cc = config.control
  if cc.vae:
    for j, classes in enumerate(cc.vae_classes):
      start = time.perf_counter()
      train_set = latent_ot.load_split(config, "train", classes=tuple(classes))
      model, params = train_vae(jax.random.fold_in(jax.random.fold_in(base_key, VAE_STREAM), j),
                                train_set.images, cc.vae_steps, cc.vae_batch_size, cc.vae_lr,
                                cc.vae_sigma, cc.vae_hidden)
      row = "vae_" + "".join(str(c) for c in classes)
      decoded[row] = np.clip(vae_decode(model, params, latents), -1.0, 1.0)
      vae_rows.append(row)
      results[f"train_seconds_{row}"] = time.perf_counter() - start
      logging.info("VAE control %s: %d images, %d steps, %.1f s.", row, len(train_set),
                   cc.vae_steps, results[f"train_seconds_{row}"])

  pairs: dict[str, list[tuple[str, str]]] = {g: [] for g in GROUPS}
  for (a, ida), (b, idb) in itertools.combinations(unconditional, 2):
    pairs["same_data" if ida == idb else "different_data"].append((a, b))
  for rows in conditional.values():
    pairs["conditional"] += list(itertools.combinations(rows, 2))
  pairs["vae_control"] = list(itertools.combinations(vae_rows, 2))
  pair_stats: dict[tuple[str, str], dict[str, float]] = {}
  for group, members in pairs.items():
    if not members:
      continue
    stats = []
    for a, b in members:
      s = pair_statistics(decoded[a], decoded[b])
      stats.append(s)
      if group != "conditional":  # label pairs go to decoded.npz as a matrix instead
        results.update({f"{k}_{a}__{b}": v for k, v in s.items()})
      pair_stats[(a, b)] = s
    for key in stats[0]:
      results[f"{key}_{group}"] = float(np.mean([s[key] for s in stats]))
    results[f"num_pairs_{group}"] = len(members)
    logging.info("%-15s %d pair(s): same-latent %.3f, different-latent %.3f, ratio %.3f, "
                 "NN match %.3f", group, len(members), results[f"distance_same_latent_{group}"],
                 results[f"distance_different_latent_{group}"],
                 results[f"distance_ratio_{group}"], results[f"nn_match_fraction_{group}"])

  matrices = {}
  for name, cond_rows in conditional.items():  # ratio[y, y'] over the label pairs
    ratio = np.zeros((len(cond_rows), len(cond_rows)))
    for (i, a), (j, b) in itertools.combinations(enumerate(cond_rows), 2):
      ratio[i, j] = ratio[j, i] = pair_stats[(a, b)]["distance_ratio"]
    matrices[f"distance_ratio_matrix_{name}"] = ratio
    matrices[f"labels_{name}"] = np.asarray(config.models[name].labels)
  common.save_npz(os.path.join(workdir, "decoded.npz"), latents=latents, **decoded, **matrices)
  shown = min(sc.grid_latents, sc.num_latents)
  rows = [(name, decoded[name][:shown]) for name, _ in unconditional] + \
         [(name, decoded[name][:shown]) for name in vae_rows]
  if rows:
    _rows_figure(rows, os.path.join(workdir, "shared_latents.png"),
                 "Same latent (column) decoded by different models (rows)")
  for name, cond_rows in conditional.items():
    _rows_figure([(r, decoded[r][:shown]) for r in cond_rows],
                 os.path.join(workdir, f"shared_latents_conditional_{name}.png"),
                 f"Same latent (column) decoded by the class-conditional '{name}' with label y (rows)")
  results["seconds"] = watch.seconds()
  return results
