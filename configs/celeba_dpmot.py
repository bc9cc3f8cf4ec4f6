"""DPM-OT on CelebA 64×64 from an image folder (the paper's CelebA setting; GPU/TPU).

python scripts/main.py --config=configs/celeba_dpmot.py --config.data.root=/path/to/celeba64

The folder holds the aligned face images (PNG/JPEG; a train/ and test/ split if present,
otherwise --config.dpmot.target_split=train with the novelty images taken from test/).
Images are resized and center-cropped to 64×64. The reference code restarts M = 20 levels
from the end on CelebA: switch step 19, 20 reverse steps.
"""
import ml_collections

from configs import cifar10_dpmot


def get_config() -> ml_collections.ConfigDict:
  config = cifar10_dpmot.get_config()
  config.data.name = "image_folder"
  config.data.root = ""  # required: the image folder
  config.data.resolution = 64
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.attn_resolutions = (16,)
  config.training.num_steps = 500_000
  config.dpmot.switch_index = 19
  config.evaluation.methods = ("ddpm", "ddim_20", "ddim_50", "dpm_solver_20", "dpmot_20", "pf_ode")
  return config
