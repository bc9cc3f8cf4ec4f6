"""DPM-OT (Li et al., ICCV 2023) end to end, beside the strong baselines at equal NFE.

Stages, each cached in the workdir and recomputed only when its inputs change
(`stages.fingerprint`):

0. inputs   every user-supplied input is read once, before any work: the dataset splits
            (train, floor, novelty reference, targets; a split serving two roles is read
            once), the Inception weights (evaluation.features='inception') and the diffusers
            weights (training.init_from_diffusers). All that are missing are named in ONE
            FileNotFoundError, with where each was looked for.
1. model    train the DDPM (trainer.train_ddpm; resumable) → <workdir>/model-<fp>/;
            with training.init_from_diffusers the imported network is used as it is (no
            training step; fingerprint = the weights' path, size and mtime + config.diffusion)
2. latents  the target set diffused to step M (the switch time t_M):
            x_M = √ᾱ_M y + √(1 − ᾱ_M) ε, ε seeded               → latents-<fp>.npz
3. ot       the semi-discrete OT potential g between the source (N(0, I) or U[0,1]^d) and the
            N latents, with ott-jax (semidiscrete.solve_potential) → ot-<fp>/ (orbax)
4. samples  per method: DDPM (all steps), DDIM-k, DPM-Solver-k, PF-ODE (adaptive) from
            x_T ~ N(0, I), and DPM-OT: z ~ source → x_M = latents[j(z)],
            j(z) = argmax_j g_j − ‖z − x_M^j‖² (targets split across devices when there are
            several) → M reverse steps (NFE counted by the sampler)
                                                        → samples-<method>-<fp>.npz
5. eval     FID (classifier features for digits, Inception pool3 for RGB sets) against the
            training set, precision/recall (k-NN, k = 3), MMR (digits), memorization
            (pixel-space nearest target) and the data floor (held-out real images).

DPM-OT's latents at the reference's switch time are nearly clean target images, so every
DPM-OT number sits beside its memorization columns; the optional sweep over t_M
(`dpmot.switch_sweep`) plots FID against memorization.

Outputs: results.json (flat keys `<metric>_<method>`, OT diagnostics `ot_*`), comparison.md
(the table), samples_<method>.png (one grid per method), sweep figure fid_vs_memorization.png.
Sample files carry their fingerprint in the name (and inside), so a changed input writes a
new file beside the old one.

Results keys (all numbers): params, train_steps, imported_weights (1: diffusers weights used
as they are), train_seconds, num_samples, num_targets, switch_index, switch_alpha_bar,
switch_noise_to_signal, classifier_accuracy (classifier features only), ot_iterations,
ot_converged (0/1), ot_empty_cells (ints), ot_seconds, ot_chi2_error, ot_max_relative_error,
per method <metric>_<method> for nfe, fid, precision, recall, [mmr, recognized_fraction],
copy_fraction, nn_distance_ratio, seconds; <metric>_data_floor; mmr_lambdas and
mmr_sweep_<method> (classifier features); sweep_* lists with dpmot.switch_sweep; seconds.
"""
from __future__ import annotations

import dataclasses
import os
import re
import zlib
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
from ddpm_ot_jax import trainer
from ddpm_ot_jax.experiments import common
from ddpm_ot_jax.experiments import stages

# The config fields this experiment reads (scripts/main.py rejects any other field or override).
CONFIG_FIELDS = ("data", "model", "diffusion", "training", "dpmot", "evaluation")

# Streams derived from config.seed (trainer uses 0–2).
LATENT_STREAM, OT_STREAM, METHOD_STREAM, CLASSIFIER_STREAM = 10, 11, 12, 13
# DPM-Solver settings of every DPM-Solver row, the baseline and DPM-OT's alike.
DPM_SOLVER_KWARGS = (("order", 3), ("variant", "dpmsolver++"))


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the table: `sampler` from x_T ~ N(0, I), or from OT latents (`dpmot`)."""

  name: str
  sampler: str
  num_steps: int | None = None
  dpmot: bool = False
  kwargs: tuple = ()


def parse_method(name: str, config: ml_collections.ConfigDict, num_steps_total: int) -> Method:
  """'ddpm', 'ddim_<k>', 'dpm_solver_<k>', 'pf_ode' or 'dpmot_<k>' → Method.

  'dpmot_<k>' runs `dpmot.sampler` for k steps from the switch step M = dpmot.switch_index,
  so 1 ≤ k ≤ M + 1 (and k = M + 1 for the 'ddpm' sampler, which takes every step).
  """
  if name == "ddpm":
    return Method(f"DDPM-{num_steps_total}", "ddpm")
  if name == "pf_ode":
    return Method("PF-ODE", "pf_ode")
  match = re.fullmatch(r"(ddim|dpm_solver|dpmot)_(\d+)", name)
  if not match:
    raise ValueError(f"Unknown method {name!r} in evaluation.methods; use 'ddpm', 'pf_ode', "
                     "'ddim_<k>', 'dpm_solver_<k>' or 'dpmot_<k>'.")
  kind, steps = match.group(1), int(match.group(2))
  if steps < 1:
    raise ValueError(f"{name}: the number of steps must be at least 1.")
  if kind == "ddim":
    return Method(f"DDIM-{steps}", "ddim", steps, kwargs=(("eta", 0.0),))
  if kind == "dpm_solver":
    return Method(f"DPM-Solver-{steps}", "dpm_solver", steps, kwargs=DPM_SOLVER_KWARGS)
  dc = config.dpmot
  available = dc.switch_index + 1  # reverse steps from x_M down to x_0
  if dc.sampler == "ddpm" and steps != available:
    raise ValueError(f"dpmot_{steps}: the 'ddpm' sampler takes every step from switch_index="
                     f"{dc.switch_index}, i.e. {available} steps.")
  if steps > available:
    raise ValueError(f"dpmot_{steps}: only {available} reverse steps lie below dpmot."
                     f"switch_index={dc.switch_index}; use dpmot_<k> with k ≤ {available} or "
                     f"raise switch_index to at least {steps - 1}.")
  return Method(f"DPM-OT-{steps}", dc.sampler, None if dc.sampler == "ddpm" else steps, True,
                _dpmot_sampler_kwargs(dc))


def _dpmot_sampler_kwargs(dc: ml_collections.ConfigDict) -> tuple:
  """The settings of `dpmot.sampler` for the reverse steps from x_M."""
  return {"ddim": (("eta", float(dc.eta)),), "dpm_solver": DPM_SOLVER_KWARGS}.get(dc.sampler, ())


def _key(name: str) -> str:
  """'DPM-Solver-10' → 'dpm_solver_10': the suffix of the flat results keys."""
  return name.lower().replace("-", "_")


def _stream(name: str) -> int:
  """A PRNG stream per method name (not per list position: reordering reuses samples)."""
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


# ----------------------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------------------


def _split_name(config: ml_collections.ConfigDict, split: str) -> str:
  """The loader's own name of `split` (CIFAR-10's 'heldout' is 'test'), so aliases load once."""
  if config.data.name == "cifar10" and split == "heldout":
    return "test"
  return split


def _load_split(config, split: str) -> data.ImageDataset:
  dc = config.data
  return data.load_dataset(dc.name, split, dc.get("root") or None, dc.get("resolution") or None)


@dataclasses.dataclass
class Inputs:
  """What the user supplies, read once: splits by loader name, the Inception network
  (model, variables) when evaluation.features='inception', and the imported diffusers UNet
  (model, params) when training.init_from_diffusers is set."""

  splits: dict[str, data.ImageDataset]
  inception: tuple[Any, Any] | None = None
  diffusers: tuple[Any, Any] | None = None

  def split(self, config: ml_collections.ConfigDict, name: str) -> data.ImageDataset:
    return self.splits[_split_name(config, name)]


def load_inputs(config: ml_collections.ConfigDict) -> Inputs:
  """Reads every user-supplied input of a DPM-OT run once, before any training.

  Each needed split (train, evaluation.floor_split, evaluation.novelty_split,
  dpmot.target_split) is loaded once; the Inception weights are read with
  `evaluation.inception_width` / `inception_resize` when evaluation.features='inception'; the
  diffusers UNet when training.init_from_diffusers is set. Every input that is missing or
  unreadable is collected and reported in one FileNotFoundError (ValueError when none is
  missing but some are unreadable) naming each and where it was looked for.
  """
  dc, ec = config.dpmot, config.evaluation
  problems: list[tuple[str, Exception]] = []
  splits: dict[str, data.ImageDataset] = {}
  names = dict.fromkeys(_split_name(config, s) for s in
                        ("train", ec.floor_split, ec.novelty_split, dc.target_split))
  for name in names:
    try:
      splits[name] = _load_split(config, name)
    except (FileNotFoundError, ValueError) as e:
      problems.append((f"dataset {config.data.name} (config.data.root={config.data.get('root')!r})", e))
      break  # the other splits sit in the same place: one entry for the dataset
  inception_net = None
  if ec.features == "inception":
    from ddpm_ot_jax.models import inception  # pylint: disable=g-import-not-at-top

    path = os.path.expanduser(ec.inception_weights) if ec.inception_weights else None
    try:
      inception_net = inception.load_pytorch_fid_weights(
          path, width=float(ec.inception_width), resize=int(ec.inception_resize))
    except (FileNotFoundError, ValueError) as e:
      problems.append(("Inception weights (config.evaluation.inception_weights)", e))
  diffusers = None
  if config.training.get("init_from_diffusers", ""):
    shape = splits["train"].image_shape if "train" in splits else None  # checked against it
    try:
      diffusers = trainer.model_from_config(config, shape)
    except (FileNotFoundError, ValueError) as e:
      problems.append(("diffusers weights (config.training.init_from_diffusers)", e))
  if problems:
    kind = (FileNotFoundError if any(isinstance(e, FileNotFoundError) for _, e in problems)
            else ValueError)
    parts = " ".join(f"({i}) {what}: {' '.join(str(e).split())}"
                     for i, (what, e) in enumerate(problems, 1))
    raise kind(f"DPM-OT cannot start, {len(problems)} input(s) missing or unreadable (nothing "
               f"was trained): {parts}")
  return Inputs(splits, inception_net, diffusers)


# ----------------------------------------------------------------------------------------
# Stages.
# ----------------------------------------------------------------------------------------


def _model_inputs(config) -> dict:
  return dict(seed=config.seed, data=config.data, model=config.model,
              diffusion=config.diffusion, training=config.training)


def _imported_model_inputs(config) -> dict:
  """The imported model's identity: the weights file (absolute path, size, mtime) and the
  diffusion schedule it is sampled with; training.* and model.* do not apply."""
  from ddpm_ot_jax.models import diffusers_import  # pylint: disable=g-import-not-at-top

  path = os.path.abspath(os.path.expanduser(config.training.init_from_diffusers))
  weights = os.path.join(path, diffusers_import.WEIGHTS_NAME) if os.path.isdir(path) else path
  stat = os.stat(weights)
  return dict(init_from_diffusers=weights, size=stat.st_size, mtime_ns=stat.st_mtime_ns,
              diffusion=config.diffusion)


def _model(config, workdir: str, train_set: data.ImageDataset, inputs: Inputs):
  """(network, results about it, model fingerprint): trained (resumable), or the imported
  diffusers UNet as it is (`trainer.place_network`, no training step)."""
  if inputs.diffusers is None:
    fp = stages.fingerprint(_model_inputs(config))
    directory = stages.stage_dir(workdir, "model", fp)
    result = trainer.train_ddpm(config, os.path.join(directory, "checkpoints"), train_set,
                                hooks=common.training_hooks(directory))
    info = dict(params=result.num_params, train_steps=int(jax.device_get(result.state.step)),
                train_seconds=result.train_seconds, imported_weights=0)
    return result.network, info, fp
  fp = stages.fingerprint(_imported_model_inputs(config))
  model, params = inputs.diffusers
  logging.info("Using the diffusers weights %s as they are (no training).",
               config.training.init_from_diffusers)
  network = trainer.place_network(config, model, params)
  info = dict(params=network.num_params, train_steps=0, train_seconds=0.0, imported_weights=1)
  return network, info, fp


def _latents(config, schedule, targets: np.ndarray, switch_index: int, fp: str, workdir: str):
  """x_M = √ᾱ_M y + √(1 − ᾱ_M) ε for every target y (Ho et al. 2020, Eq. 4)."""

  def compute():
    alpha_bar = float(schedule.alphas_cumprod()[switch_index])
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), LATENT_STREAM)
    noise = np.asarray(jax.random.normal(key, targets.shape, jnp.float32))
    latents = np.sqrt(alpha_bar) * targets + np.sqrt(1.0 - alpha_bar) * noise
    return {"latents": latents.astype(np.float32)}

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
                             "diagnostics": jnp.zeros((len(_DIAG_KEYS),), jnp.float32)})
      logging.info("OT potential reused from %s", directory)
      return stored["g"], _diagnostics_from_array(np.asarray(stored["diagnostics"]))
    logging.info("Solving semi-discrete OT: N=%d targets in d=%d, up to %d iterations", n,
                 latents[0].size, num_iterations)
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), OT_STREAM)
    g, diag = semidiscrete.solve_potential(
        key, jnp.asarray(latents), source=config.dpmot.source, num_iterations=num_iterations,
        batch_size=oc.batch_size, learning_rate=oc.learning_rate,
        error_eval_every=oc.error_eval_every, error_batch_size=oc.error_batch_size or None,
        chi2_threshold=oc.chi2_threshold, num_check_samples=oc.check_samples)
    logging.info("OT: %d iterations, %.1f s, chi2 %.2e, converged %s, empty cells %s",
                 diag["iterations"], diag["seconds"], diag["chi2_error"], diag["converged"],
                 diag.get("empty_cells"))
    ckpt.save(0, {"g": jnp.asarray(g, jnp.float32),
                  "diagnostics": jnp.asarray(_diagnostics_to_array(diag), jnp.float32)})
    return g, _diagnostics_from_array(_diagnostics_to_array(diag))


_DIAG_KEYS = ("iterations", "seconds", "chi2_error", "converged", "max_relative_error", "empty_cells")
_INT_DIAG_KEYS = ("iterations", "converged", "empty_cells")


def _diagnostics_to_array(diag: dict) -> np.ndarray:
  return np.array([float(diag.get(k, np.nan)) for k in _DIAG_KEYS])


def _diagnostics_from_array(values: np.ndarray) -> dict:
  """Back from the float32 array of the orbax save: counts and the flag as ints; entries
  that were not measured (NaN, e.g. empty_cells with check_samples=0) are left out."""
  out: dict[str, float | int] = {}
  for k, v in zip(_DIAG_KEYS, (float(v) for v in values)):
    if np.isfinite(v):
      out[k] = int(round(v)) if k in _INT_DIAG_KEYS else v
  return out


def _draw(method: Method, network, key, num_samples: int, batch_size: int, image_shape,
          monge_map, start_index: int | None, source: str) -> dict[str, np.ndarray]:
  """`num_samples` images of `method` (`samplers.sample_images` or `samplers.dpm_ot`) as the
  arrays of the sample cache: images, nfe, seconds and, for DPM-OT, target_index."""
  kwargs = dict(method.kwargs)
  if method.dpmot:
    result = samplers.dpm_ot(network, monge_map, key, num_samples, image_shape, start_index,
                             method.num_steps, method.sampler, source, batch_size, **kwargs)
  else:
    result = samplers.sample_images(network, key, num_samples, image_shape, method.sampler,
                                    method.num_steps, batch_size, **kwargs)
  out = {"images": result.images, "nfe": np.array(result.nfe), "seconds": np.array(result.seconds)}
  if result.target_index is not None:
    out["target_index"] = result.target_index
  return out


# ----------------------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Evaluator:
  """Features for FID / precision-recall, and class probabilities for MMR when available."""

  features: Callable[[np.ndarray], np.ndarray]
  probs: Callable[[np.ndarray], np.ndarray] | None
  feature_name: str
  classifier_accuracy: float | None = None


def _evaluator(config, train_set: data.ImageDataset, heldout: data.ImageDataset, workdir: str,
               inputs: Inputs) -> Evaluator:
  """Inception features (pytorch-fid weights, read by `load_inputs`) or a digits classifier
  trained on `train_set` (cached in the workdir; its accuracy on `heldout` reported)."""
  ec = config.evaluation
  if ec.features == "inception":
    from ddpm_ot_jax.models import inception  # pylint: disable=g-import-not-at-top

    model, variables = inputs.inception
    feature_fn = inception.make_feature_fn(model, variables)
    feats = lambda images: np.asarray(inception.extract_features(feature_fn, images))  # noqa: E731
    return Evaluator(feats, None, "inception")
  from ddpm_ot_jax import classifier  # pylint: disable=g-import-not-at-top

  steps = int(ec.classifier_steps)
  fp = stages.fingerprint(dict(seed=config.seed, data=config.data, kind="classifier", steps=steps))
  path = os.path.join(workdir, f"classifier-{fp[:12]}.msgpack")
  if os.path.exists(path):
    with open(path, "rb") as f:
      params = flax.serialization.msgpack_restore(f.read())
  else:
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), CLASSIFIER_STREAM)
    params = classifier.train_classifier(key, train_set.images, train_set.labels,
                                         num_classes=train_set.num_classes, num_steps=steps)
    with common.atomic_path(path) as tmp:
      with open(tmp, "wb") as f:
        f.write(flax.serialization.msgpack_serialize(jax.device_get(params)))
  probs = lambda images: np.asarray(classifier.predict_probs(params, images))  # noqa: E731
  feats = lambda images: np.asarray(classifier.features(params, images))  # noqa: E731
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
  """Config errors, before anything is read or computed."""
  dc, ec = config.dpmot, config.evaluation
  n_steps = config.diffusion.num_steps
  if not 0 <= dc.switch_index < n_steps:
    raise ValueError(f"dpmot.switch_index must lie in [0, {n_steps - 1}], got {dc.switch_index}.")
  if dc.sampler not in ("ddim", "ddpm", "dpm_solver"):
    raise ValueError(f"dpmot.sampler must be 'ddim', 'ddpm' or 'dpm_solver', got {dc.sampler!r}.")
  if dc.source not in ("gaussian", "uniform"):
    raise ValueError(f"dpmot.source must be 'gaussian' or 'uniform', got {dc.source!r}.")
  if ec.features not in ("classifier", "inception"):
    raise ValueError(f"evaluation.features must be 'classifier' or 'inception', got {ec.features!r}.")
  if ec.num_samples <= ec.pr_k:
    raise ValueError(f"evaluation.num_samples must exceed pr_k={ec.pr_k}.")
  if dc.ot.error_batch_size < 0:
    raise ValueError("dpmot.ot.error_batch_size must be ≥ 0 (0: the solver's default).")
  if dc.switch_sweep and dc.sampler == "ddpm":
    raise ValueError("dpmot.switch_sweep compares switch steps at a fixed NFE "
                     "(dpmot.sweep_num_steps), which the 'ddpm' sampler (every step from M) "
                     "cannot keep: use dpmot.sampler='ddim' or 'dpm_solver', or switch_sweep=().")
  for m in dc.switch_sweep:
    if not dc.sweep_num_steps <= m + 1 <= n_steps:
      raise ValueError(f"switch_sweep index {m} cannot take {dc.sweep_num_steps} steps.")
  if _split_name(config, dc.target_split) == _split_name(config, ec.novelty_split):
    raise ValueError("dpmot.target_split and evaluation.novelty_split must differ: the novelty "
                     "images are the reference for 'not a copy of a target'.")
  if _split_name(config, ec.floor_split) == "train":
    raise ValueError("evaluation.floor_split must not be 'train': the data floor compares real "
                     "images outside the training set with it.")
  for name in ec.methods:
    parse_method(name, config, n_steps)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the stages of the module docstring; returns the flat results dict."""
  _validate(config)
  watch = common.Stopwatch()
  dc, ec = config.dpmot, config.evaluation
  # Everything a user can get wrong about inputs fails here, before hours of training.
  inputs = load_inputs(config)
  train_set = inputs.split(config, "train")
  floor_set = inputs.split(config, ec.floor_split)
  novelty_set = inputs.split(config, ec.novelty_split)
  targets_set = inputs.split(config, dc.target_split)
  evaluator = _evaluator(config, train_set, floor_set, workdir, inputs)
  logging.info("Data: %d train, %d floor (%s), %d novelty reference (%s), %d targets (%s) of shape %s",
               len(train_set), len(floor_set), ec.floor_split, len(novelty_set), ec.novelty_split,
               len(targets_set), dc.target_split, train_set.image_shape)

  # 1. Model.
  network, model_info, model_fp = _model(config, workdir, train_set, inputs)
  schedule = trainer.schedule_from_config(config)
  logging.info("Model: %d params, %d steps (%.0f s this run)", model_info["params"],
               model_info["train_steps"], model_info["train_seconds"])

  targets = targets_set.images
  if dc.max_targets and len(targets) > dc.max_targets:
    targets = targets[:dc.max_targets]
  reference_features = evaluator.features(train_set.images)
  novelty_pixels = novelty_set.images[:ec.max_novelty_images or None]
  devices = list(network.mesh.devices.flat)

  # 2–3. Latents and OT potential at the switch index (and the sweep's).
  def expressway(switch_index: int, iterations: int):
    lat_fp = stages.fingerprint(dict(model=model_fp, targets=dc.target_split, max_targets=dc.max_targets,
                                     switch_index=switch_index, seed=config.seed, data=config.data))
    latents = _latents(config, schedule, targets, switch_index, lat_fp, workdir)
    ot_fp = stages.fingerprint(dict(latents=lat_fp, ot=dc.ot, source=dc.source, iterations=iterations))
    g, diag = _potential(config, latents, ot_fp, workdir, iterations)
    if not diag.get("converged", 0):
      logging.warning(
          "The semi-discrete OT at switch step %d did not converge in %d iterations (last χ² "
          "check %.3g > dpmot.ot.chi2_threshold=%g): the cells of the OT map do not hold equal "
          "mass, so DPM-OT favours some targets. Raise dpmot.ot.learning_rate (Adam moves g "
          "by at most about lr per step), dpmot.ot.num_iterations (or "
          "dpmot.sweep_ot_iterations) or dpmot.ot.error_batch_size.", switch_index,
          diag.get("iterations", -1), diag.get("chi2_error", float("nan")), dc.ot.chi2_threshold)
    return semidiscrete.monge_map(latents, g, devices, dc.ot.block_size), diag, lat_fp, ot_fp

  ot_map, ot_diag, _, ot_fp = expressway(dc.switch_index, dc.ot.num_iterations)

  # 4–5. Samples and evaluation, one method at a time.
  alpha_bar = float(schedule.alphas_cumprod()[dc.switch_index])
  results: dict[str, Any] = {
      **model_info,
      "num_samples": ec.num_samples,
      "num_targets": len(targets),
      "switch_index": dc.switch_index,
      "switch_alpha_bar": alpha_bar,
      "switch_noise_to_signal": float(np.sqrt(1 / alpha_bar - 1)),
  }
  if evaluator.classifier_accuracy is not None:
    results["classifier_accuracy"] = evaluator.classifier_accuracy
  results.update({f"ot_{k}": v for k, v in ot_diag.items()})
  rows, sample_paths = [], {}
  method_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), METHOD_STREAM)

  def samples(method: Method, ot_map, start_index: int, stem: str, **identity):
    """`method`'s samples, cached in <workdir>/<stem>-<fp>.npz; fp covers `identity` and the
    sampling settings (evaluation.batch_size sets the chunks, hence the per-chunk keys).
    Returns (arrays, path, cached)."""
    fp = stages.fingerprint(dict(identity, method=dataclasses.asdict(method), n=ec.num_samples,
                                 batch_size=ec.batch_size, seed=config.seed))

    def compute():
      return _draw(method, network, jax.random.fold_in(method_key, _stream(method.name)),
                   ec.num_samples, ec.batch_size, train_set.image_shape, ot_map, start_index,
                   dc.source)

    path = os.path.join(workdir, f"{stem}-{fp[:12]}.npz")
    arrays, cached = stages.cached_arrays(path, fp, compute)
    return arrays, path, cached

  def measure(images: np.ndarray, with_memorization: bool = True) -> dict[str, float]:
    return _metrics(images, evaluator, reference_features, targets, novelty_pixels, config,
                    with_memorization)

  for name in ec.methods:
    method = parse_method(name, config, schedule.num_steps)
    arrays, path, cached = samples(method, ot_map, dc.switch_index, f"samples-{_key(method.name)}",
                                   model=model_fp, ot=ot_fp if method.dpmot else None,
                                   switch=dc.switch_index if method.dpmot else None)
    sample_paths[method.name] = path
    row = measure(arrays["images"])
    row["nfe"], row["seconds"] = int(arrays["nfe"]), float(arrays["seconds"])
    rows.append((method.name, row))
    common.save_image_grid(arrays["images"][:100],
                           os.path.join(workdir, f"samples_{_key(method.name)}.png"),
                           f"{method.name} ({row['nfe']} NFE)")
    logging.info("%s: NFE %d, FID %.3f, copies %.3f, %.1f s%s", method.name, row["nfe"], row["fid"],
                 row["copy_fraction"], row["seconds"], f" (cached samples {path})" if cached else "")
    results.update({f"{k}_{_key(method.name)}": v for k, v in row.items()})

  # The floor's memorization is meaningless when the floor images are the targets themselves.
  same_images = _split_name(config, ec.floor_split) == _split_name(config, dc.target_split)
  floor = measure(floor_set.images, with_memorization=not same_images)
  floor["nfe"] = 0
  rows.append((f"data floor ({ec.floor_split})", floor))
  results.update({f"{k}_data_floor": v for k, v in floor.items() if k != "nfe"})
  if evaluator.probs is not None:
    results["mmr_lambdas"] = list(ec.mmr_sweep)
    for name, path in sample_paths.items():
      with np.load(path) as stored:
        results[f"mmr_sweep_{_key(name)}"] = metrics.mmr_sweep(evaluator.probs(stored["images"]), ec.mmr_sweep)

  table = comparison_table(rows, evaluator.feature_name, ec.num_samples)
  with common.atomic_path(os.path.join(workdir, "comparison.md")) as tmp:
    with open(tmp, "w") as f:
      f.write(table)
  logging.info("\n%s", table)

  if dc.switch_sweep:
    results.update(_sweep(config, expressway, samples, measure, evaluator.feature_name, workdir,
                          floor["fid"]))
  results["seconds"] = watch.seconds()
  return results


def _sweep(config, expressway, samples, measure, feature_name: str, workdir: str,
           floor_fid: float) -> dict:
  """FID vs memorization of DPM-OT at fixed NFE over switch indices M (plot, with the data
  floor's FID, + keys); `expressway`, `samples` and `measure` are `run`'s stages."""
  dc = config.dpmot
  fids, copies, ratios = [], [], []
  for m in dc.switch_sweep:
    # At the run's own switch step the main potential (same latents, its iterations) is reused.
    iterations = dc.ot.num_iterations if m == dc.switch_index else dc.sweep_ot_iterations
    ot_map, diag, _, ot_fp = expressway(m, iterations)
    method = Method(f"DPM-OT-{dc.sweep_num_steps}@{m}", dc.sampler, dc.sweep_num_steps, True,
                    _dpmot_sampler_kwargs(dc))
    arrays, _, _ = samples(method, ot_map, m, f"sweep-{m}", ot=ot_fp)
    row = measure(arrays["images"])
    fids.append(row["fid"])
    copies.append(row["copy_fraction"])
    ratios.append(row["nn_distance_ratio"])
    logging.info("sweep M=%d: FID %.3f, copies %.3f, NN ratio %.3f (OT chi2 %.2e)", m, row["fid"],
                 row["copy_fraction"], row["nn_distance_ratio"], diag.get("chi2_error", float("nan")))
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=(5.5, 4))
  ax = fig.subplots()
  ax.plot(ratios, fids, "o-")
  for m, x, y in zip(dc.switch_sweep, ratios, fids):
    ax.annotate(f"M={m}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
  ax.axvline(1.0, color="k", ls=":", lw=0.8)
  ax.axhline(floor_fid, color="tab:gray", ls="--", lw=0.8, label="data floor (held-out images)")
  ax.legend(loc="upper left", fontsize=8)
  ax.set_xlabel("median nearest-target distance / held-out's (→ 0: copies)")
  ax.set_ylabel(f"FID ({feature_name} features)")
  ax.set_title(f"DPM-OT at {dc.sweep_num_steps} NFE: switch step M")
  common.save_figure(fig, os.path.join(workdir, "fid_vs_memorization.png"))
  return {"sweep_switch_indices": list(dc.switch_sweep), "sweep_fid": fids, "sweep_copy_fraction": copies,
          "sweep_nn_distance_ratio": ratios}
