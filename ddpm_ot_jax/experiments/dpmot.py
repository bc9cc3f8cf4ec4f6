"""DPM-OT (Li et al., ICCV 2023) beside tuned baselines, with intervals and honest controls.

Roles of the data (each a split or a slice of one, `data.parse_split`; digits defaults):

  training     'train' (1497)       the DDPM's training set
  targets      dpmot.target_split   the N images DPM-OT diffuses to x_M and maps noise onto
               ('train[:897]')      (the 'copy machine' draws from them)
  classifier   evaluation.classifier_split ('train[897:1197]')  the digits classifier that
               gives features (FID/KID/precision/recall) and class probabilities (MMR); never
               a target, never the reference
  reference    evaluation.reference_split ('heldout', 300)  the FID/KID/precision/recall
               reference: seen by no model, no classifier, no OT target
  floor        evaluation.floor_split ('train[1197:]')  real images that are not targets:
               the data-floor row, and the memorization reference ("as novel as fresh data")
  tuning       evaluation.tuning_split (= the targets)  the reference of the spacing choice;
               never the reported reference

Stages, each cached in the workdir under a fingerprint of its inputs (`stages`):

0. inputs   every split, the Inception weights (features='inception') and the diffusers
            weights (training.init_from_diffusers) are read before any work; all that are
            missing are named in ONE FileNotFoundError.
1. model    `trainer.train_ddpm` (resumable) → model-<fingerprint>/, or the imported network
            as it is.
2. latents  per switch step M: x_M = √ᾱ_M y + √(1 − ᾱ_M) ε for every target y (Ho et al.
            2020, Eq. 4; ᾱ of the samplers' view)                  → latents-<fingerprint>.npz
3. ot       per M: the semi-discrete potential g between the source and the N latents
            (`semidiscrete.solve_potential`, ott-jax)                 → ot-<fingerprint>/ (orbax)
4. spacing  for every few-step sampler whose time spacing is not fixed in
            evaluation.spacings: one validation draw per spacing in `SPACINGS`, FID against
            the tuning split; the lowest wins (reported as spacing_<method>).
5. samples  per method and draw d < evaluation.num_draws: `evaluation.num_samples` images
            (`samplers.sample_images`, or `samplers.dpm_ot` for DPM-OT)
                                                          → samples-<method>-<d>-<fingerprint>.npz
6. eval     per draw: FID and KID against the reference, precision/recall, MMR and
            recognized fraction (classifier features), copies and NN-distance ratio against the
            targets (memorization); every row as mean ± std over the draws. Two controls in
            every table: 'copy machine' (num_samples targets drawn with replacement — what
            equal-mass OT cells with no denoising would give — through the same metrics) and
            'data floor' (all floor images; its ± from bootstrap resamples). `metrics.compare`
            calls A better than B only when the mean ± std intervals separate
            (verdicts.md, verdict_* keys); otherwise they are tied.
7. solver   optional (evaluation.solver_error_samples > 0): from the same x_T, the RMS
            distance of every deterministic sampler's output to an adaptive PF-ODE solution
            at rtol = atol = evaluation.solver_error_rtol: whether a sampler solves the ODE
            better, apart from whether its images score better.

Several processes (hosts; scripts/main.py joins them): every process runs every stage with
the same arguments. Training feeds each process's rows of every batch; latents are computed
alike by all; the OT potential is solved by each on one device and process 0's g is used by
all; the Monge map's targets are split over all devices; samples are drawn on all devices and
gathered to every process, which evaluates them itself (the same numbers everywhere; nothing
is broadcast). Only process 0 writes files (`common`); a stage's cache is reused only when
every process finds it (`stages`).

Methods (evaluation.methods; one spelling for config, results keys and files; the table
label in brackets): 'ddpm' [DDPM-N], 'pf_ode' [PF-ODE], '<family>_<k>' for the few-step
families of `FAMILIES` with k network calls ('ddim_10' [DDIM-10], 'dpm_solver_10'
[DPM-Solver(3M)-10], 'dpm_solver_pp_2m_10', 'dpm_solver_pp_3m_10', 'unipc_10'), and DPM-OT
'dpm_ot_<k>' (k reverse steps from M = dpmot.switch_index) or 'dpm_ot_<k>_m<M>'.

Results keys (numbers or lists of numbers): params, train_steps, imported_weights,
train_seconds, num_samples, num_draws, num_targets, classifier_accuracy (classifier
features), per switch step M: ot_<diag>_m<M>, switch_alpha_bar_m<M>,
switch_noise_to_signal_m<M>; per row r (methods, copy_machine, data_floor) and metric:
<metric>_<r> (mean), <metric>_<r>_std, <metric>_<r>_draws (metric: fid, kid, precision,
recall, copy_fraction, nn_distance_ratio; with the classifier also mmr, recognized_fraction
and mmr_lambdaXXX, the MMR at λ = XXX/100 for λ in evaluation.mmr_sweep); nfe_<r>; spacing_<method> (index
into SPACINGS) and tuning_fid_<method>_<spacing>; verdict_<metric>_<a>_vs_<b> (+1 a better,
−1 worse, 0 tied); solver_error_<method>; seconds.
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
from ddpm_ot_jax import distributed
from ddpm_ot_jax import flow
from ddpm_ot_jax import metrics
from ddpm_ot_jax import plotting
from ddpm_ot_jax import samplers
from ddpm_ot_jax import sde
from ddpm_ot_jax import semidiscrete
from ddpm_ot_jax import trainer
from ddpm_ot_jax.experiments import common
from ddpm_ot_jax.experiments import stages

# The config fields this experiment reads (scripts/main.py rejects any other field or override).
CONFIG_FIELDS = ("data", "model", "diffusion", "training", "dpmot", "evaluation")

# Streams derived from config.seed (trainer uses 0–2).
(LATENT_STREAM, OT_STREAM, METHOD_STREAM, CLASSIFIER_STREAM, TUNING_STREAM, COPY_STREAM,
 BOOTSTRAP_STREAM, SOLVER_ERROR_STREAM) = range(10, 18)

# Few-step sampler families: table label, `samplers.sample` name, fixed settings.
FAMILIES = {
    "ddim": ("DDIM", "ddim", (("eta", 0.0),)),
    "dpm_solver": ("DPM-Solver(3M)", "dpm_solver", (("order", 3), ("variant", "dpmsolver"))),
    "dpm_solver_pp_2m": ("DPM-Solver++(2M)", "dpm_solver",
                         (("order", 2), ("variant", "dpmsolver++"))),
    "dpm_solver_pp_3m": ("DPM-Solver++(3M)", "dpm_solver",
                         (("order", 3), ("variant", "dpmsolver++"))),
    "unipc": ("UniPC(3)", "unipc", (("order", 3), ("variant", "bh2"))),
}
# Time spacings a few-step sampler is tuned over (`samplers` spacing names).
SPACINGS = ("logSNR", "time_uniform", "time_quadratic")
# The metrics of a row: (key, table header, format, lower is better).
_METRICS = (("fid", "FID", "{:.2f}", True), ("kid", "KID×10³", "{:.2f}", True),
            ("precision", "precision", "{:.3f}", False), ("recall", "recall", "{:.3f}", False),
            ("mmr", "MMR", "{:.3f}", True), ("copy_fraction", "copies", "{:.3f}", True),
            ("nn_distance_ratio", "NN-dist ratio", "{:.3f}", False))
_KID_SCALE = 1e3  # KID is shown ×10³ in the tables


@dataclasses.dataclass(frozen=True)
class Method:
  """One table row drawn from the model.

  name: the config / results spelling ('dpm_solver_pp_3m_10'); label: the table's;
  family: a `FAMILIES` key, 'ddpm', 'pf_ode' or 'dpm_ot'; sampler: the `samplers.sample`
  name; num_steps: network calls (None: 'ddpm' every step, 'pf_ode' adaptive);
  switch_index: DPM-OT's M (None otherwise); kwargs: fixed sampler settings.
  """

  name: str
  label: str
  family: str
  sampler: str
  num_steps: int | None = None
  switch_index: int | None = None
  kwargs: tuple = ()

  @property
  def tunable(self) -> bool:
    """Few-step samplers from x_T, whose time spacing is chosen (or fixed) per NFE."""
    return self.family in FAMILIES


def parse_method(name: str, config: ml_collections.ConfigDict) -> Method:
  """A name of evaluation.methods → Method; ValueError naming the valid forms otherwise."""
  n_steps = config.diffusion.num_steps
  if name == "ddpm":
    return Method("ddpm", f"DDPM-{n_steps}", "ddpm", "ddpm")
  if name == "pf_ode":
    return Method("pf_ode", "PF-ODE", "pf_ode", "pf_ode")
  families = "|".join(sorted(FAMILIES, key=len, reverse=True))
  match = re.fullmatch(rf"({families})_(\d+)", name)
  if match:
    steps = int(match.group(2))
    if steps < 1:
      raise ValueError(f"evaluation.methods: {name} needs at least 1 step.")
    label, sampler, kwargs = FAMILIES[match.group(1)]
    return Method(name, f"{label}-{steps}", match.group(1), sampler, steps, kwargs=kwargs)
  match = re.fullmatch(r"dpm_ot_(\d+)(?:_m(\d+))?", name)
  if not match:
    raise ValueError(
        f"Unknown method {name!r} in evaluation.methods; use 'ddpm', 'pf_ode', "
        f"'<family>_<k>' with family in {', '.join(FAMILIES)}, 'dpm_ot_<k>' or "
        "'dpm_ot_<k>_m<M>'.")
  dpmot_config = config.dpmot
  steps = int(match.group(1))
  m = int(match.group(2)) if match.group(2) else int(dpmot_config.switch_index)
  if not 0 <= m < n_steps:
    raise ValueError(f"{name}: the switch step M={m} must lie in [0, {n_steps - 1}].")
  available = m + 1  # reverse steps from x_M down to x_0
  if dpmot_config.sampler == "ddpm" and steps != available:
    raise ValueError(f"{name}: the 'ddpm' sampler takes every step from M={m}, i.e. "
                     f"{available} steps.")
  if not 1 <= steps <= available:
    raise ValueError(f"{name}: only {available} reverse steps lie below M={m}; use k ≤ "
                     f"{available} or a larger M.")
  label = f"DPM-OT-{steps}" + ("" if match.group(2) is None else f" (M={m})")
  kwargs = {"ddim": (("eta", float(dpmot_config.eta)),),
            "dpm_solver": FAMILIES["dpm_solver_pp_3m"][2]}.get(dpmot_config.sampler, ())
  return Method(name, label, "dpm_ot", dpmot_config.sampler,
                None if dpmot_config.sampler == "ddpm" else steps, m, kwargs)


def _stream(name: str) -> int:
  """A PRNG stream per name (not per list position: reordering reuses cached samples)."""
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _key(config, stream: int, name: str = "") -> jax.Array:
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), stream)
  return jax.random.fold_in(key, _stream(name)) if name else key


# ----------------------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------------------


def _roles(config) -> dict[str, str]:
  """role → split, for every split the run reads."""
  ec = config.evaluation
  roles = dict(training="train", targets=config.dpmot.target_split,
               reference=ec.reference_split, floor=ec.floor_split,
               tuning=ec.tuning_split or config.dpmot.target_split)
  if ec.features == "classifier":
    roles["classifier"] = ec.classifier_split
  return roles


@dataclasses.dataclass
class Inputs:
  """What the user supplies, read once: the splits by role, the Inception network (model,
  variables) when evaluation.features='inception', the imported diffusers UNet (model,
  params) when training.init_from_diffusers is set."""

  splits: dict[str, data.ImageDataset]
  inception: tuple[Any, Any] | None = None
  diffusers: tuple[Any, Any] | None = None


def load_inputs(config: ml_collections.ConfigDict) -> Inputs:
  """Reads every user-supplied input of a DPM-OT run once, before any training; every input
  that is missing or unreadable is reported in one FileNotFoundError (ValueError when none
  is missing but some are unreadable), naming each and where it was looked for."""
  ec, data_config = config.evaluation, config.data
  problems: list[tuple[str, Exception]] = []
  loaded: dict[str, data.ImageDataset] = {}
  splits: dict[str, data.ImageDataset] = {}
  for role, split in _roles(config).items():
    try:
      if split not in loaded:
        loaded[split] = data.load_dataset(data_config.name, split,
                                          data_config.get("root") or None,
                                          data_config.get("resolution") or None)
      splits[role] = loaded[split]
    except (FileNotFoundError, ValueError) as e:
      problems.append((f"dataset {data_config.name} split {split!r} ({role}; config.data.root="
                       f"{data_config.get('root')!r})", e))
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
    shape = splits["training"].image_shape if "training" in splits else None
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
# Model, latents, potential.
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
  """(network, facts about it, model fingerprint): trained (resumable), or the imported
  diffusers UNet as it is (`trainer.place_network`, no training step)."""
  if inputs.diffusers is None:
    fingerprint = stages.fingerprint(_model_inputs(config))
    directory = stages.stage_dir(workdir, "model", fingerprint)
    result = trainer.train_ddpm(config, os.path.join(directory, "checkpoints"), train_set,
                                hooks=common.training_hooks(directory))
    info = dict(params=result.num_params, train_steps=int(jax.device_get(result.state.step)),
                train_seconds=result.train_seconds, imported_weights=0)
    return result.network, info, fingerprint
  model, params = inputs.diffusers
  logging.info("Using the diffusers weights %s as they are (no training).",
               config.training.init_from_diffusers)
  network = trainer.place_network(config, model, params)
  info = dict(params=network.num_params, train_steps=0, train_seconds=0.0, imported_weights=1)
  return network, info, stages.fingerprint(_imported_model_inputs(config))


def switch_alpha_bar(view: samplers.NoiseSchedule, switch_index: int) -> float:
  """ᾱ_M of the samplers' view at step M (the DDPM's ᾱ_M for the discrete view)."""
  log_alpha, _ = sde.log_alpha_std(view, samplers.time_of_index(view, switch_index))
  return float(np.exp(2.0 * float(log_alpha)))


_DIAG_KEYS = ("iterations", "seconds", "chi2_error", "converged", "max_relative_error", "empty_cells")
_INT_DIAG_KEYS = ("iterations", "converged", "empty_cells")


def _diagnostics_from_array(values: np.ndarray) -> dict:
  """OT diagnostics back from the float array they are stored as: counts and the flag as
  ints; entries that were not measured (NaN) are left out."""
  out: dict[str, float | int] = {}
  for k, v in zip(_DIAG_KEYS, (float(v) for v in values)):
    if np.isfinite(v):
      out[k] = int(round(v)) if k in _INT_DIAG_KEYS else v
  return out


@dataclasses.dataclass(frozen=True)
class LatentMap:
  """DPM-OT's map at one switch step M: the Monge map noise → x_M^{j(z)} and its facts."""

  monge_map: semidiscrete.MongeMap
  diagnostics: dict
  alpha_bar: float
  fingerprint: str


def _latent_map(config, network, model_fingerprint: str, targets: np.ndarray, switch_index: int,
                workdir: str) -> LatentMap:
  """Latents at M (cached .npz) and the OT potential g (cached with orbax) → the Monge map."""
  dpmot_config, ot_config = config.dpmot, config.dpmot.ot
  alpha_bar = switch_alpha_bar(network.view, switch_index)
  latents_fingerprint = stages.fingerprint(dict(
      model=model_fingerprint, targets=dpmot_config.target_split, data=config.data,
      switch_index=switch_index, seed=config.seed))

  def latents_fn():
    checkpoints.fault_point("dpmot_latents")
    noise = np.asarray(jax.random.normal(_key(config, LATENT_STREAM), targets.shape, jnp.float32))
    latents = np.sqrt(alpha_bar) * targets + np.sqrt(1.0 - alpha_bar) * noise
    return {"latents": latents.astype(np.float32)}

  arrays, cached = stages.cached_arrays(
      os.path.join(workdir, f"latents-{latents_fingerprint[:12]}.npz"), latents_fingerprint,
      latents_fn)
  latents = arrays["latents"]
  logging.info("Latents at M=%d (N=%d, ᾱ_M=%.4f): %s", switch_index, len(latents), alpha_bar,
               "reused" if cached else "computed")
  ot_fingerprint = stages.fingerprint(dict(latents=latents_fingerprint, ot=ot_config,
                                           source=dpmot_config.source))
  directory = stages.stage_dir(workdir, "ot", ot_fingerprint)
  with checkpoints.Checkpointer(directory, keep=1, async_save=False) as ckpt:
    # Host (numpy) arrays: orbax writes them from the primary host and restores them in all.
    if distributed.all_processes(ckpt.latest_step() is not None):
      stored = ckpt.restore({"g": np.zeros((len(latents),), np.float32),
                             "diagnostics": np.zeros((len(_DIAG_KEYS),), np.float32)})
      g, diag = stored["g"], _diagnostics_from_array(np.asarray(stored["diagnostics"]))
      logging.info("OT potential at M=%d reused from %s", switch_index, directory)
    else:
      logging.info("Solving semi-discrete OT at M=%d: N=%d targets in d=%d, up to %d "
                   "iterations", switch_index, len(latents), latents[0].size,
                   ot_config.num_iterations)
      checkpoints.fault_point("dpmot_ot_solve")
      # Every process solves on its own first device with the same key (the same g, bit for
      # bit); process 0's g and diagnostics are then used everywhere, so they cannot differ.
      g, diag = semidiscrete.solve_potential(
          _key(config, OT_STREAM), jax.device_put(latents, jax.local_devices()[0]),
          source=dpmot_config.source, num_iterations=ot_config.num_iterations,
          batch_size=ot_config.batch_size, learning_rate=ot_config.learning_rate,
          error_eval_every=ot_config.error_eval_every,
          error_batch_size=ot_config.error_batch_size or None,
          chi2_threshold=ot_config.chi2_threshold, num_check_samples=ot_config.check_samples)
      solved = distributed.allgather_to_host(np.asarray(g, np.float32))  # (processes, N)
      if any(not np.array_equal(solved[0], other) for other in solved[1:]):
        logging.warning("The processes solved different OT potentials at M=%d (max |Δg| "
                        "%.3g); all use process 0's.", switch_index,
                        float(np.max(np.abs(solved - solved[0]))))
      g = solved[0]
      values = distributed.chief_value(
          np.array([float(diag.get(k, np.nan)) for k in _DIAG_KEYS], np.float32))
      ckpt.save(0, {"g": g, "diagnostics": values})
      diag = _diagnostics_from_array(values)
      logging.info("OT at M=%d: %d iterations, %.1f s, χ² %.2e, converged %s, empty cells %s",
                   switch_index, diag["iterations"], diag["seconds"], diag["chi2_error"],
                   diag["converged"], diag.get("empty_cells"))
  if not diag.get("converged", 0):
    logging.warning(
        "The semi-discrete OT at M=%d did not converge in %d iterations (last χ² check %.3g > "
        "dpmot.ot.chi2_threshold=%g): the cells do not hold equal mass, so DPM-OT favours some "
        "targets. Raise dpmot.ot.learning_rate (Adam moves g by at most about lr per step), "
        "dpmot.ot.num_iterations or dpmot.ot.error_batch_size.", switch_index,
        diag.get("iterations", -1), diag.get("chi2_error", float("nan")), ot_config.chi2_threshold)
  devices = list(network.mesh.devices.flat)
  return LatentMap(semidiscrete.monge_map(latents, g, devices, ot_config.block_size), diag,
                   alpha_bar, ot_fingerprint)


# ----------------------------------------------------------------------------------------
# Samples.
# ----------------------------------------------------------------------------------------


def _draw(method: Method, network, key, num_samples: int, batch_size: int, image_shape,
          latent_map: LatentMap | None, source: str, spacing: str | None) -> dict[str, np.ndarray]:
  """`num_samples` images of `method` as the arrays of a sample cache: images, nfe, seconds
  and, for DPM-OT, target_index."""
  checkpoints.fault_point("dpmot_sampling")
  kwargs = dict(method.kwargs)
  if spacing is not None:
    kwargs["spacing"] = spacing
  if method.family == "dpm_ot":
    result = samplers.dpm_ot(network, latent_map.monge_map, key, num_samples, image_shape,
                             method.switch_index, method.num_steps, method.sampler, source,
                             batch_size, **kwargs)
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
  """Features for FID / KID / precision-recall, class probabilities for MMR (classifier
  features only), and the fixed sets every draw is compared with."""

  features: Callable[[np.ndarray], np.ndarray]
  probs: Callable[[np.ndarray], np.ndarray] | None
  feature_name: str
  reference_features: np.ndarray
  targets: np.ndarray  # pixels: the memorization reference "copy of a target"
  novelty: np.ndarray  # pixels: real images that are not targets ("as novel as fresh data")
  kid_scale: float = 1.0  # feature scale s of KID's kernel (1: Inception's standard KID)
  classifier_accuracy: float | None = None

  def measure(self, images: np.ndarray, config, reference_features: np.ndarray | None = None
              ) -> dict[str, float]:
    """The metrics of one draw of images."""
    checkpoints.fault_point("dpmot_metrics")
    ec = config.evaluation
    reference = self.reference_features if reference_features is None else reference_features
    feats = self.features(images)
    out = {"fid": metrics.fid_from_features(reference, feats),
           "kid": metrics.kid_from_features(reference, feats, scale=self.kid_scale)}
    out.update(metrics.precision_recall(reference, feats, k=ec.pr_k))
    if self.probs is not None:
      probs = self.probs(images)
      out["mmr"] = metrics.mode_mixture_ratio(probs, ec.mmr_lambda)
      out["recognized_fraction"] = metrics.recognized_fraction(probs)
      out.update({f"mmr_lambda{round(100 * lam):03d}": v  # λ in hundredths: mmr_lambda011
                  for lam, v in zip(ec.mmr_sweep, metrics.mmr_sweep(probs, ec.mmr_sweep))})
    mem = metrics.memorization(images, self.targets, self.novelty)
    out["copy_fraction"] = mem["copy_fraction"]
    out["nn_distance_ratio"] = mem["nn_distance_ratio"]
    return out


def _evaluator(config, inputs: Inputs, targets: np.ndarray, workdir: str) -> Evaluator:
  """Inception features (pytorch-fid weights, read by `load_inputs`) or a digits classifier
  trained on the classifier split (cached in the workdir; its accuracy on the reference)."""
  ec = config.evaluation
  reference = inputs.splits["reference"]
  novelty = inputs.splits["floor"].images[:ec.max_novelty_images or None]
  if ec.features == "inception":
    from ddpm_ot_jax.models import inception  # pylint: disable=g-import-not-at-top

    model, variables = inputs.inception
    feature_fn = inception.make_feature_fn(model, variables)
    feats = lambda images: np.asarray(inception.extract_features(feature_fn, images))  # noqa: E731
    return Evaluator(feats, None, "Inception", feats(reference.images), targets, novelty)
  from ddpm_ot_jax import classifier  # pylint: disable=g-import-not-at-top

  train_set = inputs.splits["classifier"]
  steps = int(ec.classifier_steps)
  fingerprint = stages.fingerprint(dict(seed=config.seed, data=config.data,
                                        split=ec.classifier_split, kind="classifier", steps=steps))
  path = os.path.join(workdir, f"classifier-{fingerprint[:12]}.msgpack")
  params = _read_cached_params(path)
  if not distributed.all_processes(params is not None):
    # trained by every process alike (local device, same key); process 0 writes it
    params = classifier.train_classifier(_key(config, CLASSIFIER_STREAM), train_set.images,
                                         train_set.labels, num_classes=train_set.num_classes,
                                         num_steps=steps)
    common.write_bytes(path, flax.serialization.msgpack_serialize(jax.device_get(params)))
  probs = lambda images: np.asarray(classifier.predict_probs(params, images))  # noqa: E731
  feats = lambda images: np.asarray(classifier.features(params, images))  # noqa: E731
  accuracy = float(np.mean(np.argmax(probs(reference.images), -1) == reference.labels))
  reference_features = feats(reference.images)
  # KID's kernel on these ReLU features (RMS ≈ 2, unlike Inception's ≈ 0.5): scaled by their RMS.
  kid_scale = float(np.sqrt(np.mean(reference_features.astype(np.float64) ** 2)))
  return Evaluator(feats, probs, "digits-classifier", reference_features, targets, novelty,
                   kid_scale, accuracy)


def _read_cached_params(path: str):
  """The msgpack'd parameters at `path`; None when missing or unreadable (a warning: the
  cache is recomputed and rewritten atomically)."""
  if not os.path.exists(path):
    return None
  try:
    with open(path, "rb") as f:
      return flax.serialization.msgpack_restore(f.read())
  except Exception as e:  # pylint: disable=broad-except  (msgpack raises its own types)
    logging.warning("The cached classifier %s cannot be read (%s: %s); training it again.",
                    path, type(e).__name__, e)
    return None


def _summarize(draws: list[dict[str, float]]) -> dict[str, Any]:
  """{metric: mean, metric_std: std, metric_draws: values} over the draws of one row."""
  out: dict[str, Any] = {}
  for key in draws[0]:
    values = [d[key] for d in draws]
    out[key], out[f"{key}_std"] = metrics.mean_std(values)
    out[f"{key}_draws"] = values
  return out


def _floor_row(evaluator: Evaluator, floor: np.ndarray, config) -> dict[str, Any]:
  """The data floor: every metric on all floor images (the value), ± the std over
  evaluation.num_draws bootstrap resamples of them (resampled with replacement)."""
  row = evaluator.measure(floor, config)
  rng = np.random.default_rng([config.seed, BOOTSTRAP_STREAM])
  boot = [evaluator.measure(floor[rng.integers(0, len(floor), len(floor))], config)
          for _ in range(config.evaluation.num_draws)]
  out = dict(row)
  for key in row:
    values = [b[key] for b in boot]
    out[f"{key}_std"] = metrics.mean_std(values)[1]
    out[f"{key}_draws"] = values
  out["nfe"] = 0
  return out


def _results_key(key: str, row_name: str) -> str:
  """A row's 'fid' / 'fid_std' / 'fid_draws' → 'fid_<row>' / 'fid_<row>_std' / 'fid_<row>_draws'."""
  for suffix in ("_std", "_draws"):
    if key.endswith(suffix):
      return f"{key[:-len(suffix)]}_{row_name}{suffix}"
  return f"{key}_{row_name}"


def _cell(row: dict, key: str, fmt: str) -> str:
  if key not in row:
    return "–"
  scale = _KID_SCALE if key == "kid" else 1.0
  value, std = row[key] * scale, row.get(f"{key}_std", float("nan")) * scale
  text = fmt.format(value)
  return text if not np.isfinite(std) else f"{text} ± {fmt.format(std)}"


def comparison_table(rows: list[tuple[str, dict]], caption: str) -> str:
  """The markdown table: one row per method and control, mean ± std of each metric."""
  present = [c for c in _METRICS if any(c[0] in r for _, r in rows)]
  lines = ["| method | NFE | " + " | ".join(c[1] for c in present) + " | s / draw |",
           "|---|---:|" + "---:|" * len(present) + "---:|"]
  for label, row in rows:
    cells = [_cell(row, key, fmt) for key, _, fmt, _ in present]
    seconds = f"{row['seconds']:.1f}" if "seconds" in row else "–"
    lines.append(f"| {label} | {row.get('nfe', '–')} | " + " | ".join(cells) + f" | {seconds} |")
  return "\n".join(lines) + "\n\n" + caption + "\n"


def _caption(config, evaluator: Evaluator, num_targets: int, num_floor: int) -> str:
  ec = config.evaluation
  return (
      f"Mean ± std over {ec.num_draws} independent draws of {ec.num_samples} samples per row "
      f"(seeds disjoint from the spacing tuning). FID, KID, precision and recall in "
      f"{evaluator.feature_name} features against the reference split '{ec.reference_split}' "
      f"(seen by no model, classifier or OT target). DPM-OT maps noise onto the "
      f"{num_targets} targets '{config.dpmot.target_split}'; the copy machine draws "
      f"{ec.num_samples} of them with replacement. The data floor is the {num_floor} images of "
      f"'{ec.floor_split}' (real, not targets), ± over bootstrap resamples; with fewer images "
      f"than the rows its FID is biased upward (FID grows as n shrinks); KID is unbiased at any "
      f"n. MMR: share of samples with ≥ 2 classes of softmax ≥ {ec.mmr_lambda}"
      + (f" (classifier trained on '{ec.classifier_split}', accuracy on the reference "
         f"{evaluator.classifier_accuracy:.3f})" if evaluator.classifier_accuracy is not None
         else "") +
      ". copies: share of samples whose nearest target is ≥ 3× closer than the second; "
      "NN-dist ratio: median nearest-target distance of the samples over that of the floor "
      "images (1: as novel as fresh data, → 0: copies).")


def _verdicts(rows: list[tuple[Method | None, str, dict]]) -> tuple[str, dict[str, int]]:
  """Who beats whom, by FID and by KID (mean ± std intervals must separate): every DPM-OT
  row against every other row of its NFE, every row against the copy machine and the floor."""
  by_name = {name: (method, row) for method, name, row in rows}
  pairs = []
  for method, name, row in rows:
    if method is not None and method.family == "dpm_ot":
      pairs += [(name, other) for m, other, r in rows
                if m is not None and other != name and r["nfe"] == row["nfe"]
                and (other, name) not in pairs]
    if name not in ("copy_machine", "data_floor"):
      pairs += [(name, "copy_machine"), (name, "data_floor")]
  words = {1: "better", -1: "worse", 0: "tied"}
  lines, keys = ["| A | B | FID | KID |", "|---|---|---|---|"], {}
  for a, b in dict.fromkeys(pairs):
    verdict = {}
    for metric in ("fid", "kid"):
      ra, rb = by_name[a][1], by_name[b][1]
      verdict[metric] = metrics.compare((ra[metric], ra[f"{metric}_std"]),
                                        (rb[metric], rb[f"{metric}_std"]))
      keys[f"verdict_{metric}_{a}_vs_{b}"] = verdict[metric]
    lines.append(f"| {a} | {b} | {words[verdict['fid']]} | {words[verdict['kid']]} |")
  return "A better than B: A's mean ± std interval lies entirely below B's.\n\n" + \
      "\n".join(lines) + "\n", keys


# ----------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------


def _validate(config) -> list[Method]:
  """Config errors, before anything is read or computed; returns the methods."""
  dpmot_config, ec = config.dpmot, config.evaluation
  trainer.check_training(config)
  if dpmot_config.sampler not in ("ddim", "ddpm", "dpm_solver"):
    raise ValueError("dpmot.sampler must be 'ddim', 'ddpm' or 'dpm_solver', got "
                     f"{dpmot_config.sampler!r}.")
  if dpmot_config.source not in semidiscrete.SOURCES:
    raise ValueError(f"dpmot.source must be one of {semidiscrete.SOURCES}, got "
                     f"{dpmot_config.source!r}.")
  if ec.features not in ("classifier", "inception"):
    raise ValueError(f"evaluation.features must be 'classifier' or 'inception', got {ec.features!r}.")
  if ec.num_samples <= ec.pr_k:
    raise ValueError(f"evaluation.num_samples must exceed pr_k={ec.pr_k}.")
  if ec.num_draws < 2:
    raise ValueError("evaluation.num_draws must be ≥ 2: every row is reported with its spread.")
  if dpmot_config.ot.error_batch_size < 0:
    raise ValueError("dpmot.ot.error_batch_size must be ≥ 0 (0: the solver's default).")
  roles = _roles(config)
  for a, b in (("targets", "reference"), ("targets", "floor"), ("reference", "floor"),
               ("classifier", "targets"), ("classifier", "reference"), ("classifier", "floor"),
               ("tuning", "reference")):
    if a in roles and b in roles and roles[a] == roles[b]:
      raise ValueError(f"The {a} and {b} splits must differ (both are {roles[a]!r}): the "
                       f"{b} must be images the {a} role has not seen.")
  for name, spacing in ec.spacings.items():
    if spacing not in SPACINGS:
      raise ValueError(f"evaluation.spacings.{name}={spacing!r}: use one of {SPACINGS}.")
  methods = [parse_method(name, config) for name in ec.methods]
  if len({m.name for m in methods}) != len(methods):
    raise ValueError("evaluation.methods lists a method twice.")
  return methods


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the stages of the module docstring; returns the flat results dict."""
  methods = _validate(config)
  watch = common.Stopwatch()
  dpmot_config, ec = config.dpmot, config.evaluation
  inputs = load_inputs(config)  # everything a user can get wrong about inputs fails here
  train_set = inputs.splits["training"]
  targets = inputs.splits["targets"].images
  floor = inputs.splits["floor"].images
  image_shape = train_set.image_shape
  logging.info("Splits: %s", ", ".join(f"{role} {split!r} ({len(inputs.splits[role])})"
                                       for role, split in _roles(config).items()))

  network, model_info, model_fingerprint = _model(config, workdir, train_set, inputs)
  logging.info("Model: %d params, %d steps (%.0f s this run)", model_info["params"],
               model_info["train_steps"], model_info["train_seconds"])
  evaluator = _evaluator(config, inputs, targets, workdir)
  tuning_features = evaluator.features(inputs.splits["tuning"].images)
  results: dict[str, Any] = {**model_info, "num_samples": ec.num_samples,
                             "num_draws": ec.num_draws, "num_targets": len(targets)}
  if evaluator.classifier_accuracy is not None:
    results["classifier_accuracy"] = evaluator.classifier_accuracy

  latent_maps: dict[int, LatentMap] = {}
  for m in sorted({method.switch_index for method in methods if method.family == "dpm_ot"}):
    latent_maps[m] = _latent_map(config, network, model_fingerprint, targets, m, workdir)
    latent_map = latent_maps[m]
    results.update({f"ot_{k}_m{m}": v for k, v in latent_map.diagnostics.items()})
    results[f"switch_alpha_bar_m{m}"] = latent_map.alpha_bar
    results[f"switch_noise_to_signal_m{m}"] = float(np.sqrt(1.0 / latent_map.alpha_bar - 1.0))

  def samples(method: Method, key, num: int, stem: str, spacing: str | None, **identity):
    """`method`'s samples, cached in <workdir>/<stem>-<fingerprint>.npz (arrays, cached)."""
    latent_map = latent_maps.get(method.switch_index)
    fingerprint = stages.fingerprint(dict(
        identity, method=dataclasses.asdict(method), n=num, spacing=spacing,
        batch_size=ec.batch_size, seed=config.seed, model=model_fingerprint,
        ot=latent_map.fingerprint if latent_map else None))
    return stages.cached_arrays(
        os.path.join(workdir, f"{stem}-{fingerprint[:12]}.npz"), fingerprint,
        lambda: _draw(method, network, key, num, ec.batch_size, image_shape, latent_map,
                      dpmot_config.source, spacing))

  # Spacing of each few-step sampler: fixed by evaluation.spacings, else tuned on one
  # validation draw per spacing against the tuning split.
  spacings: dict[str, str | None] = {}
  for method in methods:
    if not method.tunable:
      spacings[method.name] = None
    elif method.name in ec.spacings:
      spacings[method.name] = ec.spacings[method.name]
    else:
      fids = {}
      for spacing in SPACINGS:
        arrays, _ = samples(method, _key(config, TUNING_STREAM, method.name + spacing),
                            ec.tuning_num_samples, f"tuning-{method.name}-{spacing}", spacing)
        fids[spacing] = metrics.fid_from_features(tuning_features,
                                                  evaluator.features(arrays["images"]))
        results[f"tuning_fid_{method.name}_{spacing}"] = fids[spacing]
      spacings[method.name] = min(fids, key=fids.get)
      logging.info("%s: spacing %s (validation FID %s)", method.label, spacings[method.name],
                   ", ".join(f"{s} {v:.2f}" for s, v in fids.items()))
    if spacings[method.name] is not None:
      results[f"spacing_{method.name}"] = SPACINGS.index(spacings[method.name])

  # Rows: D draws per method, then the two controls.
  rows: list[tuple[Method | None, str, dict]] = []
  for method in methods:
    draws, seconds, nfe, first = [], [], None, None
    for d in range(ec.num_draws):
      key = jax.random.fold_in(_key(config, METHOD_STREAM, method.name), d)
      arrays, cached = samples(method, key, ec.num_samples, f"samples-{method.name}-{d}",
                               spacings[method.name], draw=d)
      draws.append(evaluator.measure(arrays["images"], config))
      seconds.append(float(arrays["seconds"]))
      nfe = int(arrays["nfe"])
      first = arrays["images"] if first is None else first
    row = _summarize(draws)
    row.update(nfe=nfe, seconds=float(np.mean(seconds)))
    rows.append((method, method.name, row))
    common.save_image_grid(first[:100], os.path.join(workdir, f"samples_{method.name}.png"),
                           f"{method.label} ({nfe} NFE)")
    logging.info("%s: NFE %d, FID %.2f ± %.2f, KID×10³ %.2f ± %.2f, copies %.3f", method.label,
                 nfe, row["fid"], row["fid_std"], row["kid"] * _KID_SCALE,
                 row["kid_std"] * _KID_SCALE, row["copy_fraction"])
  rng = np.random.default_rng([config.seed, COPY_STREAM])
  copies = [evaluator.measure(targets[rng.integers(0, len(targets), ec.num_samples)], config)
            for _ in range(ec.num_draws)]
  rows.append((None, "copy_machine", {**_summarize(copies), "nfe": 0}))
  rows.append((None, "data_floor", _floor_row(evaluator, floor, config)))
  labels = {name: (method.label if method else name.replace("_", " "))
            for method, name, _ in rows}
  for _, name, row in rows:
    results.update({_results_key(k, name): v for k, v in row.items()})

  table = comparison_table([(labels[name], row) for _, name, row in rows],
                           _caption(config, evaluator, len(targets), len(floor)))
  verdict_table, verdict_keys = _verdicts(rows)
  results.update(verdict_keys)
  for path, text in (("comparison.md", table), ("verdicts.md", verdict_table)):
    common.write_text(os.path.join(workdir, path), text)
  logging.info("\n%s\n%s", table, verdict_table)

  if ec.solver_error_samples:
    results.update(_solver_errors(config, network, methods, spacings, image_shape, workdir))
  _figures(rows, labels, evaluator.feature_name, workdir)
  results["seconds"] = watch.seconds()
  return results


def _solver_errors(config, network, methods: list[Method], spacings: dict, image_shape,
                   workdir: str) -> dict[str, float]:
  """RMS distance (pixels on [−1, 1]) of each deterministic sampler's output to an adaptive
  PF-ODE solution (rtol = atol = evaluation.solver_error_rtol) from the same x_T, at the
  same end time t = 1/N (index 0; DDIM's x̂_0 there is compared as it is)."""
  ec = config.evaluation
  num = int(ec.solver_error_samples)
  key = _key(config, SOLVER_ERROR_STREAM)
  options = flow.SolverOptions(rtol=ec.solver_error_rtol, atol=ec.solver_error_rtol,
                               max_steps=16384)
  reference = samplers.sample_images(network, key, num, image_shape, "pf_ode", None, num,
                                     options=options)
  out = {"solver_error_reference_nfe": reference.nfe}
  lines = ["| method | NFE | RMS to the ODE solution |", "|---|---:|---:|"]
  for method in methods:
    if method.family not in FAMILIES:
      continue
    kwargs = dict(method.kwargs, spacing=spacings[method.name])
    result = samplers.sample_images(network, key, num, image_shape, method.sampler,
                                    method.num_steps, num, **kwargs)
    error = float(np.sqrt(np.mean((result.images - reference.images) ** 2)))
    out[f"solver_error_{method.name}"] = error
    lines.append(f"| {method.label} | {result.nfe} | {error:.4f} |")
  text = (f"RMS distance to the PF-ODE solution (adaptive, rtol {ec.solver_error_rtol:g}, "
          f"{reference.nfe} NFE) from the same {num} x_T.\n\n" + "\n".join(lines) + "\n")
  common.write_text(os.path.join(workdir, "solver_error.md"), text)
  logging.info("\n%s", text)
  return out


def _figures(rows, labels: dict[str, str], feature_name: str, workdir: str) -> None:
  """fid_vs_nfe.png (every sampler family over NFE, DPM-OT per switch step, controls as
  bands, memorization beside it) and fid_vs_memorization.png (the DPM-OT rows)."""
  curves: dict[str, list[tuple[int, float, float, float]]] = {}
  dpm_ot = []
  for method, name, row in rows:
    if method is None:
      continue
    point = (row["nfe"], row["fid"], row["fid_std"], row["nn_distance_ratio"])
    if method.family == "dpm_ot":
      dpm_ot.append((method.switch_index, *point, row["copy_fraction"]))
    else:
      curves.setdefault(FAMILIES.get(method.family, (method.label,))[0], []).append(point)
  controls = {labels[name]: (row["fid"], row["fid_std"]) for method, name, row in rows
              if method is None}
  common.save_figure(plotting.fid_vs_nfe_figure(curves, dpm_ot, controls, feature_name),
                     os.path.join(workdir, "fid_vs_nfe.png"))
  if dpm_ot:
    common.save_figure(plotting.fid_vs_memorization_figure(dpm_ot, controls, feature_name),
                       os.path.join(workdir, "fid_vs_memorization.png"))
