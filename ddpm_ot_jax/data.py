"""Image datasets read from local files, and deterministic, resumable batches.

Datasets (all as `ImageDataset`: NHWC float32 images on [−1, 1], int32 labels):

* scikit-learn's digits (1797 8×8 grey images, ships with scikit-learn: the offline default),
  pixel values 0..16 mapped by x ↦ x/8 − 1, with a fixed stratified train / held-out split.
* CIFAR-10 from a local `cifar-10-batches-py` folder (the python-pickle release);
  `download_cifar10` fetches and md5-checks the archive for users who are online.
* Image folders (PNG/JPEG; class = subfolder) resized so the shorter side is the
  resolution and center-cropped: AFHQ / FFHQ / MetFaces-style data.

Batches: `batch_iterator` walks an endless stream made of one fresh permutation of the
dataset per epoch, drawn from numpy's Generator seeded by (seed, epoch); batch k is
stream[kB : (k+1)B] and its random horizontal flips come from a Generator seeded by
(seed, k). So batch k depends only on (seed, k): a run resumed at step k sees exactly the
batches an uninterrupted run would. `shard_batch` splits a batch across devices.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import urllib.request
from typing import Any, Iterator

import jax
import numpy as np

# ----------------------------------------------------------------------------------------
# The dataset container.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
  """Images (N, H, W, C) float32 on [−1, 1], labels (N,) int32 in [0, num_classes)."""

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  class_names: tuple[str, ...] = ()

  def __post_init__(self):
    if self.images.ndim != 4 or self.images.dtype != np.float32:
      raise ValueError(f"images must be (N, H, W, C) float32, got {self.images.shape} "
                       f"{self.images.dtype}.")
    if self.labels.shape != self.images.shape[:1] or self.labels.dtype != np.int32:
      raise ValueError(f"labels must be ({len(self.images)},) int32, got {self.labels.shape} "
                       f"{self.labels.dtype}.")

  def __len__(self) -> int:
    return len(self.images)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C)."""
    return tuple(self.images.shape[1:])


def _from_uint8(images: np.ndarray) -> np.ndarray:
  """Pixel values 0..255 → [−1, 1]: x ↦ x/127.5 − 1."""
  return (images.astype(np.float32) / 127.5 - 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------
# scikit-learn digits.
# ----------------------------------------------------------------------------------------

DIGITS_HELDOUT_SIZE = 300
DIGITS_SPLIT_SEED = 0


def load_digits(split: str = "train") -> ImageDataset:
  """scikit-learn's 8×8 digits as (N, 8, 8, 1) images on [−1, 1] (x ↦ x/8 − 1), 10 classes.

  split: 'train' (1497 images), 'heldout' (alias 'test', 300 images) or 'all' (1797).
  The split is fixed: stratified by label (scikit-learn's `train_test_split`, seed 0), so
  each digit has the same share in both parts. Images keep their original order.
  """
  import sklearn.datasets  # pylint: disable=g-import-not-at-top
  import sklearn.model_selection  # pylint: disable=g-import-not-at-top

  digits = sklearn.datasets.load_digits()
  images = (digits.images / 8.0 - 1.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  index = np.arange(len(labels))
  if split == "all":
    chosen = index
  elif split in ("train", "heldout", "test"):
    train, heldout = sklearn.model_selection.train_test_split(
        index, test_size=DIGITS_HELDOUT_SIZE, stratify=labels, random_state=DIGITS_SPLIT_SEED)
    chosen = np.sort(train if split == "train" else heldout)
  else:
    raise ValueError(f"Unknown digits split {split!r}; choose 'train', 'heldout' or 'all'.")
  return ImageDataset(images[chosen], labels[chosen], 10, tuple(str(d) for d in range(10)))


# ----------------------------------------------------------------------------------------
# CIFAR-10 (python-pickle batches).
# ----------------------------------------------------------------------------------------

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
_CIFAR10_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}


def _cifar10_how_to_get(root: str) -> str:
  return (f"Download {CIFAR10_URL} (CIFAR-10 python version) and extract it into {root} "
          f"(giving {os.path.join(root, CIFAR10_FOLDER)}), or, on a machine that is online, "
          f"call ddpm_ot_jax.data.download_cifar10({root!r}).")


def _read_cifar10_batch(path: str, root: str) -> tuple[np.ndarray, np.ndarray]:
  """One pickled batch → (uint8 images (n, 32, 32, 3), int32 labels (n,))."""
  try:
    with open(path, "rb") as f:
      batch = pickle.load(f, encoding="bytes")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != data.shape[:1]:
      raise ValueError(f"data {data.shape}, labels {labels.shape}; expected (n, 3072), (n,)")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
      raise ValueError("labels outside 0..9")
  except Exception as e:  # unpickling errors come in many types; all mean a corrupt file
    raise ValueError(f"{path} is not a valid CIFAR-10 batch ({type(e).__name__}: {e}). "
                     f"Delete the folder and get it again: {_cifar10_how_to_get(root)}") from e
  # Rows are channel-major (3, 32, 32) planes: R, G, B.
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int32)


def _cifar10_folder(root: str, split: str) -> tuple[str, tuple[str, ...]]:
  """(folder, batch file names) of a CIFAR-10 split; FileNotFoundError when absent."""
  key = {"train": "train", "test": "test", "heldout": "test"}.get(split)
  if key is None:
    raise ValueError(f"Unknown CIFAR-10 split {split!r}; choose 'train' or 'test'.")
  files = _CIFAR10_FILES[key]
  candidates = [os.path.join(root, CIFAR10_FOLDER), root]
  folder = next((c for c in candidates
                 if all(os.path.isfile(os.path.join(c, f)) for f in files)), None)
  if folder is None:
    raise FileNotFoundError(
        f"CIFAR-10 {key} split not found: looked for {', '.join(files)} in "
        f"{candidates[0]} and in {candidates[1]}. {_cifar10_how_to_get(root)}")
  return folder, files


def load_cifar10(root: str, split: str = "train") -> ImageDataset:
  """CIFAR-10 from `root/cifar-10-batches-py/` (or `root` itself if it is that folder).

  split: 'train' (data_batch_1..5, 50000 images) or 'test' (alias 'heldout'; test_batch,
  10000 images). Images (N, 32, 32, 3) on [−1, 1] (x ↦ x/127.5 − 1), labels 0..9.
  Missing files raise FileNotFoundError and corrupt ones ValueError, both saying where the
  loader looked and how to get the data.
  """
  folder, files = _cifar10_folder(root, split)
  parts = [_read_cifar10_batch(os.path.join(folder, f), root) for f in files]
  images = np.concatenate([p[0] for p in parts])
  labels = np.concatenate([p[1] for p in parts])
  return ImageDataset(_from_uint8(images), labels, 10, CIFAR10_CLASSES)


def _md5(path: str) -> str:
  digest = hashlib.md5()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def extract_cifar10(archive: str, root: str, md5: str | None = CIFAR10_MD5) -> str:
  """Checks `archive` (cifar-10-python.tar.gz) against `md5` and extracts it into `root`.

  The folder appears atomically (extracted beside it, then renamed), so an interrupted
  extraction never leaves a half-written `cifar-10-batches-py`. Returns its path.
  """
  if md5 is not None:
    actual = _md5(archive)
    if actual != md5:
      raise ValueError(f"{archive} has md5 {actual}, expected {md5}: the download is "
                       "incomplete or corrupt. Delete it and download again.")
  os.makedirs(root, exist_ok=True)
  target = os.path.join(root, CIFAR10_FOLDER)
  staging = tempfile.mkdtemp(dir=root, prefix=".cifar10-")
  try:
    with tarfile.open(archive, "r:gz") as tar:
      tar.extractall(staging, filter="data")
    extracted = os.path.join(staging, CIFAR10_FOLDER)
    if not os.path.isdir(extracted):
      raise ValueError(f"{archive} holds no {CIFAR10_FOLDER}/ folder; is it the python "
                       f"version of CIFAR-10 ({CIFAR10_URL})?")
    if os.path.isdir(target):
      shutil.rmtree(target)
    os.replace(extracted, target)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return target


def download_cifar10(root: str, url: str = CIFAR10_URL) -> str:
  """Downloads CIFAR-10 (python version, 163 MB) into `root`, verifying its md5 checksum.

  Does nothing if `root/cifar-10-batches-py` already holds all batches. Returns the folder.
  Needs internet access; tests never call it.
  """
  target = os.path.join(root, CIFAR10_FOLDER)
  if all(os.path.isfile(os.path.join(target, f))
         for files in _CIFAR10_FILES.values() for f in files):
    return target
  os.makedirs(root, exist_ok=True)
  fd, archive = tempfile.mkstemp(dir=root, prefix=".cifar10-", suffix=".tar.gz")
  try:
    with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:
      shutil.copyfileobj(response, f)
    return extract_cifar10(archive, root)
  finally:
    os.remove(archive)


# ----------------------------------------------------------------------------------------
# Image folders.
# ----------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _image_files(folder: str) -> list[str]:
  """Image files under `folder` (recursively), sorted by relative path."""
  found = []
  for directory, _, names in os.walk(folder):
    found += [os.path.join(directory, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
  return sorted(found, key=lambda p: os.path.relpath(p, folder))


def _has_image_files(folder: str) -> bool:
  """True as soon as one image file is found under `folder` (no full listing)."""
  for _, _, names in os.walk(folder):
    if any(n.lower().endswith(IMAGE_EXTENSIONS) for n in names):
      return True
  return False


def check_image_folder(root: str) -> None:
  """Raises the FileNotFoundError `load_image_folder(root, ...)` would raise for a missing
  folder or one without images, without reading any image."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"Image folder {root} does not exist. Put PNG/JPEG images there "
                            "(one subfolder per class), or point the config's data root at it.")
  if not _has_image_files(root):
    raise FileNotFoundError(f"No PNG/JPEG images ({', '.join(IMAGE_EXTENSIONS)}) under {root}.")


def _load_image(path: str, resolution: int, channels: int) -> np.ndarray:
  """Shorter side resized to `resolution` (bicubic, antialiased), center crop, uint8 HWC."""
  from PIL import Image, ImageOps  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(path) as image:
      image = image.convert("RGB" if channels == 3 else "L")
      image = ImageOps.fit(image, (resolution, resolution), method=Image.Resampling.BICUBIC)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"Cannot read image {path} ({type(e).__name__}: {e}); delete or replace "
                     "it.") from e
  array = np.asarray(image, dtype=np.uint8)
  return array[..., None] if array.ndim == 2 else array


def load_image_folder(root: str, resolution: int, channels: int = 3,
                      labels_from_subfolders: bool = True,
                      max_images: int | None = None) -> ImageDataset:
  """PNG/JPEG images under `root`, each resized (shorter side → resolution) and center-cropped.

  labels_from_subfolders: class k = the k-th subfolder of root in sorted order (images
  found recursively inside it); images lying directly in root are then an error. With
  False, or when root has no image-holding subfolders, every image gets label 0.
  channels: 3 (RGB) or 1 (greyscale). max_images: keep the first images in sorted order.
  """
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels}.")
  if not isinstance(resolution, int) or resolution < 1:
    raise ValueError(f"resolution must be a positive int, got {resolution!r}.")
  check_image_folder(root)
  subfolders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  class_files = [(d, _image_files(os.path.join(root, d))) for d in subfolders]
  class_files = [(d, files) for d, files in class_files if files]
  if labels_from_subfolders and class_files:
    loose = [n for n in os.listdir(root) if n.lower().endswith(IMAGE_EXTENSIONS)
             and os.path.isfile(os.path.join(root, n))]
    if loose:
      raise ValueError(f"{root} has class subfolders and also loose images ({loose[0]}, ...); "
                       "move them into a class subfolder or set labels_from_subfolders=False.")
    class_names = tuple(d for d, _ in class_files)
  else:
    class_files = [(os.path.basename(os.path.normpath(root)), _image_files(root))]
    class_names = (class_files[0][0],)
  paths = [(p, k) for k, (_, files) in enumerate(class_files) for p in files]
  if not paths:
    raise FileNotFoundError(f"No PNG/JPEG images ({', '.join(IMAGE_EXTENSIONS)}) under {root}.")
  if max_images is not None:
    paths = paths[:max_images]
  images = np.stack([_load_image(p, resolution, channels) for p, _ in paths])
  labels = np.asarray([k for _, k in paths], dtype=np.int32)
  return ImageDataset(_from_uint8(images), labels, len(class_names), class_names)


# ----------------------------------------------------------------------------------------
# Dispatch.
# ----------------------------------------------------------------------------------------

DATASETS = ("digits", "cifar10", "image_folder")
SLICE_SEED = 0  # the fixed order that split slices 'name[a:b]' index into
_SLICE = re.compile(r"^([A-Za-z_]\w*)\[(-?\d*):(-?\d*)\]$")


def parse_split(split: str) -> tuple[str, slice | None]:
  """'train' → ('train', None); 'train[897:1197]' → ('train', slice(897, 1197)).

  A slice selects rows of the split in a fixed, class-interleaved random order
  (`slice_order`), so disjoint slices are disjoint, near-stratified random subsets: the way
  one split serves several roles (DPM-OT targets, classifier, data floor) without overlap.
  """
  match = _SLICE.match(split.replace(" ", ""))
  if match is None:
    if "[" in split:
      raise ValueError(f"Bad split {split!r}: a slice looks like 'train[100:400]'.")
    return split, None
  start, stop = (int(v) if v else None for v in match.group(2, 3))
  return match.group(1), slice(start, stop)


def slice_order(labels: np.ndarray) -> np.ndarray:
  """A fixed permutation of the rows (seed SLICE_SEED) in which the classes are interleaved:
  rows sorted by their rank within their class in a random order, so every contiguous range
  holds each class in proportion (up to one image per class)."""
  perm = np.random.default_rng(SLICE_SEED).permutation(len(labels))
  rank = np.empty(len(labels), np.int64)
  for c in np.unique(labels):
    members = perm[labels[perm] == c]
    rank[members] = np.arange(len(members)) * len(labels) // max(len(members), 1)
  return perm[np.argsort(rank[perm], kind="stable")]


def take(dataset: ImageDataset, index: np.ndarray) -> ImageDataset:
  """The rows `index` of `dataset`."""
  return ImageDataset(dataset.images[index], dataset.labels[index], dataset.num_classes,
                      dataset.class_names)


def load_dataset(name: str, split: str, root: str | None = None,
                 resolution: int | None = None,
                 labels_from_subfolders: bool = True) -> ImageDataset:
  """Loads dataset `name` ('digits', 'cifar10' or 'image_folder') and `split`.

  digits: root unused, resolution None or 8; splits 'train', 'heldout', 'all'.
  cifar10: root = folder holding cifar-10-batches-py; resolution None or 32; 'train', 'test'.
  image_folder: root required, resolution required; the split's images are in
  root/<split> if that folder exists (AFHQ's train/ and val/), else (for 'train' or 'all')
  in root itself.
  Any split may be sliced, 'train[a:b]' (`parse_split`); a slice past the split's end is a
  ValueError naming its size.
  """
  root = os.path.expanduser(root) if root else root
  base, part = parse_split(split)
  location = _locate(name, base, root, resolution)
  if name == "digits":
    dataset = load_digits(base)
  elif name == "cifar10":
    dataset = load_cifar10(root, base)
  else:
    dataset = load_image_folder(location, resolution, labels_from_subfolders=labels_from_subfolders)
  if part is None:
    return dataset
  index = slice_order(dataset.labels)[part]
  if part.stop is not None and abs(part.stop) > len(dataset) or len(index) == 0:
    raise ValueError(f"Split {split!r} asks for rows past the end (or none) of the "
                     f"{len(dataset)} images of {name} split {base!r}.")
  return take(dataset, np.sort(index))


# Pixel levels of each dataset's files: digits 0..16 (x/8 − 1), 8-bit images 0..255
# (x/127.5 − 1).
NUM_LEVELS = {"digits": 17, "cifar10": 256, "image_folder": 256}


def pixel_levels(images: np.ndarray, num_levels: int) -> np.ndarray:
  """The integer pixel values k ∈ {0, …, L − 1} of images stored as x = 2k/(L − 1) − 1 (every
  loader here: digits L = 17, 8-bit images L = 256, `NUM_LEVELS`), as int32 of the same shape.

  Raises ValueError when the images are not on that grid (wrong `num_levels`, or images
  that were resampled or normalized differently).
  """
  scaled = (np.asarray(images, np.float64) + 1.0) * 0.5 * (num_levels - 1)
  levels = np.rint(scaled)
  if scaled.size and (np.max(np.abs(scaled - levels)) > 1e-3 or levels.min() < 0
                      or levels.max() > num_levels - 1):
    raise ValueError(
        f"the images are not on the {num_levels}-level grid x = 2k/{num_levels - 1} − 1 "
        f"(k = 0..{num_levels - 1}; largest distance {np.max(np.abs(scaled - levels)):.3g} "
        f"levels, range {scaled.min():.3g}..{scaled.max():.3g}); give the dataset's number "
        f"of pixel levels ({', '.join(f'{k}: {v}' for k, v in NUM_LEVELS.items())}).")
  return levels.astype(np.int32)


def check_dataset(name: str, split: str, root: str | None = None,
                  resolution: int | None = None) -> None:
  """Raises the ValueError / FileNotFoundError that `load_dataset(name, split, root,
  resolution)` would raise for a bad name, split or resolution or for missing files, without
  reading the images (a cheap up-front check before hours of work)."""
  root = os.path.expanduser(root) if root else root
  split, _ = parse_split(split)
  location = _locate(name, split, root, resolution)
  if name == "digits":
    if split not in ("train", "heldout", "test", "all"):
      raise ValueError(f"Unknown digits split {split!r}; choose 'train', 'heldout' or 'all'.")
  elif name == "cifar10":
    _cifar10_folder(root, split)
  else:
    check_image_folder(location)


def _locate(name: str, split: str, root: str | None, resolution: int | None) -> str | None:
  """Validates (name, root, resolution); for image folders returns the split's folder."""
  if name == "digits":
    if resolution not in (None, 8):
      raise ValueError(f"digits images are 8×8; got resolution={resolution}.")
    if root:
      raise ValueError(f"digits are read from scikit-learn, not from data.root={root!r}; set "
                       "data.root='' (or data.name to the dataset that lives there).")
    return None
  if name == "cifar10":
    if resolution not in (None, 32):
      raise ValueError(f"CIFAR-10 images are 32×32; got resolution={resolution}.")
    if not root:
      raise ValueError("CIFAR-10 needs a data root (the folder holding cifar-10-batches-py). "
                       + _cifar10_how_to_get("DATA_ROOT"))
    return root
  if name == "image_folder":
    if not root or resolution is None:
      raise ValueError("image_folder needs both a data root and a resolution.")
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
      if split not in ("train", "all"):
        raise FileNotFoundError(f"No folder {folder} for split {split!r} of the image folder "
                                f"{root}.")
      folder = root
    return folder
  raise ValueError(f"Unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")


# ----------------------------------------------------------------------------------------
# Deterministic batches.
# ----------------------------------------------------------------------------------------

_PERMUTATION_STREAM, _FLIP_STREAM = 0, 1


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, stream, index])


def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order of epoch `epoch`: a permutation of 0..N−1 from a Generator seeded by (seed, epoch)."""
  return _rng(seed, _PERMUTATION_STREAM, epoch).permutation(num_examples)


def _batch_indices(num_examples: int, batch_size: int, step: int, permutation) -> np.ndarray:
  """Indices stream[step·B : (step+1)·B] of the concatenated epoch permutations."""
  start = step * batch_size
  first, last = start // num_examples, (start + batch_size - 1) // num_examples
  stream = np.concatenate([permutation(e) for e in range(first, last + 1)])
  offset = start - first * num_examples
  return stream[offset:offset + batch_size]


def _flip_mask(seed: int, step: int, batch_size: int) -> np.ndarray:
  return _rng(seed, _FLIP_STREAM, step).random(batch_size) < 0.5


def _check_batch_args(dataset: ImageDataset, batch_size: int, seed: int, step: int,
                      num_shards: int, shard_index: int) -> None:
  if len(dataset) == 0:
    raise ValueError("The dataset is empty.")
  if batch_size < 1 or step < 0 or seed < 0:
    raise ValueError(f"Need batch_size ≥ 1, step ≥ 0, seed ≥ 0; got {batch_size}, {step}, {seed}.")
  if num_shards < 1 or not 0 <= shard_index < num_shards or batch_size % num_shards:
    raise ValueError(f"Batch size {batch_size} cannot be split into {num_shards} equal shards "
                     f"(shard_index {shard_index}); use a multiple of the number of hosts.")


def _assemble(dataset: ImageDataset, indices: np.ndarray, seed: int, step: int, flip: bool,
              num_shards: int, shard_index: int) -> tuple[np.ndarray, np.ndarray]:
  """Rows `shard_index` of `num_shards` of the batch `indices`: only those are read."""
  size = len(indices) // num_shards
  part = slice(shard_index * size, (shard_index + 1) * size)
  images = dataset.images[indices[part]]
  if flip:
    mask = _flip_mask(seed, step, len(indices))[part]
    images[mask] = images[mask, :, ::-1]
  return images, dataset.labels[indices[part]]


def get_batch(dataset: ImageDataset, batch_size: int, seed: int, step: int,
              flip: bool = False, num_shards: int = 1,
              shard_index: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Batch number `step` of `batch_iterator(dataset, batch_size, seed, flip=flip)`."""
  _check_batch_args(dataset, batch_size, seed, step, num_shards, shard_index)
  n = len(dataset)
  indices = _batch_indices(n, batch_size, step, lambda e: _epoch_permutation(n, seed, e))
  return _assemble(dataset, indices, seed, step, flip, num_shards, shard_index)


def batch_iterator(dataset: ImageDataset, batch_size: int, seed: int, start_step: int = 0,
                   flip: bool = False, num_shards: int = 1,
                   shard_index: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Endless (images, labels) batches k = start_step, start_step + 1, ...

  The examples run through one permutation of the dataset per epoch (numpy Generator
  seeded by (seed, epoch)); batch k is positions kB..(k+1)B−1 of that endless stream, so
  every example appears once per epoch and batches may straddle epochs (any B works, even
  B > N). flip: each image of batch k is mirrored left-right with probability ½, drawn from
  a Generator seeded by (seed, k). Hence batch k is a function of (seed, k) alone and a
  run resumed with start_step = k continues exactly.

  Multi-host: every host walks the same global batches and reads only its part
  `shard_index` of `num_shards` equal consecutive slices (e.g. jax.process_index(),
  jax.process_count()); the parts concatenated are the single-host batch.
  """
  _check_batch_args(dataset, batch_size, seed, start_step, num_shards, shard_index)
  n = len(dataset)
  cache: dict[int, np.ndarray] = {}

  def permutation(epoch: int) -> np.ndarray:
    if epoch not in cache:
      for old in [e for e in cache if e < epoch - 1]:
        del cache[old]
      cache[epoch] = _epoch_permutation(n, seed, epoch)
    return cache[epoch]

  def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    step = start_step
    while True:
      indices = _batch_indices(n, batch_size, step, permutation)
      yield _assemble(dataset, indices, seed, step, flip, num_shards, shard_index)
      step += 1

  return generate()


def shard_batch(x: Any, num_devices: int) -> Any:
  """Reshapes the leading axis of every array in `x` from B to (num_devices, B/num_devices)."""

  def reshape(a):
    a = np.asarray(a) if not isinstance(a, (np.ndarray, jax.Array)) else a
    if a.shape[0] % num_devices:
      raise ValueError(f"Batch size {a.shape[0]} is not divisible by {num_devices} devices; "
                       "choose a batch size that is a multiple of the device count.")
    return a.reshape((num_devices, a.shape[0] // num_devices) + tuple(a.shape[1:]))

  if num_devices < 1:
    raise ValueError(f"num_devices must be ≥ 1, got {num_devices}.")
  return jax.tree.map(reshape, x)
