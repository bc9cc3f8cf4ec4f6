"""Tests of the diffusers UNet2DModel importer against diffusers' own forward pass.

Small randomly initialised UNet2DModels are written with diffusers' save_pretrained
(safetensors + config.json), imported, and our ε_θ(x, t, y) is compared with diffusers'
on the same inputs. Needs torch and diffusers, which setup.py's [test] extra installs.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from absl.testing import absltest
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from ddpm_ot_jax.models import diffusers_import
from ddpm_ot_jax.models import unet as unet_lib

import diffusers  # the reference implementation; pip install -e ".[test]"
import torch

# The checkpoint's conventions (google/ddpm-cifar10-32) at a small size: [sin, cos] time
# embedding with freq_shift 1, bottom/right padding in the downsampler, ε = 1e-6, 1 head.
DDPM_STYLE = dict(
    sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
    layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, norm_eps=1e-6,
    attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0)
# diffusers' defaults: [cos, sin], shift 0, symmetric padding, ε = 1e-5, heads of 8
# channels; class-conditional; attention at full resolution; 1 → 2 channels.
DIFFUSERS_STYLE = dict(
    sample_size=16, in_channels=1, out_channels=2, block_out_channels=(32, 64),
    layers_per_block=1, down_block_types=("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D"), norm_num_groups=8, attention_head_dim=8,
    num_class_embeds=3)


def _random_diffusers_unet(config: dict, seed: int):
  """A UNet2DModel whose every weight is random (GroupNorm scales near 1)."""
  torch.manual_seed(seed)
  model = diffusers.UNet2DModel(**config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim > 1:
        p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  return model


def _compare(test, reference, folder: str, labels=None) -> None:
  """Our imported model and diffusers' agree within 1e-4 on random x, fractional t."""
  config = reference.config
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, config.in_channels, 16, 16)).astype(np.float32)
  t = np.array([3.0, 517.5], np.float32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(x), torch.from_numpy(t),
                         class_labels=None if labels is None else torch.tensor(labels)).sample
  model, params = diffusers_import.load_diffusers_unet(folder)
  ours = model.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                     None if labels is None else jnp.asarray(labels))
  ours = np.asarray(ours).transpose(0, 3, 1, 2)
  test.assertEqual(ours.shape, tuple(expected.shape))
  test.assertGreater(np.abs(expected.numpy()).max(), 0.1)  # a non-trivial output
  np.testing.assert_allclose(ours, expected.numpy(), atol=1e-4, rtol=0)


class DiffusersImportTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.ddpm = _random_diffusers_unet(DDPM_STYLE, seed=0)
    cls.ddpm_folder = os.path.join(cls.root, "ddpm")
    cls.ddpm.save_pretrained(cls.ddpm_folder, safe_serialization=True)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root)
    super().tearDownClass()

  def test_ddpm_checkpoint_conventions_match_diffusers(self):
    """The CIFAR-10 checkpoint's conventions, small: our forward = diffusers' (≤ 1e-4)."""
    _compare(self, self.ddpm, self.ddpm_folder)

  def test_multihead_class_conditional_matches_diffusers(self):
    """diffusers' default conventions, 4–8 heads, class embedding: forward matches (≤ 1e-4)."""
    reference = _random_diffusers_unet(DIFFUSERS_STYLE, seed=1)
    folder = os.path.join(self.root, "conditional")
    reference.save_pretrained(folder, safe_serialization=True)
    _compare(self, reference, os.path.join(folder, diffusers_import.WEIGHTS_NAME), labels=[2, 0])

  def test_old_attention_names(self):
    """Files from old diffusers (query/key/value/proj_attn) import to the same params."""
    folder = os.path.join(self.root, "old_names")
    os.makedirs(folder)
    shutil.copy(os.path.join(self.ddpm_folder, "config.json"), folder)
    tensors = safetensors.numpy.load_file(
        os.path.join(self.ddpm_folder, diffusers_import.WEIGHTS_NAME))
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.",
               ".to_out.0.": ".proj_attn."}
    old = {}
    for name, value in tensors.items():
      for new_part, old_part in renames.items():
        name = name.replace(new_part, old_part)
      old[name] = value
    self.assertTrue(any(".proj_attn." in name for name in old))
    safetensors.numpy.save_file(old, os.path.join(folder, diffusers_import.WEIGHTS_NAME))
    _, params_new = diffusers_import.load_diffusers_unet(self.ddpm_folder)
    _, params_old = diffusers_import.load_diffusers_unet(folder)
    for path, value in _flat(params_new).items():
      np.testing.assert_array_equal(_flat(params_old)[path], value)

  def test_cifar10_checkpoint_layout(self):
    """google/ddpm-cifar10-32's architecture: our DDPM CIFAR-10 UNet, every tensor placed,
    35,746,307 parameters on both sides."""
    reference = diffusers.UNet2DModel(**{k: v for k, v in
                                          diffusers_import.DDPM_CIFAR10_CONFIG.items()
                                          if not k.startswith("_")})
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    model = diffusers_import.unet_from_diffusers_config(diffusers_import.DDPM_CIFAR10_CONFIG)
    self.assertEqual(model, unet_lib.UNet(dropout=0.0, out_ch=3))
    params = diffusers_import.convert_diffusers_state_dict(state, model, (32, 32, 3))
    self.assertEqual(unet_lib.count_params(params), 35_746_307)
    self.assertEqual(sum(p.numel() for p in reference.parameters()), 35_746_307)
    # Spot checks of the layout: conv OIHW → HWIO; Linear (out, in) → (in, heads, head_dim).
    np.testing.assert_array_equal(params["conv_in"]["kernel"],
                                  state["conv_in.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["down_1_attn_0"]["attention"]["query"]["kernel"][..., 0, :],
                                  state["down_blocks.1.attentions.0.to_q.weight"].T)
    np.testing.assert_array_equal(params["up_1_upsample"]["conv"]["bias"],
                                  state["up_blocks.2.upsamplers.0.conv.bias"])

  def test_image_shape_checked_against_config(self):
    """With the data's image shape given, a model whose sample_size / in_channels differ stops
    with one ValueError naming both shapes (before its weights are read: a corrupt weights
    file is not reached); the matching shape loads, and [H, W] sample sizes are read."""
    model, _ = diffusers_import.load_diffusers_unet(self.ddpm_folder, (16, 16, 3))
    self.assertEqual(model.ch, 32)
    for shape in ((8, 8, 3), (16, 16, 1)):
      with self.assertRaisesRegex(ValueError, r"takes 16×16 images with 3 channel.*sample_size="
                                  rf"16, in_channels=3.*are {shape[0]}×{shape[1]}×{shape[2]}"):
        diffusers_import.load_diffusers_unet(self.ddpm_folder, shape)
    folder = os.path.join(self.root, "corrupt")
    os.makedirs(folder)
    shutil.copy(os.path.join(self.ddpm_folder, "config.json"), folder)
    with open(os.path.join(folder, diffusers_import.WEIGHTS_NAME), "wb") as f:
      f.write(b"\x00" * 100)
    with self.assertRaisesRegex(ValueError, "takes 16×16"):
      diffusers_import.load_diffusers_unet(folder, (32, 32, 3))
    self.assertEqual(diffusers_import.image_shape_of_config(
        {"sample_size": [24, 32], "in_channels": 1}), (24, 32, 1))

  def test_errors(self):
    """Missing files → FileNotFoundError; corrupt, unsupported or mismatched → ValueError."""
    folder = os.path.join(self.root, "errors")
    os.makedirs(folder)
    with self.assertRaisesRegex(FileNotFoundError, "ddpm-cifar10-32"):
      diffusers_import.load_diffusers_unet(folder)
    weights = os.path.join(folder, diffusers_import.WEIGHTS_NAME)
    shutil.copy(os.path.join(self.ddpm_folder, diffusers_import.WEIGHTS_NAME), weights)
    with self.assertRaisesRegex(FileNotFoundError, "config.json"):
      diffusers_import.load_diffusers_unet(weights)
    with open(os.path.join(self.ddpm_folder, "config.json")) as f:
      config = json.load(f)
    with open(os.path.join(folder, "config.json"), "w") as f:
      json.dump(dict(config, resnet_time_scale_shift="scale_shift"), f)
    with self.assertRaisesRegex(ValueError, "resnet_time_scale_shift"):
      diffusers_import.load_diffusers_unet(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
      json.dump(config, f)
    tensors = safetensors.numpy.load_file(weights)
    del tensors["mid_block.attentions.0.to_k.bias"]
    safetensors.numpy.save_file(tensors, weights)
    with self.assertRaisesRegex(ValueError, "missing mid_block.attentions.0.to_k.bias"):
      diffusers_import.load_diffusers_unet(folder)
    with open(weights, "wb") as f:
      f.write(b"\x00" * 100)
    with self.assertRaisesRegex(ValueError, "safetensors"):
      diffusers_import.load_diffusers_unet(folder)


def _flat(params) -> dict:
  import flax.traverse_util  # pylint: disable=g-import-not-at-top
  return flax.traverse_util.flatten_dict(params)


if __name__ == "__main__":
  absltest.main()
