"""DPM-OT (Li et al., ICCV 2023) end to end, beside the strong baselines at equal NFE.

Stages, each cached in the workdir and recomputed only when its inputs change
(`stages.fingerprint`):

1. model    train the DDPM (ddpm_training.train_ddpm; resumable) → <workdir>/model-<fp>/
2. latents  the target set diffused to step M (the switch time t_M):
            x_M = √ᾱ_M y + √(1 − ᾱ_M) ε, ε seeded               → latents-<fp>.npz
3. ot       the semi-discrete OT potential g between the source (N(0, I) or U[0,1]^d) and the
            N latents, with ott-jax (semidiscrete.solve_potential) → ot-<fp>/ (orbax)
4. samples  per method: DDPM (all steps), DDIM-k, DPM-Solver-k, PF-ODE (adaptive) from
            x_T ~ N(0, I), and DPM-OT: z ~ source → x_M = latents[argmax_j g_j − ‖z − x_M^j‖²]
            → M reverse steps (NFE counted by the sampler)              → samples-<fp>.npz
5. eval     FID (classifier features for digits, Inception pool3 for RGB sets) against the
            training set, precision/recall (k-NN, k = 3), MMR (digits), memorization
            (pixel-space nearest target) and the data floor (held-out real images).

DPM-OT's latents at the reference's switch time are nearly clean target images, so every
DPM-OT number sits beside its memorization columns; the optional sweep over t_M
(`dpmot.switch_sweep`) plots FID against memorization.

Outputs: results.json (flat keys `<metric>_<method>`, OT diagnostics `ot_*`), comparison.md
(the table), samples_<method>.png (one grid per method), sweep figure fid_vs_memorization.png.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any, Callable

from absl import logging
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_ot_jax import checkpoints
from ddpm_ot_jax import data
from ddpm_ot_jax import metrics
from ddpm_ot_jax import samplers
from ddpm_ot_jax import semidiscrete
from ddpm_ot_jax import train
from ddpm_ot_jax.experiments import common
from ddpm_ot_jax.experiments import ddpm_training
from ddpm_ot_jax.experiments import stages

# Streams derived from config.seed (ddpm_training uses 0–3).
LATENT_STREAM, OT_STREAM, METHOD_STREAM, CLASSIFIER_STREAM = 10, 11, 12, 13


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the table: `sampler` from x_T ~ N(0, I), or from OT latents (`dpmot`)."""

  name: str
  sampler: str
  num_steps: int | None = None
  dpmot: bool = False
  kwargs: tuple = ()


def parse_method(name: str, config: ml_collections.ConfigDict, num_steps_total: int) -> Method:
  """'ddpm', 'ddim_<k>', 'dpm_solver_<k>', 'pf_ode' or 'dpmot_<k>' → Method."""
  if name == "ddpm":
    return Method(f"DDPM-{num_steps_total}", "ddpm")
  if name == "pf_ode":
    return Method("PF-ODE", "pf_ode")
  match = re.fullmatch(r"(ddim|dpm_solver|dpmot)_(\d+)", name)
  if not match:
    raise ValueError(f"Unknown method {name!r} in evaluation.methods; use 'ddpm', 'pf_ode', "
                     "'ddim_<k>', 'dpm_solver_<k>' or 'dpmot_<k>'.")
  kind, steps = match.group(1), int(match.group(2))
  if kind == "ddim":
    return Method(f"DDIM-{steps}", "ddim", steps, kwargs=(("eta", 0.0),))
  if kind == "dpm_solver":
    return Method(f"DPM-Solver-{steps}", "dpm_solver", steps,
                  kwargs=(("order", 3), ("variant", "dpmsolver++")))
  dc = config.dpmot
  if steps != dc.switch_index + 1 and dc.sampler == "ddpm":
    raise ValueError(f"dpmot_{steps}: the 'ddpm' sampler takes every step from switch_index="
                     f"{dc.switch_index}, i.e. {dc.switch_index + 1} steps.")
  kwargs = (("eta", float(dc.eta)),) if dc.sampler == "ddim" else ()
  return Method(f"DPM-OT-{steps}", dc.sampler, None if dc.sampler == "ddpm" else steps, True, kwargs)


def _key(name: str) -> str:
  """'DPM-Solver-10' → 'dpm_solver_10': the suffix of the flat results keys."""
  return name.lower().replace("-", "_")


# ----------------------------------------------------------------------------------------
# Stages.
# ----------------------------------------------------------------------------------------


def _load_split(config, split: str) -> data.ImageDataset:
  dc = config.data
  return data.load_dataset(dc.name, split, dc.get("root") or None, dc.get("resolution") or None)


def _model_inputs(config) -> dict:
  return dict(seed=config.seed, data=config.data, model=config.model,
              diffusion=config.diffusion, training=config.training)


def _latents(config, schedule, targets: np.ndarray, switch_index: int, fp: str, workdir: str):
  """x_M = √ᾱ_M y + √(1 − ᾱ_M) ε for every target y (Ho et al. 2020, Eq. 4)."""

  def compute():
    alpha_bar = float(schedule.alphas_cumprod()[switch_index])
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), LATENT_STREAM)
    noise = np.asarray(jax.random.normal(key, targets.shape, jnp.float32))
    return {"latents": np.sqrt(alpha_bar) * targets + np.sqrt(1.0 - alpha_bar) * noise}

  arrays, cached = stages.cached_arrays(os.path.join(workdir, f"latents-{fp[:12]}.npz"), fp, compute)
  logging.info("Latents at step %d (N=%d): %s", switch_index, len(targets),
               "reused" if cached else "computed")
  return arrays["latents"]


def _potential(config, latents: np.ndarray, fp: str, workdir: str, num_iterations: int):
  """The semi-discrete dual potential g (N,), solved once and kept with orbax."""
  oc = config.dpmot.ot
  directory = stages.stage_dir(workdir, "ot", fp)
  n = len(latents)
  with checkpoints.Checkpointer(directory, keep=1, async_save=False) as ckpt:
    if ckpt.latest_step() is not None:
      stored = ckpt.restore({"g": jnp.zeros((n,), jnp.float32),
                             "diagnostics": jnp.zeros((6,), jnp.float32)})
      logging.info("OT potential reused from %s", directory)
      return stored["g"], _diagnostics_from_array(np.asarray(stored["diagnostics"]))
    logging.info("Solving semi-discrete OT: N=%d targets in d=%d, up to %d iterations", n,
                 latents[0].size, num_iterations)
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), OT_STREAM)
    g, diag = semidiscrete.solve_potential(
        key, jnp.asarray(latents), source=config.dpmot.source, num_iterations=num_iterations,
        batch_size=oc.batch_size, learning_rate=oc.learning_rate,
        error_eval_every=oc.error_eval_every, chi2_threshold=oc.chi2_threshold,
        num_check_samples=oc.check_samples)
    logging.info("OT: %d iterations, %.1f s, chi2 %.2e, converged %s, empty cells %s",
                 diag["iterations"], diag["seconds"], diag["chi2_error"], diag["converged"],
                 diag.get("empty_cells"))
    ckpt.save(0, {"g": jnp.asarray(g, jnp.float32),
                  "diagnostics": jnp.asarray(_diagnostics_to_array(diag), jnp.float32)})
    return g, _diagnostics_from_array(_diagnostics_to_array(diag))


_DIAG_KEYS = ("iterations", "seconds", "chi2_error", "converged", "max_relative_error", "empty_cells")


def _diagnostics_to_array(diag: dict) -> np.ndarray:
  return np.array([float(diag.get(k, np.nan)) for k in _DIAG_KEYS])


def _diagnostics_from_array(values: np.ndarray) -> dict:
  return dict(zip(_DIAG_KEYS, (float(v) for v in values)))


def _draw(method: Method, model, params, schedule, mesh, key, num_samples: int, batch_size: int,
          image_shape, ot_map: Callable | None, start_index: int | None, source: str):
  """`num_samples` images of `method` in chunks; returns (images, nfe, seconds)."""
  chunks, nfe = [], None
  labels = ddpm_training.class_labels(model, num_samples)
  start = time.perf_counter()
  for k, lo in enumerate(range(0, num_samples, batch_size)):
    count = min(batch_size, num_samples - lo)
    key_noise, key_sampler = jax.random.split(jax.random.fold_in(key, k))
    if method.dpmot:
      z = semidiscrete.sample_source(key_noise, (count, int(np.prod(image_shape))), source)
      x_start = ot_map(z).reshape((count,) + tuple(image_shape))
    else:
      x_start = jax.random.normal(key_noise, (count,) + tuple(image_shape), jnp.float32)
    if count % mesh.devices.size == 0:
      x_start = jax.device_put(x_start, train.batch_sharded(mesh))
    y = None if labels is None else labels[lo:lo + count]
    eps_fn = samplers.model_eps_fn(model.apply, params, y)
    result = samplers.sample(method.sampler, eps_fn, schedule, x_start, key=key_sampler,
                             num_steps=method.num_steps,
                             start_index=start_index if method.dpmot else None,
                             **dict(method.kwargs))
    chunks.append(np.asarray(jnp.clip(result.x, -1.0, 1.0)))
    nfe = int(result.nfe)
  return np.concatenate(chunks), nfe, time.perf_counter() - start


# ----------------------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Evaluator:
  """Features for FID / precision-recall, and class probabilities for MMR when available."""

  features: Callable[[np.ndarray], np.ndarray]
  probs: Callable[[np.ndarray], np.ndarray] | None
  feature_name: str
  classifier_accuracy: float = float("nan")


def _evaluator(config, train_set: data.ImageDataset, heldout: data.ImageDataset, workdir: str) -> Evaluator:
  """Inception features (pytorch-fid weights) or a digits classifier trained on `train_set`
  (cached in the workdir; its accuracy on `heldout` reported)."""
  ec = config.evaluation
  if ec.features == "inception":
    from ddpm_ot_jax.models import inception  # pylint: disable=g-import-not-at-top

    path = os.path.expanduser(ec.inception_weights) if ec.inception_weights else None
    model, variables = inception.load_pytorch_fid_weights(path)
    feature_fn = inception.make_feature_fn(model, variables)
    feats = lambda images: np.asarray(inception.extract_features(feature_fn, images))
    return Evaluator(feats, None, "inception")
  if ec.features != "classifier":
    raise ValueError(f"evaluation.features must be 'classifier' or 'inception', got {ec.features!r}.")
  from ddpm_ot_jax import classifier  # pylint: disable=g-import-not-at-top

  fp = stages.fingerprint(dict(seed=config.seed, data=config.data, kind="classifier"))
  path = os.path.join(workdir, f"classifier-{fp[:12]}.msgpack")
  if os.path.exists(path):
    with open(path, "rb") as f:
      params = flax.serialization.msgpack_restore(f.read())
  else:
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), CLASSIFIER_STREAM)
    params = classifier.train_classifier(key, train_set.images, train_set.labels)
    with common.atomic_path(path) as tmp:
      with open(tmp, "wb") as f:
        f.write(flax.serialization.msgpack_serialize(jax.device_get(params)))
  probs = lambda images: np.asarray(classifier.predict_probs(params, images))
  feats = lambda images: np.asarray(classifier.features(params, images))
  accuracy = float(np.mean(np.argmax(probs(heldout.images), -1) == heldout.labels))
  return Evaluator(feats, probs, "classifier", accuracy)


def _metrics(images: np.ndarray, evaluator: Evaluator, reference_features: np.ndarray,
             targets: np.ndarray, novelty_pixels: np.ndarray, config,
             with_memorization: bool = True) -> dict[str, float]:
  ec = config.evaluation
  feats = evaluator.features(images)
  out = {"fid": metrics.fid_from_features(reference_features, feats)}
  out.update(metrics.precision_recall(reference_features, feats, k=ec.pr_k))
  if evaluator.probs is not None:
    probs = evaluator.probs(images)
    out["mmr"] = metrics.mode_mixture_ratio(probs, ec.mmr_lambda)
    out["recognized_fraction"] = metrics.recognized_fraction(probs)
  if with_memorization:
    mem = metrics.memorization(images, targets, novelty_pixels)
    out["copy_fraction"] = mem["copy_fraction"]
    out["nn_distance_ratio"] = mem["nn_distance_ratio"]
  return out


_TABLE_COLUMNS = (("nfe", "NFE", "{:.0f}"), ("fid", "FID", "{:.3f}"), ("precision", "precision", "{:.3f}"),
                  ("recall", "recall", "{:.3f}"), ("mmr", "MMR", "{:.3f}"),
                  ("copy_fraction", "copies", "{:.3f}"), ("nn_distance_ratio", "NN-dist ratio", "{:.3f}"),
                  ("seconds", "seconds", "{:.1f}"))


def comparison_table(rows: list[tuple[str, dict]], feature_name: str, num_samples: int) -> str:
  """The markdown table: one row per method (and the data floor), the columns above."""
  present = [c for c in _TABLE_COLUMNS if any(c[0] in r for _, r in rows)]
  lines = ["| method | " + " | ".join(c[1] for c in present) + " |",
           "|---|" + "---:|" * len(present)]
  for name, row in rows:
    cells = [c[2].format(row[c[0]]) if c[0] in row else "–" for c in present]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines.append("")
  lines.append(f"FID, precision and recall in {feature_name} feature space against the training "
               f"set, {num_samples} samples per method. MMR: share of samples with ≥ 2 classes of "
               "softmax ≥ λ. copies: share of samples whose nearest target is ≥ 3× closer than the "
               "second nearest; NN-dist ratio: median nearest-target distance of samples over that "
               "of held-out real images (1 = as novel as fresh data, → 0 = copies).")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------


def _validate(config) -> None:
  dc, ec = config.dpmot, config.evaluation
  n_steps = config.diffusion.num_steps
  if not 0 <= dc.switch_index < n_steps:
    raise ValueError(f"dpmot.switch_index must lie in [0, {n_steps - 1}], got {dc.switch_index}.")
  if dc.sampler not in ("ddim", "ddpm", "dpm_solver"):
    raise ValueError(f"dpmot.sampler must be 'ddim', 'ddpm' or 'dpm_solver', got {dc.sampler!r}.")
  if dc.source not in ("gaussian", "uniform"):
    raise ValueError(f"dpmot.source must be 'gaussian' or 'uniform', got {dc.source!r}.")
  if ec.num_samples <= ec.pr_k:
    raise ValueError(f"evaluation.num_samples must exceed pr_k={ec.pr_k}.")
  for m in dc.switch_sweep:
    if not dc.sweep_num_steps <= m + 1 <= n_steps:
      raise ValueError(f"switch_sweep index {m} cannot take {dc.sweep_num_steps} steps.")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  _validate(config)
  watch = common.Stopwatch()
  dc, ec = config.dpmot, config.evaluation
  # Everything a user can get wrong about inputs fails here, before hours of training.
  if dc.target_split == ec.novelty_split:
    raise ValueError("dpmot.target_split and evaluation.novelty_split must differ: the novelty "
                     "images are the reference for 'not a copy of a target'.")
  if ec.floor_split == "train":
    raise ValueError("evaluation.floor_split must not be 'train': the data floor compares real "
                     "images outside the training set with it.")
  train_set = _load_split(config, "train")
  floor_set = _load_split(config, ec.floor_split)
  novelty_set = _load_split(config, ec.novelty_split)
  targets_set = _load_split(config, dc.target_split)
  evaluator = _evaluator(config, train_set, floor_set, workdir)
  logging.info("Data: %d train, %d floor (%s), %d novelty reference (%s), %d targets (%s) of shape %s",
               len(train_set), len(floor_set), ec.floor_split, len(novelty_set), ec.novelty_split,
               len(targets_set), dc.target_split, train_set.image_shape)

  # 1. Model.
  model_fp = stages.fingerprint(_model_inputs(config))
  model_dir = stages.stage_dir(workdir, "model", model_fp)
  result = ddpm_training.train_ddpm(config, model_dir, train_set)
  model, params, schedule, mesh = result.model, result.state.ema_params, result.schedule, result.mesh
  logging.info("Model: %d params, %d steps (%.0f s this run)", result.num_params,
               int(result.state.step), result.train_seconds)

  targets = targets_set.images
  if dc.max_targets and len(targets) > dc.max_targets:
    targets = targets[:dc.max_targets]
  reference_features = evaluator.features(train_set.images)
  novelty_pixels = novelty_set.images[:ec.max_novelty_images or None]

  # 2–3. Latents and OT potential at the switch index (and the sweep's).
  def expressway(switch_index: int, iterations: int):
    lat_fp = stages.fingerprint(dict(model=model_fp, targets=dc.target_split, max_targets=dc.max_targets,
                                     switch_index=switch_index, seed=config.seed, data=config.data))
    latents = _latents(config, schedule, targets, switch_index, lat_fp, workdir)
    ot_fp = stages.fingerprint(dict(latents=lat_fp, ot=dc.ot, source=dc.source, iterations=iterations))
    g, diag = _potential(config, latents, ot_fp, workdir, iterations)
    flat = jnp.asarray(latents.reshape(len(latents), -1))
    assign = jax.jit(lambda z: semidiscrete.assign(z, flat, g, dc.ot.block_size))
    return (lambda z: flat[assign(z)]), diag, lat_fp, ot_fp

  ot_map, ot_diag, _, ot_fp = expressway(dc.switch_index, dc.ot.num_iterations)

  # 4–5. Samples and evaluation, one method at a time.
  results: dict[str, Any] = {
      "params": result.num_params,
      "num_samples": ec.num_samples,
      "num_targets": len(targets),
      "switch_index": dc.switch_index,
      "switch_alpha_bar": float(schedule.alphas_cumprod()[dc.switch_index]),
      "switch_noise_to_signal": float(np.sqrt(1 / schedule.alphas_cumprod()[dc.switch_index] - 1)),
      "train_seconds": result.train_seconds,
      "classifier_accuracy": evaluator.classifier_accuracy,
  }
  results.update({f"ot_{k}": v for k, v in ot_diag.items()})
  rows = []
  method_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), METHOD_STREAM)
  for i, name in enumerate(ec.methods):
    method = parse_method(name, config, schedule.num_steps)
    fp = stages.fingerprint(dict(model=model_fp, method=dataclasses.asdict(method), n=ec.num_samples,
                                 seed=config.seed, ot=ot_fp if method.dpmot else None,
                                 switch=dc.switch_index if method.dpmot else None))

    def compute(method=method, i=i):
      images, nfe, seconds = _draw(method, model, params, schedule, mesh, jax.random.fold_in(method_key, i),
                                   ec.num_samples, ec.batch_size, train_set.image_shape, ot_map,
                                   dc.switch_index, dc.source)
      return {"images": images, "nfe": np.array(nfe), "seconds": np.array(seconds)}

    arrays, cached = stages.cached_arrays(os.path.join(workdir, f"samples-{_key(method.name)}.npz"), fp, compute)
    row = _metrics(arrays["images"], evaluator, reference_features, targets, novelty_pixels, config)
    row["nfe"], row["seconds"] = int(arrays["nfe"]), float(arrays["seconds"])
    rows.append((method.name, row))
    ddpm_training.save_image_grid(arrays["images"][:100], os.path.join(workdir, f"samples_{_key(method.name)}.png"),
                                  f"{method.name} ({row['nfe']} NFE)")
    logging.info("%s: NFE %d, FID %.3f, copies %.3f, %.1f s%s", method.name, row["nfe"], row["fid"],
                 row["copy_fraction"], row["seconds"], " (cached samples)" if cached else "")
    results.update({f"{k}_{_key(method.name)}": v for k, v in row.items()})

  # The floor's memorization is meaningless when the floor images are the targets themselves.
  floor = _metrics(floor_set.images, evaluator, reference_features, targets, novelty_pixels, config,
                   with_memorization=ec.floor_split != dc.target_split)
  floor["nfe"] = 0
  rows.append((f"data floor ({ec.floor_split})", floor))
  results.update({f"{k}_data_floor": v for k, v in floor.items() if k != "nfe"})
  if evaluator.probs is not None:
    results["mmr_lambdas"] = list(ec.mmr_sweep)
    for name in ec.methods:
      method = parse_method(name, config, schedule.num_steps)
      with np.load(os.path.join(workdir, f"samples-{_key(method.name)}.npz")) as stored:
        results[f"mmr_sweep_{_key(method.name)}"] = metrics.mmr_sweep(evaluator.probs(stored["images"]), ec.mmr_sweep)

  table = comparison_table(rows, evaluator.feature_name, ec.num_samples)
  with common.atomic_path(os.path.join(workdir, "comparison.md")) as tmp:
    with open(tmp, "w") as f:
      f.write(table)
  logging.info("\n%s", table)

  if dc.switch_sweep:
    results.update(_sweep(config, expressway, model, params, schedule, mesh, train_set, evaluator,
                          reference_features, targets, novelty_pixels, method_key, workdir))
  results["seconds"] = watch.seconds()
  return results


def _sweep(config, expressway, model, params, schedule, mesh, train_set, evaluator, reference_features,
           targets, novelty_pixels, method_key, workdir) -> dict:
  """FID vs memorization of DPM-OT at fixed NFE over switch indices M (plot + keys)."""
  dc, ec = config.dpmot, config.evaluation
  fids, copies, ratios = [], [], []
  for j, m in enumerate(dc.switch_sweep):
    ot_map, diag, _, ot_fp = expressway(m, dc.sweep_ot_iterations)
    method = Method(f"DPM-OT-{dc.sweep_num_steps}@{m}", "ddim", dc.sweep_num_steps, True, (("eta", float(dc.eta)),))
    fp = stages.fingerprint(dict(ot=ot_fp, method=dataclasses.asdict(method), n=ec.num_samples, seed=config.seed))

    def compute(method=method, m=m, j=j, ot_map=ot_map):
      images, nfe, seconds = _draw(method, model, params, schedule, mesh, jax.random.fold_in(method_key, 1000 + j),
                                   ec.num_samples, ec.batch_size, train_set.image_shape, ot_map, m, dc.source)
      return {"images": images, "nfe": np.array(nfe), "seconds": np.array(seconds)}

    arrays, _ = stages.cached_arrays(os.path.join(workdir, f"sweep-{m}.npz"), fp, compute)
    row = _metrics(arrays["images"], evaluator, reference_features, targets, novelty_pixels, config)
    fids.append(row["fid"])
    copies.append(row["copy_fraction"])
    ratios.append(row["nn_distance_ratio"])
    logging.info("sweep M=%d: FID %.3f, copies %.3f, NN ratio %.3f (OT chi2 %.2e)", m, row["fid"],
                 row["copy_fraction"], row["nn_distance_ratio"], diag["chi2_error"])
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(5.5, 4))
  ax.plot(ratios, fids, "o-")
  for m, x, y in zip(dc.switch_sweep, ratios, fids):
    ax.annotate(f"M={m}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
  ax.axvline(1.0, color="k", ls=":", lw=0.8)
  ax.set_xlabel("median nearest-target distance / held-out's (→ 0: copies)")
  ax.set_ylabel(f"FID ({evaluator.feature_name} features)")
  ax.set_title(f"DPM-OT at {dc.sweep_num_steps} NFE: switch step M")
  common.save_figure(fig, os.path.join(workdir, "fid_vs_memorization.png"))
  return {"sweep_switch_indices": list(dc.switch_sweep), "sweep_fid": fids, "sweep_copy_fraction": copies,
          "sweep_nn_distance_ratio": ratios}
