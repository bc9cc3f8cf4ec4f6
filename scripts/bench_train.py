r"""Training and sampling throughput of the DDPM configs on this machine's devices.

  python scripts/bench_train.py                       # digits + CIFAR-10 (real model size)
  python scripts/bench_train.py --config.configs=digits --config.train_steps=50

Reads configs/bench/train.py (ml_collections, `--config.KEY=VALUE` overrides, as
scripts/main.py); the models themselves are those of configs/digits_ddpm.py and
configs/cifar10_ddpm.py.

For each config: the data-parallel train step (`train.make_train_step`, all devices) at the
config's model size, images/s over config.train_steps steps after one compiling step; and DDIM
with 10 network evaluations (`samplers.ddim`, 10 NFE) from the EMA parameters, images/s
after one compiling call. Images are random (throughput does not depend on content), so no
dataset is needed. CIFAR-10 uses the full 35.7M-parameter UNet; on CPU its batches default
to 16 (config.cifar_batch_size), on accelerators to the paper's 128. Writes JSON (config.out) and prints
a table; the load average is recorded because a shared CPU skews the numbers.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Sequence

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

DEFAULT_CONFIG = os.path.join(_REPO, "configs", "bench", "train.py")
_NAMES = ("digits", "cifar10")


def _bench(name: str, config, batch_size: int, train_steps: int, sample_batch: int,
           sample_repeats: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from ddpm_ot_jax import samplers  # pylint: disable=g-import-not-at-top
  from ddpm_ot_jax import train  # pylint: disable=g-import-not-at-top
  from ddpm_ot_jax import trainer  # pylint: disable=g-import-not-at-top
  from ddpm_ot_jax.models import unet  # pylint: disable=g-import-not-at-top

  shape = {"digits": (8, 8, 1), "cifar10": (32, 32, 3)}[name]
  model = unet.unet_from_config(config.model)
  schedule = trainer.schedule_from_config(config)
  hparams = trainer.hparams_from_config(config, model)
  tx = train.make_optimizer(hparams)
  mesh = train.make_data_mesh()
  train.check_batch_size(batch_size, mesh)
  state = train.make_init_fn(model, tx, shape, mesh)(jax.random.PRNGKey(0), jax.random.PRNGKey(1))
  step = train.make_train_step(model, tx, schedule, hparams, mesh)
  rng = np.random.default_rng(0)
  images = train.global_batch(mesh, rng.uniform(-1, 1, (batch_size,) + shape).astype(np.float32))
  labels = train.global_batch(mesh, np.zeros(batch_size, np.int32))

  start = time.perf_counter()
  state, metrics = step(state, images, labels)
  jax.block_until_ready(metrics)
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(train_steps):
    state, metrics = step(state, images, labels)
    jax.block_until_ready(metrics)  # CPU: wait on each step (docs/ARCHITECTURE.md, Conventions)
  train_seconds = time.perf_counter() - start

  eps_fn = samplers.model_eps_fn(model.apply, state.ema_params)
  x = jax.random.normal(jax.random.PRNGKey(2), (sample_batch,) + shape)
  if sample_batch % mesh.devices.size == 0:
    x = jax.device_put(x, train.batch_sharded(mesh))
  view = trainer.sampling_schedule(config)  # the samplers' view for training.loss_type
  start = time.perf_counter()
  result = samplers.ddim(eps_fn, view, x, 10)
  jax.block_until_ready(result.x)
  sample_compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(sample_repeats):
    result = samplers.ddim(eps_fn, view, x, 10)
    jax.block_until_ready(result.x)
  sample_seconds = time.perf_counter() - start
  return {
      "config": name,
      "params": unet.count_params(state.params),
      "batch_size": batch_size,
      "train_steps": train_steps,
      "train_images_per_second": batch_size * train_steps / train_seconds,
      "train_seconds_per_step": train_seconds / train_steps,
      "train_compile_seconds": compile_seconds,
      "sample_batch_size": sample_batch,
      "sample_nfe": int(result.nfe),
      "sample_images_per_second": sample_batch * sample_repeats / sample_seconds,
      "sample_compile_seconds": sample_compile_seconds,
  }


def main(argv: Sequence[str]) -> None:
  del argv  # only the program name: `cli.flags_parser` refuses any other argument
  import cli  # pylint: disable=g-import-not-at-top
  bench = _CONFIG.value
  names = [n.strip() for n in str(bench.configs).split(",") if n.strip()]
  unknown = [n for n in names if n not in _NAMES]
  if unknown or not names:
    cli.fail(f"unknown config {', '.join(unknown) or repr(bench.configs)} in config.configs; "
             f"choose from {', '.join(_NAMES)}.")
  if bench.sample_repeats < 1:
    cli.fail(f"config.sample_repeats must be ≥ 1, got {bench.sample_repeats}.")
  import jax  # pylint: disable=g-import-not-at-top

  from configs import cifar10_ddpm  # pylint: disable=g-import-not-at-top
  from configs import digits_ddpm  # pylint: disable=g-import-not-at-top
  from ddpm_ot_jax.experiments import common  # pylint: disable=g-import-not-at-top

  on_cpu = jax.default_backend() == "cpu"
  rows = []
  for name in names:
    if name == "digits":
      config = digits_ddpm.get_config()
      batch = config.training.batch_size
      steps = bench.train_steps or (30 if on_cpu else 50)
    else:  # cifar10
      config = cifar10_ddpm.get_config()
      batch = bench.cifar_batch_size or (16 if on_cpu else config.training.batch_size)
      steps = bench.train_steps or (3 if on_cpu else 50)
    rows.append(_bench(name, config, batch, steps, bench.sample_batch_size or batch,
                       bench.sample_repeats))

  load = os.getloadavg()
  report = {
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "device_kind": jax.devices()[0].device_kind,
      "cpu_count": os.cpu_count(),
      "load_average_1min_after": load[0],
      "results": rows,
  }
  common.write_json(bench.out, report)
  header = (f"{'config':8s} {'params':>10s} {'batch':>6s} {'train img/s':>12s} "
            f"{'s/step':>8s} {'DDIM-10 img/s':>14s} {'compile s':>10s}")
  print(f"backend {report['backend']} ({report['device_kind']}), {len(report['devices'])} "
        f"device(s), load average {load[0]:.1f}")
  print(header)
  print("-" * len(header))
  for r in rows:
    print(f"{r['config']:8s} {r['params']:10d} {r['batch_size']:6d} "
          f"{r['train_images_per_second']:12.1f} {r['train_seconds_per_step']:8.3f} "
          f"{r['sample_images_per_second']:14.1f} {r['train_compile_seconds']:10.1f}")
  print(f"Wrote {bench.out}")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  import cli  # pylint: disable=g-import-not-at-top  # scripts/ is first on sys.path
  _CONFIG = cli.define_config_flag(DEFAULT_CONFIG, "Path to a config file in configs/bench/.")
  app.run(main, flags_parser=cli.flags_parser(DEFAULT_CONFIG))
