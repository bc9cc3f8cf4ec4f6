"""Shared test helpers; test modules import this, never each other.

* float64: `float64(enabled)` (a context) and `Float64TestCase` / `Float64ParameterizedTestCase`
  (float64 on for the whole class, the previous setting restored after it). No module
  switches float64 at import: that leaked into every later test of the same process.
* the tiny model: `TINY_UNET`, the one tiny UNet of the tests (ch 8, one level, one ResBlock,
  no attention but the middle block's, dropout 0.1, 4 norm groups); `tiny_model(config)` puts
  it in a config's model block, `tiny_model_flags()` as scripts/main.py flags, `tiny_unet()`
  builds it, `noisy_tiny_unet()` with perturbed parameters (ε_θ far from 0).
* tiny experiment configs shared by several test modules (`tiny_dpmot`, `tiny_latent_ot_models`,
  `tiny_likelihood_config`), a fake CIFAR-10 folder (`fake_cifar`), training-state comparison
  (`state_leaves`, `assert_states_close`).
* runs: `ExperimentRunCase` (one experiment per class, float32, temporary workdir),
  `run_main` (scripts/main.py in a subprocess), `run_on_cpu_devices` (Python on several
  virtual CPU devices).

Other helper modules: fake_weights.py (tiny random Inception weights in pytorch-fid's
format), multiprocess_helpers.py (several jax processes as one run; imported by the
processes themselves, so kept free of test imports), multiprocess_dpmot_config.py (a config
file those processes load).
"""
from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
import tempfile
from typing import Iterator

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


# --- float64 ---------------------------------------------------------------------------------

@contextlib.contextmanager
def float64(enabled: bool = True) -> Iterator[None]:
  """jax_enable_x64 = `enabled` inside the block, the previous value restored after it (also
  when code inside switched it, as the theory experiments' run() do)."""
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", bool(enabled))
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", previous)


class Float64Mixin:
  """float64 on from setUpClass (before a subclass's own setUpClass body, which calls super()
  first) until after tearDownClass; the previous setting restored then. For one test only:
  `self.enterContext(float64())` (or `float64(False)` for a float32 check inside a class)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.enterClassContext(float64(True))


class Float64TestCase(Float64Mixin, absltest.TestCase):
  """An absltest.TestCase whose tests run in float64."""


class Float64ParameterizedTestCase(Float64Mixin, parameterized.TestCase):
  """A parameterized.TestCase whose tests run in float64."""


# --- the tiny model --------------------------------------------------------------------------

TINY_UNET = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.1,
                 norm_groups=4)


def tiny_model(config, **overrides):
  """`config` (an experiment config with a `model` block) with the tiny UNet's fields (and
  `overrides`) in config.model; returns config."""
  config.model.update({**TINY_UNET, **overrides})
  return config


def tiny_model_flags(omit: tuple[str, ...] = (), **overrides) -> list[str]:
  """The tiny UNet as scripts/main.py flags (--config.model.<field>=<value>), without the
  fields in `omit` (a flag can only set a field the config file has)."""
  flags = []
  for key, value in {**TINY_UNET, **overrides}.items():
    if key in omit:
      continue
    if isinstance(value, tuple):
      value = "(" + "".join(f"{v}," for v in value) + ")"
    flags.append(f"--config.model.{key}={value}")
  return flags


def tiny_unet(**overrides):
  """The real UNet (ddpm_ot_jax.models.unet) at the tiny size: compiles in seconds."""
  from ddpm_ot_jax.models import unet  # pylint: disable=g-import-not-at-top

  return unet.UNet(**{**TINY_UNET, **overrides})


def noisy_tiny_unet(num_classes: int = 0, image_shape: tuple[int, ...] = (8, 8, 1)):
  """(model, params): the tiny UNet without dropout, every parameter of its init perturbed
  (0.3 · N(0, 1)), so that ε_θ is far from 0 (the fresh init's zero output layer would make
  every sampler trivial)."""
  model = tiny_unet(dropout=0.0, num_classes=num_classes)
  y = jnp.zeros((1,), jnp.int32) if num_classes else None
  params = model.init(jax.random.PRNGKey(3), jnp.zeros((1, *image_shape)), jnp.zeros((1,)),
                      y)["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))
  leaves = [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  return model, jax.tree.unflatten(tree, leaves)


# --- tiny experiment configs -----------------------------------------------------------------

DPMOT_NUM_TARGETS = 48


def tiny_dpmot(config):
  """Tiny model, training (the random init), OT and evaluation sizes on top of a DPM-OT
  config (tests/dpmot_test.py, tests/multiprocess_dpmot_config.py)."""
  tiny_model(config)
  config.training.update(dict(num_steps=0, batch_size=8, warmup_steps=1, log_every=1,
                              checkpoint_every=1, sample_every=0))  # the random init
  config.dpmot.target_split = f"train[:{DPMOT_NUM_TARGETS}]"
  config.dpmot.ot.update(dict(num_iterations=100, batch_size=128, error_eval_every=50,
                              check_samples=2000, error_batch_size=512))
  config.evaluation.update(dict(methods=("ddim_10", "dpm_ot_10"), num_samples=24, num_draws=2,
                                batch_size=24, tuning_num_samples=24, classifier_steps=20))
  config.evaluation.spacings = dict(ddim_10="time_uniform")
  return config


def tiny_latent_ot_models(config):
  """The tiny UNet and 2 training steps for the models of a latent-OT / shared-latents config
  (tests/latent_ot_test.py, tests/shared_latents_test.py)."""
  tiny_model(config)
  config.training.update(dict(num_steps=2, batch_size=16, warmup_steps=1, log_every=1,
                              checkpoint_every=2))
  return config


def tiny_likelihood_config():
  """configs/digits_likelihood.py with the tiny UNet trained 4 steps, 6 held-out digits in
  batches of 4, loose ODE tolerances, the Gaussian exact case in d = 3 and small other cases
  (tests/likelihood_experiment_test.py, tests/likelihood_cases_test.py)."""
  from configs import digits_likelihood  # pylint: disable=g-import-not-at-top

  config = tiny_model(digits_likelihood.get_config())
  config.training.update(dict(num_steps=4, batch_size=16, warmup_steps=2, log_every=2,
                              checkpoint_every=4, sample_every=0))
  config.likelihood.update(dict(max_images=6, batch_size=4))
  config.likelihood.solver.update(dict(rtol=1e-3, atol=1e-3))
  config.exact.update(dict(cases=("gaussian",), num_points=4, gaussian_dims=3, gmm_dims=2,
                           gmm_components=2, grid_size=256, num_time_steps=16))
  return config


def without_exact(config):
  """`config` without its exact-cases block; returns it."""
  del config["exact"]
  return config


# --- data ------------------------------------------------------------------------------------

def write_cifar_batch(path: str, images: np.ndarray, labels: np.ndarray) -> None:
  """A batch in the CIFAR-10 python format: rows = R, G, B planes of 32×32 uint8."""
  rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
  with open(path, "wb") as f:
    pickle.dump({b"batch_label": b"fake", b"labels": [int(y) for y in labels],
                 b"data": rows, b"filenames": [b"x.png"] * len(images)}, f, protocol=2)


def fake_cifar(root: str, per_batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
  """Writes data_batch_1..5 and test_batch of random pixels in the CIFAR-10 python format under
  root/cifar-10-batches-py (every test that needs a CIFAR-10 folder uses this); returns the
  uint8 arrays."""
  from ddpm_ot_jax import data  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  folder = os.path.join(root, data.CIFAR10_FOLDER)
  os.makedirs(folder, exist_ok=True)
  written = {}
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    images = rng.integers(0, 256, size=(per_batch, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=per_batch)
    write_cifar_batch(os.path.join(folder, name), images, labels)
    written[name] = (images, labels)
  return written


# --- training states -------------------------------------------------------------------------

STATE_FIELDS = ("params", "ema_params", "opt_state", "step", "rng")


def state_leaves(state) -> dict[str, list[np.ndarray]]:
  """{field: its leaves as host arrays} of a TrainState (replicated leaves, any process)."""
  return {field: [np.asarray(x) for x in jax.tree.leaves(getattr(state, field))]
          for field in STATE_FIELDS}


def assert_states_close(a: dict[str, list[np.ndarray]], b: dict[str, list[np.ndarray]],
                        lr: float) -> None:
  """Two training states (`state_leaves`) equal up to float summation order: ≤ 1e-5 relative,
  step and key exactly.

  Adam moves every coordinate by ≈ lr · m/√v whatever the gradient's size, so a coordinate
  whose gradient is ~0 (a bias cancelled by the GroupNorm after it) has a step that summation
  order can change by a fraction of lr: params and EMA get 1e-2 · lr of slack.
  """
  for field in STATE_FIELDS:
    slack = 1e-2 * lr if field in ("params", "ema_params") else 0.0
    assert len(a[field]) == len(b[field]), field
    for x, y in zip(a[field], b[field]):
      if np.issubdtype(x.dtype, np.floating):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6 * (1 + np.max(np.abs(y))) + slack,
                                   err_msg=field)
      else:
        np.testing.assert_array_equal(x, y, err_msg=field)


# --- runs ------------------------------------------------------------------------------------

def run_main(*args: str, cwd: str = ROOT, timeout: float = 600,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  """`python scripts/main.py *args` in `cwd` (env: extra environment variables); returns the
  finished process (text output)."""
  return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "main.py"), *args],
                        cwd=cwd, capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, **(env or {})))


def run_on_cpu_devices(*args: str, num_devices: int = 4,
                       timeout: float = 300) -> subprocess.CompletedProcess:
  """`python *args` in the repo root (the repo and tests/ importable) on `num_devices` virtual
  CPU devices: the XLA flag is set before jax starts, and JAX_PLATFORMS=cpu so that an
  accelerator install gets them too. Returns the finished process (text output)."""
  path = os.pathsep.join(p for p in (ROOT, TESTS, os.environ.get("PYTHONPATH", "")) if p)
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=path)
  return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)


class ExperimentRunCase(absltest.TestCase):
  """Subclasses define `run_experiment(cls)` (called once, with `cls.workdir` ready), in
  float32 (networks); the float64 setting is restored and the workdir removed after the
  class."""

  @classmethod
  def run_experiment(cls) -> None:
    raise NotImplementedError

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.enterClassContext(float64(False))
    cls.workdir = cls.enterClassContext(tempfile.TemporaryDirectory())
    cls.run_experiment()
