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
* `vae_control`: the non-diffusion control: two MLP VAEs (`models/vae.py`), independently
  initialised and trained on the same two datasets as the `different_data` DDPMs, decoding the same z
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
checked before the first model is trained (`model_sources.check_sources`).
"""
from __future__ import annotations

import itertools
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_ot_jax import flow
from ddpm_ot_jax import latent_codes
from ddpm_ot_jax import model_sources
from ddpm_ot_jax import ot
from ddpm_ot_jax import plotting
from ddpm_ot_jax.experiments import common
from ddpm_ot_jax.experiments import stages
from ddpm_ot_jax.models import vae

# The config fields this experiment reads (scripts/main.py rejects any other field or override).
CONFIG_FIELDS = ("data", "model", "diffusion", "training", "models", "models_dir",
    "shared_latents", "control")

# Streams derived from config.seed (trainer 0–2, train_ddpm 3, dpmot 10–13, latent_ot 20–21,
# stages.RESTORE_STREAM 22).
LATENT_STREAM, VAE_STREAM = 30, 31
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
# The run.
# ----------------------------------------------------------------------------------------


def _data_identity(spec: ml_collections.ConfigDict) -> tuple:
  return (tuple(spec.classes), spec.subfolder, spec.transform)


def _validate(config: ml_collections.ConfigDict) -> None:
  """Config checks (ValueError naming the key) that need no file."""
  sc = config.shared_latents
  if sc.num_latents < 2:
    raise ValueError(f"shared_latents.num_latents must be ≥ 2, got {sc.num_latents}.")
  if sc.sampler not in latent_codes.DECODERS:
    raise ValueError(f"shared_latents.sampler must be one of {latent_codes.DECODERS}, got "
                     f"{sc.sampler!r}.")
  if sc.batch_size < 1 or sc.num_steps < 1:
    raise ValueError("shared_latents.batch_size and num_steps must be ≥ 1.")
  if not config.models:
    raise ValueError("config.models is empty: list the DDPMs to decode with.")
  for name, spec in config.models.items():
    model_sources.check_spec(name, spec)
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
  image_shape = model_sources.image_shape(config.data)
  # Every input up front: a missing folder or checkpoint of the last model (or of the VAE
  # control's data) must not surface after hours of training the first ones.
  model_sources.check_sources(config, list(config.models.keys()), image_shape)
  if config.control.vae:
    model_sources.check_split(config.data, "train")
  base_key = jax.random.PRNGKey(config.seed)
  latents = np.asarray(jax.random.normal(jax.random.fold_in(base_key, LATENT_STREAM),
                                         (sc.num_latents,) + tuple(image_shape), jnp.float32))
  options = flow.SolverOptions(rtol=sc.ode_rtol, atol=sc.ode_atol)
  results: dict[str, Any] = {"num_latents": int(sc.num_latents)}
  decoded: dict[str, np.ndarray] = {}
  unconditional: list[tuple[str, tuple]] = []  # (row, data identity)
  conditional: dict[str, list[str]] = {}
  for name, spec in config.models.items():
    loaded = stages.load_model(config, name, spec, workdir, image_shape)
    results[f"train_steps_{name}"] = loaded.steps
    results[f"train_seconds_{name}"] = loaded.train_seconds
    start = time.perf_counter()
    if loaded.num_classes:
      conditional[name] = []
      for label in spec.labels:
        row = f"{name}_y{label}"
        decoded[row], nfe = latent_codes.decode_latents(
            loaded, latents, sc.sampler, sc.num_steps, options, sc.batch_size, int(label))
        conditional[name].append(row)
    else:
      decoded[name], nfe = latent_codes.decode_latents(
          loaded, latents, sc.sampler, sc.num_steps, options, sc.batch_size)
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
      train_set = model_sources.load_split(config.data, "train", classes=tuple(classes))
      model, params = vae.train_vae(jax.random.fold_in(jax.random.fold_in(base_key, VAE_STREAM), j),
                                train_set.images, cc.vae_steps, cc.vae_batch_size, cc.vae_lr,
                                cc.vae_sigma, cc.vae_hidden)
      row = "vae_" + "".join(str(c) for c in classes)
      decoded[row] = np.clip(vae.vae_decode(model, params, latents), -1.0, 1.0)
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
    common.save_figure(
        plotting.image_rows_figure(rows, "Same latent (column) decoded by different models (rows)"),
        os.path.join(workdir, "shared_latents.png"))
  for name, cond_rows in conditional.items():
    title = f"Same latent (column) decoded by the class-conditional '{name}' with label y (rows)"
    common.save_figure(plotting.image_rows_figure([(r, decoded[r][:shown]) for r in cond_rows], title),
                       os.path.join(workdir, f"shared_latents_conditional_{name}.png"))
  results["seconds"] = watch.seconds()
  return results
