"""Tiny random Inception-v3 weights in pytorch-fid's file format, for tests.

`random_state_dict` gives random tensors with pytorch-fid's key names for a network of channel
scale `width` (1/16 here: the same graph, seconds to compile); `write_zip_without_torch`
writes them in torch.save's zip layout without torch; `write_fake_fid_weights` does both.
Shared by tests/inception_test.py and tests/dpmot_test.py.
"""
from __future__ import annotations

import collections
import io
import pickle
import sys
import types
import zipfile

import numpy as np

import jax
import jax.numpy as jnp

from ddpm_ot_jax.models import inception

WIDTH = 1 / 16
RESIZE = 75


def random_state_dict(seed: int, width: float = WIDTH, resize: int = RESIZE) -> dict[str, np.ndarray]:
  """Random weights with pytorch-fid's key names and the shapes of the network of this width
  (plus fc and num_batches_tracked, as in the real file)."""
  model = inception.InceptionV3(width=width, resize=resize)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, resize, resize, 3)))
  rng = np.random.default_rng(seed)
  variables = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), dict(shapes))
  state = inception.variables_to_state_dict(variables)
  out = collections.OrderedDict()
  for key, value in state.items():
    if key.endswith("conv.weight"):
      fan_in = np.prod(value.shape[1:])
      out[key] = (rng.standard_normal(value.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    elif key.endswith("running_var"):
      out[key] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
    elif key.endswith("bn.weight"):
      out[key] = rng.uniform(0.8, 1.2, value.shape).astype(np.float32)
    else:
      out[key] = (0.1 * rng.standard_normal(value.shape)).astype(np.float32)
    if key.endswith("running_var"):
      out[key[: -len("running_var")] + "num_batches_tracked"] = np.array(0, np.int64)
  out["fc.weight"] = rng.standard_normal((1008, round(2048 * width))).astype(np.float32)
  out["fc.bias"] = np.zeros((1008,), np.float32)
  return out


def write_zip_without_torch(path: str, state: dict[str, np.ndarray]) -> None:
  """torch.save's zip layout, pickled through stand-in torch modules (torch not installed)."""
  fake_torch = types.ModuleType("torch")
  fake_utils = types.ModuleType("torch._utils")
  storage_types = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}
  for name in storage_types.values():
    setattr(fake_torch, name, type(name, (), {"__module__": "torch"}))

  def _rebuild_tensor_v2(*args):
    raise AssertionError("only for pickling")
  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  fake_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  fake_torch._utils = fake_utils

  class Tensor:
    def __init__(self, key, array):
      self.key, self.array = key, array

    def __reduce__(self):
      stride = tuple(s // self.array.itemsize for s in self.array.strides)
      storage = _Storage(self.key, self.array)
      return (_rebuild_tensor_v2, (storage, 0, self.array.shape, stride, False,
                                   collections.OrderedDict()))

  class _Storage:
    def __init__(self, key, array):
      self.key, self.array = key, array

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, _Storage):
        cls = getattr(fake_torch, storage_types[obj.array.dtype])
        return ("storage", cls, obj.key, "cpu", obj.array.size)
      return None

  saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
  sys.modules["torch"], sys.modules["torch._utils"] = fake_torch, fake_utils
  try:
    buf = io.BytesIO()
    tensors = collections.OrderedDict(
        (k, Tensor(str(i), np.array(v, order="C"))) for i, (k, v) in enumerate(state.items()))
    Pickler(buf, protocol=2).dump(tensors)
  finally:
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", buf.getvalue())
    archive.writestr("archive/byteorder", "little")
    archive.writestr("archive/version", "3\n")
    for tensor in tensors.values():
      archive.writestr(f"archive/data/{tensor.key}", tensor.array.tobytes())


def write_fake_fid_weights(path: str, seed: int = 0, width: float = WIDTH,
                           resize: int = RESIZE) -> dict[str, np.ndarray]:
  """Writes `random_state_dict(seed, width, resize)` to `path` (torch zip format); returns it."""
  state = random_state_dict(seed, width, resize)
  write_zip_without_torch(path, state)
  return state
