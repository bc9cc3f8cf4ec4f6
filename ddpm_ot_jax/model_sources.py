"""Where an experiment's DDPMs come from: trained here, restored from a checkpoint, or imported.

A model is described by a spec (`model_spec`, configs put these under `config.models.<name>`):
the data it is trained on (a split of `config.data`, optionally restricted to some labels or
an image subfolder, optionally transformed x ↦ xᵀ to make "other data" of the same size) and
where its parameters come from ('train', 'checkpoint', 'diffusers'). `load_model` turns a
spec into a `LoadedModel` (ε_θ, its EMA parameters replicated over the data mesh and the
samplers' continuous-time view matching how it was trained). `check_sources` checks every
model's data folder, checkpoint or weights without reading images or weights, so a missing one
stops a run before the first model is trained.

Library code: no logging and no files written here except the checkpoints `trainer.train_ddpm`
writes into the folder the caller names (its progress goes to the caller's `hooks`).
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import flax
import jax
import ml_collections
import numpy as np

from ddpm_ot_jax import checkpoints
from ddpm_ot_jax import data
from ddpm_ot_jax import samplers
from ddpm_ot_jax import train
from ddpm_ot_jax import trainer

SOURCES = ("train", "checkpoint", "diffusers")
TRANSFORMS = ("none", "transpose")


# ----------------------------------------------------------------------------------------
# Model specs: which data a DDPM is trained on and where its parameters come from.
# ----------------------------------------------------------------------------------------


def model_spec(**overrides: Any) -> ml_collections.ConfigDict:
  """One DDPM of an experiment (configs put these under `config.models.<name>`).

  source: 'train' (train_ddpm in the folder the caller names, resumed on a rerun),
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


def _subfolder(data_config: ml_collections.ConfigDict, split: str, subfolder: str) -> str:
  """<data.root>/<split>/<subfolder> (or <data.root>/<subfolder> for 'train' / 'all'): the
  first that exists; FileNotFoundError naming both when neither does."""
  root = data_config.get("root") or None
  if data_config.name != "image_folder":
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


def check_split(data_config: ml_collections.ConfigDict, split: str, subfolder: str = "") -> None:
  """Raises what `load_split(data_config, split, subfolder)` would raise for missing or
  misnamed data, without reading any image."""
  if subfolder:
    data.check_image_folder(_subfolder(data_config, split, subfolder))
  else:
    data.check_dataset(data_config.name, split, data_config.get("root") or None,
                       data_config.get("resolution") or None)


def load_split(data_config: ml_collections.ConfigDict, split: str, subfolder: str = "",
               classes: tuple[int, ...] = (), transform: str = "none") -> data.ImageDataset:
  """`split` of the dataset `data_config` (a config's `data` field), restricted to
  `subfolder` (image folders) and `classes`, then transformed (`apply_transform`).

  Missing files raise the data loader's FileNotFoundError, which names where it looked.
  """
  root = data_config.get("root") or None
  resolution = data_config.get("resolution") or None
  if subfolder:
    dataset = data.load_image_folder(_subfolder(data_config, split, subfolder), resolution,
                                     channels=data_config.get("channels", 3),
                                     labels_from_subfolders=False)
  else:
    dataset = data.load_dataset(data_config.name, split, root, resolution)
  dataset = select_classes(dataset, tuple(classes))
  images = apply_transform(dataset.images, transform)
  return data.ImageDataset(images, dataset.labels, dataset.num_classes, dataset.class_names)


def image_shape(data_config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of the dataset `data_config` without reading it: digits 8×8×1, CIFAR-10
  32×32×3, image folders resolution² × channels."""
  if data_config.name == "digits":
    return (8, 8, 1)
  if data_config.name == "cifar10":
    return (32, 32, 3)
  if data_config.name == "image_folder":
    if not data_config.get("resolution"):
      raise ValueError("data.resolution must be set for image folders.")
    return (int(data_config.resolution), int(data_config.resolution),
            int(data_config.get("channels", 3)))
  raise ValueError(f"Unknown dataset {data_config.name!r}.")


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


def training_inputs(cfg: ml_collections.ConfigDict, spec: ml_collections.ConfigDict) -> dict:
  """Every input of a source='train' model's training run (`cfg` = `model_config(...)`):
  what a fingerprint of the trained model must cover."""
  return dict(seed=cfg.seed, data=cfg.data, model=cfg.model, diffusion=cfg.diffusion,
              training=cfg.training, classes=spec.classes, subfolder=spec.subfolder,
              transform=spec.transform, num_classes=spec.num_classes)


def folder_name(cfg: ml_collections.ConfigDict, spec: ml_collections.ConfigDict) -> str:
  """What a model is trained on, as a folder name: e.g. 'digits-c01234', 'cat-cond3',
  'digits-transpose-seed7' (`cfg` = `model_config(...)`). It does not depend on the model's
  role in an experiment, so experiments can share models with equal specs."""
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
  return "-".join(parts)


_MODULES: dict[str, flax.linen.Module] = {}


def shared_unet(unet_config: ml_collections.ConfigDict) -> flax.linen.Module:
  """`unet_from_config(unet_config)`, the same instance for equal configs.

  The samplers' jitted loops key their cache on the module's bound `apply` (compared by
  instance), so models of one architecture share one compilation (a diffrax ODE solve of
  the UNet takes seconds to trace) when they share the module object.
  """
  from ddpm_ot_jax.models import unet  # pylint: disable=g-import-not-at-top

  model = unet.unet_from_config(unet_config)
  return _MODULES.setdefault(repr(model), model)


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
                  shape: tuple[int, ...]) -> None:
  """Checks, before anything is trained, that every model `config.models.<name>` in `names`
  can be had: the training data of source='train' (its data split or image subfolder), a
  finished checkpoint for 'checkpoint', and for 'diffusers' the weights and a config.json
  whose sample_size and in_channels match the image `shape`. Raises the first
  FileNotFoundError / ValueError, naming models.<name> and the missing path; reads no image
  and no weights."""
  from ddpm_ot_jax.models import diffusers_import  # pylint: disable=g-import-not-at-top

  for name in names:
    spec = config.models[name]
    check_spec(name, spec)
    if spec.source == "train":
      check_split(model_config(config, spec).data, "train", spec.subfolder)
    elif spec.source == "checkpoint":
      checkpointer, _, _ = _open_checkpoints(name, spec)
      checkpointer.close()
    else:
      path = os.path.expanduser(spec.path)
      diffusers_import.check_image_shape(diffusers_import.read_diffusers_config(path),
                                         shape, f"models.{name} (diffusers, {path})")


def _restore(name: str, cfg: ml_collections.ConfigDict, spec: ml_collections.ConfigDict,
             shape: tuple[int, ...], mesh: jax.sharding.Mesh, init_key: jax.Array):
  """(model, EMA params, step, folder) from the newest checkpoint of a train_ddpm run at
  spec.path (`init_key` draws the abstract target's init, which the restore overwrites)."""
  checkpointer, step, folder = _open_checkpoints(name, spec)
  try:
    model = shared_unet(cfg.model)
    hparams = trainer.hparams_from_config(cfg, model)
    tx = train.make_optimizer(hparams)
    target = train.make_init_fn(model, tx, shape, mesh)(init_key, init_key)
    state = checkpointer.restore(target, step)
  finally:
    checkpointer.close()
  return model, state.ema_params, step, folder


def load_model(config: ml_collections.ConfigDict, name: str, spec: ml_collections.ConfigDict,
               shape: tuple[int, ...], train_dir: str, init_key: jax.Array,
               hooks: trainer.TrainHooks = trainer.TrainHooks()) -> LoadedModel:
  """Trains (resuming), restores or imports the DDPM `name` described by `spec`.

  source='train' reads the training split (restricted as the spec says) and runs
  `trainer.train_ddpm` with checkpoints in <train_dir>/checkpoints, reporting to `hooks`; the
  caller names `train_dir` after every input of the training run (`training_inputs`), so a
  rerun resumes and a changed config trains a new model instead of reusing the old one.
  source='checkpoint' restores the newest checkpoint at spec.path (`init_key`: the abstract
  target's init). Missing data, checkpoints or weights raise FileNotFoundError naming the
  missing path; images of another `shape` (H, W, C) raise ValueError.
  """
  check_spec(name, spec)
  cfg = model_config(config, spec)
  if spec.source == "train":
    dataset = load_split(cfg.data, "train", spec.subfolder, tuple(spec.classes), spec.transform)
    if tuple(dataset.image_shape) != tuple(shape):
      raise ValueError(f"Model '{name}' trains on images of shape {dataset.image_shape}, the "
                       f"experiment uses {tuple(shape)}.")
    result = trainer.train_ddpm(cfg, os.path.join(train_dir, "checkpoints"), dataset,
                                model=shared_unet(cfg.model), hooks=hooks)
    return LoadedModel(name, result.model, result.state.ema_params, result.sampling_schedule,
                       result.mesh, train_dir, int(jax.device_get(result.state.step)),
                       result.train_seconds, int(getattr(result.model, "num_classes", 0)))
  mesh = train.make_data_mesh()
  if spec.source == "checkpoint":
    model, params, step, directory = _restore(name, cfg, spec, shape, mesh, init_key)
    return LoadedModel(name, model, params, trainer.sampling_schedule(cfg), mesh,
                       directory, step, 0.0, int(getattr(model, "num_classes", 0)))
  from ddpm_ot_jax.models import diffusers_import  # pylint: disable=g-import-not-at-top

  model, params = diffusers_import.load_diffusers_unet(os.path.expanduser(spec.path),
                                                       tuple(shape))
  params = jax.device_put(params, train.replicated(mesh))
  # Published DDPM weights were trained on the discrete chain.
  schedule = samplers.noise_schedule(trainer.schedule_from_config(cfg), "discrete")
  return LoadedModel(name, model, params, schedule, mesh, spec.path, 0, 0.0,
                     int(getattr(model, "num_classes", 0)))
