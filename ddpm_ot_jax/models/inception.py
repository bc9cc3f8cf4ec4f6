r"""Inception-v3 pool3 features for FID, in Flax, with pytorch-fid's weights.

The network is pytorch-fid's `fid_inception_v3` (the TF 2015-12-05 FID graph ported to
PyTorch): torchvision's Inception-v3 with its Mixed blocks replaced by FIDInceptionA
(Mixed_5b–d), FIDInceptionC (Mixed_6b–e), FIDInceptionE_1 (Mixed_7b) and FIDInceptionE_2
(Mixed_7c). They differ from torchvision's blocks only in the pooling branch: average pooling
that does not count padded zeros (count_include_pad=False), and max pooling instead of average
pooling in FIDInceptionE_2. Every convolution is BasicConv2d = conv (no bias) → BatchNorm
(ε = 1e-3, running statistics) → ReLU. The feature is the global average of Mixed_7c (2048-d).

Input: NHWC images in [−1, 1] (this project's convention; pytorch-fid takes [0, 1] and maps
x ↦ 2x − 1 itself), resized bilinearly without antialiasing to 299 × 299 (as
`F.interpolate(mode='bilinear', align_corners=False)`); one channel is repeated to three.

`width` scales every channel count (1.0 is the real network; the tests use a tiny random
network with width 1/16 and the same parameter names). Submodules carry the PyTorch names,
so a state_dict key `Mixed_6b.branch7x7_2.conv.weight` becomes
params['Mixed_6b']['branch7x7_2']['conv']['kernel'] (OIHW → HWIO).

`load_pytorch_fid_weights` reads `pt_inception-2015-12-05-6726825d.pth` (a `torch.save`
state_dict, zip or legacy format) with the standard library's pickle and numpy: torch is not
needed.
"""
from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from typing import Any, Callable, Sequence

import ml_dtypes
import numpy as np

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS_FILENAME)
FEATURE_DIM = 2048


def _ch(channels: int, width: float) -> int:
  return max(1, int(round(channels * width)))


class BasicConv2d(nn.Module):
  """conv (no bias) → BatchNorm(ε = 1e-3, running stats) → ReLU; padding as in torch."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    pad = tuple((p, p) for p in self.padding)
    x = nn.Conv(self.features, self.kernel_size, self.strides, padding=pad, use_bias=False,
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3_no_pad_count(x: Array) -> Array:
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class FIDInceptionA(nn.Module):
  """Mixed_5b–d: 1x1 | 1x1→5x5 | 1x1→3x3→3x3 | avgpool(no pad count)→1x1."""
  pool_features: int
  width: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = lambda n: _ch(n, self.width)
    b1 = BasicConv2d(c(64), (1, 1), name="branch1x1")(x)
    b5 = BasicConv2d(c(48), (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv2d(c(64), (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv2d(c(64), (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(c(96), (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(c(96), (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(c(self.pool_features), (1, 1), name="branch_pool")(
        _avg_pool_3x3_no_pad_count(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (torchvision InceptionB): 3x3/2 | 1x1→3x3→3x3/2 | maxpool 3x3/2."""
  width: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = lambda n: _ch(n, self.width)
    b3 = BasicConv2d(c(384), (3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = BasicConv2d(c(64), (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(c(96), (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(c(96), (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    bp = nn.max_pool(x, (3, 3), (2, 2))
    return jnp.concatenate([b3, bd, bp], axis=-1)


class FIDInceptionC(nn.Module):
  """Mixed_6b–e: 1x1 | 1x1→1x7→7x1 | 1x1→7x1→1x7→7x1→1x7 | avgpool(no pad count)→1x1."""
  channels_7x7: int
  width: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = lambda n: _ch(n, self.width)
    c7 = c(self.channels_7x7)
    b1 = BasicConv2d(c(192), (1, 1), name="branch1x1")(x)
    b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv2d(c(192), (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(c(192), (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(c(192), (1, 1), name="branch_pool")(_avg_pool_3x3_no_pad_count(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (torchvision InceptionD): 1x1→3x3/2 | 1x1→1x7→7x1→3x3/2 | maxpool 3x3/2."""
  width: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = lambda n: _ch(n, self.width)
    b3 = BasicConv2d(c(192), (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv2d(c(320), (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = BasicConv2d(c(192), (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv2d(c(192), (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(c(192), (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(c(192), (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    bp = nn.max_pool(x, (3, 3), (2, 2))
    return jnp.concatenate([b3, b7, bp], axis=-1)


class FIDInceptionE(nn.Module):
  """Mixed_7b (pool='avg', FIDInceptionE_1) and Mixed_7c (pool='max', FIDInceptionE_2).

  1x1 | 1x1→[1x3, 3x1] | 1x1→3x3→[1x3, 3x1] | pool→1x1.
  """
  pool: str
  width: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = lambda n: _ch(n, self.width)
    b1 = BasicConv2d(c(320), (1, 1), name="branch1x1")(x)
    b3 = BasicConv2d(c(384), (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        BasicConv2d(c(384), (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv2d(c(384), (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv2d(c(448), (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(c(384), (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        BasicConv2d(c(384), (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv2d(c(384), (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_3x3_no_pad_count(x)
    elif self.pool == "max":
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}.")
    bp = BasicConv2d(c(192), (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """pytorch-fid's FID Inception-v3 up to pool3: images (B, H, W, C) in [−1, 1] → (B, 2048·width).

  resize: the side the input is resized to (299 for the real network; ≥ 75 works).
  """
  width: float = 1.0
  resize: int = 299

  @nn.compact
  def __call__(self, images: Array) -> Array:
    x = jnp.asarray(images, jnp.float32)
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    if x.shape[-1] != 3:
      raise ValueError(f"Inception expects 1 or 3 channels (NHWC), got shape {x.shape}.")
    if x.shape[1:3] != (self.resize, self.resize):
      x = jax.image.resize(x, (x.shape[0], self.resize, self.resize, 3), "bilinear",
                           antialias=False)
    w = self.width
    c = lambda n: _ch(n, w)
    x = BasicConv2d(c(32), (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(c(32), (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(c(64), (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = nn.max_pool(x, (3, 3), (2, 2))
    x = BasicConv2d(c(80), (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(c(192), (3, 3), name="Conv2d_4a_3x3")(x)
    x = nn.max_pool(x, (3, 3), (2, 2))
    x = FIDInceptionA(32, w, name="Mixed_5b")(x)
    x = FIDInceptionA(64, w, name="Mixed_5c")(x)
    x = FIDInceptionA(64, w, name="Mixed_5d")(x)
    x = InceptionB(w, name="Mixed_6a")(x)
    x = FIDInceptionC(128, w, name="Mixed_6b")(x)
    x = FIDInceptionC(160, w, name="Mixed_6c")(x)
    x = FIDInceptionC(160, w, name="Mixed_6d")(x)
    x = FIDInceptionC(192, w, name="Mixed_6e")(x)
    x = InceptionD(w, name="Mixed_7a")(x)
    x = FIDInceptionE("avg", w, name="Mixed_7b")(x)
    x = FIDInceptionE("max", w, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


# --------------------------------------------------------------------------------------
# Reading a torch.save state_dict without torch.

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class _StorageType:
  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


class _LazyTensor:
  """A tensor whose storage bytes may be read after the pickle (legacy format)."""

  def __init__(self, storage_key: str, dtype, offset: int, size: tuple, stride: tuple):
    self.storage_key, self.dtype = storage_key, dtype
    self.offset, self.size, self.stride = offset, tuple(size), tuple(stride)

  def materialize(self, storages: dict[str, np.ndarray]) -> np.ndarray:
    flat = storages[self.storage_key]
    if not self.size:
      return flat[self.offset].copy()
    strides = tuple(s * flat.itemsize for s in self.stride)
    view = np.lib.stride_tricks.as_strided(flat[self.offset:], self.size, strides)
    return np.array(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused_args, **unused_kwargs):
  key, dtype = storage
  return _LazyTensor(key, dtype, storage_offset, size, stride)


class _TorchUnpickler(pickle.Unpickler):
  """Maps the few torch globals a state_dict pickle names onto numpy stand-ins."""

  def __init__(self, file):
    super().__init__(file)
    self.storage_dtypes: dict[str, np.dtype] = {}

  def find_class(self, module: str, name: str):
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return lambda tensor, requires_grad, hooks: tensor
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch" and name == "Size":
      return tuple
    raise pickle.UnpicklingError(f"Unsupported global {module}.{name} in a state_dict file.")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"Unsupported persistent id {pid!r}.")
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"Unsupported storage type {storage_type!r}.")
    self.storage_dtypes[key] = storage_type.dtype
    if len(pid) > 5 and pid[5] is not None:  # legacy view of a larger storage
      raise pickle.UnpicklingError("Storage views are not supported.")
    return key, storage_type.dtype


def _load_zip_state_dict(path: str) -> dict[str, Any]:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pkl:
      raise ValueError(f"{path} is a zip file without data.pkl: not a torch.save file.")
    prefix = pkl[0][: -len("data.pkl")]
    with archive.open(pkl[0]) as f:
      unpickler = _TorchUnpickler(f)
      obj = unpickler.load()
    big_endian = False
    if prefix + "byteorder" in names:
      big_endian = archive.read(prefix + "byteorder").decode().strip() == "big"
    storages = {}
    for key, dtype in unpickler.storage_dtypes.items():
      dt = dtype.newbyteorder(">") if big_endian else dtype
      storages[key] = np.frombuffer(archive.read(f"{prefix}data/{key}"), dt).astype(dtype)
  return _materialize(obj, storages)


def _load_legacy_state_dict(path: str) -> dict[str, Any]:
  with open(path, "rb") as f:
    if pickle.load(f) != _LEGACY_MAGIC:
      raise ValueError(f"{path} is not a torch.save file (bad magic number).")
    pickle.load(f)  # protocol version
    pickle.load(f)  # sys info
    unpickler = _TorchUnpickler(f)
    obj = unpickler.load()
    keys = pickle.load(f)
    storages = {}
    for key in keys:
      key = str(key)
      dtype = unpickler.storage_dtypes[key]
      (numel,) = struct.unpack("<q", f.read(8))
      storages[key] = np.frombuffer(f.read(numel * dtype.itemsize), dtype).copy()
  return _materialize(obj, storages)


def _materialize(obj: Any, storages: dict[str, np.ndarray]) -> Any:
  if isinstance(obj, _LazyTensor):
    return obj.materialize(storages)
  if isinstance(obj, dict):
    return collections.OrderedDict((k, _materialize(v, storages)) for k, v in obj.items())
  return obj


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """A `torch.save`d state_dict as {name: numpy array}, read without torch (zip or legacy)."""
  if zipfile.is_zipfile(path):
    state = _load_zip_state_dict(path)
  else:
    state = _load_legacy_state_dict(path)
  if not isinstance(state, dict):
    raise ValueError(f"{path} does not hold a state_dict (got {type(state).__name__}).")
  return state


# --------------------------------------------------------------------------------------
# state_dict → flax variables.


def default_weight_paths() -> list[str]:
  """Where `load_pytorch_fid_weights` looks when no path is given, in order."""
  paths = []
  if os.environ.get("FID_INCEPTION_WEIGHTS"):
    paths.append(os.environ["FID_INCEPTION_WEIGHTS"])
  torch_home = os.environ.get("TORCH_HOME", os.path.join(os.path.expanduser("~"), ".cache",
                                                         "torch"))
  paths.append(os.path.join(torch_home, "hub", "checkpoints", FID_WEIGHTS_FILENAME))
  paths.append(os.path.join(os.path.expanduser("~"), ".cache", "ddpm_ot_jax",
                            FID_WEIGHTS_FILENAME))
  return paths


def _set(tree: dict, path: Sequence[str], value: np.ndarray) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = jnp.asarray(value)


def state_dict_to_variables(state: dict[str, np.ndarray]) -> dict[str, Any]:
  """{'params', 'batch_stats'} for `InceptionV3` from a pytorch-fid state_dict.

  '<module path>.conv.weight' (O, I, kh, kw) → params[...]['conv']['kernel'] (kh, kw, I, O);
  '.bn.weight/.bn.bias' → params[...]['bn']['scale'/'bias'];
  '.bn.running_mean/.bn.running_var' → batch_stats[...]['bn']['mean'/'var'];
  'fc.*', 'AuxLogits.*' and 'num_batches_tracked' are not part of the pool3 extractor.
  """
  params: dict = {}
  batch_stats: dict = {}
  for key, value in state.items():
    parts = key.split(".")
    if parts[0] in ("fc", "AuxLogits") or parts[-1] == "num_batches_tracked":
      continue
    value = np.asarray(value, np.float32)
    module, leaf = parts[:-1], parts[-1]
    if module[-1] == "conv" and leaf == "weight":
      _set(params, module + ["kernel"], value.transpose(2, 3, 1, 0))
    elif module[-1] == "bn" and leaf == "weight":
      _set(params, module + ["scale"], value)
    elif module[-1] == "bn" and leaf == "bias":
      _set(params, module + ["bias"], value)
    elif module[-1] == "bn" and leaf == "running_mean":
      _set(batch_stats, module + ["mean"], value)
    elif module[-1] == "bn" and leaf == "running_var":
      _set(batch_stats, module + ["var"], value)
    else:
      raise ValueError(f"Unexpected key {key!r} in an Inception state_dict.")
  return {"params": params, "batch_stats": batch_stats}


def variables_to_state_dict(variables: dict[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of `state_dict_to_variables`: flax variables → pytorch-fid key names (OIHW)."""
  state: dict[str, np.ndarray] = collections.OrderedDict()
  leaf_names = {("params", "kernel"): "weight", ("params", "scale"): "weight",
                ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
                ("batch_stats", "var"): "running_var"}
  for collection in ("params", "batch_stats"):
    for path, value in jax.tree_util.tree_leaves_with_path(variables[collection]):
      names = [p.key for p in path]
      value = np.asarray(value, np.float32)
      if names[-1] == "kernel":
        value = value.transpose(3, 2, 0, 1)
      state[".".join(names[:-1] + [leaf_names[(collection, names[-1])]])] = value
  return state


def _check_structure(variables: dict[str, Any], model: InceptionV3, path: str) -> None:
  """ValueError unless `variables` has exactly the parameter names and shapes of `model`."""
  expected = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, model.resize, model.resize, 3)))
  flat = jax.tree_util.tree_leaves_with_path
  want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in flat(dict(expected))}
  got = {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in flat(variables)}
  if want != got:
    missing = sorted(set(want) - set(got))[:5]
    extra = sorted(set(got) - set(want))[:5]
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])[:5]
    raise ValueError(f"{path} does not match the FID Inception (width={model.width}): "
                     f"missing {missing}, unexpected {extra}, wrong shapes {wrong}.")


def load_pytorch_fid_weights(path: str | None = None, width: float = 1.0,
                             resize: int = 299) -> tuple[InceptionV3, dict[str, Any]]:
  """(model, variables) from pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`.

  path: the file; None looks in `default_weight_paths()` ($FID_INCEPTION_WEIGHTS, the torch hub
  cache where pytorch-fid stores it, ~/.cache/ddpm_ot_jax/). Raises FileNotFoundError naming
  the places searched and where to download the file; ValueError if the file is not that
  network's state_dict. Features: `model.apply(variables, images)`.
  """
  candidates = [path] if path is not None else default_weight_paths()
  found = next((p for p in candidates if p and os.path.isfile(p)), None)
  if found is None:
    raise FileNotFoundError(
        "Inception FID weights not found; looked in: " + ", ".join(map(str, candidates))
        + f". Download {FID_WEIGHTS_URL} (the pytorch-fid weights) and pass its path, set "
        "FID_INCEPTION_WEIGHTS, or place it in one of those locations.")
  try:
    state = read_torch_state_dict(found)
  except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, struct.error, KeyError) as e:
    raise ValueError(f"{found} is not a readable torch state_dict ({e}); re-download "
                     f"{FID_WEIGHTS_URL}.") from e
  model = InceptionV3(width=width, resize=resize)
  variables = state_dict_to_variables(state)
  _check_structure(variables, model, found)
  return model, variables


def make_feature_fn(model: InceptionV3, variables: dict[str, Any]) -> Callable[[Array], Array]:
  """A jitted images (B, H, W, C) in [−1, 1] → pool3 features (B, 2048·width)."""
  return jax.jit(lambda images: model.apply(variables, images))


def extract_features(feature_fn: Callable[[Array], Array], images: Any,
                     batch_size: int = 200) -> np.ndarray:
  """Features of a large image set in fixed-size batches (last batch padded: one compile)."""
  images = np.asarray(images)
  out = []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    n = len(batch)
    if n < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - n,) + batch.shape[1:], batch.dtype)])
    out.append(np.asarray(feature_fn(jnp.asarray(batch)))[:n])
  return np.concatenate(out, axis=0)
