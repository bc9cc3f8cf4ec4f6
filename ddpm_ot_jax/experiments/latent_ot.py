"""Experiment `latent_ot`: is the pairing image ↔ DDPM code an optimal assignment? (Figure 7)

Khrulkov et al. (2022), Sec. 3.5 "Numerical results": take K validation images x_1..x_K,
encode each with the deterministic DDPM encoder, y_i = E(x_i), solve the exact discrete OT
problem between {x_i} and {y_i} (pixels as vectors in R^d, quadratic cost, uniform weights)
and look at the optimal permutation π. The paper found π = id for K = 500 AFHQ images. We
report, for each K in `latent_ot.num_images` that the split allows,

    identity_fraction = (1/K) #{i : π(i) = i},
    ot_relative_error = ε_rel = (Cost(E) − Cost(OT)) / Cost(OT),   Cost(π) = (1/K) Σ_i |x_i − y_π(i)|²

(the paper's Sec. 3.4 definitions, `ot.optimal_assignment` / `ot.pairing_cost`), for the two
deterministic encoders of `samplers`:

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

The DDPMs come from `models.<name>` specs (see `model_spec` and `load_model`): trained here
with `trainer.train_ddpm` in <models_dir>/<data>-<fingerprint>/ (`model_folder`; a
rerun resumes; models_dir defaults to <workdir>/models),
restored from another run's checkpoints, or imported from diffusers weights. Every model's
data folder, checkpoint or weights is checked before the first model is trained
(`check_sources`), so a missing one stops the run at once, not hours later. Encoders and
decoders run on the samplers' view matching each model's training.loss_type.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from typing import Any

from absl import logging
import flax
import jax
import ml_collections
import numpy as np

from ddpm_ot_jax import checkpoints
from ddpm_ot_jax import data
from ddpm_ot_jax import flow
from ddpm_ot_jax import ot
from ddpm_ot_jax import plotting
from ddpm_ot_jax import samplers
from ddpm_ot_jax import train
from ddpm_ot_jax import trainer
from ddpm_ot_jax.experiments import common
from ddpm_ot_jax.experiments import stages

# The config fields this experiment reads (scripts/main.py rejects any other field or override).
CONFIG_FIELDS = ("data", "model", "diffusion", "training", "models", "models_dir", "latent_ot")

# Streams derived from config.seed (trainer uses 0–2, train_ddpm 3, dpmot 10–13).
SUBSET_STREAM, SHUFFLE_STREAM, RESTORE_STREAM = 20, 21, 22

ENCODERS = ("ode", "ddim")
SOURCES = ("train", "checkpoint", "diffusers")
TRANSFORMS = ("none", "transpose")


# ----------------------------------------------------------------------------------------
# Model specs: which data a DDPM is trained on and where its parameters come from.
# ----------------------------------------------------------------------------------------


def model_spec(**overrides: Any) -> ml_collections.ConfigDict:
  """One DDPM of an experiment (configs put these under `config.models.<name>`).

  source: 'train' (train_ddpm in `model_folder`, resumed on a rerun),
    'checkpoint' (restore the newest checkpoint of a train_ddpm run at `path`: its workdir or
    its checkpoints/ folder; config.model must describe the same network) or 'diffusers'
    (a diffusers UNet2DModel folder or .safetensors file at `path`, e.g. the published
    google/ddpm-cifar10-32; the architecture comes from its config.json).
  path: see source.
  classes: keep only these labels of the training split (() = all).
  subfolder: image folders only: train on <data.root>/<split>/<subfolder> (AFHQ's cat/dog/wild).
  transform: 'none' or 'transpose' (x ↦ xᵀ per image: "other data" of the same size).
  num_classes: > 0 makes the UNet class-conditional on the dataset's labels (0 = unconditional).
  labels: class labels to decode with (class-conditional models in shared_latents).
  seed_offset: added to config.seed for this model's init and training noise.
  """
  spec = ml_collections.ConfigDict(dict(
      source="train", path="", classes=(), subfolder="", transform="none", num_classes=0,
      labels=(), seed_offset=0))
  for key, value in overrides.items():
    if key not in spec:
      raise KeyError(f"Unknown model spec key {key!r}; valid keys: {', '.join(spec.keys())}.")
    spec[key] = value
  return spec


def check_spec(name: str, spec: ml_collections.ConfigDict) -> None:
  """Raises KeyError/ValueError naming models.<name> when its spec is not one `load_model` takes."""
  unknown = sorted(set(spec.keys()) - set(model_spec().keys()))
  if unknown:
    raise KeyError(f"models.{name} has unknown keys {unknown}; valid keys: "
                   f"{', '.join(model_spec().keys())}.")
  if spec.source not in SOURCES:
    raise ValueError(f"models.{name}.source must be one of {SOURCES}, got {spec.source!r}.")
  if spec.source != "train" and not spec.path:
    raise ValueError(f"models.{name}.source={spec.source!r} needs models.{name}.path.")
  if spec.transform not in TRANSFORMS:
    raise ValueError(f"models.{name}.transform must be one of {TRANSFORMS}, got "
                     f"{spec.transform!r}.")


def apply_transform(images: np.ndarray, transform: str) -> np.ndarray:
  """'none' or 'transpose' (swap the two spatial axes of every (N, H, W, C) image)."""
  if transform == "none":
    return images
  if transform == "transpose":
    if images.shape[1] != images.shape[2]:
      raise ValueError(f"transform='transpose' needs square images, got {images.shape[1:3]}.")
    return np.ascontiguousarray(np.swapaxes(images, 1, 2))
  raise ValueError(f"Unknown transform {transform!r}; choose one of {TRANSFORMS}.")


def select_classes(dataset: data.ImageDataset, classes: tuple[int, ...]) -> data.ImageDataset:
  """The images whose label is in `classes` (all when empty), as a new ImageDataset."""
  if not classes:
    return dataset
  keep = np.isin(dataset.labels, np.asarray(classes, np.int32))
  if not keep.any():
    raise ValueError(f"No images with labels {tuple(classes)} (the dataset has labels "
                     f"{sorted(set(dataset.labels.tolist()))}).")
  return data.ImageDataset(dataset.images[keep], dataset.labels[keep], dataset.num_classes,
                           dataset.class_names)


def _subfolder(config: ml_collections.ConfigDict, split: str, subfolder: str) -> str:
  """<data.root>/<split>/<subfolder> (or <data.root>/<subfolder> for 'train' / 'all'): the
  first that exists; FileNotFoundError naming both when neither does."""
  dc = config.data
  root = dc.get("root") or None
  if dc.name != "image_folder":
    raise ValueError(f"A model subfolder ({subfolder!r}) needs data.name='image_folder'.")
  if not root:
    raise ValueError("data.root is empty: set it to the image folder (e.g. data/afhq).")
  root = os.path.expanduser(root)
  candidates = [os.path.join(root, split, subfolder)]
  if split in ("train", "all"):
    candidates.append(os.path.join(root, subfolder))
  folder = next((c for c in candidates if os.path.isdir(c)), None)
  if folder is None:
    raise FileNotFoundError(
        f"No image folder for split {split!r}, subfolder {subfolder!r}: looked for "
        f"{' and '.join(candidates)}. Put the PNG/JPEG images there or set data.root "
        f"(now {root!r}).")
  return folder


def check_split(config: ml_collections.ConfigDict, split: str, subfolder: str = "") -> None:
  """Raises what `load_split(config, split, subfolder)` would raise for missing or misnamed
  data, without reading any image."""
  dc = config.data
  if subfolder:
    data.check_image_folder(_subfolder(config, split, subfolder))
  else:
    data.check_dataset(dc.name, split, dc.get("root") or None, dc.get("resolution") or None)


def load_split(config: ml_collections.ConfigDict, split: str, subfolder: str = "",
               classes: tuple[int, ...] = (), transform: str = "none") -> data.ImageDataset:
  """`split` of config.data, restricted to `subfolder` (image folders) and `classes`.

  Missing files raise the data loader's FileNotFoundError, which names where it looked.
  """
  dc = config.data
  root = dc.get("root") or None
  resolution = dc.get("resolution") or None
  if subfolder:
    dataset = data.load_image_folder(_subfolder(config, split, subfolder), resolution,
                                     channels=dc.get("channels", 3), labels_from_subfolders=False)
  else:
    dataset = data.load_dataset(dc.name, split, root, resolution)
  dataset = select_classes(dataset, tuple(classes))
  images = apply_transform(dataset.images, transform)
  return data.ImageDataset(images, dataset.labels, dataset.num_classes, dataset.class_names)


def image_shape_from_config(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of config.data without reading it: digits 8×8×1, CIFAR-10 32×32×3, image
  folders resolution² × channels."""
  dc = config.data
  if dc.name == "digits":
    return (8, 8, 1)
  if dc.name == "cifar10":
    return (32, 32, 3)
  if dc.name == "image_folder":
    if not dc.get("resolution"):
      raise ValueError("data.resolution must be set for image folders.")
    return (int(dc.resolution), int(dc.resolution), int(dc.get("channels", 3)))
  raise ValueError(f"Unknown dataset {dc.name!r}.")


# ----------------------------------------------------------------------------------------
# Loading or training a model.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedModel:
  """A DDPM ready for the samplers: ε_θ = model.apply with `params` (EMA weights).

  schedule: the samplers' continuous-time view matching how it was trained
  (`trainer.sampling_schedule`; imported diffusers weights: the discrete chain's).
  directory: where its checkpoints live (or the diffusers path); steps: optimizer steps
  behind the parameters (0 for imported weights); train_seconds: training time spent by
  this process (0 when restored).
  """

  name: str
  model: flax.linen.Module
  params: Any
  schedule: samplers.NoiseSchedule
  mesh: jax.sharding.Mesh
  directory: str
  steps: int
  train_seconds: float
  num_classes: int

  def eps_fn(self, labels: jax.Array | None = None) -> samplers.EpsFn:
    """ε_θ(x, t_index) with class labels `labels` (None: unconditional)."""
    return samplers.model_eps_fn(self.model.apply, self.params, labels)


def model_config(config: ml_collections.ConfigDict,
                 spec: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The train_ddpm config of one model: config with seed += seed_offset and, for a
  class-conditional spec, model.num_classes = spec.num_classes."""
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.seed = int(config.seed) + int(spec.seed_offset)
    if spec.num_classes:
      cfg.model.num_classes = int(spec.num_classes)
  return cfg


def _model_fingerprint(cfg: ml_collections.ConfigDict, spec: ml_collections.ConfigDict) -> str:
  return stages.fingerprint(dict(
      seed=cfg.seed, data=cfg.data, model=cfg.model, diffusion=cfg.diffusion,
      training=cfg.training, classes=spec.classes, subfolder=spec.subfolder,
      transform=spec.transform, num_classes=spec.num_classes))


_MODULES: dict[str, flax.linen.Module] = {}


def shared_unet(model_config: ml_collections.ConfigDict) -> flax.linen.Module:
  """`unet_from_config(model_config)`, the same instance for equal configs.

  The samplers' jitted loops key their cache on the module's bound `apply` (compared by
  instance), so models of one architecture share one compilation (a diffrax ODE solve of
  the UNet takes seconds to trace) when they share the module object.
  """
  from ddpm_ot_jax.models import unet  # pylint: disable=g-import-not-at-top

  model = unet.unet_from_config(model_config)
  return _MODULES.setdefault(repr(model), model)


def model_folder(config: ml_collections.ConfigDict, workdir: str, cfg: ml_collections.ConfigDict,
                 spec: ml_collections.ConfigDict) -> str:
  """<models_dir>/<data description>-<fingerprint[:8]>, e.g. models/digits-c01234-1f0e9a2b.

  models_dir is config.models_dir, or <workdir>/models when empty. The name depends only on
  what the model is trained on and how (not on its role in an experiment), so experiments
  given the same models_dir share models with equal specs.
  """
  parts = [spec.subfolder or cfg.data.name]
  if spec.classes:
    separator = "" if all(0 <= int(c) < 10 for c in spec.classes) else "_"
    parts.append("c" + separator.join(str(int(c)) for c in spec.classes))
  if spec.transform != "none":
    parts.append(spec.transform)
  if spec.num_classes:
    parts.append(f"cond{int(spec.num_classes)}")
  if spec.seed_offset:
    parts.append(f"seed{int(cfg.seed)}")
  root = config.get("models_dir") or os.path.join(workdir, "models")
  return os.path.join(root, "-".join(parts) + "-" + _model_fingerprint(cfg, spec)[:8])


def _checkpoint_folder(path: str) -> str:
  path = os.path.expanduser(path)
  nested = os.path.join(path, "checkpoints")
  return nested if os.path.isdir(nested) else path


def _open_checkpoints(name: str, spec: ml_collections.ConfigDict
                      ) -> tuple[checkpoints.Checkpointer, int, str]:
  """(checkpointer, newest step, folder) of the train_ddpm run at spec.path; FileNotFoundError
  saying what to do when the folder or a finished checkpoint is missing (nothing is created)."""
  folder = _checkpoint_folder(spec.path)
  how = (f"Train it first (python scripts/main.py --config=<the training config> "
         f"--workdir={spec.path}), point models.{name}.path at a train_ddpm workdir, or set "
         f"models.{name}.source='train' to train it here.")
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"No checkpoint folder for model '{name}': {folder} does not exist. "
                            + how)
  checkpointer = checkpoints.Checkpointer(folder, keep=None, async_save=False)
  step = checkpointer.latest_step()
  if step is None:
    checkpointer.close()
    raise FileNotFoundError(f"No checkpoint for model '{name}' in {folder}. " + how)
  return checkpointer, step, folder


def check_sources(config: ml_collections.ConfigDict, names: list[str],
                  image_shape: tuple[int, ...]) -> None:
  """Checks, before anything is trained, that every model in `names` can be had: the
  training data of source='train' (its data split or image subfolder), a finished checkpoint
  for 'checkpoint', and for 'diffusers' the weights and a config.json whose sample_size and
  in_channels match `image_shape`. Raises the first FileNotFoundError / ValueError, naming
  models.<name> and the missing path; reads no image and no weights."""
  from ddpm_ot_jax.models import diffusers_import  # pylint: disable=g-import-not-at-top

  for name in names:
    spec = config.models[name]
    check_spec(name, spec)
    if spec.source == "train":
      check_split(model_config(config, spec), "train", spec.subfolder)
    elif spec.source == "checkpoint":
      checkpointer, _, _ = _open_checkpoints(name, spec)
      checkpointer.close()
    else:
      path = os.path.expanduser(spec.path)
      diffusers_import.check_image_shape(diffusers_import.read_diffusers_config(path),
                                         image_shape, f"models.{name} (diffusers, {path})")


def _restore(name: str, cfg: ml_collections.ConfigDict, spec: ml_collections.ConfigDict,
             image_shape: tuple[int, ...], mesh: jax.sharding.Mesh):
  """(model, EMA params, step) from the newest checkpoint of a train_ddpm run at spec.path."""
  checkpointer, step, folder = _open_checkpoints(name, spec)
  try:
    model = shared_unet(cfg.model)
    hparams = trainer.hparams_from_config(cfg, model)
    tx = train.make_optimizer(hparams)
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), RESTORE_STREAM)
    target = train.make_init_fn(model, tx, image_shape, mesh)(key, key)
    state = checkpointer.restore(target, step)
  finally:
    checkpointer.close()
  logging.info("Model '%s': restored step %d from %s.", name, step, folder)
  return model, state.ema_params, step, folder


def load_model(config: ml_collections.ConfigDict, name: str, spec: ml_collections.ConfigDict,
               workdir: str, image_shape: tuple[int, ...]) -> LoadedModel:
  """Trains (resuming), restores or imports the DDPM `name` described by `spec`.

  source='train' reads the training split (restricted as the spec says) and runs
  `trainer.train_ddpm` in `model_folder(...)`, whose name carries the fingerprint of
  every input of the training run, so a rerun resumes and a changed config trains a new model
  instead of reusing the old one. Missing data, checkpoints or weights raise
  FileNotFoundError naming the missing path.
  """
  check_spec(name, spec)
  cfg = model_config(config, spec)
  if spec.source == "train":
    dataset = load_split(cfg, "train", spec.subfolder, tuple(spec.classes), spec.transform)
    if tuple(dataset.image_shape) != tuple(image_shape):
      raise ValueError(f"Model '{name}' trains on images of shape {dataset.image_shape}, the "
                       f"experiment uses {tuple(image_shape)}.")
    directory = model_folder(config, workdir, cfg, spec)
    logging.info("Model '%s': %d training images → %s", name, len(dataset), directory)
    result = trainer.train_ddpm(cfg, os.path.join(directory, "checkpoints"), dataset,
                                model=shared_unet(cfg.model),
                                hooks=common.training_hooks(directory))
    return LoadedModel(name, result.model, result.state.ema_params, result.sampling_schedule,
                       result.mesh, directory, int(jax.device_get(result.state.step)), result.train_seconds,
                       int(getattr(result.model, "num_classes", 0)))
  mesh = train.make_data_mesh()
  if spec.source == "checkpoint":
    model, params, step, directory = _restore(name, cfg, spec, image_shape, mesh)
    return LoadedModel(name, model, params, trainer.sampling_schedule(cfg), mesh,
                       directory, step, 0.0, int(getattr(model, "num_classes", 0)))
  from ddpm_ot_jax.models import diffusers_import  # pylint: disable=g-import-not-at-top

  model, params = diffusers_import.load_diffusers_unet(os.path.expanduser(spec.path),
                                                       tuple(image_shape))
  params = jax.device_put(params, train.replicated(mesh))
  logging.info("Model '%s': diffusers weights from %s.", name, spec.path)
  # Published DDPM weights were trained on the discrete chain.
  schedule = samplers.noise_schedule(trainer.schedule_from_config(cfg), "discrete")
  return LoadedModel(name, model, params, schedule, mesh, spec.path, 0, 0.0,
                     int(getattr(model, "num_classes", 0)))


# ----------------------------------------------------------------------------------------
# Encoding and the OT test.
# ----------------------------------------------------------------------------------------


def solver_options(lc: ml_collections.ConfigDict) -> flow.SolverOptions:
  return flow.SolverOptions(solver=lc.ode_solver, rtol=lc.ode_rtol, atol=lc.ode_atol,
                            max_steps=lc.ode_max_steps)


@dataclasses.dataclass
class Codes:
  """codes y_i = E(x_i); reconstructions D(y_i) with the matching decoder (None when not
  computed); network evaluations of the encoder and of the decoder (per image, last chunk);
  seconds: wall time of encoding and decoding."""

  codes: np.ndarray
  reconstructions: np.ndarray | None
  nfe_encode: int
  nfe_decode: int
  seconds: float


def encode_images(loaded: LoadedModel, images: np.ndarray, method: str,
                  lc: ml_collections.ConfigDict, labels: np.ndarray | None = None,
                  round_trip: bool = False) -> Codes:
  """Codes of `images` under `method`, in chunks of lc.batch_size (split across the devices,
  padded to a multiple of their number: `samplers.shard_rows`):

  * 'ode': the PF-ODE encoder from step 0 to N − 1 (`samplers.ode_encode`, adaptive, tolerances
    lc.ode_rtol/atol); decoder: the same ODE backwards (`samplers.pf_ode`);
  * 'ddim': DDIM inversion with lc.ddim_steps steps (`samplers.ddim_invert`); decoder: DDIM
    with η = 0 on the same grid (`samplers.ddim`).

  With `round_trip` the codes are decoded back (as `samplers.round_trip` does). A
  class-conditional model encodes each image with its label.
  """
  if method not in ENCODERS:
    raise ValueError(f"Unknown encoder {method!r}; choose one of {ENCODERS}.")
  options = solver_options(lc)
  codes, recons, nfe_encode, nfe_decode = [], [], 0, 0
  start = time.perf_counter()
  for lo in range(0, len(images), lc.batch_size):
    count = len(images[lo:lo + lc.batch_size])
    x = samplers.shard_rows(images[lo:lo + lc.batch_size], loaded.mesh)
    y = None
    if loaded.num_classes:
      y = samplers.shard_rows(
          np.asarray(labels[lo:lo + lc.batch_size], np.int32), loaded.mesh)
    eps_fn = loaded.eps_fn(y)
    if method == "ode":
      encoded = samplers.ode_encode(eps_fn, loaded.schedule, x, options)
    else:
      encoded = samplers.ddim_invert(eps_fn, loaded.schedule, x, lc.ddim_steps)
    codes.append(samplers.gather_rows(encoded.x, count))
    nfe_encode = int(encoded.nfe)
    if round_trip:
      if method == "ode":
        decoded = samplers.pf_ode(eps_fn, loaded.schedule, encoded.x, options, end_index=0.0)
      else:
        decoded = samplers.ddim(eps_fn, loaded.schedule, encoded.x, lc.ddim_steps)
      recons.append(samplers.gather_rows(decoded.x, count))
      nfe_decode = int(decoded.nfe)
  seconds = time.perf_counter() - start
  return Codes(np.concatenate(codes), np.concatenate(recons) if recons else None, nfe_encode,
               nfe_decode, seconds)


def ot_test(images: np.ndarray, codes: np.ndarray, method: str = "pot") -> dict[str, Any]:
  """The paper's test on the pairing images[i] ↔ codes[i]: the optimal permutation π,
  Cost(E), Cost(OT), ε_rel and the identity fraction (`ot.optimal_assignment`), and the
  nearest-code fraction (1/K) #{i : argmin_j |x_i − y_j| = i}: when it is 1 every image is
  closer to its own code than to any other, and π = id follows without solving anything."""
  perm = ot.optimal_assignment(images, codes, method)
  cost_encoder = ot.pairing_cost(images, codes)
  cost_ot = ot.pairing_cost(images, codes, perm)
  nearest = np.argmin(ot.squared_distances(images, codes), axis=1)
  return {"perm": perm, "cost_encoder": cost_encoder, "cost_ot": cost_ot,
          "ot_relative_error": (cost_encoder - cost_ot) / cost_ot,
          "identity_fraction": ot.identity_fraction(perm),
          "nearest_code_fraction": float(np.mean(nearest == np.arange(len(perm))))}


def _ot_matrix_figure(panels: list[tuple[str, np.ndarray, dict]], path: str, k: int) -> None:
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=(3.2 * len(panels), 3.6))
  axes = fig.subplots(1, len(panels), squeeze=False)
  for ax, (title, perm, test) in zip(axes[0], panels):
    plan = np.zeros((len(perm), len(perm)), np.float32)
    plan[np.arange(len(perm)), perm] = 1.0
    ax.imshow(plan, cmap="gray_r", interpolation="nearest")
    ax.set_title(f"{title}\nidentity {test['identity_fraction']:.3f}, "
                 f"ε_rel {test['ot_relative_error']:.2g}", fontsize=8)
    ax.set_xlabel("code j")
    ax.set_ylabel("image i")
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(f"Optimal transport plans between {k} held-out images and their codes "
               "(black: mass moved from image i to code j)", fontsize=9)
  common.save_figure(fig, path)


def _codes_figure(images: np.ndarray, rows: list[tuple[str, np.ndarray]], path: str) -> None:
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  all_rows = [("images", images)] + rows
  fig = Figure(figsize=(8, 0.72 * len(all_rows) + 0.2))
  axes = fig.subplots(len(all_rows), 1, squeeze=False)
  fig.subplots_adjust(hspace=0.08)
  for ax, (label, row) in zip(axes[:, 0], all_rows):
    grid = plotting.image_grid(np.clip(row, -1, 1), columns=len(row))
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_axis_off()
    ax.text(-0.01, 0.5, label, transform=ax.transAxes, ha="right", va="center", fontsize=8)
  common.save_figure(fig, path)


# ----------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------


def _validate(config: ml_collections.ConfigDict) -> None:
  lc = config.latent_ot
  if not lc.num_images or any(int(k) < 2 for k in lc.num_images):
    raise ValueError(f"latent_ot.num_images must list sizes K ≥ 2, got {tuple(lc.num_images)}.")
  for enc in lc.encoders:
    if enc not in ENCODERS:
      raise ValueError(f"latent_ot.encoders: unknown encoder {enc!r}; choose from {ENCODERS}.")
  if lc.batch_size < 1 or lc.ddim_steps < 1:
    raise ValueError("latent_ot.batch_size and latent_ot.ddim_steps must be ≥ 1.")
  if "own" not in config.models:
    raise KeyError("config.models must have an 'own' model (trained on the encoded images' "
                   "distribution).")
  for name, spec in config.models.items():
    check_spec(name, spec)


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
  check_split(config, lc.split, own_spec.subfolder)
  check_sources(config, model_names, image_shape_from_config(config))
  # The images first: a missing dataset fails before any training.
  heldout = load_split(config, lc.split, own_spec.subfolder, tuple(lc.classes), own_spec.transform)
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
    loaded = load_model(config, model_name, config.models[model_name], workdir, image_shape)
    results[f"train_steps_{model_name}"] = loaded.steps
    results[f"train_seconds_{model_name}"] = loaded.train_seconds
    if model_name == "own":
      from ddpm_ot_jax.models import unet  # pylint: disable=g-import-not-at-top
      results["params"] = unet.count_params(loaded.params)
    prefix = "" if model_name == "own" else f"{model_name}_"
    for enc in lc.encoders:
      out = encode_images(loaded, images, enc, lc, labels, round_trip=lc.round_trip)
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
      test = ot_test(images[:k], codes, lc.ot_method)
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
  _ot_matrix_figure([(titles[n], tests[(n, k_max)]["perm"], tests[(n, k_max)])
                     for n in panel_names], os.path.join(workdir, "ot_matrix.png"), k_max)
  shown = min(12, k_max)
  _codes_figure(images[:shown], [(label, row[:shown]) for label, row in figure_rows],
                os.path.join(workdir, "codes.png"))
  results["seconds"] = watch.seconds()
  return results
