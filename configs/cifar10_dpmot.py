"""DPM-OT at the paper's CIFAR-10 setting (GPU/TPU): the flagship configuration.

python scripts/main.py --config=configs/cifar10_dpmot.py \
    --config.data.root=/path/to/cifar10 \
    --config.evaluation.inception_weights=/path/to/pt_inception-2015-12-05-6726825d.pth \
    --config.training.init_from_diffusers=/path/to/ddpm-cifar10-32   # optional: no training

The DDPM CIFAR-10 UNet trained here (configs/cifar10_ddpm.py, 800k steps, resumable), the
N = 10,000 test images as targets (the reference code's choice; --config.dpmot.target_split=
train for N = 50,000), switch step 9 with 10 reverse steps (NFE 10), 50,000 samples for FID
against the training set with pytorch-fid's Inception weights.

With training.init_from_diffusers set to the folder of the published google/ddpm-cifar10-32
model (diffusion_pytorch_model.safetensors + config.json), that network is sampled exactly
as imported: no training step is taken (training.* is not used), the architecture comes from
its config.json (config.model is ignored), the schedule is config.diffusion (1000 linear β
from 1e-4 to 0.02, the model's own), and the model stage is fingerprinted by the weights
file's absolute path, size and mtime, so other weights never reuse these latents, potentials
or samples.

Before anything is trained the run reads the CIFAR-10 folder (train and test batches), the
Inception weights ("" searches $FID_INCEPTION_WEIGHTS, the torch hub cache and
~/.cache/ddpm_ot_jax/) and the diffusers weights if set; if any are missing it stops with
one message naming each missing input and where it looked.
"""
import ml_collections

from configs import cifar10_ddpm
from configs import digits_dpmot


def get_config() -> ml_collections.ConfigDict:
  config = cifar10_ddpm.network_config()
  config.experiment = "dpmot"
  config.dpmot = digits_dpmot.get_config().dpmot
  config.dpmot.target_split = "test"
  config.dpmot.ot.num_iterations = 50_000
  config.dpmot.ot.batch_size = 1024
  config.dpmot.ot.check_samples = 1_000_000
  config.dpmot.ot.block_size = 1024
  # χ² checks from 16384 source points: a 16384 × N float32 matrix (0.66 GB at N = 10⁴,
  # 3.3 GB at N = 5·10⁴) instead of the default 8N × N (3.2 GB / 80 GB); noise ≈ 4e-3.
  config.dpmot.ot.error_batch_size = 16384
  config.dpmot.switch_sweep = (9, 49, 99, 199)
  config.dpmot.sweep_ot_iterations = 20_000
  config.evaluation = digits_dpmot.get_config().evaluation
  config.evaluation.features = "inception"
  # "" searches $FID_INCEPTION_WEIGHTS, the torch hub cache and ~/.cache/ddpm_ot_jax/.
  config.evaluation.inception_weights = ""
  config.evaluation.num_samples = 50_000
  config.evaluation.batch_size = 500
  config.evaluation.floor_split = "test"  # FID of the 10k test images against training statistics
  config.evaluation.novelty_split = "train"  # real images that are not targets
  config.evaluation.max_novelty_images = 10_000
  return config
