"""The DDPM paper's CIFAR-10 model and training (Ho et al. 2020, Appendix B), for GPU/TPU.

python scripts/main.py --config=configs/cifar10_ddpm.py --config.data.root=/path/to/cifar10

35.7M-parameter UNet (ch 128, ch_mult (1, 2, 2, 2), 2 res blocks, attention at 16×16,
dropout 0.1), batch 128, Adam lr 2e-4 with 5000 warmup steps, gradient clipping at 1,
EMA 0.9999, random horizontal flips, 1000-step linear β from 1e-4 to 0.02, 800k steps.
The data root is the folder holding cifar-10-batches-py (default $CIFAR10_DIR, else
~/data/cifar10). To start from the published google/ddpm-cifar10-32 weights instead of
training from scratch: --config.training.init_from_diffusers=/path/to/ddpm-cifar10-32
(the folder holding diffusion_pytorch_model.safetensors and config.json).
Training resumes from <workdir>/checkpoints when run again with the same workdir.
"""
import os

import ml_collections

from ddpm_ot_jax import config_base


def network_config() -> ml_collections.ConfigDict:
  """The DDPM itself (data, model, diffusion, training): the part every experiment that
  trains this network shares; `get_config` adds train_ddpm's sampling and evaluation."""
  config = config_base.default_config()

  config.data = ml_collections.ConfigDict(dict(
      name="cifar10",
      root=os.environ.get("CIFAR10_DIR", "~/data/cifar10"),  # holds cifar-10-batches-py
      resolution=0,  # 0: the dataset's own size (32)
      flip=True,
  ))
  config.model = ml_collections.ConfigDict(dict(
      ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1,
      num_classes=0, resamp_with_conv=True,
      dtype="float32",  # 'bfloat16' computes in bf16 on accelerators (params stay float32)
  ))
  config.diffusion = ml_collections.ConfigDict(dict(
      num_steps=1000, beta_start=1e-4, beta_end=0.02,
  ))
  config.training = ml_collections.ConfigDict(dict(
      num_steps=800_000,
      batch_size=128,  # global batch, split across all devices
      num_devices=0,  # 0: all devices
      # Several hosts that jax detects itself (TPU pods, SLURM, Open MPI); elsewhere name the run
      # with the DDPM_OT_* environment variables instead (README, 'Several hosts').
      distributed=False,
      lr=2e-4,
      warmup_steps=5000,
      grad_clip=1.0,
      ema_decay=0.9999,
      ema_warmup=False,
      loss_type="discrete",  # 'discrete' (DDPM) or 'continuous' (VP-SDE time)
      log_every=100,
      checkpoint_every=5000,
      keep_checkpoints=3,
      sample_every=20_000,  # EMA sample grid to <workdir>/grids/ (0: never)
      grid_samples=64,
      grid_sampler_steps=50,
      init_from_diffusers="",  # diffusers UNet2DModel folder/file to start from
  ))
  return config


def get_config() -> ml_collections.ConfigDict:
  config = network_config()
  config.experiment = "train_ddpm"
  config.sampling = ml_collections.ConfigDict(dict(
      sampler="ddim",  # 'ddim', 'ddpm', 'dpm_solver' or 'pf_ode'
      num_steps=100,  # network evaluations for ddim / dpm_solver ('ddpm' always takes 1000)
      eta=0.0,  # DDIM's η
      order=3,  # dpm_solver: multistep order 1, 2 or 3
      variant="dpmsolver++",  # dpm_solver: 'dpmsolver++' (x_0-prediction) or 'dpmsolver' (ε)
      num_samples=1000,
      batch_size=500,
      grid_size=100,
  ))
  config.evaluate = ml_collections.ConfigDict(dict(
      classifier=False,  # the digits classifier does not apply; FID lives in the DPM-OT runs
      threshold=0.5,
      heldout_split="test",
      classifier_steps=1500,
  ))
  return config
