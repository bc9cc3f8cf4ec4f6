"""Tests for models/inception.py: reading pytorch-fid state_dict files and the FID network.

A tiny random network (width 1/16, input resized to 75) with the real key names is written in
the torch.save format, loaded, and compared against a PyTorch reference written here from
pytorch-fid's block definitions (skipped where torch is not installed).
"""
from __future__ import annotations

import collections
import os
import tempfile
import zipfile

from absl.testing import absltest
import numpy as np

import jax.numpy as jnp

from ddpm_ot_jax import metrics
from ddpm_ot_jax.models import inception

import fake_weights

try:
  import torch
  import torch.nn.functional as F
except ImportError:  # pragma: no cover - torch is optional
  torch = None

WIDTH = fake_weights.WIDTH
RESIZE = fake_weights.RESIZE


def _write_state_dict(path: str, state: dict[str, np.ndarray], legacy: bool = False) -> None:
  if torch is not None:
    tensors = collections.OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in state.items())
    torch.save(tensors, path, _use_new_zipfile_serialization=not legacy)
  else:
    fake_weights.write_zip_without_torch(path, state)


if torch is not None:

  class _Conv(torch.nn.Module):
    """pytorch-fid / torchvision BasicConv2d."""

    def __init__(self, cin, cout, **kw):
      super().__init__()
      self.conv = torch.nn.Conv2d(cin, cout, bias=False, **kw)
      self.bn = torch.nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
      return F.relu(self.bn(self.conv(x)))

  def _avg(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

  class _A(torch.nn.Module):
    def __init__(self, cin, pool, c):
      super().__init__()
      self.branch1x1 = _Conv(cin, c(64), kernel_size=1)
      self.branch5x5_1 = _Conv(cin, c(48), kernel_size=1)
      self.branch5x5_2 = _Conv(c(48), c(64), kernel_size=5, padding=2)
      self.branch3x3dbl_1 = _Conv(cin, c(64), kernel_size=1)
      self.branch3x3dbl_2 = _Conv(c(64), c(96), kernel_size=3, padding=1)
      self.branch3x3dbl_3 = _Conv(c(96), c(96), kernel_size=3, padding=1)
      self.branch_pool = _Conv(cin, c(pool), kernel_size=1)
      self.out = c(64) * 2 + c(96) + c(pool)

    def forward(self, x):
      return torch.cat([
          self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
          self.branch_pool(_avg(x))], 1)

  class _B(torch.nn.Module):
    def __init__(self, cin, c):
      super().__init__()
      self.branch3x3 = _Conv(cin, c(384), kernel_size=3, stride=2)
      self.branch3x3dbl_1 = _Conv(cin, c(64), kernel_size=1)
      self.branch3x3dbl_2 = _Conv(c(64), c(96), kernel_size=3, padding=1)
      self.branch3x3dbl_3 = _Conv(c(96), c(96), kernel_size=3, stride=2)
      self.out = c(384) + c(96) + cin

    def forward(self, x):
      return torch.cat([
          self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
          F.max_pool2d(x, kernel_size=3, stride=2)], 1)

  class _C(torch.nn.Module):
    def __init__(self, cin, c7, c):
      super().__init__()
      self.branch1x1 = _Conv(cin, c(192), kernel_size=1)
      self.branch7x7_1 = _Conv(cin, c7, kernel_size=1)
      self.branch7x7_2 = _Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
      self.branch7x7_3 = _Conv(c7, c(192), kernel_size=(7, 1), padding=(3, 0))
      self.branch7x7dbl_1 = _Conv(cin, c7, kernel_size=1)
      self.branch7x7dbl_2 = _Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
      self.branch7x7dbl_3 = _Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
      self.branch7x7dbl_4 = _Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
      self.branch7x7dbl_5 = _Conv(c7, c(192), kernel_size=(1, 7), padding=(0, 3))
      self.branch_pool = _Conv(cin, c(192), kernel_size=1)
      self.out = 4 * c(192)

    def forward(self, x):
      b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
      bd = self.branch7x7dbl_1(x)
      for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                    self.branch7x7dbl_5):
        bd = layer(bd)
      return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg(x))], 1)

  class _D(torch.nn.Module):
    def __init__(self, cin, c):
      super().__init__()
      self.branch3x3_1 = _Conv(cin, c(192), kernel_size=1)
      self.branch3x3_2 = _Conv(c(192), c(320), kernel_size=3, stride=2)
      self.branch7x7x3_1 = _Conv(cin, c(192), kernel_size=1)
      self.branch7x7x3_2 = _Conv(c(192), c(192), kernel_size=(1, 7), padding=(0, 3))
      self.branch7x7x3_3 = _Conv(c(192), c(192), kernel_size=(7, 1), padding=(3, 0))
      self.branch7x7x3_4 = _Conv(c(192), c(192), kernel_size=3, stride=2)
      self.out = c(320) + c(192) + cin

    def forward(self, x):
      b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
      return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                        F.max_pool2d(x, kernel_size=3, stride=2)], 1)

  class _E(torch.nn.Module):
    def __init__(self, cin, pool, c):
      super().__init__()
      self.pool = pool
      self.branch1x1 = _Conv(cin, c(320), kernel_size=1)
      self.branch3x3_1 = _Conv(cin, c(384), kernel_size=1)
      self.branch3x3_2a = _Conv(c(384), c(384), kernel_size=(1, 3), padding=(0, 1))
      self.branch3x3_2b = _Conv(c(384), c(384), kernel_size=(3, 1), padding=(1, 0))
      self.branch3x3dbl_1 = _Conv(cin, c(448), kernel_size=1)
      self.branch3x3dbl_2 = _Conv(c(448), c(384), kernel_size=3, padding=1)
      self.branch3x3dbl_3a = _Conv(c(384), c(384), kernel_size=(1, 3), padding=(0, 1))
      self.branch3x3dbl_3b = _Conv(c(384), c(384), kernel_size=(3, 1), padding=(1, 0))
      self.branch_pool = _Conv(cin, c(192), kernel_size=1)
      self.out = c(320) + 4 * c(384) + c(192)

    def forward(self, x):
      b3 = self.branch3x3_1(x)
      b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
      bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
      bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
      if self.pool == "avg":  # FIDInceptionE_1
        pooled = _avg(x)
      else:  # FIDInceptionE_2: max pooling
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
      return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)

  class _TorchFIDInception(torch.nn.Module):
    """pytorch-fid's InceptionV3 (output block 3), input in [0, 1], widths scaled."""

    def __init__(self, width, resize):
      super().__init__()
      c = lambda n: max(1, int(round(n * width)))
      self.resize = resize
      self.Conv2d_1a_3x3 = _Conv(3, c(32), kernel_size=3, stride=2)
      self.Conv2d_2a_3x3 = _Conv(c(32), c(32), kernel_size=3)
      self.Conv2d_2b_3x3 = _Conv(c(32), c(64), kernel_size=3, padding=1)
      self.Conv2d_3b_1x1 = _Conv(c(64), c(80), kernel_size=1)
      self.Conv2d_4a_3x3 = _Conv(c(80), c(192), kernel_size=3)
      self.Mixed_5b = _A(c(192), 32, c)
      self.Mixed_5c = _A(self.Mixed_5b.out, 64, c)
      self.Mixed_5d = _A(self.Mixed_5c.out, 64, c)
      self.Mixed_6a = _B(self.Mixed_5d.out, c)
      self.Mixed_6b = _C(self.Mixed_6a.out, c(128), c)
      self.Mixed_6c = _C(self.Mixed_6b.out, c(160), c)
      self.Mixed_6d = _C(self.Mixed_6c.out, c(160), c)
      self.Mixed_6e = _C(self.Mixed_6d.out, c(192), c)
      self.Mixed_7a = _D(self.Mixed_6e.out, c)
      self.Mixed_7b = _E(self.Mixed_7a.out, "avg", c)
      self.Mixed_7c = _E(self.Mixed_7b.out, "max", c)
      self.fc = torch.nn.Linear(self.Mixed_7c.out, 1008)

    def forward(self, x):
      x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
      x = 2 * x - 1
      x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
      x = F.max_pool2d(x, kernel_size=3, stride=2)
      x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
      x = F.max_pool2d(x, kernel_size=3, stride=2)
      for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                   "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
        x = getattr(self, name)(x)
      return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


class InceptionTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.state = fake_weights.random_state_dict(0, WIDTH, RESIZE)
    cls.path = os.path.join(cls.tmp, inception.FID_WEIGHTS_FILENAME)
    _write_state_dict(cls.path, cls.state)
    cls.model, cls.variables = inception.load_pytorch_fid_weights(cls.path, width=WIDTH,
                                                                  resize=RESIZE)
    cls.feature_fn = staticmethod(inception.make_feature_fn(cls.model, cls.variables))
    rng = np.random.default_rng(1)
    cls.images = rng.uniform(-1, 1, (24, 32, 32, 3)).astype(np.float32)
    cls.features = inception.extract_features(cls.feature_fn, cls.images, batch_size=16)

  def test_reader_round_trips_every_tensor(self):
    """The pickle reader (no torch) returns every array of the file bit-exactly."""
    state = inception.read_torch_state_dict(self.path)
    self.assertEqual(list(state), list(self.state))
    for key, value in self.state.items():
      np.testing.assert_array_equal(state[key], value, err_msg=key)

  def test_reader_without_torch_writer(self):
    """A zip file pickled through stand-in torch modules (no torch at all) reads back exactly."""
    path = os.path.join(self.tmp, "no_torch.pth")
    fake_weights.write_zip_without_torch(path, self.state)
    state = inception.read_torch_state_dict(path)
    for key, value in self.state.items():
      self.assertEqual(state[key].shape, value.shape)
      np.testing.assert_array_equal(state[key], value, err_msg=key)

  def test_legacy_format_reads_the_same(self):
    """A file saved in torch's legacy (pre-zip) format gives the same arrays."""
    if torch is None:
      self.skipTest("torch not installed")
    path = os.path.join(self.tmp, "legacy.pth")
    _write_state_dict(path, self.state, legacy=True)
    self.assertFalse(zipfile.is_zipfile(path))
    state = inception.read_torch_state_dict(path)
    for key, value in self.state.items():
      np.testing.assert_array_equal(state[key], value, err_msg=key)

  def test_matches_torch_reference_forward(self):
    """Flax pool3 features equal a PyTorch pytorch-fid-style forward of the same weights."""
    if torch is None:
      self.skipTest("torch not installed")
    ref = _TorchFIDInception(WIDTH, RESIZE).eval()
    ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self.state.items()},
                        strict=True)
    with torch.no_grad():  # pytorch-fid input: NCHW in [0, 1]
      x = torch.from_numpy((self.images.transpose(0, 3, 1, 2) + 1) / 2)
      expected = ref(x).numpy()
    self.assertEqual(self.features.shape, expected.shape)
    np.testing.assert_allclose(self.features, expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())

  def test_fid_of_a_set_with_itself_is_zero(self):
    """FID(X, X) = 0 up to sqrtm round-off."""
    self.assertAlmostEqual(metrics.fid_from_features(self.features, self.features), 0.0, places=4)

  def test_fid_is_symmetric_and_positive(self):
    """FID(X, Y) = FID(Y, X) > 0 for two different image sets."""
    other = inception.extract_features(self.feature_fn, np.clip(self.images[::-1] * 0.5 + 0.3,
                                                                -1, 1), batch_size=16)
    a = metrics.fid_from_features(self.features, other)
    b = metrics.fid_from_features(other, self.features)
    self.assertGreater(a, 0.0)
    self.assertAlmostEqual(a, b, delta=1e-6 * max(1.0, a))

  def test_grayscale_is_repeated_to_rgb(self):
    """One channel gives the same features as that channel repeated three times."""
    gray = self.images[:16, :, :, :1]
    np.testing.assert_allclose(self.feature_fn(jnp.asarray(gray)),
                               self.feature_fn(jnp.asarray(np.repeat(gray, 3, axis=-1))),
                               rtol=1e-6, atol=1e-6)

  def test_missing_file_says_where_it_looked_and_where_to_get_it(self):
    """FileNotFoundError names the searched path and the download URL."""
    missing = os.path.join(self.tmp, "nope", inception.FID_WEIGHTS_FILENAME)
    with self.assertRaises(FileNotFoundError) as ctx:
      inception.load_pytorch_fid_weights(missing)
    self.assertIn(missing, str(ctx.exception))
    self.assertIn(inception.FID_WEIGHTS_URL, str(ctx.exception))

  def test_wrong_network_is_rejected(self):
    """A state_dict of another width fails with ValueError, not a shape error deep in apply."""
    with self.assertRaises(ValueError):
      inception.load_pytorch_fid_weights(self.path, width=1 / 8, resize=RESIZE)


if __name__ == "__main__":
  absltest.main()
