"""DPM-OT on FFHQ 256×256 from an image folder (the paper's FFHQ setting; GPU/TPU).

python scripts/main.py --config=configs/ffhq_dpmot.py --config.data.root=/path/to/ffhq

A 256×256 UNet (ch 128, ch_mult (1, 1, 2, 2, 4, 4), attention at 16×16), switch step 19 with
20 reverse steps (the reference's M = 20 for FFHQ). Large folders: keep
--config.dpmot.target_split (a slice, e.g. "test[:5000]") and evaluation.num_samples within
the accelerator's memory.
"""
import ml_collections

from configs import celeba_dpmot


def get_config() -> ml_collections.ConfigDict:
  config = celeba_dpmot.get_config()
  config.data.resolution = 256
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.training.batch_size = 64
  config.evaluation.batch_size = 64
  config.evaluation.num_samples = 10_000
  return config
