"""DPM-OT on CelebA 64×64 from an image folder (the paper's CelebA setting; GPU/TPU).

python scripts/main.py --config=configs/celeba_dpmot.py --config.data.root=/path/to/celeba64

The folder holds the aligned face images (PNG/JPEG; a train/ and test/ split if present,
otherwise set the splits to slices of train, e.g. --config.dpmot.target_split='train[:5000]'
--config.evaluation.reference_split='train[5000:10000]' --config.evaluation.floor_split=
'train[10000:15000]').
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
  config.dpmot.target_split = "test[:5000]"
  config.evaluation.reference_split = "test[5000:]"
  config.evaluation.methods = ("ddim_20", "dpm_solver_pp_3m_20", "unipc_20", "dpm_ot_20")
  return config
