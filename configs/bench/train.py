"""scripts/bench_train.py: training and sampling throughput of the DDPM configs.

  python scripts/bench_train.py --config=configs/bench/train.py \
      --config.configs=digits --config.train_steps=50

The models, schedules and optimizers are those of configs/digits_ddpm.py and
configs/cifar10_ddpm.py (read by the script, not copied here); this file only sizes the run.
"""
import os

import ml_collections

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Comma-separated: digits (configs/digits_ddpm.py), cifar10 (configs/cifar10_ddpm.py, the
  # full 35.7M-parameter UNet).
  config.configs = "digits,cifar10"
  config.train_steps = 0  # timed train steps after one compiling step (0: 30 digits, 3 CIFAR on CPU; 50 on accelerators)
  config.sample_repeats = 2  # timed DDIM-10 calls after one compiling call
  config.cifar_batch_size = 0  # CIFAR-10 train batch (0: 16 on CPU, the config's 128 elsewhere); digits use the config's
  config.sample_batch_size = 0  # images per DDIM-10 call (0: the training batch)
  config.out = os.path.join(_REPO, "bench_results", "bench_train.json")  # the JSON report
  return config
