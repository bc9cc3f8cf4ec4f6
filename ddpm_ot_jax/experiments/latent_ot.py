"""Experiment `latent_ot`: is the pairing image ↔ DDPM code an optimal assignment? (Figure 7)

Khrulkov et al. (2022), Sec. 3.5 "Numerical results": take K validation images x_1..x_K,
encode each with the deterministic DDPM encoder, y_i = E(x_i), solve the exact discrete OT
problem between {x_i} and {y_i} (pixels as vectors in R^d, quadratic cost, uniform weights)
and look at the optimal permutation π. The paper found π = id for K = 500 AFHQ images. We
report, for each K in `latent_ot.num_images` that the split allows,

    identity_fraction = (1/K) #{i : π(i) = i},
    ot_relative_error = ε_rel = (Cost(E) − Cost(OT)) / Cost(OT),   Cost(π) = (1/K) Σ_i |x_i − y_π(i)|²

(the paper's Sec. 3.4 definitions, `ot.pairing_test`), for the two deterministic encoders
of `latent_codes.encode_images`:

* 'ode':  the probability-flow ODE (Eq. 6) from step 0 to N − 1, adaptive diffrax solve;
* 'ddim': DDIM inversion with `latent_ot.ddim_steps` steps (the paper's encoder);

and for two controls that tell what the test can and cannot see:

* 'shuffled': the same codes under a seeded random permutation σ. The pairing x_i ↔ y_σ(i)
  is wrong for all but ≈ 1 point, so an informative test must give identity_fraction ≈ 1/K
  and ε_rel > 0;
* 'other': the codes of the same images under a DDPM trained on *other data*
  (`models.other`; for digits, the transposed digits). Its encoder is not the OT map of the
  images' distribution, so a test that is specific to OT maps should reject it. Note that
  the discrete test only checks that the pairing is cyclically monotone on K points: any
  map that is the gradient of a convex function (e.g. per-pixel standardisation) passes it
  exactly, whatever its target distribution.

Keys: `identity_fraction_<enc>_k<K>`, `ot_relative_error_<enc>_k<K>` and
`nearest_code_fraction_<enc>_k<K>` (share of images whose nearest code is their own: when it
is 1 the identity is optimal trivially) with
<enc> ∈ {ode, ddim, shuffled_ode, shuffled_ddim, other_ode, other_ddim}; per encoder
`round_trip_rmse_<enc>` (RMS pixel error of decode(encode(x)) on [−1, 1]), `code_mean_<enc>`,
`code_std_<enc>` (≈ 0 and 1 when the codes look like N(0, I) samples), `nfe_<enc>` and
`nfe_decode_<enc>` (network evaluations per image of the encoder and the decoder),
`encode_seconds_<enc>` (encoding and decoding); `ks`, `skipped_ks`, `num_images_available`, `params`,
`train_seconds_<model>`, `seconds`. Arrays: arrays.npz (images, codes, the shuffling σ and every
optimal permutation `perm_<enc>_k<K>`), so every number can be recomputed. Figures:
ot_matrix.png (the K × K optimal transport plans as images: Figure 7) and codes.png (images,
their codes and the reconstructions).

The DDPMs come from `models.<name>` specs (`model_sources.model_spec`): trained here
with `trainer.train_ddpm` in <models_dir>/<data>-<fingerprint>/ (`stages.model_folder`; a
rerun resumes; models_dir defaults to <workdir>/models),
restored from another run's checkpoints, or imported from diffusers weights
(`stages.load_model`). Every model's data folder, checkpoint or weights is checked before the
first model is trained (`model_sources.check_sources`), so a missing one stops the run at
once, not hours later. Encoders and
decoders run on the samplers' view matching each model's training.loss_type.
"""
from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from ddpm_ot_jax import flow
from ddpm_ot_jax import latent_codes
from ddpm_ot_jax import model_sources
from ddpm_ot_jax import ot
from ddpm_ot_jax import plotting
from ddpm_ot_jax.experiments import common
from ddpm_ot_jax.experiments import stages

# The config fields this experiment reads (scripts/main.py rejects any other field or override).
CONFIG_FIELDS = ("data", "model", "diffusion", "training", "models", "models_dir", "latent_ot")

# Streams derived from config.seed (trainer uses 0–2, train_ddpm 3, dpmot 10–13, restoring a
# checkpoint stages.RESTORE_STREAM = 22).
SUBSET_STREAM, SHUFFLE_STREAM = 20, 21


def solver_options(lc: ml_collections.ConfigDict) -> flow.SolverOptions:
  """The PF-ODE encoder's and decoder's diffrax options from config.latent_ot."""
  return flow.SolverOptions(solver=lc.ode_solver, rtol=lc.ode_rtol, atol=lc.ode_atol,
                            max_steps=lc.ode_max_steps)


# ----------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------


def _validate(config: ml_collections.ConfigDict) -> None:
  lc = config.latent_ot
  if not lc.num_images or any(int(k) < 2 for k in lc.num_images):
    raise ValueError(f"latent_ot.num_images must list sizes K ≥ 2, got {tuple(lc.num_images)}.")
  for enc in lc.encoders:
    if enc not in latent_codes.ENCODERS:
      raise ValueError(f"latent_ot.encoders: unknown encoder {enc!r}; choose from "
                       f"{latent_codes.ENCODERS}.")
  if lc.batch_size < 1 or lc.ddim_steps < 1:
    raise ValueError("latent_ot.batch_size and latent_ot.ddim_steps must be ≥ 1.")
  if "own" not in config.models:
    raise KeyError("config.models must have an 'own' model (trained on the encoded images' "
                   "distribution).")
  for name, spec in config.models.items():
    model_sources.check_spec(name, spec)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Encodes held-out images, runs the OT test for every K, encoder and control."""
  _validate(config)
  watch = common.Stopwatch()
  lc = config.latent_ot
  own_spec = config.models.own
  model_names = ["own"] + (["other"] if lc.other_model else [])
  if lc.other_model and "other" not in config.models:
    raise KeyError("latent_ot.other_model is on but config.models has no 'other' model.")
  # Every input up front: a missing dataset, checkpoint or weights fails before any training.
  model_sources.check_split(config.data, lc.split, own_spec.subfolder)
  model_sources.check_sources(config, model_names, model_sources.image_shape(config.data))
  # The images first: a missing dataset fails before any training.
  heldout = model_sources.load_split(config.data, lc.split, own_spec.subfolder,
                                     tuple(lc.classes), own_spec.transform)
  ks = sorted({int(k) for k in lc.num_images})
  usable = [k for k in ks if k <= len(heldout)]
  skipped = [k for k in ks if k > len(heldout)]
  if skipped:
    logging.warning("Split %r has %d images: K = %s skipped.", lc.split, len(heldout), skipped)
  if not usable:
    raise ValueError(f"Split {lc.split!r} has only {len(heldout)} images; latent_ot.num_images="
                     f"{tuple(lc.num_images)} asks for more. Use smaller K.")
  k_max = usable[-1]
  base_key = jax.random.PRNGKey(config.seed)
  order = np.asarray(jax.random.permutation(jax.random.fold_in(base_key, SUBSET_STREAM),
                                            len(heldout)))[:k_max]
  images = heldout.images[order]
  labels = heldout.labels[order]
  image_shape = heldout.image_shape

  results: dict[str, Any] = {"ks": usable, "skipped_ks": skipped,
                             "num_images_available": len(heldout)}
  arrays: dict[str, np.ndarray] = {"images": images, "labels": labels, "order": order}

  code_sets: dict[str, np.ndarray] = {}
  figure_rows = []
  for model_name in model_names:
    loaded = stages.load_model(config, model_name, config.models[model_name], workdir,
                               image_shape)
    results[f"train_steps_{model_name}"] = loaded.steps
    results[f"train_seconds_{model_name}"] = loaded.train_seconds
    if model_name == "own":
      from ddpm_ot_jax.models import unet  # pylint: disable=g-import-not-at-top
      results["params"] = unet.count_params(loaded.params)
    prefix = "" if model_name == "own" else f"{model_name}_"
    for enc in lc.encoders:
      out = latent_codes.encode_images(loaded, images, enc, lc.batch_size, lc.ddim_steps,
                                       solver_options(lc), labels, round_trip=lc.round_trip)
      name = f"{prefix}{enc}"
      code_sets[name] = out.codes
      arrays[f"codes_{name}"] = out.codes
      results[f"nfe_{name}"] = out.nfe_encode
      if out.reconstructions is not None:
        results[f"nfe_decode_{name}"] = out.nfe_decode
      results[f"encode_seconds_{name}"] = out.seconds
      results[f"code_mean_{name}"] = float(np.mean(out.codes))
      results[f"code_std_{name}"] = float(np.std(out.codes))
      message = ""
      if out.reconstructions is not None:
        rmse = np.sqrt(np.mean((out.reconstructions - images).reshape(k_max, -1) ** 2, axis=1))
        results[f"round_trip_rmse_{name}"] = float(np.mean(rmse))
        arrays[f"reconstructions_{name}"] = out.reconstructions
        message = f", round trip RMSE {results[f'round_trip_rmse_{name}']:.4f}"
      if model_name == "own":
        figure_rows.append((f"code ({enc}) / 3", out.codes / 3.0))
        if out.reconstructions is not None:
          figure_rows.append((f"decoded ({enc})", out.reconstructions))
      logging.info("%s codes of %d images: NFE %d, %.1f s, mean %.3f, std %.3f%s", name, k_max,
                   out.nfe_encode, out.seconds, results[f"code_mean_{name}"],
                   results[f"code_std_{name}"], message)

  tests = {}
  for k in usable:
    pairings = {name: codes[:k] for name, codes in code_sets.items()}
    if lc.shuffle_control:  # the same k codes in a seeded random order: a wrong pairing
      shuffle = np.asarray(jax.random.permutation(
          jax.random.fold_in(jax.random.fold_in(base_key, SHUFFLE_STREAM), k), k))
      arrays[f"shuffle_k{k}"] = shuffle
      for enc in lc.encoders:
        pairings[f"shuffled_{enc}"] = code_sets[enc][:k][shuffle]
    for name, codes in pairings.items():
      test = ot.pairing_test(images[:k], codes, lc.ot_method)
      tests[(name, k)] = test
      results[f"identity_fraction_{name}_k{k}"] = test["identity_fraction"]
      results[f"ot_relative_error_{name}_k{k}"] = test["ot_relative_error"]
      results[f"nearest_code_fraction_{name}_k{k}"] = test["nearest_code_fraction"]
      arrays[f"perm_{name}_k{k}"] = test["perm"]
      logging.info("K=%d %-14s identity fraction %.3f, ε_rel %.3g", k, name,
                   test["identity_fraction"], test["ot_relative_error"])

  common.save_npz(os.path.join(workdir, "arrays.npz"), **arrays)
  first = lc.encoders[0]
  panel_names = [n for n in (*lc.encoders, f"other_{first}", f"shuffled_{first}")
                 if (n, k_max) in tests]
  titles = {"ode": "PF-ODE codes", "ddim": "DDIM-inversion codes",
            f"other_{first}": f"other-data model ({first})",
            f"shuffled_{first}": "shuffled codes (control)"}
  plans = [(titles[n], tests[(n, k_max)]["perm"], tests[(n, k_max)]["identity_fraction"],
            tests[(n, k_max)]["ot_relative_error"]) for n in panel_names]
  common.save_figure(plotting.transport_plans_figure(plans), os.path.join(workdir, "ot_matrix.png"))
  shown = min(12, k_max)
  rows = [("images", images[:shown])] + [(label, row[:shown]) for label, row in figure_rows]
  common.save_figure(plotting.image_rows_figure(rows), os.path.join(workdir, "codes.png"))
  results["seconds"] = watch.seconds()
  return results
