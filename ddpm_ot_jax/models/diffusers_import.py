"""Loads a diffusers `UNet2DModel` checkpoint (safetensors + config.json) into our `UNet`.

The published DDPM CIFAR-10 model (`google/ddpm-cifar10-32`, Ho et al. 2020, 35.7M
parameters) is a `UNet2DModel` with block_out_channels (128, 256, 256, 256), attention in
the 16×16 level (DownBlock2D, AttnDownBlock2D, DownBlock2D, DownBlock2D), one attention head
(attention_head_dim null), GroupNorm ε = 1e-6, time embedding [sin, cos] with
freq_shift = 1 (flip_sin_to_cos false) and downsample_padding 0 (pad bottom/right). Our
`UNet` has a field for each of these conventions, so the import is exact: same ops in the
same order, only the weight layout changes (PyTorch OIHW conv → HWIO, Linear (out, in) →
Dense (in, out), q/k/v/out projections split into heads as diffusers does: channel
c = head · head_dim + d).

Written by hand because diffusers ships no Flax port of UNet2DModel; reading the weights
needs only `safetensors`, not torch. Checkpoints saved by old diffusers versions name the
attention projections query/key/value/proj_attn; both spellings are read.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from ddpm_ot_jax.models.unet import UNet

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"

_HOW_TO_GET = (
    "Download config.json and diffusion_pytorch_model.safetensors from "
    "https://huggingface.co/google/ddpm-cifar10-32 into one folder, or, with diffusers "
    "installed, run: python -c \"from diffusers import UNet2DModel; "
    "UNet2DModel.from_pretrained('google/ddpm-cifar10-32').save_pretrained('DIR')\".")

# config.json of google/ddpm-cifar10-32 (Ho et al.'s CIFAR-10 model, converted by diffusers).
DDPM_CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}

_DOWN_TYPES = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP_TYPES = {"UpBlock2D": False, "AttnUpBlock2D": True}
# Old diffusers names of the attention projections → current names.
_DEPRECATED_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _require(config: Mapping[str, Any], key: str, allowed: tuple, default: Any) -> Any:
  value = config.get(key, default)
  if value not in allowed:
    raise ValueError(f"diffusers config {key}={value!r} is not supported by our UNet "
                     f"(supported: {list(allowed)}).")
  return value


def unet_from_diffusers_config(config: Mapping[str, Any]) -> UNet:
  """The `UNet` that computes exactly what a `UNet2DModel` with this config.json computes.

  Supported: positional time embedding, SiLU, DownBlock2D/AttnDownBlock2D and
  UpBlock2D/AttnUpBlock2D with conv resampling, UNetMidBlock2D with attention, the
  default (additive) time conditioning, an optional nn.Embedding class embedding.
  Anything else raises ValueError naming the key.
  """
  _require(config, "time_embedding_type", ("positional",), "positional")
  _require(config, "act_fn", ("silu", "swish"), "silu")
  _require(config, "center_input_sample", (False,), False)
  _require(config, "mid_block_scale_factor", (1, 1.0), 1)
  _require(config, "resnet_time_scale_shift", ("default",), "default")
  _require(config, "class_embed_type", (None,), None)
  _require(config, "downsample_type", ("conv",), "conv")
  _require(config, "upsample_type", ("conv",), "conv")
  _require(config, "add_attention", (True,), True)
  _require(config, "mid_block_type", ("UNetMidBlock2D",), "UNetMidBlock2D")
  down_types = list(config.get("down_block_types",
                               ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")))
  up_types = list(config.get("up_block_types",
                             ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")))
  channels = [int(c) for c in config.get("block_out_channels", (224, 448, 672, 896))]
  if not len(down_types) == len(up_types) == len(channels):
    raise ValueError("diffusers config: down_block_types, up_block_types and "
                     "block_out_channels must have the same length.")
  for block_type in down_types:
    if block_type not in _DOWN_TYPES:
      raise ValueError(f"down block {block_type!r} not supported (supported: {list(_DOWN_TYPES)}).")
  for block_type in up_types:
    if block_type not in _UP_TYPES:
      raise ValueError(f"up block {block_type!r} not supported (supported: {list(_UP_TYPES)}).")
  attn_levels = [i for i, b in enumerate(down_types) if _DOWN_TYPES[b]]
  if attn_levels != [i for i in range(len(channels)) if _UP_TYPES[up_types[-1 - i]]]:
    raise ValueError(f"diffusers config: attention in down blocks {down_types} and up blocks "
                     f"{up_types} sit at different resolutions; our UNet needs them paired.")
  ch = channels[0]
  if any(c % ch for c in channels):
    raise ValueError(f"block_out_channels {channels} are not multiples of the first.")
  temb_dim = config.get("time_embedding_dim")
  if temb_dim is not None and temb_dim != 4 * ch:
    raise ValueError(f"time_embedding_dim {temb_dim} ≠ 4 × {ch} is not supported.")
  norm_groups = int(config.get("norm_num_groups", 32))
  attn_groups = config.get("attn_norm_num_groups")
  if attn_groups is not None and attn_groups != norm_groups:
    raise ValueError(f"attn_norm_num_groups {attn_groups} ≠ norm_num_groups {norm_groups} "
                     "is not supported.")
  sample_size = config.get("sample_size")
  if sample_size is None:
    raise ValueError("diffusers config has no sample_size; the attention levels need it.")
  height = int(sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size)
  num_classes = config.get("num_class_embeds") or 0
  head_dim = config.get("attention_head_dim", 8)
  return UNet(
      ch=ch,
      ch_mult=tuple(c // ch for c in channels),
      num_res_blocks=int(config.get("layers_per_block", 2)),
      attn_resolutions=tuple(height // 2**i for i in attn_levels),
      dropout=float(config.get("dropout", 0.0)),
      num_classes=int(num_classes),
      out_ch=int(config.get("out_channels", 3)),
      resamp_with_conv=True,
      norm_groups=norm_groups,
      norm_eps=float(config.get("norm_eps", 1e-5)),
      num_heads=1,
      head_dim=None if head_dim is None else int(head_dim),
      flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
      freq_shift=float(config.get("freq_shift", 0)),
      downsample_padding=int(config.get("downsample_padding", 1)),
  )


def _diffusers_module(path: tuple[str, ...], num_levels: int) -> str:
  """The diffusers module name of our module at `path` (without the leaf name)."""
  top, rest = path[0], list(path[1:])
  simple = {"temb_dense0": "time_embedding.linear_1", "temb_dense1": "time_embedding.linear_2",
            "class_embed": "class_embedding", "conv_in": "conv_in", "conv_out": "conv_out",
            "norm_out": "conv_norm_out"}
  if top in simple:
    return simple[top]
  match = re.fullmatch(r"(down|up)_(\d+)_(res|attn|downsample|upsample)(?:_(\d+))?", top)
  mid = re.fullmatch(r"mid_(res|attn)(?:_(\d+))?", top)
  if match:
    direction, level, kind, index = match.groups()
    block = int(level) if direction == "down" else num_levels - 1 - int(level)
    prefix = f"{direction}_blocks.{block}"
  elif mid:
    kind, index = mid.groups()
    prefix, index = "mid_block", index or "0"
  else:
    raise ValueError(f"No diffusers name for UNet module {'/'.join(path)}.")
  if kind == "res":
    inner = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
             "conv2": "conv2", "shortcut": "conv_shortcut"}[rest[0]]
    return f"{prefix}.resnets.{index}.{inner}"
  if kind == "attn":
    inner = {("norm",): "group_norm", ("attention", "query"): "to_q",
             ("attention", "key"): "to_k", ("attention", "value"): "to_v",
             ("attention", "out"): "to_out.0"}[tuple(rest)]
    return f"{prefix}.attentions.{index}.{inner}"
  return f"{prefix}.{kind}rs.0.conv"  # downsamplers.0.conv / upsamplers.0.conv


def _convert(leaf: str, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """One diffusers (PyTorch layout) tensor → our layout with `shape`."""
  if leaf in ("scale", "embedding"):
    return tensor
  if leaf == "bias":
    return tensor.reshape(shape)  # attention q/k/v biases are (heads, head_dim)
  if tensor.ndim == 4:  # Conv2d weight (O, I, kh, kw) → (kh, kw, I, O)
    return tensor.transpose(2, 3, 1, 0)
  # Linear weight (out, in) → Dense kernel (in, out), split into heads for attention.
  return tensor.T.reshape(shape)


def convert_diffusers_state_dict(state_dict: Mapping[str, np.ndarray], model: UNet,
                                 image_shape: tuple[int, int, int]) -> dict:
  """Our params for `model` from a diffusers UNet2DModel state dict.

  image_shape: (H, W, C) of the model's input, to trace the parameter shapes.
  Every tensor must be used and every parameter found with the right shape; otherwise
  ValueError lists the offending names.
  """
  batch_y = jnp.zeros((1,), jnp.int32) if model.num_classes else None
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1,) + tuple(image_shape)), jnp.zeros((1,)), batch_y))
  flat = flax.traverse_util.flatten_dict(abstract["params"])
  num_levels = len(model.ch_mult)
  unused = set(state_dict)
  converted, problems = {}, []
  for path, spec in flat.items():
    module = _diffusers_module(path[:-1], num_levels)
    torch_leaf = "bias" if path[-1] == "bias" else "weight"
    name = f"{module}.{torch_leaf}"
    if name not in state_dict:
      for new, old in _DEPRECATED_ATTENTION.items():
        if module.endswith("." + new):
          name = f"{module[:-len(new)]}{old}.{torch_leaf}"
    if name not in state_dict:
      problems.append(f"missing {module}.{torch_leaf} (for {'/'.join(path)})")
      continue
    unused.discard(name)
    tensor = np.asarray(state_dict[name], dtype=np.float32)
    try:
      value = _convert(path[-1], tensor, spec.shape)
    except ValueError:
      value = None
    if value is None or value.shape != spec.shape:
      problems.append(f"{name} has shape {tensor.shape}; expected {spec.shape} in our layout")
      continue
    converted[path] = jnp.asarray(value)
  if problems or unused:
    problems += [f"unexpected tensor {name}" for name in sorted(unused)]
    raise ValueError("The diffusers weights do not fit the UNet built from config.json:\n  "
                     + "\n  ".join(problems[:20])
                     + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
  return flax.traverse_util.unflatten_dict(converted)


def diffusers_files(path: str) -> tuple[str, str]:
  """(weights, config.json) of a diffusers UNet2DModel: `path` is the safetensors file or the
  folder holding it. Raises FileNotFoundError (saying how to get the files) when either is
  missing and ValueError when the weights are not a .safetensors file."""
  weights = os.path.join(path, WEIGHTS_NAME) if os.path.isdir(path) else path
  config_path = os.path.join(os.path.dirname(os.path.abspath(weights)), CONFIG_NAME)
  if not os.path.isfile(weights):
    raise FileNotFoundError(f"No diffusers weights at {weights}. {_HOW_TO_GET}")
  if not weights.endswith(".safetensors"):
    raise ValueError(f"{weights} is not a .safetensors file; only the safetensors layout is "
                     f"read (no pickled torch files). {_HOW_TO_GET}")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"No {CONFIG_NAME} beside {weights} (looked for {config_path}). "
                            f"{_HOW_TO_GET}")
  return weights, config_path


def read_diffusers_config(path: str) -> dict[str, Any]:
  """The config.json of the diffusers UNet2DModel at `path` (file or folder), checked to be
  a UNet2DModel's; errors as in `diffusers_files`, ValueError for unreadable JSON."""
  _, config_path = diffusers_files(path)
  try:
    with open(config_path) as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"Cannot read {config_path} as JSON ({e}). {_HOW_TO_GET}") from e
  if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
    raise ValueError(f"{config_path} describes a {config['_class_name']}, not a UNet2DModel.")
  if config.get("sample_size") is None:
    raise ValueError(f"{config_path} has no sample_size; the attention levels need it.")
  return config


def image_shape_of_config(config: Mapping[str, Any]) -> tuple[int, int, int]:
  """(H, W, C) of the images a UNet2DModel config was built for: sample_size (an int or
  [H, W]) and in_channels (default 3)."""
  size = config["sample_size"]
  height, width = (size, size) if isinstance(size, int) else size
  return int(height), int(width), int(config.get("in_channels", 3))


def check_image_shape(config: Mapping[str, Any], image_shape: tuple[int, ...],
                      where: str = "the diffusers model") -> None:
  """Raises ValueError when `image_shape` (H, W, C) of the data is not what the model takes
  (`image_shape_of_config`), naming both shapes and what to change."""
  expected = image_shape_of_config(config)
  if tuple(int(d) for d in image_shape) != expected:
    raise ValueError(
        f"{where} takes {expected[0]}×{expected[1]} images with {expected[2]} channel(s) "
        f"(sample_size={config['sample_size']}, in_channels={config.get('in_channels', 3)} in "
        f"its config.json), but the data's images are {image_shape[0]}×{image_shape[1]}×"
        f"{image_shape[2]}. Use data of that shape (data.name / data.resolution) or weights "
        "trained on this data.")


def load_diffusers_unet(path: str,
                        image_shape: tuple[int, int, int] | None = None) -> tuple[UNet, dict]:
  """Reads a diffusers UNet2DModel (safetensors file, or the folder holding it + config.json).

  Returns (model, params); evaluate ε_θ(x, t) as `model.apply({'params': params}, x, t)`
  with x in NHWC and t the DDPM step index (0..999 for google/ddpm-cifar10-32).
  image_shape: (H, W, C) of the data the model will see; when given it must equal the
  model's (sample_size, in_channels), checked before the weights are read.
  Raises FileNotFoundError when a file is missing and ValueError when the checkpoint is
  corrupt, uses an architecture our UNet cannot express, or does not fit `image_shape`.
  """
  weights, _ = diffusers_files(path)
  config = read_diffusers_config(path)
  if image_shape is not None:
    check_image_shape(config, image_shape, f"The diffusers model at {path}")
  try:
    state_dict = safetensors.numpy.load_file(weights)
  except Exception as e:  # safetensors raises its own error types for corrupt headers
    raise ValueError(f"Cannot read {weights} as safetensors ({e}). {_HOW_TO_GET}") from e
  model = unet_from_diffusers_config(config)
  params = convert_diffusers_state_dict(state_dict, model, image_shape_of_config(config))
  return model, params
